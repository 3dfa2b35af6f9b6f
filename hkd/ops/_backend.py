"""Which propagation backends exist on this machine, and the choice behind backend="auto"."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")


@functools.cache
def extension_loaded() -> bool:
    """True when the compiled extension hkd._C imports (it registers the torch.ops.hkd kernels)."""
    try:
        import hkd._C  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def cuda_compiled() -> bool:
    """True when hkd._C was built with its CUDA kernels."""
    if not extension_loaded():
        return False
    import hkd._C

    return bool(hkd._C.WITH_CUDA)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def usable(backend: str, device: torch.device) -> bool:
    """Whether `backend` can run on tensors of `device` here."""
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu" and extension_loaded()
    if backend == "cuda":
        return device.type == "cuda" and cuda_compiled()
    if backend == "triton":
        return triton_installed() and (device.type == "cuda" or (device.type == "cpu" and triton_interpreted()))
    raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")


@torch.compiler.assume_constant_result  # torch.compile: a constant of the graph, no tracing into the checks
def resolve(backend: str, device: torch.device, preference: tuple[str, ...] = ("cuda", "triton", "cpu")) -> str:
    """The backend to run: `backend` itself after checking it can run here, or for "auto" the first
    usable entry of `preference` (the fastest first), falling back to the reference. Every op front resolves
    its backend here."""
    if backend == "auto":
        # the Triton interpreter is a test vehicle, never an automatic choice on the CPU
        fast = [b for b in preference if usable(b, device) and (b != "triton" or device.type == "cuda")]
        return fast[0] if fast else "reference"
    if not usable(backend, device):
        raise RuntimeError(f"backend {backend!r} is not usable for {device.type} tensors here (see `hkd info`)")
    return backend
