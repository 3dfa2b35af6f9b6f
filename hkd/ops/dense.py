"""hkd.ops.expm and hkd.ops.dense_propagate: dense Koopman generators.

Algorithms (the maths lives in csrc/expm.h; the tables below mirror it):

* expm(A): truncated Taylor series T_m(A / 2^s)^(2^s), evaluated by Paterson-Stockmeyer, (m, s) per matrix from
  ||A||_1 and the dtype's unit roundoff (backward error <= u). Gradient: the adjoint of the Frechet derivative,
  grad_A = L(A^T, G), computed alongside the same approximant (direct scheme: ~3x the forward).
* the action exp(tau_b A) z_b with per-sample tau: s substeps of T_m(tau_b A / s), (m, s) minimising m * s for
  ||tau A||_1 <= s theta_m (Al-Mohy and Higham's expm_multiply, one plan for the call from max |tau_b|).
  Gradients: the exact reverse of that recurrence (z: the action of tau A^T; A and tau: sums of outer products).
* dense_propagate per level: shared (0-d) tau -> expm(tau A) once, then one GEMM. Per-sample tau -> the action or
  one expm(tau_b A) per sample + bmm, whichever the flop model (`choose_algorithm`) says is cheaper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hkd.ops import _backend, reference

# theta_m, m = 1..55 (csrc/expm.h)
THETA = {
    torch.float64: (
        2.21e-16, 2.58e-08, 1.39e-05, 0.00034, 0.0024, 0.00907, 0.0238, 0.0499, 0.0896, 0.144, 0.214, 0.3, 0.4,
        0.514, 0.641, 0.78, 0.931, 1.09, 1.26, 1.44, 1.62, 1.82, 2.01, 2.22, 2.43, 2.64, 2.86, 3.08, 3.31, 3.54,
        3.77, 4.01, 4.25, 4.49, 4.73, 4.97, 5.22, 5.47, 5.72, 5.97, 6.22, 6.48, 6.73, 6.99, 7.25, 7.5, 7.76, 8.02,
        8.28, 8.55, 8.81, 9.07, 9.34, 9.6, 9.87,
    ),
    torch.float32: (
        1.19e-07, 0.000598, 0.0112, 0.0512, 0.131, 0.25, 0.401, 0.58, 0.78, 0.995, 1.22, 1.46, 1.71, 1.96, 2.22,
        2.48, 2.74, 3.01, 3.28, 3.55, 3.82, 4.1, 4.37, 4.65, 4.93, 5.2, 5.48, 5.76, 6.04, 6.32, 6.6, 6.88, 7.16,
        7.44, 7.72, 8.0, 8.29, 8.57, 8.85, 9.13, 9.41, 9.69, 9.98, 10.3, 10.5, 10.8, 11.1, 11.4, 11.7, 11.9, 12.2,
        12.5, 12.8, 13.1, 13.4,
    ),
}  # fmt: skip
MAX_SUBSTEPS = 100000
EXPM_DEGREES = (1, 2, 4, 6, 9, 12, 16, 20, 25, 30)


def _theta(dtype: torch.dtype) -> tuple[float, ...]:
    return THETA[torch.float64 if dtype == torch.float64 else torch.float32]


def ps_cost(m: int) -> int:
    """Matrix products of T_m by Paterson-Stockmeyer."""
    q = math.isqrt(m - 1) + 1 if m > 1 else 1
    return q - 1 + m // q - (m % q == 0)


def expm_plan(norm: float, dtype: torch.dtype) -> tuple[int, int]:
    """(degree m, squarings s) for exp(A), ||A||_1 = norm."""
    theta = _theta(dtype)
    costs = []
    for m in EXPM_DEGREES:
        s = 0 if norm <= theta[m - 1] else min(64, math.ceil(math.log2(norm / theta[m - 1])))
        costs.append((ps_cost(m) + s, s, m))
    return min(costs)[:0:-1]  # ties: fewer squarings (as csrc/expm.h)


def action_plan(norm: float, dtype: torch.dtype) -> tuple[int, int]:
    """(degree m, substeps s) for exp(tau A) z, ||tau A||_1 = norm (as csrc/expm.h action_plan)."""
    if not math.isfinite(norm):
        return 1, 1
    best = None
    for m, theta in enumerate(_theta(dtype), start=1):
        s = min(max(math.ceil(norm / theta), 1), MAX_SUBSTEPS)
        if best is None or m * s < best[0] * best[1]:
            best = (m, s)
    return best


def _action_norm(A: Tensor, tau: Tensor) -> float:
    return float(tau.abs().max()) * float(torch.linalg.matrix_norm(A, ord=1).max()) if tau.numel() else 0.0


def choose_algorithm(batch: int, d: int, positions: int, per_position: bool, norm: float, dtype) -> str:
    """Per-sample tau: "action" (m s Taylor terms, each a GEMM over all B P columns: 2 m s d^2 B P flops) or
    "expm" (one exp(tau_b A) per sample (and position): B (P) (cost(m) + s) 2 d^3, then the GEMM 2 d^2 B P)."""
    m, s = action_plan(norm, dtype)
    action = m * s * 2 * d * d * batch * positions
    me, se = expm_plan(norm, dtype)
    matrices = batch * (positions if per_position else 1)
    expm_cost = matrices * (ps_cost(me) + se) * 2 * d**3 + 2 * d * d * batch * positions
    return "action" if action <= expm_cost else "expm"


# ---- plain-PyTorch composites: the action (reference backend) and the gradient of every action backend ------
def _apply(A: Tensor, v: Tensor) -> Tensor:
    """A v per position: A (d, d) or (P, d, d), v (B, d, P); a shared A is one GEMM over all B P columns."""
    return torch.einsum("ij,bjp->bip", A, v) if A.dim() == 2 else torch.einsum("pij,bjp->bip", A, v)


def taylor_action(z: Tensor, A: Tensor, tau: Tensor) -> Tensor:
    """exp(tau_b A) z_b by the Taylor recurrence with plain PyTorch ops (differentiable): the action composite."""
    m, s = action_plan(_action_norm(A, tau), z.dtype)
    if not math.isfinite(_action_norm(A, tau)):
        return torch.full_like(z, math.nan)
    h = (tau / s).reshape(-1, 1, 1)
    y = z
    for _ in range(s):
        v = y
        for k in range(1, m + 1):
            v = _apply(A, v) * (h / k)
            y = y + v
    return y


def taylor_action_backward(grad: Tensor, z: Tensor, A: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact reverse of `taylor_action`'s recurrence: (grad_z, grad_A, grad_tau)."""
    norm = _action_norm(A, tau)
    if not math.isfinite(norm):
        nan = math.nan
        return torch.full_like(z, nan), torch.full_like(A, nan), torch.full_like(tau, nan)
    m, s = action_plan(norm, z.dtype)
    h = (tau / s).reshape(-1, 1, 1)
    At = A.transpose(-1, -2)
    starts = [z]  # the state at the start of each substep
    for _ in range(s - 1):
        y = v = starts[-1]
        for k in range(1, m + 1):
            v = _apply(A, v) * (h / k)
            y = y + v
        starts.append(y)
    g = grad
    grad_A = torch.zeros_like(A)
    grad_h = torch.zeros_like(tau)
    outer = "bip,bjp->ij" if A.dim() == 2 else "bip,bjp->pij"
    for x in reversed(starts):
        vs, us = [x], []  # v_k = (h/k) u_k, u_k = A v_{k-1}
        for k in range(1, m + 1):
            us.append(_apply(A, vs[-1]))
            vs.append(us[-1] * (h / k))
        gbar = g  # dL/dv_m; dL/dv_{k-1} = g + (h/k) A^T dL/dv_k
        for k in range(m, 0, -1):
            grad_A = grad_A + torch.einsum(outer, gbar * (h / k), vs[k - 1])
            grad_h = grad_h + (gbar * us[k - 1]).sum(dim=(1, 2)) / k
            gbar = g + _apply(At, gbar) * (h / k)
        g = gbar
    return g, grad_A, grad_h / s


# ---- custom ops: autograd and fake kernels -----------------------------------------------------------------
def _expm_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _frechet_adjoint(expm_op, A: Tensor, grad: Tensor) -> Tensor:
    """L(A^T, G), the gradient of exp at A, as the top-right block of exp([[A^T, G], [0, A^T]]): built from the
    op itself, so that autograd can differentiate it again."""
    n = A.shape[-1]
    At = A.transpose(-1, -2)
    block = torch.cat((torch.cat((At, grad), -1), torch.cat((torch.zeros_like(At), At), -1)), -2)
    return expm_op(block)[..., :n, n:]


def _expm_backward(ctx, grad):
    (A,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph (double backward): a gradient that is differentiable again
        return _frechet_adjoint(torch.ops.hkd.expm, A, grad)
    return torch.ops.hkd.expm_backward(A, grad)


def _action_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _action_backward(ctx, grad):
    if torch.is_grad_enabled():  # create_graph (double backward): the plain-PyTorch reverse is differentiable
        return taylor_action_backward(grad, *ctx.saved_tensors)
    return tuple(torch.ops.hkd.dense_action_backward(grad, *ctx.saved_tensors))


if _backend.extension_loaded():
    torch.library.register_fake("hkd::expm")(lambda A: torch.empty_like(A))
    torch.library.register_fake("hkd::expm_backward")(lambda A, grad: torch.empty_like(A))
    torch.library.register_fake("hkd::dense_action")(lambda z, A, tau: torch.empty_like(z))
    torch.library.register_fake("hkd::dense_action_backward")(
        lambda grad, z, A, tau: (torch.empty_like(z), torch.empty_like(A), torch.empty_like(tau))
    )
    torch.library.register_autograd("hkd::expm", _expm_backward, setup_context=_expm_setup)
    torch.library.register_autograd("hkd::dense_action", _action_backward, setup_context=_action_setup)
    # the reverse recurrence is GEMM-bound: the same plain-PyTorch code serves CPU and CUDA
    torch.library.impl("hkd::dense_action_backward", ("CPU", "CUDA"))(taylor_action_backward)


@torch.library.custom_op("hkd::expm_triton", mutates_args=())
def _expm_triton(A: Tensor) -> Tensor:
    from hkd.kernels import expm as kernels

    return kernels.expm(A)


@torch.library.custom_op("hkd::dense_action_triton", mutates_args=())
def _action_triton(z: Tensor, A: Tensor, tau: Tensor) -> Tensor:
    from hkd.kernels import expm as kernels

    norm = _action_norm(A, tau)
    if not math.isfinite(norm):
        return torch.full_like(z, math.nan)
    return kernels.action(z, A, tau, *action_plan(norm, z.dtype))


def _expm_triton_backward(ctx, grad):
    (A,) = ctx.saved_tensors
    return _frechet_adjoint(_expm_triton, A, grad)


def _action_triton_backward(ctx, grad):
    return taylor_action_backward(grad, *ctx.saved_tensors)


_expm_triton.register_fake(lambda A: torch.empty_like(A))
_action_triton.register_fake(lambda z, A, tau: torch.empty_like(z))
_expm_triton.register_autograd(_expm_triton_backward, setup_context=_expm_setup)
_action_triton.register_autograd(_action_triton_backward, setup_context=_action_setup)


# ---- fronts ------------------------------------------------------------------------------------------------
def _expm(A: Tensor, backend: str) -> Tensor:
    if backend == "reference" or A.shape[-1] == 0:  # 0 x 0 matrices: their (empty) exponential needs no kernel
        return reference.expm(A)
    if backend == "triton":
        return _expm_triton(A)
    return torch.ops.hkd.expm(A)


def _action(z: Tensor, A: Tensor, tau: Tensor, backend: str) -> Tensor:
    if backend == "reference" or A.shape[-1] == 0:
        return taylor_action(z, A, tau)
    if backend == "triton":
        return _action_triton(z, A, tau)
    return torch.ops.hkd.dense_action(z, A, tau)


def expm(A: Tensor, *, backend: str = "auto") -> Tensor:
    """Batched matrix exponential of A (..., n, n); a drop-in for torch.linalg.matrix_exp."""
    if not isinstance(A, Tensor) or A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"expm: A must be a (..., n, n) tensor, got {getattr(A, 'shape', type(A))}")
    if not A.is_floating_point():
        raise TypeError(f"expm: A must be floating point, got {A.dtype}")
    backend = _backend.resolve(backend, A.device)
    dtype = reference._compute_dtype(A.dtype)
    return _expm(A.to(dtype), backend).to(A.dtype)


def _check(latents, generators, tau) -> Tensor:
    if len(latents) != len(generators) or not latents:
        raise ValueError(f"dense_propagate: {len(latents)} latents for {len(generators)} generators")
    device = latents[0].device
    for level, (z, A) in enumerate(zip(latents, generators, strict=True)):
        if z.dim() < 2:
            raise ValueError(f"dense_propagate: latents[{level}] must be (B, d, *S), got {tuple(z.shape)}")
        d, positions = z.shape[1], math.prod(z.shape[2:])
        if A.dim() not in (2, 3) or A.shape[-1] != A.shape[-2]:
            raise ValueError(f"dense_propagate: generators[{level}] must be square (d, d) or (P, d, d), got "
                             f"{tuple(A.shape)}")  # fmt: skip
        if A.shape[-1] != d:
            raise ValueError(f"dense_propagate: generators[{level}] is {A.shape[-1]}x{A.shape[-1]} but "
                             f"latents[{level}] has {d} channels")  # fmt: skip
        if A.dim() == 3 and A.shape[0] != positions:
            raise ValueError(f"dense_propagate: generators[{level}] has {A.shape[0]} positions, latents[{level}] "
                             f"has {positions}")  # fmt: skip
        if z.shape[0] != latents[0].shape[0]:
            raise ValueError(
                f"dense_propagate: latents[{level}] has batch {z.shape[0]}, latents[0] {latents[0].shape[0]}"
            )
        if z.device != device or A.device != device:
            raise ValueError(
                f"dense_propagate: level {level} mixes devices ({z.device}, {A.device}; expected {device})"
            )
        for name, t in ((f"latents[{level}]", z), (f"generators[{level}]", A)):
            if not t.is_floating_point():
                raise ValueError(f"dense_propagate: {name} dtype {t.dtype}; must be a real float")
    if isinstance(tau, Tensor) and tau.device != device:
        raise ValueError(f"dense_propagate: tau is on {tau.device}, the latents on {device} (mixes devices)")
    tau = torch.as_tensor(tau, device=device)
    if tau.is_complex() or tau.dtype == torch.bool:
        raise ValueError(f"dense_propagate: tau dtype {tau.dtype}; must be a real number")
    if not torch.compiler.is_compiling():  # one host sync for all levels
        finite = torch.stack([torch.isfinite(A).all() for A in generators]).tolist()
        if not all(finite):
            raise ValueError(f"dense_propagate: generators[{finite.index(False)}] has NaN or infinite entries")
    if tau.dim() > 1 or (tau.dim() == 1 and tau.shape[0] != latents[0].shape[0]):
        raise ValueError(f"dense_propagate: tau must be 0-d or (B,) = ({latents[0].shape[0]},), got {tuple(tau.shape)}")
    return tau


def dense_propagate(
    latents: list[Tensor], generators: list[Tensor], tau: Tensor | float, *, backend: str = "auto"
) -> list[Tensor]:
    """Evolve every level's latent (B, d_l, *S_l) by exp(tau A_l), A_l (d_l, d_l) or (prod(S_l), d_l, d_l):
    z'[b, :, p] = exp(tau_b A_l(p)) z[b, :, p]."""
    tau = _check(latents, generators, tau)
    backend = _backend.resolve(backend, latents[0].device)
    out = []
    for z, A in zip(latents, generators, strict=True):
        batch, d, positions = z.shape[0], z.shape[1], math.prod(z.shape[2:])
        dtype = reference._compute_dtype(z.dtype)
        flat, A, t = z.to(dtype).reshape(batch, d, positions), A.to(dtype), tau.to(dtype)
        if t.dim() == 0:  # one exp(tau A), then a GEMM
            M = _expm(t * A, backend)
            y = M @ flat if A.dim() == 2 else torch.einsum("pij,bjp->bip", M, flat)
        else:
            # the cost model needs ||tau A|| (one sync); a traced graph assumes ||tau A||_1 = 1
            compiling = torch.compiler.is_compiling()
            norm = 1.0 if compiling else _action_norm(A.detach(), t.detach())
            if choose_algorithm(batch, d, positions, A.dim() == 3, norm, dtype) == "action":
                y = _action(flat, A, t, backend)
            else:
                M = _expm(t.reshape(-1, *([1] * A.dim())) * A, backend)  # (B, d, d) or (B, P, d, d)
                y = torch.bmm(M, flat) if A.dim() == 2 else torch.einsum("bpij,bjp->bip", M, flat)
        out.append(y.reshape(z.shape).to(z.dtype))
    return out
