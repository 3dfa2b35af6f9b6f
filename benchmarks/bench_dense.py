"""Dense generators: every workload of issue #4 with each backend and both plain-PyTorch composites, one run.

    python benchmarks/bench_dense.py [--threads 2] [--repeat 5]

Per-sample tau workloads (B, d, P): z (B, d, P) float32, one shared A (d x d) with ||A||_1 = 2, tau_b ~ U(0, 1).
  composite "action":     the Taylor action with plain PyTorch (one GEMM + scale + add per term; hkd.ops.dense.
                          taylor_action, the same m, s as the fused kernels)
  composite "per-sample": torch.linalg.matrix_exp(tau_b A) for every b, then bmm
  backends: dense_propagate(backend=...) (its cost model picks the algorithm) and the CPU kernels forced to each
  algorithm. Ratio = the better composite's time / the backend's time (> 1: faster).
expm workloads: torch.linalg.matrix_exp against hkd.ops.expm, forward, and forward + backward (autograd).
The Triton interpreter is not a timing vehicle: Triton and CUDA rows appear only on a GPU.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

from hkd.ops import _backend, dense, dense_propagate, expm

ACTION_WORKLOADS = [(256, 256, 1), (1024, 128, 1), (256, 64, 1), (256, 64, 64), (64, 32, 1024)]
EXPM_WORKLOADS = [(1024, 32), (256, 64)]


def timeit(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up."""
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_sample_expm(z, A, tau):
    return torch.bmm(torch.linalg.matrix_exp(tau[:, None, None] * A), z)


def row(name: str, seconds: float, baseline: float | None) -> str:
    ratio = f"{baseline / seconds:6.2f}x" if baseline else "      "
    return f"  {name:<34} {seconds * 1e3:10.2f} ms  {ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fast = [b for b in ("cpu", "cuda", "triton") if _backend.usable(b, device) and not _backend.triton_interpreted()]
    fast = fast or [b for b in ("cpu",) if _backend.usable(b, device)]
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# bench_dense: {device.type} ({name}), {args.threads} threads, torch {torch.__version__}, float32")
    torch.manual_seed(0)

    for B, d, P in ACTION_WORKLOADS:
        bench_action(B, d, P, device, fast, args.repeat)
    for count, n in EXPM_WORKLOADS:
        bench_expm(count, n, device, fast, args.repeat)


def bench_action(B: int, d: int, P: int, device, fast: list[str], repeat: int) -> None:
    A = torch.randn(d, d, device=device)
    A = A * (2.0 / torch.linalg.matrix_norm(A, ord=1))
    z = torch.randn(B, d, P, device=device)
    tau = torch.rand(B, device=device)
    norm = dense._action_norm(A, tau)
    m, s = dense.action_plan(norm, torch.float32)
    choice = dense.choose_algorithm(B, d, P, False, norm, torch.float32)
    print(f"\naction B={B} d={d} P={P} (Taylor m={m}, s={s}; cost model: {choice})")
    t_action = timeit(lambda: dense.taylor_action(z, A, tau), repeat)
    t_expm = timeit(lambda: per_sample_expm(z, A, tau), max(1, repeat // 2))
    best = min(t_action, t_expm)
    print(row("composite action (PyTorch)", t_action, best))
    print(row("composite per-sample expm (PyTorch)", t_expm, best))
    for b in fast:
        print(row(f"dense_propagate {b}", timeit(lambda b=b: dense_propagate([z], [A], tau, backend=b), repeat), best))
        print(row(f"  {b} action kernel", timeit(lambda b=b: dense._action(z, A, tau, b), repeat), best))
        t = timeit(lambda b=b: torch.bmm(dense._expm(tau[:, None, None] * A, b), z), max(1, repeat // 2))
        print(row(f"  {b} per-sample expm kernel", t, best))


def bench_expm(count: int, n: int, device, fast: list[str], repeat: int) -> None:
    A = torch.randn(count, n, n, device=device) / math.sqrt(n)
    print(f"\nexpm {count} x {n}x{n} (||A||_1 ~ {float(torch.linalg.matrix_norm(A, ord=1).mean()):.1f})")
    t_ref = timeit(lambda: torch.linalg.matrix_exp(A), repeat)
    print(row("torch.linalg.matrix_exp", t_ref, t_ref))
    for b in fast:
        print(row(f"hkd expm {b}", timeit(lambda b=b: expm(A, backend=b), repeat), t_ref))
    G = torch.randn_like(A)
    Ag = A.clone().requires_grad_()

    def fwd_bwd(f):
        Ag.grad = None
        f(Ag).backward(G)

    t_ref = timeit(lambda: fwd_bwd(torch.linalg.matrix_exp), repeat)
    print(row("forward+backward matrix_exp", t_ref, t_ref))
    for b in fast:
        print(
            row(f"forward+backward hkd {b}", timeit(lambda b=b: fwd_bwd(lambda X: expm(X, backend=b)), repeat), t_ref)
        )


if __name__ == "__main__":
    main()
