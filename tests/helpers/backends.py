"""The propagation backends the op tests run on this machine: the host ones (reference, the C++ CPU kernels, Triton
under its interpreter), each skipped with its reason when it is not usable here, and whether CUDA is."""

import pytest
import torch

from hkd.ops import _backend

CPU = torch.device("cpu")
CUDA_OK = torch.cuda.is_available() and _backend.cuda_compiled()
HOST_BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not _backend.usable("cpu", CPU), reason="hkd._C not built")),
    pytest.param(
        "triton",
        marks=[
            pytest.mark.triton,
            pytest.mark.skipif(not _backend.usable("triton", CPU), reason="triton not installed or not interpreted"),
        ],
    ),
]
