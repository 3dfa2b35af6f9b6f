"""dense_propagate before and after a change, side by side in one run: the "plain" workload of hkd bench dense.

    python benchmarks/dense_before_after.py --before DIR [--rounds 5]

DIR holds an older build of the package as an importable `hkd` folder (its Python files, hkd/kernels and the built
_C*.so). Each round runs one child process per build, alternating, and each child times every row once after a
warm-up; the table keeps the minimum over rounds (and the spread: the median). z (256, 256, 1), A = randn(256, 256)
/ 16 (||A||_1 ~ 14.6, spectral radius ~ 1), tau_b ~ U(0, 2), float32; errors against float64 per-sample expm.
Rows "tiny z": the same with z * 1e-30, whose late Taylor terms are subnormal floats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, math, sys, time
if sys.argv[1] != "-":
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, sys.argv[1])
import torch
from hkd.ops import dense_propagate
torch.manual_seed(0)
B, d = 256, 256
z = torch.randn(B, d, 1)
A = torch.randn(d, d) / 16
tau = torch.rand(B) * 2
exact = torch.linalg.matrix_exp(tau.double()[:, None, None] * A.double()) @ z.double()
leaves = [t.clone().requires_grad_() for t in (z, A, tau)]
G = torch.randn_like(z)

def fwd_bwd(backend):
    for leaf in leaves:
        leaf.grad = None
    dense_propagate([leaves[0]], [leaves[1]], leaves[2], backend=backend)[0].backward(G)

rows = {
    "dense_propagate auto": lambda: dense_propagate([z], [A], tau)[0],
    "dense_propagate auto, tiny z": lambda: dense_propagate([z * 1e-30], [A], tau)[0] * 1e30,
    "fwd+bwd dense_propagate auto": lambda: fwd_bwd("auto"),
}
if "--reference" in sys.argv:
    rows["dense_propagate reference"] = lambda: dense_propagate([z], [A], tau, backend="reference")[0]
result = {}
for name, f in rows.items():
    y = f()
    start = time.perf_counter()
    f()
    seconds = time.perf_counter() - start
    err = float((y.double() - exact).norm() / exact.norm()) if isinstance(y, torch.Tensor) else math.nan
    result[name] = [seconds, err]
print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="folder holding the older build as an importable hkd package")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reference", action="store_true", help="also time the reference backend")
    args = parser.parse_args()
    builds = {"before": os.path.abspath(args.before), "after": "-"}
    times: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for build, where in builds.items():
            cmd = [sys.executable, "-c", CHILD, where] + (["--reference"] if args.reference else [])
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            for name, (seconds, err) in result.items():
                times.setdefault((name, build), []).append(seconds)
                errors[(name, build)] = err
    print(f"# dense before/after: min (median) of {args.rounds} alternating rounds, ms; relative error vs float64")
    print(f"{'':34} {'before':>22} {'after':>22} {'before/after':>13}")
    for name in dict.fromkeys(name for name, _ in times):
        cells, best = [], {}
        for build in builds:
            ts = sorted(times[(name, build)])
            best[build] = ts[0]
            cells.append(f"{ts[0] * 1e3:8.2f} ({ts[len(ts) // 2] * 1e3:8.2f}) {errors[(name, build)]:.1e}")
        print(f"{name:34} {cells[0]:>22} {cells[1]:>22} {best['before'] / best['after']:12.1f}x")


if __name__ == "__main__":
    main()
