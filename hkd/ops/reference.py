"""Plain-PyTorch definitions of every op: the oracles that all fast backends are tested against.

Conventions (the definition of the ops; every backend follows them):

* Spectral generators. Channel pair k of a level is the channels (2k, 2k+1) (adjacent pairs).
  With eigenvalue alpha_k + i beta_k, exp(tau A) acts on the pair as complex multiplication of
  (z[2k] + i z[2k+1]) by exp((alpha_k + i beta_k) tau): a scaling by exp(alpha tau) and a
  counter-clockwise rotation by the angle beta tau:

      z'[2k]   = exp(alpha tau) (cos(beta tau) z[2k] - sin(beta tau) z[2k+1])
      z'[2k+1] = exp(alpha tau) (sin(beta tau) z[2k] + cos(beta tau) z[2k+1])

* Dense generators act on the channel vector at each spatial position p:
  z'[b, :, p] = expm(tau_b A(p)) z[b, :, p].

* tau is a 0-d tensor (one time step for the whole batch) or has shape (B,) (one per sample).

Arithmetic runs in at least float32 (float16/bfloat16 latents are upcast and the result cast back).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _batch_tau(tau: Tensor, batch: int, ndim: int, dtype: torch.dtype) -> Tensor:
    """tau as (B or 1, 1, ..., 1) with `ndim` trailing singleton axes."""
    return tau.to(dtype).reshape(-1, *([1] * ndim)).expand(batch if tau.dim() else 1, *([1] * ndim))


def spectral_propagate(latents: list[Tensor], alphas: list[Tensor], betas: list[Tensor], tau: Tensor) -> list[Tensor]:
    """exp(tau A) z for every level, A block diagonal with 2x2 rotation-scaling blocks."""
    out = []
    for z, alpha, beta in zip(latents, alphas, betas, strict=True):
        batch, d, spatial = z.shape[0], z.shape[1], z.shape[2:]
        dtype = _compute_dtype(z.dtype)
        pair = z.to(dtype).reshape(batch, d // 2, 2, *spatial)
        x, y = pair[:, :, 0], pair[:, :, 1]
        # generators: (d/2, *S) per position or (d/2,) shared -> broadcast against (B, d/2, *S)
        shape = (d // 2, *spatial) if alpha.dim() > 1 else (d // 2, *([1] * len(spatial)))
        alpha, beta = alpha.to(dtype).reshape(shape), beta.to(dtype).reshape(shape)
        t = _batch_tau(tau, batch, 1 + len(spatial), dtype)
        scale, angle = torch.exp(alpha * t), beta * t
        cos, sin = torch.cos(angle), torch.sin(angle)
        evolved = torch.stack((scale * (cos * x - sin * y), scale * (sin * x + cos * y)), dim=2)
        out.append(evolved.reshape(z.shape).to(z.dtype))
    return out


def expm(A: Tensor) -> Tensor:
    """Batched matrix exponential of A (..., n, n).

    torch.linalg.matrix_exp's float64 result is off by up to ~1e-11 (relative, against scipy.linalg.expm) for
    ||A||_1 in about (0.01, 0.05), its lowest-degree branch; there A is scaled to ||A||_1 <= 0.005, where it is
    accurate, and the result squared back (not inside a compiled graph: the branch needs the norm's value)."""
    if A.dtype == torch.float64 and A.numel() and not torch.compiler.is_compiling():
        norm = float(torch.linalg.matrix_norm(A.detach(), ord=1).max())
        if 0.005 < norm < 0.06:
            squarings = math.ceil(math.log2(norm / 0.005))
            E = torch.linalg.matrix_exp(A / 2**squarings)
            for _ in range(squarings):
                E = E @ E
            return E
    return torch.linalg.matrix_exp(A)


def dense_propagate(latents: list[Tensor], generators: list[Tensor], tau: Tensor) -> list[Tensor]:
    """exp(tau A) z per level; A (d, d) shared over positions or (P, d, d) one per position."""
    out = []
    for z, A in zip(latents, generators, strict=True):
        batch, d, spatial = z.shape[0], z.shape[1], z.shape[2:]
        dtype = _compute_dtype(z.dtype)
        flat = z.to(dtype).reshape(batch, d, math.prod(spatial))
        t = tau.to(dtype).reshape(-1, *([1] * A.dim()))  # (B or 1, 1.., 1)
        M = torch.linalg.matrix_exp(t * A.to(dtype))  # (B|1, d, d) or (B|1, P, d, d)
        if A.dim() == 2:
            evolved = M @ flat
        else:
            evolved = torch.einsum("bpij,bjp->bip", M.expand(batch, *M.shape[1:]), flat)
        out.append(evolved.reshape(z.shape).to(z.dtype))
    return out
