"""HKDPropagator: the per-level linear Koopman evolution z^(l) -> exp(tau A^(l)) z^(l), all levels in one op call.

Generators (all initialised to zero, so the evolution starts as the identity):

* "spectral" (the paper): A^(l) block diagonal with 2x2 rotation-scaling blocks; channel pair k = channels (2k, 2k+1)
  has the eigenvalues alpha_k +- i beta_k (hkd.ops.spectral_propagate). Parameters `alphas[l]`, `betas[l]` of shape
  (d_l / 2, h_l, w_l) with per_position=True (one generator per spatial position), else (d_l / 2,).
* "dense": a general d_l x d_l generator (hkd.ops.dense_propagate), `generators[l]` of shape (h_l * w_l, d_l, d_l)
  with per_position=True, else (d_l, d_l). Per position costs h*w*d^2 parameters per level: use it at small sizes.

Spectral components, for the analysis: `eigenvalues()` gives per level a complex tensor laid out as (n, h, w) (or (n,)
when shared over positions), n = d/2 for spectral (alpha + i beta, one of each conjugate pair) and n = d for dense
(all eigenvalues). `band_mask` selects the components whose reading falls in a quantile band, in that same layout (the
reading: the real part alpha, the growth or decay rate, or the rotation rate |beta|, the usual meaning of a Koopman
mode's frequency; `band_reading` is the default);
`band_project` keeps those components of a latent and zeroes the rest. Each component's subspace is invariant under
exp(tau A), so projecting before or after the evolution gives the same result.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hkd import ops

GENERATORS = ("spectral", "dense")
BAND_NAMES = {"low": 0, "middle": 1, "high": 2}
READINGS = ("alpha", "rate")  # what orders the bands: Re(lambda) = alpha, or |Im(lambda)| = |beta|


class HKDPropagator(nn.Module):
    """One Koopman generator per level; `forward(latents, tau)` evolves every level by exp(tau A^(l)).

    level_shapes: (d_l, h_l, w_l) per level. tau: a float, a 0-d tensor or a (B,) tensor (one time step per sample).
    backend: passed to the op fronts ("auto", "reference", "cpu", "cuda", "triton").
    """

    def __init__(
        self,
        level_shapes: list[tuple[int, ...]],
        generator: str = "spectral",
        per_position: bool = True,
        backend: str = "auto",
        band_reading: str = "alpha",
    ):
        super().__init__()
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
        if band_reading not in READINGS:
            raise ValueError(f"band_reading must be one of {READINGS}, got {band_reading!r}")
        self.band_reading = band_reading
        self.level_shapes = [tuple(int(n) for n in shape) for shape in level_shapes]
        if not self.level_shapes or any(len(s) < 1 or min(s) < 1 for s in self.level_shapes):
            raise ValueError(f"level_shapes must be a non-empty list of (d, h, w), got {level_shapes}")
        self.generator, self.per_position, self.backend = generator, per_position, backend
        if generator == "spectral":
            odd = [s for s in self.level_shapes if s[0] % 2]
            if odd:
                raise ValueError(f"spectral generators pair channels: every d_l must be even, got levels {odd}")
            shapes = [(d // 2, *spatial) if per_position else (d // 2,) for d, *spatial in self.level_shapes]
            self.alphas = nn.ParameterList([nn.Parameter(torch.zeros(shape)) for shape in shapes])
            self.betas = nn.ParameterList([nn.Parameter(torch.zeros(shape)) for shape in shapes])
        else:
            shapes = [(math.prod(spatial), d, d) if per_position else (d, d) for d, *spatial in self.level_shapes]
            self.generators = nn.ParameterList([nn.Parameter(torch.zeros(shape)) for shape in shapes])

    def extra_repr(self) -> str:
        return f"levels={self.level_shapes}, generator={self.generator}, per_position={self.per_position}"

    def check(self, latents: list[Tensor]) -> None:
        got = [tuple(z.shape[1:]) for z in latents]
        if got != self.level_shapes:
            raise ValueError(
                f"HKDPropagator expects latents of shapes {self.level_shapes} (after the batch), got {got}"
            )

    def forward(self, latents: list[Tensor], tau: Tensor | float) -> list[Tensor]:
        self.check(latents)
        if self.generator == "spectral":
            return ops.spectral_propagate(list(latents), list(self.alphas), list(self.betas), tau, backend=self.backend)
        return ops.dense_propagate(list(latents), list(self.generators), tau, backend=self.backend)

    def at(self, tau: Tensor | float) -> FixedStepPropagator:
        """A frozen propagator for one fixed time step tau (a float or 0-d tensor), for repeated generation.

        It snapshots the current generators (detached: later training does not change it). Dense: it caches
        M^(l) = expm(tau A^(l)) and applies z -> M z (a batched matrix product). Spectral: it caches the generators
        and tau and calls the fused spectral op, whose exp/cos/sin per (pair, position) is negligible next to the
        apply; the apply is all that remains either way.
        """
        tau = torch.as_tensor(tau, dtype=torch.float32)
        if tau.dim() != 0:
            raise ValueError(f"at(tau) takes one time step (a scalar), got tau of shape {tuple(tau.shape)}")
        return FixedStepPropagator(self, tau)

    # Spectral components, for the analysis and editing --------------------------------------------------------------

    def eigenvalues(self) -> list[Tensor]:
        """Per level, the complex eigenvalues of A^(l) laid out as (n, h, w), or (n,) when shared over positions."""
        with torch.no_grad():
            if self.generator == "spectral":
                return [torch.complex(a, b) for a, b in zip(self.alphas, self.betas, strict=True)]
            out = []
            for A, (d, *spatial) in zip(self.generators, self.level_shapes, strict=True):
                eig = torch.linalg.eigvals(A.double()).to(A.dtype.to_complex())  # (P, d) or (d,)
                out.append(eig.T.reshape(d, *spatial) if self.per_position else eig)
            return out

    def band_mask(self, level: int, band: int | str, num_bands: int = 3, reading: str | None = None) -> Tensor:
        """Boolean mask over level `level`'s components (the layout of `eigenvalues()[level]`) keeping those whose
        reading (alpha = Re, or rate = |Im|; default `band_reading`) lies in quantile band `band` of num_bands (0 =
        lowest; "low"/"middle"/"high" when num_bands=3). Band b is q_b <= v < q_{b+1} (the last band includes the
        maximum), q_b the lower b/num_bands quantile of the level's values over all its modes and positions (a
        conjugate pair counted once): equal values, conjugate pairs included, always share a band, so bands can be
        uneven (everything is in the top band while A = 0)."""
        reading = self.band_reading if reading is None else reading
        if reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
        if isinstance(band, str):
            if num_bands != 3 or band not in BAND_NAMES:
                raise ValueError(f"band names {tuple(BAND_NAMES)} need num_bands=3; got {band!r}, {num_bands}")
            band = BAND_NAMES[band]
        if not 0 <= band < num_bands:
            raise ValueError(f"band must be in [0, {num_bands}), got {band}")
        if not 0 <= level < len(self.level_shapes):
            raise ValueError(f"level must be in [0, {len(self.level_shapes)}), got {level}")
        eig = self.eigenvalues()[level]
        value = eig.real if reading == "alpha" else eig.imag.abs()
        # quantiles over modes: a spectral entry is one conjugate pair; count a dense conjugate pair once too
        flat = value.reshape(-1) if self.generator == "spectral" else value[eig.imag >= 0]
        q = torch.tensor([band / num_bands, (band + 1) / num_bands], dtype=flat.dtype)
        low, high = torch.quantile(flat, q, interpolation="lower")
        return (value >= low) & ((value < high) if band < num_bands - 1 else (value <= flat.max()))

    def band_project(self, level: int, z: Tensor, mask: Tensor) -> Tensor:
        """Level `level`'s latent z (B, d, h, w) with only the components in `mask` (from band_mask) kept."""
        d, *spatial = self.level_shapes[level]
        with torch.no_grad():
            if self.generator == "spectral":
                keep = mask.repeat_interleave(2, dim=0)  # pair k -> channels 2k, 2k+1
                keep = keep if self.per_position else keep.reshape(d, *([1] * len(spatial)))
                return z * keep.to(z.dtype)
            # dense: P = V diag(mask) V^-1 per position (real: conjugate pairs share a band)
            A = self.generators[level].double()
            values, V = torch.linalg.eig(A)
            m = (mask.reshape(d, -1).T if self.per_position else mask).to(V.dtype)
            P = (V * m.unsqueeze(-2)) @ torch.linalg.inv(V)
            P = P.real.to(torch.promote_types(z.dtype, torch.float32))
        flat = z.to(P.dtype).reshape(z.shape[0], d, -1)
        out = torch.einsum("pij,bjp->bip", P, flat) if self.per_position else P @ flat
        return out.reshape(z.shape).to(z.dtype)


class FixedStepPropagator(nn.Module):
    """exp(tau A^(l)) for a fixed tau and frozen generators (made by HKDPropagator.at); `forward(latents)`."""

    def __init__(self, propagator: HKDPropagator, tau: Tensor):
        super().__init__()
        self.level_shapes, self.generator = propagator.level_shapes, propagator.generator
        self.per_position, self.backend = propagator.per_position, propagator.backend
        self.register_buffer("tau", tau.to(next(propagator.parameters()).device))
        if self.generator == "spectral":  # buffers alpha{l}, beta{l}: the generators, snapshot
            for level, (a, b) in enumerate(zip(propagator.alphas, propagator.betas, strict=True)):
                self.register_buffer(f"alpha{level}", a.detach().clone())
                self.register_buffer(f"beta{level}", b.detach().clone())
        else:  # buffers expm{l} = expm(tau A^(l))
            with torch.no_grad():
                for level, A in enumerate(propagator.generators):
                    M = ops.expm(self.tau.to(A.dtype) * A.detach(), backend=self.backend)
                    self.register_buffer(f"expm{level}", M)

    def _buffers_list(self, prefix: str) -> list[Tensor]:
        return [getattr(self, f"{prefix}{level}") for level in range(len(self.level_shapes))]

    def forward(self, latents: list[Tensor]) -> list[Tensor]:
        got = [tuple(z.shape[1:]) for z in latents]
        if got != self.level_shapes:
            raise ValueError(f"expects latents of shapes {self.level_shapes} (after the batch), got {got}")
        if self.generator == "spectral":
            alphas, betas = self._buffers_list("alpha"), self._buffers_list("beta")
            return ops.spectral_propagate(list(latents), alphas, betas, self.tau, backend=self.backend)
        out = []
        for z, M in zip(latents, self._buffers_list("expm"), strict=True):
            flat = z.to(torch.promote_types(z.dtype, torch.float32)).reshape(z.shape[0], z.shape[1], -1)
            evolved = torch.einsum("pij,bjp->bip", M.to(flat.dtype), flat) if M.dim() == 3 else M.to(flat.dtype) @ flat
            out.append(evolved.reshape(z.shape).to(z.dtype))
        return out
