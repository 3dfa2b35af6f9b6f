"""Hierarchical Koopman Diffusion: encoder -> per-level linear Koopman evolution exp(tau A) -> decoder."""

import os
import sys

# OpenMP threads that spin at barriers while a peer thread waits for a core waste that core (on a busy machine the
# work then runs several times slower than on one core). A passive wait policy, read once when torch loads its
# OpenMP runtime, so only set before that and only where the user has not chosen one.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hkd import ops
from hkd.model import HKDModel, ModelConfig
from hkd.propagator import HKDPropagator
from hkd.unet import UNet

__version__ = "0.1.0"
__all__ = ["HKDModel", "HKDPropagator", "ModelConfig", "UNet", "ops", "__version__"]
