"""A teacher run on a busy machine: `hkd train-teacher` for a few steps, alone and beside processes that keep cores
busy, under each OpenMP wait policy, interleaved so that every variant sees the same machine.

    python benchmarks/bench_busy.py [--steps 150] [--repeats 3] [--busy 1] [--variants auto,spin,passive]
                                     [--threads 0] [--config digits]

Each run is a fresh process (the OpenMP wait policy is read once, when torch loads its OpenMP runtime):

* auto: `hkd`'s entry point as users run it: before torch loads, hkd watches the CPUs for 0.1 s and asks for the
  passive policy only if other processes keep a core busy (hkd/openmp.py);
* spin: `import torch` before hkd, so libgomp keeps its default policy (threads spin for a while at every barrier
  before they sleep);
* passive: OMP_WAIT_POLICY=PASSIVE in the environment (threads sleep at once);
* spin1, passive1, auto1: the same with teacher.threads=1.

Printed per run: wall seconds, CPU seconds (user + system of the run's process), and the 1-minute load average
before the run (from /proc/loadavg). CPU seconds are the robust number on a shared machine: work done is the same in
every variant, so CPU time above the passive run's is time spent spinning. The busy processes are
`python -c "while True: pass"`, unpinned, started half a second before the run (the load is there when it starts).
Runs use teacher.sample_grid=0 (training only) and a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = """
import sys
if {spin}:
    import torch  # libgomp loads here, before hkd can set a wait policy
from hkd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run(variant: str, steps: int, threads: int, config: str, out: Path) -> tuple[float, float, float]:
    """(wall s, CPU s, load average before) of one `hkd train-teacher` run in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    threads = 1 if variant.endswith("1") else threads
    argv = ["train-teacher", "--config", config, "--out", str(out), "--device", "cpu", f"teacher.steps={steps}",
            "teacher.sample_grid=0", f"teacher.checkpoint_every={steps}", f"teacher.log_every={steps}"]  # fmt: skip
    if threads:
        argv.append(f"teacher.threads={threads}")
    if variant.startswith("passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    code = RUN.format(spin=variant.startswith("spin"))
    load = loadavg()
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{variant}: hkd train-teacher failed")
    return wall, usage.ru_utime + usage.ru_stime, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=1, help="busy processes beside the 'busy' runs")
    parser.add_argument("--variants", default="auto,spin,passive")
    parser.add_argument("--threads", type=int, default=0, help="teacher.threads (0: hkd's default)")
    parser.add_argument("--config", default="digits")
    args = parser.parse_args()
    variants = args.variants.split(",")
    results: dict[tuple[str, str], list] = {}
    print(f"{os.cpu_count()} CPUs; {args.steps} steps; wall s / CPU s / load average before the run")
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for condition in ("alone", "busy"):
                for variant in variants:
                    busy = []
                    if condition == "busy":
                        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
                        time.sleep(0.5)
                    try:
                        out = Path(tmp) / f"{variant}-{condition}-{repeat}"
                        wall, cpu, load = run(variant, args.steps, args.threads, args.config, out)
                    finally:
                        for process in busy:
                            process.kill()
                            process.wait()
                    results.setdefault((variant, condition), []).append((wall, cpu, load))
                    print(f"repeat {repeat} {condition:5s} {variant:9s} {wall:7.1f} s wall {cpu:7.1f} s CPU "
                          f"load {load:5.2f}", flush=True)  # fmt: skip
    print("\nmedians: variant, condition, wall s, CPU s, load averages seen")
    for (variant, condition), rows in results.items():
        walls, cpus, loads = zip(*rows, strict=True)
        print(f"{variant:9s} {condition:5s} {statistics.median(walls):7.1f} {statistics.median(cpus):7.1f}   "
              f"load {min(loads):.1f}-{max(loads):.1f}")  # fmt: skip
    for variant in variants:
        alone, busy = (statistics.median(r[0] for r in results[(variant, c)]) for c in ("alone", "busy"))
        print(f"{variant}: busy / alone wall = {busy / alone:.2f}")


if __name__ == "__main__":
    main()
