"""Do the emulated CUDA tests bite? Plant one fault at a time in a copy of csrc/, rebuild the emulated kernels and run
tests/ops/test_cuda_emulated.py against it; print a table of faults caught and missed.

    python benchmarks/planted_faults.py                 # every fault (about 20-30 minutes on 2 cores)
    python benchmarks/planted_faults.py --only sync f16 # the faults whose name contains "sync" or "f16"

Each worker (--jobs) has its own copy and build in a temporary folder (ninja rebuilds only the file a fault touches).
A fault in a kernel file runs the tests of that file's kernels (SELECTION), one in the host twins all of them. A
fault is caught when the tests fail (an assertion, an emulator error such as a barrier some threads never reach, a
guard zone written, a crash or the time limit). The unchanged sources run every test first and must pass.
"""

# ruff: noqa: E501  (one fault per line)
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = "tests/ops/test_cuda_emulated.py"


@dataclass
class Fault:
    name: str
    file: str  # relative to csrc/
    old: str
    new: str
    occurrence: int | None = None  # which occurrence of `old` (None: it must be unique)


def _function_at(text: str, index: int) -> str:
    names = re.findall(r"__(?:global|device)__[^(]*?\b(\w+)\(", text[:index])
    return names[-1] if names else "?"


def syncthreads_faults() -> list[Fault]:
    """Every __syncthreads() in csrc/cuda/*.cu deleted in turn, and __syncthreads_or(x) replaced by x."""
    faults = []
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        text = path.read_text()
        for i, m in enumerate(re.finditer(r"__syncthreads\(\);", text)):
            line = text.count("\n", 0, m.start()) + 1
            name = f"sync: delete __syncthreads {path.name}:{line} ({_function_at(text, m.start())})"
            faults.append(Fault(name, f"cuda/{path.name}", "__syncthreads();", ";", i))
        for m in re.finditer(r"__syncthreads_or\((\w+)\)", text):
            line = text.count("\n", 0, m.start()) + 1
            name = f"sync: __syncthreads_or(x) -> x {path.name}:{line} ({_function_at(text, m.start())})"
            faults.append(Fault(name, f"cuda/{path.name}", m.group(0), m.group(1)))
    return faults


FAULTS = [
    # bounds and launch geometry
    Fault("bound: forward element test e >= n -> e > n", "cuda/spectral.cu", "if (e >= n) break;", "if (e > n) break;"),
    Fault("bound: backward lanes q < plane -> q <= plane", "cuda/spectral.cu", "active = q < plane;", "active = q <= plane;"),
    Fault("bound: backward slice b < b1 -> b < b1 - 1", "cuda/spectral.cu", "b < b1; ++b", "b < b1 - 1; ++b"),
    Fault("bound: blocks per level rounded down", "spectral.h", "(n + per_block - 1) / per_block", "n / per_block"),
    Fault("bound: batch slice size rounded down", "cuda/spectral.cu", "(args.batch + gridDim.y - 1) / gridDim.y",
          "args.batch / gridDim.y"),
    Fault("bound: matmul k < n -> k < n - 1", "cuda/dense.cu", "for (int k = 0; k < n; ++k)",
          "for (int k = 0; k < n - 1; ++k)"),
    Fault("bound: expm threads rounded down to 32", "cuda/dense.cu", "((n * n + 31) / 32) * 32", "(n * n / 32) * 32"),
    Fault("bound: action row tile b < B -> b <= B (load)", "cuda/dense.cu", "if (b < B) value =", "if (b <= B) value ="),
    Fault("bound: action column store pos < P -> pos < P - 1", "cuda/dense.cu", "if (pos < P) out[", "if (pos < P - 1) out["),
    Fault("bound: action substeps step < max_steps - 1", "cuda/dense.cu", "step < max_steps;", "step < max_steps - 1;"),
    Fault("bound: action Taylor terms k <= degree -> k < degree", "cuda/dense.cu", "k <= degree;", "k < degree;"),
    Fault("bound: plan column sums j < n -> j < n - 1", "cuda/dense.cu", "for (int j = 0; j < n; ++j) norm",
          "for (int j = 0; j < n - 1; ++j) norm"),
    # indices
    Fault("index: second channel of a pair x_at + P -> x_at + 1 (forward)", "cuda/spectral.cu",
          "out[x_at + P] = to_storage<scalar_t>(ye);", "out[x_at + 1] = to_storage<scalar_t>(ye);"),
    Fault("index: per-position parameter q -> k", "cuda/spectral.cu", "L.per_position ? q : k", "L.per_position ? k : k"),
    Fault("index: tau stride ignored (backward)", "cuda/spectral.cu", "const acc_t t = tau[b * args.tau_stride];",
          "const acc_t t = tau[b];"),
    Fault("index: frechet transpose dropped", "cuda/dense.cu", "A[base + (e % n) * n + e / n]", "A[base + e]"),
    # warp shuffles
    Fault("shuffle: offsets from 8 (half the warp)", "cuda/spectral.cu", "int offset = 16;", "int offset = 8;"),
    Fault("shuffle: offset + 1", "cuda/spectral.cu", "__shfl_down_sync(0xffffffffu, v, offset)",
          "__shfl_down_sync(0xffffffffu, v, offset + 1)"),
    Fault("shuffle: mask without lane 31", "cuda/spectral.cu", "__shfl_down_sync(0xffffffffu,", "__shfl_down_sync(0x7fffffffu,"),
    Fault("shuffle: warp sum read by lane 1", "cuda/spectral.cu", "threadIdx.x % 32 == 0", "threadIdx.x % 32 == 1"),
    # the multi-level table
    Fault("level: block >= first_block -> block > first_block", "cuda/spectral.cu",
          "block >= args.first_block[l + 1]", "block > args.first_block[l + 1]"),
    Fault("level: the last level never looked up", "cuda/spectral.cu", "while (l + 1 < args.levels", "while (l + 2 < args.levels"),
    Fault("level: block offset within the level dropped (forward)", "cuda/spectral.cu",
          "(blockIdx.x - args.first_block[l]) * (long long)", "(blockIdx.x) * (long long)"),
    # shared memory sizes
    Fault("smem: expm reserves 6 + 1 matrices", "cuda/dense.cu", "size_t(6 + 2) * a.n * a.n", "size_t(6 + 1) * a.n * a.n"),
    Fault("smem: frechet reserves 2 * 6 + 3 matrices", "cuda/dense.cu", "size_t(2 * 6 + 4) * a.n * a.n", "size_t(2 * 6 + 3) * a.n * a.n"),
    Fault("smem: action state tiles 3 -> 2", "cuda/dense.cu", "3 * size_t(d) * tile + tile", "2 * size_t(d) * tile + tile"),
    Fault("smem: action without the substep counts", "cuda/dense.cu", "+\n                       tile * sizeof(int);", ";"),
    Fault("smem: no cudaFuncSetAttribute for the on-chip expm kernels", "cuda/dense.cu",
          "err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));",
          "err = cudaSuccess;"),
    # 16-bit rounding
    Fault("f16: round half up (host twin of cvt.rn)", "cuda/emulate/emulate.h", "const unsigned rounded = a + 0xfffu + ((a >> 13) & 1u);",
          "const unsigned rounded = a + 0x1000u;"),
    Fault("f16: truncate (host twin of cvt.rn)", "cuda/emulate/emulate.h", "const unsigned rounded = a + 0xfffu + ((a >> 13) & 1u);",
          "const unsigned rounded = a;"),
    Fault("f16: subnormal ties up", "cuda/emulate/emulate.h", "(rest == half && (q & 1u))", "(rest == half)"),
    Fault("bf16: round half up (kernel)", "cuda/spectral.cu", "(u + 0x7fffu + ((u >> 16) & 1u)) >> 16", "(u + 0x8000u) >> 16"),
    Fault("bf16: NaN not kept quiet (kernel)", "cuda/spectral.cu", "((u >> 16) | 0x40u)", "(u >> 16)"),
]  # fmt: skip


def plant(csrc: Path, fault: Fault) -> None:
    path = csrc / fault.file
    text = path.read_text()
    count = text.count(fault.old)
    if fault.occurrence is None:
        if count != 1:
            raise SystemExit(f"planted_faults: {fault.name}: {fault.old!r} occurs {count} times in {fault.file}")
        path.write_text(text.replace(fault.old, fault.new))
        return
    starts = [m.start() for m in re.finditer(re.escape(fault.old), text)]
    at = starts[fault.occurrence]
    path.write_text(text[:at] + fault.new + text[at + len(fault.old) :])


# The tests that exercise a file's code (the 16-bit host twins: all of them).
SELECTION = {
    "cuda/spectral.cu": "spectral or 16bit",
    "spectral.h": "spectral or 16bit",
    "cuda/dense.cu": "expm or frechet or action",
}


def run_tests(csrc: Path, build: Path, timeout: float, select: str = "") -> tuple[bool, str, float]:
    """(passed, the first failure's line, seconds)."""
    env = dict(os.environ, HKD_EMULATE_CSRC=str(csrc), HKD_EMULATE_BUILD=str(build), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "pytest", TESTS, "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore"]
    command += ["-k", select] if select else []
    start = time.time()
    try:
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s", time.time() - start
    seconds = time.time() - start
    if run.returncode == 0:
        return True, "", seconds
    lines = (run.stdout + run.stderr).splitlines()
    if run.returncode < 0:
        return False, f"crashed (signal {-run.returncode})", seconds
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    detail = [line.strip() for line in lines if line.strip().startswith("E ")]
    first = failed[0].split(" - ")[0].replace("FAILED ", "").split("::")[-1] if failed else ""
    return False, (first + (": " + detail[0][2:].strip()[:110] if detail else "")).strip(), seconds


def worker(faults: list[Fault], folder: Path, timeout: float, results: dict, baseline: bool) -> None:
    """Plant `faults` one after another in this worker's copy of csrc/ (its own build folder)."""
    pristine, csrc, build = folder / "pristine", folder / "csrc", folder / "build"
    shutil.copytree(ROOT / "csrc", pristine)
    shutil.copytree(pristine, csrc)
    passed, detail, seconds = run_tests(csrc, build, timeout, "" if baseline else "16bit_to_float")  # (the build)
    if not passed:
        raise SystemExit(f"planted_faults: the unchanged sources fail: {detail}")
    if baseline:
        print(f"unchanged sources: pass, every test ({seconds:.0f} s)", flush=True)
    for fault in faults:
        plant(csrc, fault)
        passed, detail, seconds = run_tests(csrc, build, timeout, SELECTION.get(fault.file, ""))
        shutil.copy2(pristine / fault.file, csrc / fault.file)  # undo (and a newer time stamp for ninja)
        (csrc / fault.file).touch()
        results[fault.name] = ("MISSED" if passed else "caught", detail)
        print(f"{results[fault.name][0]:<7} {fault.name}  [{detail}] ({seconds:.0f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=[""], help="run the faults whose name contains one of these")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per fault's test run")
    parser.add_argument("--jobs", type=int, default=2, help="faults tested at once (each with its own build)")
    args = parser.parse_args()
    faults = [f for f in syncthreads_faults() + FAULTS if any(text in f.name for text in args.only)]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="hkd-faults-") as tmp:
        jobs = max(1, min(args.jobs, len(faults)))
        threads = [
            threading.Thread(target=worker, args=(faults[j::jobs], Path(tmp) / str(j), args.timeout, results, j == 0))
            for j in range(jobs)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    rows = [(f, *results[f.name]) for f in faults if f.name in results]
    caught = sum(r[1] == "caught" for r in rows)
    print("\n| fault | tests run | result | first failing test: message |\n|---|---|---|---|")
    for fault, result, detail in rows:
        select = SELECTION.get(fault.file, "all")
        print(f"| {fault.name} | {select} | {result} | {detail.replace('|', '/')} |")
    print(f"\n{caught} of {len(faults)} planted faults caught ({len(faults) - len(rows)} not run)")
    return 0 if caught == len(faults) else 1


if __name__ == "__main__":
    sys.exit(main())
