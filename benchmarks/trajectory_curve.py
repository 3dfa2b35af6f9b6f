"""One HKD setup's learning curve on the digits: one-step quality and the Koopman trajectory at milestones.

    python benchmarks/trajectory_curve.py --demo runs/demo --out runs/x/NAME --epochs 90 [KEY=VALUE ...]

Trains (or resumes) one run with `hkd demo`'s settings (the teacher and trajectories of the demo folder --demo),
stopping at a sixth, a third, a half, two thirds and all of its steps, and measures its EMA model there
(hkd.experiments.learning_curve): fd_digits and teacher fidelity on 500 noises (seed 0), and the latent consistency
r_A / r_0 and the decoded-trajectory error on 64 held-out teacher trajectories (seed 1). Writes OUT/curve/curve.md,
.json and .png. Deterministic: the same command gives the same numbers, and a stopped run resumes where it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hkd import demo, experiments
from hkd.errors import UserError
from hkd.files import output_folder
from hkd.teacher import load_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a demo folder with teacher/ and trajectories/")
    parser.add_argument("--out", required=True, help="the run's folder")
    parser.add_argument("--epochs", type=int, default=30, help="30: the demo's budget; 90: --quality's")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lambda3=1.0")
    args = parser.parse_args()
    source, out = Path(args.demo), Path(args.out)
    config = demo.settings(source, quick=False, overrides=[f"train.epochs={args.epochs}", *args.overrides])
    config = config.override([f"train.out={out}", "train.progress=false"])
    output_folder(out, "--out")  # a file in the way or a read-only place: refused before the teacher's samples
    teacher = load_teacher(source / "teacher" / "teacher.pt")
    _, rows = experiments.learning_curve(config, **experiments.curve_inputs(config, teacher))
    for path in experiments.curve_table({out.name: rows}, out / "curve"):
        print(path)


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # a wrong folder or override: one line, as hkd reports it
        sys.exit(f"trajectory_curve: {error}")
