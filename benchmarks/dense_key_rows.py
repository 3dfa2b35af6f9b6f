"""Rerun the key rows of `hkd bench dense` for one matrix class, single-threaded, interleaved, with process CPU time.

    python benchmarks/dense_key_rows.py KIND B d TAU_MAX ROUNDS     # e.g. plain 256 256 2 5

Wall-clock minimum (median) and the minimum of time.process_time() (which leaves out the time the process waited for
a core on a shared machine), for the plain Taylor composite and dense_propagate, forward and forward + backward.
"""

import sys
import time

import torch

from hkd import bench
from hkd.ops import dense_propagate


def main(kind: str, B: int, d: int, tau_max: float, rounds: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    A = bench.dense_generator(kind, d).float()
    z, tau = torch.randn(B, d, 1), torch.rand(B) * tau_max
    leaves = [t.clone().requires_grad_() for t in (z, A, tau)]
    G = torch.randn_like(z)

    def fwd_bwd(f):
        for leaf in leaves:
            leaf.grad = None
        f(*leaves).backward(G)

    def auto(z, A, tau):
        return dense_propagate([z], [A], tau)[0]

    rows = {
        "composite Taylor": lambda: bench.taylor_composite(z, A, tau),
        "dense_propagate auto": lambda: auto(z, A, tau),
        "fwd+bwd composite Taylor": lambda: fwd_bwd(bench.taylor_composite),
        "fwd+bwd dense_propagate auto": lambda: fwd_bwd(auto),
    }
    for f in rows.values():
        f()
    wall: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(rounds):
        for name, f in rows.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            f()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    print(f"{kind} B={B} d={d} tau ~ U(0, {tau_max:g}), 1 thread, {rounds} rounds: wall min (median) | process CPU min")
    for name in rows:
        w = sorted(wall[name])
        print(f"  {name:30} {w[0] * 1e3:9.2f} ({w[len(w) // 2] * 1e3:9.2f}) ms | cpu {min(cpu[name]) * 1e3:9.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
