"""The stable-ABI promise, checked: one abi3 wheel, built once, installs and passes the op tests on torch versions other
than the one it was built with, in fresh virtual environments with no compiler on PATH.

    python benchmarks/wheel_promise.py --torch 2.10.0 [--torch 2.15.0 ...] [--wheel dist/hkd-...whl]
        [--constraint FILE] [--pip REQUIREMENT ...] [-- PYTEST ARGS]

Without --wheel it builds one first (`pip wheel . --no-deps --no-build-isolation`, with the torch of this environment;
HKD_CUDA=off unless the environment says otherwise). Each torch version gets a fresh venv under --work, torch (and the
torchvision of that release, where one is known: else the wheel's other dependencies only, as the op tests do not import
torchvision) from pip, then the wheel with its dependencies, then pytest on tests/ops (or --tests) from
outside the source tree, so that `import hkd` is the installed wheel. PATH holds only the venv's bin folder, and CC/CXX
point to /bin/false: nothing can compile (so the torch.compile tests are left out: Inductor compiles C++ itself).
--pip adds requirements to every venv (e.g. "numpy<2.4": the Triton 3.6 that torch 2.10 pins runs its interpreter,
which the Triton tests use on a CPU, only with numpy < 2.4). --constraint sets PIP_CONSTRAINT for the venvs' pip (a
machine-wide constraint file that caps torch: /dev/null lifts it for these venvs alone). Large downloads:
PIP_FIND_LINKS may name folders of wheels fetched beforehand (`pip download`).
Takes minutes and gigabytes (torch and its CUDA libraries) per version: a benchmark script, not a test CI runs.
Prints one line per version; exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHVISION = {"2.10": "0.25", "2.11": "0.26", "2.12": "0.27", "2.13": "0.28", "2.14": "0.29"}  # torch -> torchvision


def run(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> str:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def build_wheel(out: Path) -> Path:
    env = dict(os.environ, HKD_CUDA=os.environ.get("HKD_CUDA", "off"))
    run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(out)], env)
    (wheel,) = out.glob("hkd-*.whl")
    return wheel


def requirements(wheel: Path, leave_out: str) -> list[str]:
    """The wheel's Requires-Dist lines (no extras), without the one named leave_out."""
    with zipfile.ZipFile(wheel) as z:
        (metadata,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        lines = z.read(metadata).decode().splitlines()
    reqs = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r and not r.startswith(leave_out)]


def check(version: str, wheel: Path, work: Path, tests: list[str], pytest_args: list[str], args) -> str:
    venv = work / f"venv-torch-{version}"
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=str(venv / "bin"), CC="/bin/false", CXX="/bin/false", CUDA_HOME="/nonexistent")
    if args.constraint is not None:
        env["PIP_CONSTRAINT"] = args.constraint
    compilers = run(
        [python, "-c", "import shutil; print([c for c in ('cc', 'gcc', 'c++', 'g++', 'nvcc') if shutil.which(c)])"], env
    )
    assert compilers.strip() == "[]", f"compilers on PATH: {compilers}"
    vision = TORCHVISION.get(".".join(version.split(".")[:2]))
    run(
        [python, "-m", "pip", "install", "-q", f"torch=={version}"] + ([f"torchvision=={vision}.*"] if vision else []),
        env,
    )
    if vision:
        run([python, "-m", "pip", "install", "-q", str(wheel), "pytest>=8", "scipy>=1.10", *args.pip], env)
    else:  # no torchvision release for this torch: the wheel without it (hkd imports it only for data and LPIPS)
        print(f"torch {version}: no torchvision known for it; installing the wheel without torchvision", flush=True)
        run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], env)
        run(
            [
                python,
                "-m",
                "pip",
                "install",
                "-q",
                *requirements(wheel, "torchvision"),
                "pytest>=8",
                "scipy>=1.10",
                *args.pip,
            ],
            env,
        )
    info = run([python, "-m", "hkd.cli", "info"], env, cwd=work)
    where = run([python, "-c", "import hkd, hkd._C, torch; print(hkd._C.__file__, torch.__version__)"], env, cwd=work)
    assert str(venv) in where, f"hkd._C is not the installed wheel's: {where}"
    start = time.time()
    result = run(
        [
            str(venv / "bin" / "pytest"),
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(work),
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "not compiles_fullgraph",  # torch.compile's Inductor compiles C++ itself
            *pytest_args,
            *(str(ROOT / t) for t in tests),
        ],
        env,
        cwd=work,
    )
    summary = result.strip().splitlines()[-1]
    return f"torch {where.split()[-1]}: {info.strip().splitlines()[-2]} | {summary} ({time.time() - start:.0f} s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch", action="append", required=True, help="a torch version to install (repeatable)")
    parser.add_argument("--wheel", type=Path, help="the wheel to check (default: build one)")
    parser.add_argument("--work", type=Path, help="where the venvs go (default: a temporary folder)")
    parser.add_argument(
        "--tests", nargs="+", default=["tests/ops"], help="test paths in the checkout (default tests/ops)"
    )
    parser.add_argument("--constraint", help="PIP_CONSTRAINT for the venvs' pip (/dev/null: no constraint)")
    parser.add_argument("--pip", nargs="+", default=[], help="more requirements for every venv (e.g. 'numpy<2.4')")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hkd-wheel-"))
    work.mkdir(parents=True, exist_ok=True)
    wheel = args.wheel.resolve() if args.wheel else build_wheel(work / "dist")
    print(f"wheel: {wheel.name}", flush=True)
    failed = 0
    for version in args.torch:
        try:
            print(check(version, wheel, work, args.tests, args.pytest_args, args), flush=True)
        except (RuntimeError, AssertionError) as error:
            failed += 1
            print(f"torch {version}: FAILED: {error}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
