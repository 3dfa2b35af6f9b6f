"""Hierarchical Koopman Diffusion: encoder -> per-level linear Koopman evolution exp(tau A) -> decoder."""

from hkd import ops
from hkd.unet import UNet

__version__ = "0.1.0"
__all__ = ["UNet", "ops", "__version__"]
