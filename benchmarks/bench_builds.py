"""Two builds of hkd._C side by side, interleaved: the cpu backend's rows of `hkd bench spectral` and `hkd bench dense`
(the same workloads: hkd/bench.py) and the fused training step of benchmarks/bench_train_step.py, for two package
folders (each holding an `hkd` package with its own hkd._C), so that a change to the extension (such as the move to
the stable ABI) is timed against its predecessor in one window of a shared machine.

    python benchmarks/bench_builds.py OLD_FOLDER NEW_FOLDER [--rounds 3]

Each round runs one fresh process per folder (old first, then new, alternating), each on one thread taking the min
of its repeats in process CPU time (the op rows; the training step is wall time, as bench_train_step.py measures it);
the table gives the median over rounds of each and the ratio new / old (< 1: the new build is faster). The training
step runs FOLDER/benchmarks/bench_train_step.py where a folder has one (an older tree's script follows its API),
else this tree's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside a fresh process with hkd imported from the folder given: prints {row: seconds} as JSON.
PROBE = r"""
import json, sys, time
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]  # editable hook
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)  # one thread, timed in process CPU time: immune to a shared machine's load
import hkd, hkd._C
from hkd import bench
from hkd.ops import dense, dense_propagate, expm, spectral_propagate

assert hkd._C.__file__.startswith(sys.argv[1]), hkd._C.__file__
torch.manual_seed(0)
rows = {}
latents, alphas, betas, tau = bench.spectral_workload(64, "cpu")
grads = [torch.randn_like(z) for z in latents]
leaves = [t.requires_grad_() for t in (*latents, *alphas, *betas)]
def spectral_fwd():
    with torch.no_grad():
        spectral_propagate(latents, alphas, betas, tau, backend="cpu")
rows["spectral W B=64 fwd"] = spectral_fwd
rows["spectral W B=64 fwd+bwd"] = lambda: torch.autograd.backward(
    spectral_propagate(latents, alphas, betas, tau, backend="cpu"), grads, inputs=leaves)
DENSE = ((256, 64, 1, "gaussian 15", 80.0), (32, 32, 64, "hkd-like", 80.0), (256, 64, 1, "skew-symmetric", 1.0))
for B, d, P, kind, tau_max in DENSE:
    A = bench.dense_generator(kind, d).float()
    z, t = torch.randn(B, d, P), torch.rand(B) * tau_max
    leaves_d = [x.clone().requires_grad_() for x in (z, A, t)]
    G = torch.randn_like(z)
    name = f"dense B={B} d={d} P={P} {kind} tau<{tau_max:g}"
    rows[name + " fwd"] = lambda z=z, A=A, t=t: dense_propagate([z], [A], t, backend="cpu")
    def fb(leaves_d=leaves_d, G=G):
        for x in leaves_d:
            x.grad = None
        torch.autograd.backward(dense_propagate([leaves_d[0]], [leaves_d[1]], leaves_d[2], backend="cpu")[0], G)
    rows[name + " fwd+bwd"] = fb
X = torch.randn(1024, 32, 32) / 32 ** 0.5
Xg = X.clone().requires_grad_()
GX = torch.randn_like(X)
rows["expm 1024 x 32x32 fwd"] = lambda: expm(X, backend="cpu")
def expm_fb():
    Xg.grad = None
    expm(Xg, backend="cpu").backward(GX)
rows["expm 1024 x 32x32 fwd+bwd"] = expm_fb
t = bench.measure(rows, int(sys.argv[2]), torch.device("cpu"), time.process_time)
print(json.dumps(t))
"""

TRAIN_STEP = r"""
import json, subprocess, sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
sys.path.insert(0, sys.argv[1])
import runpy
sys.argv = [sys.argv[2], "--repeats", sys.argv[3], "--threads", "1"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def probe(folder: str, repeats: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, folder, str(repeats)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_step(folder: str, repeats: int) -> dict[str, float]:
    own = Path(folder) / "benchmarks" / "bench_train_step.py"  # the script of the folder's own tree: it follows its API
    script = str(own if own.is_file() else ROOT / "benchmarks" / "bench_train_step.py")
    out = subprocess.run(
        [sys.executable, "-c", TRAIN_STEP, folder, script, str(repeats)], capture_output=True, text=True, check=True
    )
    rows = {}
    for line in out.stdout.splitlines():  # the row of the fused (cpu) step: step ms, ratio, Koopman fwd+bwd ms, share
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "cpu":
            rows["train step digits (cpu ops)"] = float(parts[1]) / 1e3
            rows["  its propagation fwd+bwd"] = float(parts[3]) / 1e3
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-step", action="store_true", help="also time benchmarks/bench_train_step.py")
    args = parser.parse_args()
    runs: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for which in order:
            folder = str(Path(getattr(args, which)).resolve())
            t = probe(folder, args.repeats)
            if args.train_step:
                t |= train_step(folder, args.repeats)
            for name, seconds in t.items():
                runs[which].setdefault(name, []).append(seconds)
            print(f"round {r + 1} {which}: {json.dumps(t)}", file=sys.stderr, flush=True)
    print(f"median over {args.rounds} interleaved rounds (each the min of {args.repeats}), ms")
    print(f"{'':46} {'old':>9} {'new':>9} {'new/old':>8}")
    for name in runs["old"]:
        old, new = statistics.median(runs["old"][name]), statistics.median(runs["new"][name])
        print(f"{name:46} {old * 1e3:9.2f} {new * 1e3:9.2f} {new / old:8.3f}")


if __name__ == "__main__":
    main()
