"""Where the time of one small dense_propagate call goes: the plan, the action kernel, the backward op, the whole call
forward and forward + backward, next to the plain Taylor composite (1 thread, minimum process CPU time of 30 calls).

    python benchmarks/dense_pieces.py [KIND B d]     # default: gaussian 2 256 64 (P = 1, tau ~ U(0, 1))
"""

import sys
import time

import torch

from hkd import bench
from hkd.ops import dense, dense_propagate


def cpu_ms(f, calls: int = 30) -> float:
    f()
    best = float("inf")
    for _ in range(calls):
        start = time.process_time()
        f()
        best = min(best, time.process_time() - start)
    return best * 1e3


def main(kind: str = "gaussian 2", B: int = 256, d: int = 64) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    A = bench.dense_generator(kind, d).float()
    z, tau = torch.randn(B, d, 1), torch.rand(B)
    plan = dense.dense_action_plan(A, tau, 1)
    leaves = [t.clone().requires_grad_() for t in (z, A, tau)]
    G = torch.randn_like(z)

    def fwd_bwd(f):
        for leaf in leaves:
            leaf.grad = None
        torch.autograd.backward(f(*leaves), G)

    rows = {
        "plan (dense_action_plan)": lambda: dense.dense_action_plan(A, tau, 1),
        "action kernel": lambda: torch.ops.hkd.dense_action(z, A, tau, plan),
        "action backward op": lambda: torch.ops.hkd.dense_action_backward(G, z, A, tau, plan),
    }
    if hasattr(torch.ops.hkd, "dense_action_record"):  # (builds before the recording forward have neither row)
        _, record, terms = torch.ops.hkd.dense_action_record(z, A, tau, plan)
        rows["action kernel, recording"] = lambda: torch.ops.hkd.dense_action_record(z, A, tau, plan)
        args = (G, z, A, tau, plan, record, terms)
        rows["backward op from the record"] = lambda: torch.ops.hkd.dense_action_backward(*args)
    rows |= {
        "dense_propagate": lambda: dense_propagate([z], [A], tau, backend="cpu"),
        "composite Taylor": lambda: bench.taylor_composite(z, A, tau),
        "fwd+bwd dense_propagate": lambda: fwd_bwd(lambda z, A, t: dense_propagate([z], [A], t, backend="cpu")[0]),
        "fwd+bwd composite Taylor": lambda: fwd_bwd(bench.taylor_composite),
    }
    print(f"{kind}, z ({B}, {d}, 1), tau ~ U(0, 1), plan {plan.tolist()}: minimum process CPU ms of 30 calls")
    for name, f in rows.items():
        print(f"  {name:28} {cpu_ms(f):8.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:2], *map(int, sys.argv[2:4]))
