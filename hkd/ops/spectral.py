"""hkd.ops.spectral_propagate: exp(tau A) for block-diagonal 2x2 rotation-scaling generators, all levels at once.

(Skeleton: validation, fast backends, autograd and fake kernels are added by the spectral-op work, issue 3.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from hkd.ops import _backend, reference


def spectral_propagate(
    latents: list[Tensor], alphas: list[Tensor], betas: list[Tensor], tau: Tensor | float, *, backend: str = "auto"
) -> list[Tensor]:
    """Evolve every level's latent (B, d_l, *S_l) by exp(tau A_l); see hkd.ops.reference for the convention."""
    tau = torch.as_tensor(tau, dtype=torch.float32, device=latents[0].device)
    _backend.resolve(backend, latents[0].device)
    return reference.spectral_propagate(list(latents), list(alphas), list(betas), tau)
