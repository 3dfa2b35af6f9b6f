"""Training step time (Algorithm 1), two tables, each one side-by-side run (same model, batch and device):

    python benchmarks/bench_train_step.py [--preset digits|cifar] [--batch 64] [--device cpu|cuda] [--repeats 5]
    python benchmarks/bench_train_step.py --cost [--micro 16 4] [--preset ...] [--batch ...]

Default: the propagation through the fused ops vs the reference (eager PyTorch) ops: step times, the ratio, and the
Koopman share. The Koopman columns time the propagation alone (forward + backward of model.propagate on the step's
latents) and its share of the step; the step with model.koopman=false (identity) is the floor. The profile line gives
the self time of the hkd:: ops inside the fused step, from torch.profiler.

--cost: what a step costs, eager vs torch.compile (train.compile) and whole batch vs micro-batches (train.micro_batch,
gradient accumulation): step time, images/s (model inputs: 5 per trajectory), peak memory, and the FLOPs of a step
(torch.utils.flop_counter: convolutions and matrix products). Peak memory: on CUDA the allocator's peak during one
step; on the CPU the growth of the process's peak resident set over one step (VmHWM after resetting it, minus the
resident set before), each configuration in a fresh process.

One step = hkd.loop.train_step (the training loop's step) over B trajectories with s = 5 times each (4 intermediate
+ T), pseudo-Huber + MSE, backward, gradient clipping, Adam. Weights and generators are random (speed does not depend
on them; generators non-zero so nothing is skipped).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from hkd.loop import split_batch, train_step
from hkd.losses import Distance, trajectory_loss
from hkd.model import HKDModel, ModelConfig
from hkd.ops import _backend
from hkd.train import accumulation_rounds

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


def make_step(
    preset: str,
    batch: int,
    device: torch.device,
    backend: str,
    koopman: bool = True,
    compile: bool = False,
    micro_batch: int | None = None,
):
    """One training step (hkd.loop.train_step) of the preset's model on `batch` trajectories."""
    resolution, channels, sizes = PRESETS[preset]
    torch.manual_seed(0)
    config = ModelConfig(img_resolution=resolution, img_channels=channels, backend=backend, koopman=koopman, **sizes)
    model = HKDModel(config).to(device)
    with torch.no_grad():
        for p in model.propagator.parameters():
            p.normal_(0, 0.05)
    net = torch.compile(model, dynamic=False) if compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = functools.partial(trajectory_loss, distance=Distance("pseudo_huber"), lambda1=0.5, mode="uniform")
    grid = torch.tensor([80.0, 40.0, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5, 0.1, 0.002, 0.0], device=device)
    states = torch.randn(batch, len(grid), channels, resolution, resolution, device=device)
    times = grid.expand(batch, -1)
    u = torch.rand(batch, 4, dtype=torch.float64, device=device)
    micro_batches = split_batch((states, times, u), accumulation_rounds(batch, micro_batch, 1))

    def step():
        train_step(net, optimizer, micro_batches, loss_fn, grad_clip=1.0)

    step.model, step.micro_batches, step.loss_fn = model, micro_batches, loss_fn
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


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def peak_memory_mib(step, device: torch.device) -> float:
    """Memory one (warm) step needs beyond what is held before it: activations, gradients, workspaces."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with open("/proc/self/clear_refs", "w") as file:  # resets VmHWM, the peak resident set, to the current one
        file.write("5")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def cpu_peak_memory_in_a_fresh_process(args, compile: bool, micro_batch: int | None) -> float:
    """peak_memory_mib of one configuration in its own process, where nothing freed by the others is reused; big
    blocks are mapped and unmapped by malloc (fixed mmap threshold), so the resident set follows the live tensors."""
    command = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch), "--device", "cpu"]
    command += ["--threads", str(args.threads), "--memory-of", f"{int(compile)}:{micro_batch or 0}"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def step_flops(step) -> int:
    """FLOPs of one step: convolutions and matrix products (torch.utils.flop_counter), forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def cost(args, device: torch.device) -> None:
    """Eager vs compiled, whole batch vs micro-batches: step time, images/s, peak memory, in one run."""
    backend = next((b for b in ("cuda", "cpu") if _backend.usable(b, device)), "reference")
    modes = (False,) if args.no_compile else (False, True)
    configs = [(compile, micro) for micro in [None, *args.micro] for compile in modes]
    names = {
        c: f"{'compiled' if c[0] else 'eager'}, " + (f"micro-batch {c[1]}" if c[1] else "whole batch") for c in configs
    }
    steps = {
        names[c]: make_step(args.preset, args.batch, device, backend, compile=c[0], micro_batch=c[1]) for c in configs
    }
    results = timed(steps, device, args.repeats)
    if device.type == "cuda":
        memory = {names[c]: peak_memory_mib(steps[names[c]], device) for c in configs}
    else:
        memory = {names[c]: cpu_peak_memory_in_a_fresh_process(args, *c) for c in configs}
    flops = step_flops(steps[names[configs[0]]])
    base = results[names[configs[0]]]
    images = 5 * args.batch
    print(f"backend {backend}; one step = {args.batch} trajectories = {images} images; {flops / 1e9:.1f} GFLOP")
    print(f"{'':34s} {'step ms':>9s} {'images/s':>9s} {'vs eager':>9s} {'peak MiB':>9s} {'GFLOP/s':>8s}")
    for name, seconds in results.items():
        row = f"{name:34s} {1e3 * seconds:9.1f} {images / seconds:9.1f} {base / seconds:8.2f}x"
        print(f"{row} {memory[name]:9.1f} {flops / seconds / 1e9:8.1f}")
    from hkd.config import load

    cfg = load("cifar10")
    steps_total = cfg.train.epochs * (cfg.trajectories.num_trajectories // cfg.train.batch)
    best = min(results.values()) / args.batch  # seconds per trajectory; a step's cost is linear in its batch
    hours = steps_total * cfg.train.batch * best / 3600
    note = "" if args.preset == "cifar" else " (not the cifar preset: an illustration only)"
    print(
        f"the cifar10 config ({steps_total} steps of {cfg.train.batch} trajectories) at the fastest row's rate: "
        f"{hours:.0f} {device.type.upper()}-hours on this device{note}"
    )


def count_flops() -> None:
    """FLOPs of one trajectory's share of a step (5 images, U-Net forward + backward) per preset, counted on meta
    tensors (nothing is computed, so the CIFAR-size model is counted in seconds)."""
    from torch.utils.flop_counter import FlopCounterMode

    for preset, (resolution, channels, sizes) in PRESETS.items():
        with torch.device("meta"):
            model = HKDModel(ModelConfig(img_resolution=resolution, img_channels=channels, **sizes))
            x, t = torch.randn(5, channels, resolution, resolution), torch.rand(5) * 80 + 0.002
        with FlopCounterMode(display=False) as counter:
            model.net.decode(model.net.encode(x, t.log() / 4), t.log() / 4).sum().backward()
        print(f"{preset}: {counter.get_total_flops() / 1e9:.2f} GFLOP per trajectory (5 images, forward + backward)")


def memory_of(args, device: torch.device) -> None:
    """The child of cpu_peak_memory_in_a_fresh_process: prints the peak memory of one configuration."""
    compile, micro = (int(x) for x in args.memory_of.split(":"))
    backend = next((b for b in ("cuda", "cpu") if _backend.usable(b, device)), "reference")
    step = make_step(args.preset, args.batch, device, backend, compile=bool(compile), micro_batch=micro or None)
    step()
    step()  # warm: compiled, optimizer state allocated
    print(peak_memory_mib(step, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cost", action="store_true", help="eager vs compiled, micro-batches: images/s and memory")
    parser.add_argument("--micro", type=int, nargs="*", default=[16, 4], help="micro-batch sizes for --cost")
    parser.add_argument("--no-compile", action="store_true", help="--cost without the compiled rows")
    parser.add_argument("--count-flops", action="store_true", help="GFLOP per trajectory of each preset's step")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_of:
        return memory_of(args, device)
    if args.count_flops:
        return count_flops()
    if args.cost:
        return cost(args, device)
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
