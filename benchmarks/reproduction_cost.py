"""GPU-hours of the CIFAR-10 reproduction from EDM's checkpoint, stage by stage: an estimate from counted FLOPs.

    python benchmarks/reproduction_cost.py

FLOPs are counted with torch.utils.flop_counter on meta tensors (convolutions and matrix products; nothing is
computed): EDM's DDPM++ at 32x32 (the cifar10 config's U-Net: 128 x (2, 2, 2), 4 blocks, attention at 16x16, stem
128 as in EDM's SongUNet), Inception-v3 at 299x299 (torchvision's layout, the same convolutions as torch-fidelity's
FID network) and VGG16's features at 224x224 (LPIPS). The counts of each stage come from hkd/configs/cifar10.yaml.
The rates are assumptions, not measurements: a sustained 30% of the GPU's peak, fp32 for the teacher's sampler and
Inception (the code runs them in float32; TF32 on the H200), bf16/fp16 for training.
"""

from __future__ import annotations

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from hkd.config import load
from hkd.unet import UNet

UTILISATION = 0.3
PEAK = {  # TFLOP/s, dense: (fp32 as the code runs it, bf16/fp16 tensor cores)
    "V100": (15.7, 125.0),
    "H200": (494.0, 989.0),  # fp32 convolutions run as TF32 (cuDNN's default)
}


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    cfg = load("cifar10")
    teacher, trajectories, train = cfg.teacher, cfg.trajectories, cfg.train
    with torch.device("meta"):
        unet = UNet(32, 3, 3, model_channels=teacher.model_channels, channel_mult=tuple(teacher.channel_mult),
                    num_blocks=teacher.num_blocks, attn_resolutions=tuple(teacher.attn_resolutions),
                    stem_channels=teacher.model_channels)  # fmt: skip
        x, sigma = torch.randn(1, 3, 32, 32), torch.ones(1)
        inception = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
        vgg = torchvision.models.vgg16(weights=None).features
        images_299, images_224 = torch.randn(1, 3, 299, 299), torch.randn(1, 3, 224, 224, requires_grad=True)
    with torch.no_grad():
        unet_forward = flops(lambda: unet(x, sigma))
        inception_forward = flops(lambda: inception(images_299))
    vgg_forward = flops(lambda: vgg(images_224.detach()))
    print(f"per image: DDPM++ forward {unet_forward / 1e9:.2f} GFLOP, Inception-v3 {inception_forward / 1e9:.2f}, "
          f"VGG16 features {vgg_forward / 1e9:.2f}")  # fmt: skip

    per_solve = 2 * trajectories.num_steps - 1  # Heun: 35 evaluations at 18 steps
    times = train.time_samples + 1  # images per trajectory in a step
    steps = train.epochs * (trajectories.num_trajectories // train.batch)
    trained = steps * train.batch  # trajectories through the step
    lpips = 3 * vgg_forward  # per image: forward on x_hat and x_eps, backward through x_hat (frozen weights: ~1)
    fid_images = 50_000
    stages = [  # name, FLOP, precision index
        ("trajectories (teacher, Heun)", trajectories.num_trajectories * per_solve * unet_forward, 0),
        ("HKD training, U-Net", trained * times * 3 * unet_forward, 1),
        ("HKD training, LPIPS-VGG", trained * times * lpips, 1),
        ("FID reference (hkd fid-ref)", fid_images * inception_forward, 0),
        ("eval: teacher Heun + Euler 3 + HKD", fid_images * (per_solve + 3 + 1) * unet_forward, 0),
        ("eval: Inception on 3 x 50k samples", 3 * fid_images * inception_forward, 0),
    ]
    print(f"\n{steps} steps of {train.batch} trajectories x {times} images; "
          f"{trajectories.num_trajectories} trajectories of {per_solve} evaluations; FID on {fid_images} samples; "
          f"{UTILISATION:.0%} of peak assumed")  # fmt: skip
    print(f"\n| stage | PFLOP | {' | '.join(f'{gpu} GPU-h' for gpu in PEAK)} |")
    print(f"|---|---:|{'---:|' * len(PEAK)}")
    totals = dict.fromkeys(PEAK, 0.0)
    for name, total, precision in stages:
        hours = {gpu: total / (UTILISATION * peak[precision] * 1e12) / 3600 for gpu, peak in PEAK.items()}
        for gpu in PEAK:
            totals[gpu] += hours[gpu]
        print(f"| {name} | {total / 1e15:.0f} | {' | '.join(f'{hours[gpu]:.1f}' for gpu in PEAK)} |")
    print(f"| total | | {' | '.join(f'{totals[gpu]:.0f}' for gpu in PEAK)} |")


if __name__ == "__main__":
    main()
