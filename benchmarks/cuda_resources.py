"""Per-kernel GPU resources (registers, shared memory, stack, spills) of every csrc/cuda/*.cu, without a GPU.

* sm_70 (V100): CUDA 13 cannot target it, so NVRTC 12.9 (pip nvidia-cuda-nvrtc-cu12, loaded with ctypes) compiles
  the torch-free source to compute_70 PTX and ptxas 12.9 (pip nvidia-cuda-nvcc-cu12) assembles it with -v.
  NVRTC skips host code: a file's kernels must be instantiated outside its `#ifndef __CUDACC_RTC__` parts.
* sm_90 (H100): the installed CUDA 13 nvcc (CUDA_HOME, or /usr/local/cuda-13.0) compiles the file to a cubin.

    python benchmarks/cuda_resources.py            # a table for every csrc/cuda/*.cu and both architectures

tests/ops/test_cuda_sources.py runs the same functions (and skips, saying why, when a tool is missing).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def cuda_sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu"))


@dataclass
class Kernel:
    name: str
    arch: str
    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int


# --- finding the tools --------------------------------------------------------------------------------------------


def _nvidia_package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(f"nvidia.{name}")
    except ModuleNotFoundError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_nvrtc12() -> Path | None:
    package = _nvidia_package_dir("cuda_nvrtc")
    library = package / "lib" / "libnvrtc.so.12" if package else None
    return library if library and library.exists() else None


def find_ptxas12() -> Path | None:
    package = _nvidia_package_dir("cuda_nvcc")
    ptxas = package / "bin" / "ptxas" if package else None
    if not ptxas or not ptxas.exists():
        return None
    if not os.access(ptxas, os.X_OK):  # the wheel ships it without its run bit
        ptxas.chmod(ptxas.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return ptxas


def find_nvcc() -> Path | None:
    """The real nvcc of a CUDA toolkit able to target sm_90 (CUDA_HOME first)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda-13.0", "/usr/local/cuda"]
    for root in filter(None, candidates):
        nvcc = Path(root) / "bin" / "nvcc"
        if nvcc.exists():
            return nvcc
    return None


# --- compiling ----------------------------------------------------------------------------------------------------


class CompileError(RuntimeError):
    pass


def nvrtc_ptx(source: Path, arch: str = "compute_70", nvrtc: Path | None = None) -> str:
    """PTX of `source` from NVRTC (torch-free sources: csrc/ is on the include path)."""
    lib = ctypes.CDLL(str(nvrtc or find_nvrtc12()))
    program = ctypes.c_void_p()
    text = source.read_bytes()
    check = lambda code, what: code == 0 or _raise(f"{what} failed ({code})")
    check(
        lib.nvrtcCreateProgram(ctypes.byref(program), text, source.name.encode(), 0, None, None), "nvrtcCreateProgram"
    )
    options = [f"--gpu-architecture={arch}", f"-I{CSRC}", "--std=c++17", "-DNDEBUG", "-lineinfo"]
    argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    try:
        result = lib.nvrtcCompileProgram(program, len(options), argv)
        log_size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(log_size))
        log = ctypes.create_string_buffer(log_size.value)
        lib.nvrtcGetProgramLog(program, log)
        if result != 0:
            raise CompileError(f"NVRTC ({arch}) could not compile {source.name}:\n{log.value.decode(errors='replace')}")
        ptx_size = ctypes.c_size_t()
        lib.nvrtcGetPTXSize(program, ctypes.byref(ptx_size))
        ptx = ctypes.create_string_buffer(ptx_size.value)
        lib.nvrtcGetPTX(program, ptx)
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def _raise(message: str):
    raise CompileError(message)


def parse_ptxas(log: str, arch: str) -> list[Kernel]:
    """Kernels from `ptxas -v` output (also what nvcc -Xptxas -v prints)."""
    kernels, name, props = [], None, {}
    for line in log.splitlines():
        if m := re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line):
            if name and name != m.group(1) and "registers" in props:
                kernels.append(_kernel(name, arch, props))
                props = {}
            name = m.group(1)
        if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            props.update(stack=int(m.group(1)), stores=int(m.group(2)), loads=int(m.group(3)))
        if m := re.search(r"Used (\d+) registers", line):
            props["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            props["smem"] = int(smem.group(1)) if smem else 0
    if name and "registers" in props:
        kernels.append(_kernel(name, arch, props))
    return kernels


def _kernel(name: str, arch: str, props: dict) -> Kernel:
    return Kernel(_demangle(name), arch, props["registers"], props.get("smem", 0), props.get("stack", 0),
                  props.get("stores", 0), props.get("loads", 0))  # fmt: skip


def _demangle(name: str) -> str:
    """`void ns::kernel<ns::T, float>(args)` -> `kernel<T, float>` (the mangled name without c++filt)."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return name
    full = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name
    return re.sub(r"\b\w+::", "", re.sub(r"\([^()]*\)$", "", full.removeprefix("void ")))


def sm70_resources(source: Path) -> list[Kernel]:
    """NVRTC 12.9 -> compute_70 PTX -> ptxas 12.9 -v for sm_70."""
    ptx = nvrtc_ptx(source, "compute_70")
    if ".entry" not in ptx:
        raise CompileError(f"{source.name}: NVRTC produced no kernel; instantiate the kernel templates outside the "
                           "`#ifndef __CUDACC_RTC__` host code (explicit instantiations)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = Path(tmp) / f"{source.stem}.ptx"
        ptx_path.write_text(ptx)
        run = subprocess.run([str(find_ptxas12()), "-arch=sm_70", "-v", str(ptx_path), "-o", os.devnull],
                             capture_output=True, text=True)  # fmt: skip
    if run.returncode:
        raise CompileError(f"ptxas (sm_70) rejected {source.name}:\n{run.stderr}")
    return parse_ptxas(run.stderr + run.stdout, "sm_70")


def sm90_resources(source: Path, nvcc: Path | None = None) -> list[Kernel]:
    """nvcc (CUDA 13) -cubin for sm_90 with -Xptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [str(nvcc or find_nvcc()), "-arch=sm_90", "-cubin", "-std=c++17", "-O3", "-Xptxas", "-v",
                   f"-I{CSRC}", str(source), "-o", str(Path(tmp) / "out.cubin")]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        raise CompileError(f"nvcc (sm_90) could not compile {source.name}:\n{run.stderr}")
    return parse_ptxas(run.stderr + run.stdout, "sm_90")


def table(rows: list[tuple[str, Kernel]]) -> str:
    lines = [f"{'file':<14} {'arch':<6} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}  kernel"]
    for source, k in rows:
        spills = f"{k.spill_stores}/{k.spill_loads}"
        lines.append(f"{source:<14} {k.arch:<6} {k.registers:>4} {k.shared_bytes:>6} {k.stack_bytes:>5} "
                     f"{spills:>11}  {k.name}")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    rows, missing = [], []
    for source in cuda_sources():
        if find_nvrtc12() and find_ptxas12():
            rows += [(source.name, k) for k in sm70_resources(source)]
        else:
            missing.append("sm_70: pip install nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-nvcc-cu12==12.9.86")
        if find_nvcc():
            rows += [(source.name, k) for k in sm90_resources(source)]
        else:
            missing.append("sm_90: no CUDA toolkit (set CUDA_HOME)")
    print(table(rows))
    for line in sorted(set(missing)):
        print("skipped", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
