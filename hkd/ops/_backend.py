"""Which propagation backends exist on this machine, and the choice behind backend="auto"."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
REBUILD = (
    "reinstall hkd for this torch: `pip install --force-reinstall --no-deps hkd`, or from a source tree "
    "`pip install --no-build-isolation --force-reinstall --no-deps .`"
)


class ExtensionLoadWarning(UserWarning):
    """hkd._C is installed but does not load: only the (slow) reference backend runs."""


def build_info() -> dict:
    """What hkd._C was built against, as recorded next to it at build time (`_C_build.json`: torch, the stable-ABI
    target, the Python API), or {} without one. Read as JSON, never executed; readable when hkd._C does not load."""
    try:
        spec = importlib.util.find_spec("hkd._C")
        return json.loads(Path(spec.origin).with_name("_C_build.json").read_text()) if spec and spec.origin else {}
    except (ImportError, ValueError, OSError):
        return {}


@functools.cache
def _extension() -> str | None:
    """None when hkd._C loads, "" when it is not installed, otherwise why it does not load (warned once)."""
    try:
        import hkd._C  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name == "hkd._C":
            return ""
        failure: Exception = error
    except (ImportError, OSError) as error:
        failure = error
    else:
        return None
    built = build_info()
    needs = (
        f"it was built for torch {built['torch']} and loads on torch >= {built['torch_min']}"
        if "torch" in built and "torch_min" in built
        else "the torch it was built for is not recorded"
    )
    message = (
        f"hkd._C is installed but does not load ({type(failure).__name__}: {failure}); {needs}, and this is torch "
        f"{torch.__version__}. Only the reference backend runs (about 10x slower on the CPU). Fix: {REBUILD}."
    )
    warnings.warn(message, ExtensionLoadWarning, stacklevel=2)
    return message


def extension_loaded() -> bool:
    """True when the compiled extension hkd._C imports (it registers the torch.ops.hkd kernels). The first call,
    at `import hkd`, warns once when hkd._C is installed but does not load (extension_error)."""
    return _extension() is None


def extension_error() -> str | None:
    """Why the installed hkd._C does not load, with the fix; None when it loads or is not installed."""
    return _extension() or None


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
        if not fast and extension_error():
            _warn_fallback()
        return fast[0] if fast else "reference"
    if not usable(backend, device):
        reason = extension_error() if backend in ("cpu", "cuda") else None
        reason = reason or "see `hkd info`"
        raise RuntimeError(f"backend {backend!r} is not usable for {device.type} tensors here: {reason}")
    return backend


@functools.cache
def _warn_fallback() -> None:
    warnings.warn(
        f'backend="auto" runs the reference ops because the compiled extension does not load: {extension_error()}',
        ExtensionLoadWarning,
        stacklevel=4,
    )
