"""Every csrc/cuda/*.cu compiles for sm_70 (NVRTC + ptxas 12.9) and sm_90 (CUDA 13 nvcc) without a GPU.

The per-kernel resources (registers, shared memory, stack, spills) print with `pytest -s` and are recorded by
`python benchmarks/cuda_resources.py` in benchmarks/RESULTS.md.
"""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "cuda_resources", Path(__file__).resolve().parents[2] / "benchmarks" / "cuda_resources.py"
)
cuda_resources = sys.modules["cuda_resources"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_resources)

SOURCES = cuda_resources.cuda_sources()
# sources whose kernels must not spill, and whose 32/16-bit kernels stay within the registers that keep full
# occupancy at 256 threads (float64 kernels are for tests)
STRICT = {"spectral.cu": 64}


def _check(source, kernels):
    print("\n" + cuda_resources.table([(source.name, k) for k in kernels]))
    assert kernels, f"no kernel resources reported for {source.name}"
    if source.name in STRICT:
        for k in kernels:
            assert k.spill_stores == 0 and k.spill_loads == 0, f"{k.name} spills on {k.arch}"
            if "double" not in k.name:
                assert k.registers <= STRICT[source.name], f"{k.name} uses {k.registers} registers on {k.arch}"


@pytest.mark.skipif(not SOURCES, reason="no csrc/cuda/*.cu")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_sm70_nvrtc_ptxas(source):
    if not cuda_resources.find_nvrtc12():
        pytest.skip("libnvrtc.so.12 missing: pip install nvidia-cuda-nvrtc-cu12==12.9.86")
    if not cuda_resources.find_ptxas12():
        pytest.skip("ptxas 12.9 missing: pip install nvidia-cuda-nvcc-cu12==12.9.86")
    _check(source, cuda_resources.sm70_resources(source))


@pytest.mark.skipif(not SOURCES, reason="no csrc/cuda/*.cu")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_sm90_nvcc(source):
    if not cuda_resources.find_nvcc():
        pytest.skip("no CUDA toolkit with nvcc (set CUDA_HOME)")
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no host C++ compiler (nvcc needs one)")
    _check(source, cuda_resources.sm90_resources(source))


def test_parse_ptxas_output():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_70'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 33 registers, 1024 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_70'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 7 registers, 352 bytes cmem[0]
"""
    foo, bar = cuda_resources.parse_ptxas(log, "sm_70")
    assert (foo.registers, foo.shared_bytes, foo.stack_bytes, foo.spill_stores, foo.spill_loads) == (33, 1024, 8, 4, 12)
    assert (bar.registers, bar.shared_bytes, bar.spill_loads) == (7, 0, 0)
    if shutil.which("c++filt"):  # the names are demangled with binutils' c++filt, and left mangled without it
        assert foo.name.startswith("foo") and bar.name.startswith("bar")
    else:
        assert (foo.name, bar.name) == ("_Z3fooPf", "_Z3barv")
