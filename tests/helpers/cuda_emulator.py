"""The CUDA kernels of csrc/cuda/*.cu built for the host emulation (csrc/cuda/emulate) and loaded as torch.ops.hkd_emu.

Built from the source tree by torch's cpp_extension with ninja into build/cuda-emulate (once; ninja rebuilds what an
edited .cu, .h or emulation file touches). Only the host C++ compiler is needed. HKD_EMULATE_CSRC=path builds the
sources of another csrc/ folder (benchmarks/planted_faults.py points it at a copy with one fault planted)."""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCHEDULES = {"in_order": (0, 0), "reversed": (1, 0), "shuffled_1": (2, 1), "shuffled_2": (2, 2)}
H100_SMS, H100_SHARED = 132, 232448
V100_SHARED = 98304


def csrc() -> Path:
    return Path(os.environ.get("HKD_EMULATE_CSRC", ROOT / "csrc")).resolve()


def unavailable() -> str | None:
    """Why the emulated module cannot be built here (None: it can). Finds pip's ninja when its folder is not on PATH
    (a virtual environment's python run without activating it)."""
    if not (shutil.which("c++") or shutil.which("g++")):
        return "no host C++ compiler"
    if not shutil.which("ninja"):
        for folder in (Path(sys.executable).parent, Path(sys.prefix) / "bin"):
            if (folder / "ninja").exists():
                os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
                break
        else:
            return "ninja missing (pip install ninja)"
    return None


@functools.cache
def ops():
    """torch.ops.hkd_emu, built (or rebuilt after an edit) and loaded once per process."""
    from torch.utils.cpp_extension import load

    source = csrc()
    build = Path(os.environ.get("HKD_EMULATE_BUILD", ROOT / "build" / "cuda-emulate"))
    build.mkdir(parents=True, exist_ok=True)
    emulate = source / "cuda" / "emulate"
    load(
        name="hkd_cuda_emulated",
        sources=[str(emulate / f) for f in ("runtime.cpp", "spectral.cpp", "dense.cpp", "ops.cpp")],
        extra_include_paths=[str(source)],
        extra_cflags=["-O2", "-g0", "-fno-extern-tls-init"],  # (the shared arrays: thread_local, constant-initialised)
        build_directory=str(build),
        is_python_module=False,
        verbose=bool(os.environ.get("HKD_EMULATE_VERBOSE")),
    )
    return torch.ops.hkd_emu


def configure(schedule: str = "in_order", sms: int = H100_SMS, shared: int = H100_SHARED) -> None:
    kind, seed = SCHEDULES[schedule]
    ops().configure(kind, seed, sms, shared)
