"""hkd.ops.spectral_propagate: exp(tau A) for block-diagonal 2x2 rotation-scaling generators, all levels at once.

The convention (channel pair k = channels (2k, 2k+1), complex multiplication by exp((alpha + i beta) tau)) is
defined by hkd.ops.reference.spectral_propagate. Backends:

* "cpu" and "cuda": the custom op torch.ops.hkd.spectral_propagate (csrc/cpu/spectral.cpp, csrc/cuda/spectral.cu),
  one parallel region / one kernel launch for all levels, and torch.ops.hkd.spectral_propagate_backward.
* "triton": the same pair of ops written in Triton (kernels/spectral.py), registered with torch.library.triton_op.
* "reference": plain PyTorch (autograd by PyTorch), any dtype.

This file validates the inputs (clear errors before any kernel runs), picks the backend, and registers the
autograd formula (the fused backward op, or under create_graph a composite of the forward op that autograd can
differentiate again) and the fake (shape-only) kernels that torch.compile and opcheck need. Every tensor argument
may have any strides: the kernels read contiguous copies (made here, and again by the ops themselves).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hkd.ops import _backend, reference


def _check(latents: list[Tensor], alphas: list[Tensor], betas: list[Tensor], tau: Tensor | float) -> Tensor:
    """Raise a clear error for inputs the op does not accept; return tau as a tensor in the compute dtype."""
    if len(latents) == 0:
        raise ValueError("spectral_propagate: empty list of levels")
    if not len(alphas) == len(betas) == len(latents):
        raise ValueError(f"spectral_propagate: {len(latents)} latents but {len(alphas)} alphas and {len(betas)} betas")
    z0 = latents[0]
    device, dtype = z0.device, z0.dtype
    for level, (z, alpha, beta) in enumerate(zip(latents, alphas, betas, strict=True)):
        if z.dim() < 2 or z.shape[1] % 2:
            raise ValueError(
                f"spectral_propagate: level {level} latent {tuple(z.shape)} must be (B, d, *S) with d even"
            )
        if z.shape[0] != z0.shape[0]:
            raise ValueError(
                f"spectral_propagate: level {level} batch {z.shape[0]} differs from level 0's {z0.shape[0]}"
            )
        if not z.is_floating_point() or z.dtype != dtype:
            raise ValueError(
                f"spectral_propagate: level {level} latent dtype {z.dtype}; all levels must share one "
                f"floating dtype ({dtype} at level 0)"
            )
        shared, per_position = (z.shape[1] // 2,), (z.shape[1] // 2, *z.shape[2:])
        if alpha.shape not in (shared, per_position) or beta.shape != alpha.shape:
            raise ValueError(
                f"spectral_propagate: level {level} alpha {tuple(alpha.shape)} and beta "
                f"{tuple(beta.shape)} must both be {shared} or {per_position} for latent {tuple(z.shape)}"
            )
        for name, t in (("latent", z), ("alpha", alpha), ("beta", beta)):
            if t.device != device:
                raise ValueError(
                    f"spectral_propagate: level {level} {name} is on {t.device}, level 0 latent on {device}"
                )
        for name, p in (("alpha", alpha), ("beta", beta)):
            if not p.is_floating_point():
                raise ValueError(f"spectral_propagate: level {level} {name} dtype {p.dtype}; must be a real float")
    if isinstance(tau, Tensor):
        if tau.device != device:
            raise ValueError(f"spectral_propagate: tau is on {tau.device}, the latents on {device}")
        if tau.shape not in ((), (z0.shape[0],)):
            raise ValueError(f"spectral_propagate: tau {tuple(tau.shape)} must be () or (B,) = ({z0.shape[0]},)")
    tau = torch.as_tensor(tau, device=device)
    if tau.is_complex() or tau.dtype == torch.bool:
        raise ValueError(f"spectral_propagate: tau dtype {tau.dtype}; must be a real number")
    return tau.to(reference._compute_dtype(dtype))


def _kernel_inputs(latents, alphas, betas, tau: Tensor):
    """The inputs as the kernels read them, for a tau from _check: contiguous (strided, expanded, sliced or
    channels_last tensors are copied; contiguous ones pass through), the parameters in tau's compute dtype."""
    compute = tau.dtype
    return (
        [z.contiguous() for z in latents],
        [a.to(compute).contiguous() for a in alphas],
        [b.to(compute).contiguous() for b in betas],
        tau.contiguous(),
    )


def spectral_propagate(
    latents: list[Tensor], alphas: list[Tensor], betas: list[Tensor], tau: Tensor | float, *, backend: str = "auto"
) -> list[Tensor]:
    """Evolve every level's latent (B, d_l, *S_l) by exp(tau A_l).

    alphas[l], betas[l]: (d_l/2, *S_l) (one generator per position) or (d_l/2,) (shared over positions);
    tau: a float, a 0-d tensor or a (B,) tensor. Returns the evolved latents (same shapes and dtypes).
    Fast backends take float32/float64/float16/bfloat16 latents and compute in float32 or float64; the
    parameters and tau are cast to that compute dtype (gradients flow back through the cast).
    """
    latents, alphas, betas = list(latents), list(alphas), list(betas)
    tau = _check(latents, alphas, betas, tau)
    backend = _backend.resolve(backend, tau.device)
    if backend == "reference":
        return reference.spectral_propagate(latents, alphas, betas, tau)
    op = torch.ops.hkd.spectral_propagate if backend in ("cpu", "cuda") else _triton_ops()[0]
    return list(op(*_kernel_inputs(latents, alphas, betas, tau)))


# --- autograd and fake kernels, shared by the C++/CUDA op and the Triton op ---------------------------------------
# The ops return contiguous tensors whatever the inputs' strides (the kernels read contiguous copies).


def _fake_forward(latents, alphas, betas, tau):
    return [z.new_empty(z.shape) for z in latents]


def _fake_backward(grads, latents, alphas, betas, tau, need_latents, need_params, need_tau):
    return (
        [z.new_empty(z.shape) for z in latents] if need_latents else [],
        [a.new_empty(a.shape) for a in alphas] if need_params else [],
        [b.new_empty(b.shape) for b in betas] if need_params else [],
        tau.new_empty(tau.shape) if need_tau else tau.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0], *inputs[1], *inputs[2], inputs[3])
    ctx.levels = len(inputs[0])


def _composite_backward(forward_op, grads, latents, alphas, betas, tau):
    """The gradients (latents, alphas, betas, tau) built from the forward op itself and elementwise PyTorch ops,
    so that autograd can differentiate them again (double backward; csrc/spectral.h has the formulas): the
    transposed rotation of g is the forward op with -beta, and with the evolved pair (x', y'),
    P = gx x' + gy y' and Q = gy x' - gx y' give d/dalpha = tau P, d/dbeta = tau Q, d/dtau = alpha P + beta Q."""
    grad_z = list(forward_op(grads, alphas, [-b for b in betas], tau))
    evolved = forward_op(latents, alphas, betas, tau)
    grad_alpha, grad_beta, grad_tau = [], [], torch.zeros_like(tau)
    for g, e, alpha, beta in zip(grads, evolved, alphas, betas, strict=True):
        batch, d, spatial = g.shape[0], g.shape[1], g.shape[2:]
        g, e = (t.to(tau.dtype).reshape(batch, d // 2, 2, *spatial) for t in (g, e))
        P = g[:, :, 0] * e[:, :, 0] + g[:, :, 1] * e[:, :, 1]  # (B, d/2, *S)
        Q = g[:, :, 1] * e[:, :, 0] - g[:, :, 0] * e[:, :, 1]
        t = tau.reshape(-1, *([1] * (P.dim() - 1)))
        shared = tuple(range(1, P.dim() - 1)) if alpha.dim() == 1 else ()  # positions, for shared parameters
        grad_alpha.append((t * P).sum(0).sum(shared) if shared else (t * P).sum(0))
        grad_beta.append((t * Q).sum(0).sum(shared) if shared else (t * Q).sum(0))
        a, w = (p.reshape(*p.shape, *([1] * (P.dim() - 1 - p.dim()))) for p in (alpha, beta))
        terms = (a * P + w * Q).flatten(1).sum(1)  # (B,)
        grad_tau = grad_tau + (terms if tau.dim() else terms.sum())
    return grad_z, grad_alpha, grad_beta, grad_tau


def _make_backward(forward_op, backward_op):
    def backward(ctx, grads):
        L = ctx.levels
        saved = ctx.saved_tensors
        latents, alphas, betas, tau = list(saved[:L]), list(saved[L : 2 * L]), list(saved[2 * L : 3 * L]), saved[-1]
        need_z, need_alpha, need_beta, need_tau = ctx.needs_input_grad
        need_latents, need_params = any(need_z), any(need_alpha) or any(need_beta)
        if torch.is_grad_enabled():  # create_graph: gradients that can be differentiated again
            grads_of = _composite_backward(forward_op, grads, latents, alphas, betas, tau)
        else:
            grads_of = backward_op(grads, latents, alphas, betas, tau, need_latents, need_params, bool(need_tau))
        grad_z, grad_alpha, grad_beta, grad_tau = grads_of
        none = [None] * L
        return (
            list(grad_z) if need_latents else none,
            list(grad_alpha) if need_params else none,
            list(grad_beta) if need_params else none,
            grad_tau if need_tau else None,
        )

    return backward


def _register(forward: str, backward: str, forward_op, backward_op) -> None:
    # (a triton_op would use itself as fake kernel, which fails under TRITON_INTERPRET=1: it launches the kernel)
    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(backward)(_fake_backward)
    torch.library.register_autograd(forward, _make_backward(forward_op, backward_op), setup_context=_setup_context)


if _backend.extension_loaded():
    _register(
        "hkd::spectral_propagate",
        "hkd::spectral_propagate_backward",
        torch.ops.hkd.spectral_propagate,
        torch.ops.hkd.spectral_propagate_backward,
    )


_TRITON_OPS = None


def _triton_ops():
    """(forward, backward): the Triton kernels as custom ops, defined on first use (Triton is optional). Like the
    C++ op, each checks its inputs and makes them contiguous itself, so that a direct call is as safe as the front."""
    global _TRITON_OPS
    if _TRITON_OPS is None:
        from hkd.kernels import spectral as kernels

        def forward(latents: list[Tensor], alphas: list[Tensor], betas: list[Tensor], tau: Tensor) -> list[Tensor]:
            return kernels.forward(*_kernel_inputs(latents, alphas, betas, _check(latents, alphas, betas, tau)))

        def backward(
            grads: list[Tensor],
            latents: list[Tensor],
            alphas: list[Tensor],
            betas: list[Tensor],
            tau: Tensor,
            need_latents: bool,
            need_params: bool,
            need_tau: bool,
        ) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
            inputs = _kernel_inputs(latents, alphas, betas, _check(latents, alphas, betas, tau))
            like = [g.shape == z.shape and g.dtype == z.dtype for g, z in zip(grads, inputs[0], strict=False)]
            if len(grads) != len(latents) or not all(like):
                raise ValueError("spectral_propagate_backward: grads must be tensors like the latents")
            return kernels.backward([g.contiguous() for g in grads], *inputs, need_latents, need_params, need_tau)

        forward_op = torch.library.triton_op("hkd::spectral_propagate_triton", forward, mutates_args=())
        backward_op = torch.library.triton_op("hkd::spectral_propagate_triton_backward", backward, mutates_args=())
        _register("hkd::spectral_propagate_triton", "hkd::spectral_propagate_triton_backward", forward_op, backward_op)
        _TRITON_OPS = (forward_op, backward_op)
    return _TRITON_OPS
