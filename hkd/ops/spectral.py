"""hkd.ops.spectral_propagate: exp(tau A) for block-diagonal 2x2 rotation-scaling generators, all levels at once.

The convention (channel pair k = channels (2k, 2k+1), complex multiplication by exp((alpha + i beta) tau)) is
defined by hkd.ops.reference.spectral_propagate. Backends:

* "cpu" and "cuda": the custom op torch.ops.hkd.spectral_propagate (csrc/cpu/spectral.cpp, csrc/cuda/spectral.cu),
  one parallel region / one kernel launch for all levels, and torch.ops.hkd.spectral_propagate_backward.
* "triton": the same pair of ops written in Triton (kernels/spectral.py), registered with torch.library.triton_op.
* "reference": plain PyTorch (autograd by PyTorch), any dtype.

This file validates the inputs (clear errors before any kernel runs), picks the backend, and registers the
autograd formula and the fake (shape-only) kernels that torch.compile and opcheck need.
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
    if isinstance(tau, Tensor):
        if tau.device != device:
            raise ValueError(f"spectral_propagate: tau is on {tau.device}, the latents on {device}")
        if tau.shape not in ((), (z0.shape[0],)):
            raise ValueError(f"spectral_propagate: tau {tuple(tau.shape)} must be () or (B,) = ({z0.shape[0]},)")
    return torch.as_tensor(tau, device=device).to(reference._compute_dtype(dtype))


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
    backend = _resolve(backend, latents[0].device)
    if backend == "reference":
        return reference.spectral_propagate(latents, alphas, betas, tau)
    compute = tau.dtype
    latents = [z.contiguous() for z in latents]  # also turns channels_last into the NCHW planes the kernels read
    alphas = [a.to(compute).contiguous() for a in alphas]
    betas = [b.to(compute).contiguous() for b in betas]
    op = torch.ops.hkd.spectral_propagate if backend in ("cpu", "cuda") else _triton_ops()[0]
    return list(op(latents, alphas, betas, tau))


@torch.compiler.assume_constant_result  # torch.compile: a constant of the graph, no tracing into the checks
def _resolve(backend: str, device: torch.device) -> str:
    return _backend.resolve(backend, device)


# --- autograd and fake kernels, shared by the C++/CUDA op and the Triton op ---------------------------------------


def _fake_forward(latents, alphas, betas, tau):
    return [torch.empty_like(z) for z in latents]


def _fake_backward(grads, latents, alphas, betas, tau, need_latents, need_params, need_tau):
    return (
        [torch.empty_like(z) for z in latents] if need_latents else [],
        [torch.empty_like(a) for a in alphas] if need_params else [],
        [torch.empty_like(b) for b in betas] if need_params else [],
        torch.empty_like(tau) if need_tau else tau.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0], *inputs[1], *inputs[2], inputs[3])
    ctx.levels = len(inputs[0])


def _make_backward(backward_op):
    def backward(ctx, grads):
        L = ctx.levels
        saved = ctx.saved_tensors
        latents, alphas, betas, tau = list(saved[:L]), list(saved[L : 2 * L]), list(saved[2 * L : 3 * L]), saved[-1]
        need_z, need_alpha, need_beta, need_tau = ctx.needs_input_grad
        need_latents, need_params = any(need_z), any(need_alpha) or any(need_beta)
        grads = [g.contiguous() for g in grads]
        grad_z, grad_alpha, grad_beta, grad_tau = backward_op(
            grads, latents, alphas, betas, tau, need_latents, need_params, bool(need_tau)
        )
        none = [None] * L
        return (
            list(grad_z) if need_latents else none,
            list(grad_alpha) if need_params else none,
            list(grad_beta) if need_params else none,
            grad_tau if need_tau else None,
        )

    return backward


def _register(forward: str, backward: str, backward_op) -> None:
    # (a triton_op would use itself as fake kernel, which fails under TRITON_INTERPRET=1: it launches the kernel)
    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(backward)(_fake_backward)
    torch.library.register_autograd(forward, _make_backward(backward_op), setup_context=_setup_context)


if _backend.extension_loaded():
    _register("hkd::spectral_propagate", "hkd::spectral_propagate_backward", torch.ops.hkd.spectral_propagate_backward)


_TRITON_OPS = None


def _triton_ops():
    """(forward, backward): the Triton kernels as custom ops, defined on first use (Triton is optional)."""
    global _TRITON_OPS
    if _TRITON_OPS is None:
        from hkd.kernels import spectral as kernels

        forward = torch.library.triton_op("hkd::spectral_propagate_triton", kernels.forward, mutates_args=())
        backward = torch.library.triton_op("hkd::spectral_propagate_triton_backward", kernels.backward, mutates_args=())
        _register("hkd::spectral_propagate_triton", "hkd::spectral_propagate_triton_backward", backward)
        _TRITON_OPS = (forward, backward)
    return _TRITON_OPS
