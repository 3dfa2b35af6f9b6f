"""Training step time (Algorithm 1): the propagation through the fused ops vs the reference (eager PyTorch) ops,
same model, same batch, same device, one run. Prints step times side by side, the ratio, and the Koopman share.

    python benchmarks/bench_train_step.py [--preset digits|cifar] [--batch 64] [--device cpu|cuda] [--repeats 5]

One step = hkd.train.trajectory_loss on B trajectories with s = 5 times each (4 intermediate + T, one forward over
B * s inputs), pseudo-Huber + MSE, backward, gradient clipping, Adam. Weights and generators are random (speed does
not depend on them; generators non-zero so nothing is skipped). The Koopman columns time the propagation alone
(forward + backward of model.propagate on the step's latents) and its share of the step; the step with
model.koopman=false (identity) is the floor. The profile line gives the self time of the hkd:: ops inside the fused
step, from torch.profiler.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hkd.losses import Distance
from hkd.model import HKDModel, ModelConfig
from hkd.ops import _backend
from hkd.train import trajectory_loss

PRESETS = {  # (resolution, channels, U-Net sizes)
    "digits": (16, 1, dict(model_channels=16, channel_mult=(1, 2, 2), num_blocks=1)),  # hkd/configs/digits.yaml
    "cifar": (32, 3, dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4)),  # hkd/configs/cifar10.yaml
}


def make_propagation(preset: str, batch: int, device: torch.device, backend: str):
    """The Koopman part of a step alone: propagate forward + backward on the step's latents (B * 5 inputs)."""
    resolution, channels, sizes = PRESETS[preset]
    torch.manual_seed(0)
    model = HKDModel(ModelConfig(img_resolution=resolution, img_channels=channels, backend=backend, **sizes))
    model = model.to(device)
    with torch.no_grad():
        for p in model.propagator.parameters():
            p.normal_(0, 0.05)
        shapes = model.net.latent_shapes
    latents = [torch.randn(5 * batch, *shape, device=device, requires_grad=True) for shape in shapes]
    t = torch.rand(5 * batch, device=device) * 80 + 0.002

    def step():
        out = model.propagate(latents, t, model.eps)
        torch.autograd.backward(out, [torch.ones_like(z) for z in out])

    return step


def make_step(preset: str, batch: int, device: torch.device, backend: str, koopman: bool = True):
    resolution, channels, sizes = PRESETS[preset]
    torch.manual_seed(0)
    config = ModelConfig(img_resolution=resolution, img_channels=channels, backend=backend, koopman=koopman, **sizes)
    model = HKDModel(config).to(device)
    with torch.no_grad():
        for p in model.propagator.parameters():
            p.normal_(0, 0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    distance = Distance("pseudo_huber")
    grid = torch.tensor([80.0, 40.0, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5, 0.1, 0.002, 0.0], device=device)
    states = torch.randn(batch, len(grid), channels, resolution, resolution, device=device)
    times = grid.expand(batch, -1)
    u = torch.rand(batch, 4, dtype=torch.float64, device=device)

    def step():
        loss = trajectory_loss(model, states, times, u, distance, 0.5, "uniform")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def timed(steps: dict, device, repeats) -> dict[str, float]:
    """Median seconds per step of each entry, measured round-robin (a load change hits every entry alike)."""
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def hkd_op_share(step, device) -> tuple[float, str]:
    """Share of the hkd:: ops' self time in one profiled step, and their names."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    ours = [e for e in events if e.key.startswith("hkd::")]
    return sum(getattr(e, attr) for e in ours) / max(total, 1e-9), ", ".join(sorted({e.key for e in ours})) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fused = [b for b in ("cpu", "cuda", "triton") if _backend.usable(b, device)]
    fused = [b for b in fused if not (b == "triton" and device.type == "cpu")]  # the interpreter is no speed path
    resolution, channels, sizes = PRESETS[args.preset]
    print(f"{args.preset}: {resolution}x{resolution}x{channels}, U-Net {sizes}, {args.batch} trajectories x 5 times, "
          f"{device}{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}")  # fmt: skip
    steps = {"identity (model.koopman=false)": make_step(args.preset, args.batch, device, "reference", False)}
    steps |= {f"{b}": make_step(args.preset, args.batch, device, b) for b in ["reference", *fused]}
    steps |= {
        f"{b} (propagation alone)": make_propagation(args.preset, args.batch, device, b) for b in ["reference", *fused]
    }
    results = timed(steps, device, args.repeats)
    base = results["reference"]
    print(f"{'propagation':32s} {'step ms':>9s} {'vs reference':>13s} {'Koopman fwd+bwd ms':>19s} {'share':>7s}")
    for name, seconds in results.items():
        if name.endswith("(propagation alone)"):
            continue
        koopman = results.get(f"{name} (propagation alone)")
        extra = "" if koopman is None else f"{1e3 * koopman:19.2f} {100 * koopman / seconds:6.1f}%"
        print(f"{name:32s} {1e3 * seconds:9.1f} {base / seconds:12.2f}x {extra}")
    for b in fused:
        share, names = hkd_op_share(steps[b], device)
        print(f"profile ({b}): hkd:: ops are {100 * share:.1f}% of the step's self time ({names})")


if __name__ == "__main__":
    main()
