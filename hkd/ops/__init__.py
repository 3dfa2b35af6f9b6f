"""Koopman propagation ops: one Python front per op (validation, backend choice, autograd, fake kernels).

Backends: "reference" (plain PyTorch, the definition), "cpu" (C++), "cuda" (CUDA), "triton", and "auto".
"""

from hkd.ops import reference
from hkd.ops._backend import BACKENDS
from hkd.ops.dense import dense_propagate, expm
from hkd.ops.spectral import spectral_propagate

__all__ = ["BACKENDS", "dense_propagate", "expm", "reference", "spectral_propagate"]
