"""Hierarchical Koopman Diffusion: encoder -> per-level linear Koopman evolution exp(tau A) -> decoder."""

# Before torch loads: the passive OpenMP wait policy if other processes keep a core busy (see hkd/openmp.py).
from hkd.openmp import choose_wait_policy

choose_wait_policy()

from hkd import ops  # noqa: E402 (after the wait policy is chosen)
from hkd.model import HKDModel, ModelConfig  # noqa: E402
from hkd.propagator import HKDPropagator  # noqa: E402
from hkd.unet import UNet  # noqa: E402

__version__ = "0.1.0"
__all__ = ["HKDModel", "HKDPropagator", "ModelConfig", "UNet", "ops", "__version__"]
