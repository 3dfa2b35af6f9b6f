"""Hierarchical Koopman Diffusion: encoder -> per-level linear Koopman evolution exp(tau A) -> decoder."""

from hkd import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
