"""The cells where dense_propagate takes one exp(tau_b A) per sample: its time and error next to the per-sample
matrix_exp composite (the better composite there), single-threaded, interleaved, process CPU time.

    python benchmarks/dense_expm_rows.py B d P TAU_MAX ROUNDS [taylor]     # e.g. 32 32 64 80 5 taylor

For each matrix class of `hkd bench dense`: the cost model's choice, the minimum process CPU time of the composite
and of dense_propagate, forward and forward + backward (gradients for z, A and tau), their ratios, and the relative
errors against float64 (per-sample expm of the float64 generator, as `hkd bench dense`); with `taylor`, also the
error of the plain-PyTorch Taylor loop (one untimed call: at tau_max = 80 it takes seconds).
"""

import sys
import time

import torch

from hkd import bench
from hkd.ops import dense, dense_propagate, reference


def ours(z, A, tau):
    return dense_propagate([z], [A], tau, backend="cpu")[0]


def one_class(kind: str, B: int, d: int, P: int, tau_max: float, rounds: int, taylor: bool) -> str:
    A64 = bench.dense_generator(kind, d)
    A, z, tau = A64.float(), torch.randn(B, d, P), torch.rand(B) * tau_max
    leaves = [t.clone().requires_grad_() for t in (z, A, tau)]
    G = torch.randn_like(z)
    choice = {1.0: "action", 0.0: "expm", -1.0: "expm64"}[float(dense.dense_action_plan(A, tau, P)[2])]

    def fwd_bwd(f):
        for leaf in leaves:
            leaf.grad = None
        torch.autograd.backward(f(*leaves), G)

    rows = {
        "expm": lambda: bench.per_sample_expm(z, A, tau),
        "ours": lambda: ours(z, A, tau),
        "expm fb": lambda: fwd_bwd(bench.per_sample_expm),
        "ours fb": lambda: fwd_bwd(ours),
    }
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(rounds):
        for name, f in rows.items():
            start = time.process_time()
            f()
            best[name] = min(best[name], time.process_time() - start)
    exact = torch.bmm(reference.expm(tau.double()[:, None, None] * A64), z.double())
    outputs = [rows["expm"], rows["ours"]] + ([lambda: bench.taylor_composite(z, A, tau)] if taylor else [])
    err = " ".join(f"{float((f().double() - exact).norm() / exact.norm()):9.1e}" for f in outputs)
    ms = {k: v * 1e3 for k, v in best.items()}
    return (f"  {kind:16} {choice:>7} {ms['expm']:9.2f} {ms['ours']:9.2f} {ms['expm'] / ms['ours']:5.2f}x"
            f" {ms['expm fb']:9.2f} {ms['ours fb']:9.2f} {ms['expm fb'] / ms['ours fb']:5.2f}x {err}")  # fmt: skip


def main(B: int, d: int, P: int, tau_max: float, rounds: int, taylor: bool = False) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"(B, d, P) = ({B}, {d}, {P}), tau ~ U(0, {tau_max:g}); min process CPU ms of {rounds} interleaved rounds")
    print(f"  {'class':16} {'choice':>7} {'expm fwd':>9} {'ours fwd':>9} {'ratio':>6} {'expm f+b':>9} {'ours f+b':>9}"
          f" {'ratio':>6} {'err expm':>9} {'err ours':>9}" + (f" {'err Taylor':>9}" if taylor else ""))  # fmt: skip
    for kind in bench.MATRIX_CLASSES:
        print(one_class(kind, B, d, P, tau_max, rounds, taylor), flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:4]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6:] == ["taylor"])
