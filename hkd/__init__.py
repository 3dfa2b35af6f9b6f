"""Hierarchical Koopman Diffusion: encoder -> per-level linear Koopman evolution exp(tau A) -> decoder."""

# Before torch loads: the passive OpenMP wait policy if other processes keep a core busy (see hkd/openmp.py).
from hkd.openmp import choose_wait_policy

choose_wait_policy()

from hkd import ops
from hkd.model import HKDModel, ModelConfig
from hkd.propagator import HKDPropagator
from hkd.unet import UNet

__version__ = "0.1.0"
__all__ = ["HKDModel", "HKDPropagator", "ModelConfig", "UNet", "ops", "__version__"]
