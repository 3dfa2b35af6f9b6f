"""Speed of hkd.ops.spectral_propagate on workload W (issue 3) against the copy floor and torch.compile, in one run.

W: B = 64, three levels of 256 channels at 32x32, 16x16, 8x8, per-position generators, per-sample tau (float32).

    python benchmarks/bench_spectral.py                   # W and B = 128 on this machine's device
    python benchmarks/bench_spectral.py --batch 64 --device cuda

Rows: the floor (a copy of the same bytes: `clone` allocates its output like the op does, `copy_` writes into a
preallocated buffer), the eager composite (hkd.ops.reference), torch.compile of that composite (the baseline), and
every usable backend; forward, and forward + backward (gradients for latents, alphas and betas; tau needs none).
Times are the minimum over --repeats runs, interleaved so that load on a shared machine hits all rows alike.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from hkd.ops import _backend, reference, spectral_propagate


def workload(batch: int, device: str, dtype=torch.float32):
    shapes = [(256, 32, 32), (256, 16, 16), (256, 8, 8)]
    latents = [torch.randn(batch, *s, device=device, dtype=dtype) for s in shapes]
    alphas = [torch.randn(d // 2, h, w, device=device) * 0.01 for d, h, w in shapes]
    betas = [torch.randn(d // 2, h, w, device=device) for d, h, w in shapes]
    tau = torch.rand(batch, device=device) * 80
    return latents, alphas, betas, tau


def timer(device: str):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(fn):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args()
    device = torch.device(args.device)
    backends = [
        b for b in ("cpu", "cuda", "triton") if _backend.usable(b, device) and not _backend.triton_interpreted()
    ]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} cpus"
    print(f"device {args.device} ({where}, {torch.get_num_threads()} threads), torch {torch.__version__}")
    compiled = None if args.no_compile else torch.compile(reference.spectral_propagate)
    run = timer(args.device)

    for batch in args.batch:
        bench(batch, args, backends, compiled, run)


def bench(batch, args, backends, compiled, run) -> None:
    latents, alphas, betas, tau = workload(batch, args.device)
    buffers = [torch.empty_like(z) for z in latents]
    grads = [torch.randn_like(z) for z in latents]
    leaves = [t.requires_grad_() for t in (*latents, *alphas, *betas)]

    def forward_backward(fn):
        def step():
            out = fn(latents, alphas, betas, tau)
            torch.autograd.backward(out, grads, inputs=leaves)

        return step

    def forward(fn):
        def step():
            with torch.no_grad():
                fn(latents, alphas, betas, tau)

        return step

    rows = {
        "copy_ (preallocated)": (lambda: [b.copy_(z) for b, z in zip(buffers, latents, strict=True)], None),
        "clone (floor)": (lambda: [z.detach().clone() for z in latents], None),
        "eager composite": (forward(reference.spectral_propagate), forward_backward(reference.spectral_propagate)),
    }
    if compiled is not None:
        rows["torch.compile (baseline)"] = (forward(compiled), forward_backward(compiled))
    for backend in backends:
        op = lambda z, a, b, t, backend=backend: spectral_propagate(z, a, b, t, backend=backend)
        rows[f"hkd {backend}"] = (forward(op), forward_backward(op))
    for fwd, bwd in rows.values():  # warm up (and compile)
        fwd()
        if bwd:
            bwd()
    times = {name: [float("inf"), float("inf")] for name in rows}
    for _ in range(args.repeats):
        for name, (fwd, bwd) in rows.items():
            times[name][0] = min(times[name][0], run(fwd))
            if bwd:
                times[name][1] = min(times[name][1], run(bwd))
    floor = times["clone (floor)"][0]
    base = times.get("torch.compile (baseline)", [float("nan")] * 2)
    gbytes = 2 * sum(z.numel() * z.element_size() for z in latents) / 1e9
    print(f"\nB = {batch}: {gbytes:.3f} GB read + written per forward; min of {args.repeats}")
    print(f"{'':26} {'fwd ms':>8} {'/floor':>7} {'/compile':>9}   {'fwd+bwd ms':>10} {'/compile':>9}")
    for name, (f, b) in times.items():
        fb = f"{b * 1e3:10.2f} {b / base[1]:9.2f}" if b < float("inf") else ""
        print(f"{name:26} {f * 1e3:8.2f} {f / floor:7.2f} {f / base[0]:9.2f}   {fb}")


if __name__ == "__main__":
    main()
