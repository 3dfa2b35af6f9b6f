"""hkd.ops.expm and hkd.ops.dense_propagate: dense Koopman generators.

(Skeleton: validation, fast backends, the action algorithm, autograd and fake kernels are added by the
dense-op work, issue 4.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from hkd.ops import _backend, reference


def expm(A: Tensor, *, backend: str = "auto") -> Tensor:
    """Batched matrix exponential of A (..., n, n)."""
    _backend.resolve(backend, A.device)
    return reference.expm(A)


def dense_propagate(
    latents: list[Tensor], generators: list[Tensor], tau: Tensor | float, *, backend: str = "auto"
) -> list[Tensor]:
    """Evolve every level's latent (B, d_l, *S_l) by exp(tau A_l), A_l (d_l, d_l) or (prod(S_l), d_l, d_l)."""
    tau = torch.as_tensor(tau, dtype=torch.float32, device=latents[0].device)
    _backend.resolve(backend, latents[0].device)
    return reference.dense_propagate(list(latents), list(generators), tau)
