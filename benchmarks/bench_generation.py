"""Generation throughput: HKD one step vs the teacher's EDM Heun sampler (18 steps = 35 evaluations), same backbone,
same batch, same device, one run. Prints images/s side by side and the ratio.

    python benchmarks/bench_generation.py [--preset digits|cifar] [--batch 64] [--device cpu|cuda] [--repeats 3]

On a shared CPU, `OMP_WAIT_POLICY=passive ... --threads 1`: spinning OpenMP threads of busy cores inflate times.

The weights are random (the speed does not depend on them): the teacher is EDMPrecond(UNet) as hkd.teacher builds
it, HKD is HKDModel.from_teacher(teacher) with random generators. "HKD one step" is model.generate (encoder, the
cached fixed step propagator.at(tau(T, eps)), decoder); the propagation layer alone is timed too.

Under each HKD row, the same one-step map exported by `hkd export` (hkd.export: exp(tau A) folded into constants, a
dynamic batch, float32): the torch.export program loaded back (torch.export.load(...).module(), on --device) and the
ONNX file in ONNX Runtime (CPU execution provider, as many intra-op threads as torch uses, no spinning), each as
images/s and as a ratio to eager model.generate, with the largest relative difference of its images from eager's.
--no-export skips them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hkd.model import HKDModel, ModelConfig
from hkd.unet import UNet

PRESETS = {  # (resolution, channels, U-Net sizes)
    "digits": (16, 1, dict(model_channels=16, channel_mult=(1, 2, 2), num_blocks=1)),  # hkd/configs/digits.yaml
    "cifar": (32, 3, dict(model_channels=64, channel_mult=(1, 2, 2), num_blocks=2)),
}


def timed(fn, device, repeats, warmup=True):
    """Median seconds per call. On the CPU, process CPU seconds (all threads): steadier than wall time when other
    jobs share the cores; on a GPU, wall time with synchronisation."""
    if warmup:
        fn()
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return statistics.median(times)


def teacher_sampler(denoiser):
    """hkd.teacher's Heun sampler when it is there; otherwise 35 plain evaluations of the same denoiser."""
    try:
        from hkd.edm import heun_sampler

        return "Heun sampler, 18 steps (35 evaluations)", lambda noise: heun_sampler(denoiser, noise, num_steps=18)
    except ImportError:
        sigmas = torch.linspace(80, 0.002, 35)
        return "35 denoiser evaluations (hkd.teacher not available)", lambda noise: [denoiser(noise, s) for s in sigmas]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="auto", help="propagation backend")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--no-export", action="store_true", help="skip the exported program and ONNX Runtime rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    resolution, channels, sizes = PRESETS[args.preset]

    from hkd.edm import EDMPrecond

    net = UNet(resolution, channels, channels, **sizes)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    teacher = EDMPrecond(net).to(device).eval()
    noise = torch.randn(args.batch, channels, resolution, resolution, device=device)
    name, sample = teacher_sampler(teacher)
    t_eval = timed(lambda: teacher(noise * 80, 80.0), device, args.repeats)  # also the teacher's warm-up
    t_teacher = timed(lambda: sample(noise), device, args.repeats, warmup=False)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    hw += ", wall seconds" if device.type == "cuda" else ", CPU seconds of this process (images/s = per CPU second)"
    print(f"preset {args.preset} ({resolution}x{resolution}x{channels}, {sizes}), batch {args.batch}, {hw}")
    print(f"{'method':58s} {'s/batch':>9s} {'images/s':>10s} {'vs teacher':>10s}")
    print(f"{'teacher: ' + name:58s} {t_teacher:9.4f} {args.batch / t_teacher:10.1f} {1.0:9.1f}x")
    print(f"{'teacher: one evaluation (reference point)':58s} {t_eval:9.4f} {args.batch / t_eval:10.1f} "
          f"{t_teacher / t_eval:9.1f}x")  # fmt: skip
    for generator, per_position in [("spectral", True), ("dense", False), ("dense", True)]:
        config = ModelConfig(
            img_resolution=resolution, img_channels=channels, generator=generator, per_position=per_position,
            backend=args.backend, **sizes,
        )  # fmt: skip
        model = HKDModel.from_teacher(teacher, config).eval()
        bench_hkd(model, noise, t_teacher, device, args.repeats, exported=not args.no_export)


def bench_hkd(model, noise, t_teacher, device, repeats, exported=True) -> None:
    for p in model.propagator.parameters():
        p.data.normal_(0, 1e-3)
    batch, config = noise.shape[0], model.config
    t_hkd = timed(lambda: model.generate(noise), device, repeats)
    label = f"HKD one step ({config.generator}, {'per position' if config.per_position else 'shared'})"
    print(f"{label:58s} {t_hkd:9.4f} {batch / t_hkd:10.1f} {t_teacher / t_hkd:9.1f}x")
    latents = model.encode(80 * noise, 80.0)
    tau = model.tau(80.0, model.eps)
    fixed = model.propagator.at(tau.float())
    t_layer = timed(lambda: model.propagator(latents, tau), device, repeats)
    t_fixed = timed(lambda: fixed(latents), device, repeats)
    print(f"{'  layer alone: forward(latents, tau) / at(tau) apply':58s} {t_layer:9.5f} / {t_fixed:.5f}")
    if exported:
        bench_exported(model, noise, t_hkd, t_teacher, device, repeats)


def bench_exported(model, noise, t_eager, t_teacher, device, repeats) -> None:
    """The .pt2 program and the .onnx file of `hkd export`, next to eager model.generate (t_eager s/batch)."""
    import onnxruntime

    from hkd.export import export

    eager = model.generate(noise).cpu()
    with tempfile.TemporaryDirectory() as folder:
        program = torch.export.load(export(model, Path(folder) / "model.pt2", "pt2", dynamic_batch=True))
        program = program.module().to(device)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = export(model, Path(folder) / "model.onnx", "onnx", dynamic_batch=True)
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    noise_np = noise.cpu().numpy()
    rows = [
        (f"exported program (.pt2, torch.export.load, {device.type})", lambda: program(noise)),
        ("ONNX Runtime (.onnx, CPU)", lambda: torch.from_numpy(session.run(["images"], {"noise": noise_np})[0])),
    ]
    batch = noise.shape[0]
    for label, run in rows:
        t = timed(run, device, repeats)
        difference = float((run().cpu() - eager).abs().max() / eager.abs().max())
        print(f"{'  ' + label:58s} {t:9.4f} {batch / t:10.1f} {t_teacher / t:9.1f}x  {t_eager / t:.2f}x eager "
              f"(max rel diff {difference:.0e})")  # fmt: skip


if __name__ == "__main__":
    main()
