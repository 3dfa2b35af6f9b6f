"""hkd.ops.expm and hkd.ops.dense_propagate: dense Koopman generators.

Algorithms (the maths lives in csrc/dense.h; the tables below mirror it):

* expm(A): truncated Taylor series T_m(A / 2^s)^(2^s), evaluated by Paterson-Stockmeyer, (m, s) per matrix from
  ||A||_1 and the dtype's unit roundoff (backward error <= u). Gradient: the adjoint of the Frechet derivative,
  grad_A = L(A^T, G), computed alongside the same approximant (direct scheme: ~3x the forward).
* the action exp(tau_b A) z_b with per-sample tau (Al-Mohy and Higham 2011, expm_multiply): sample b takes
  s_b = ceil(|tau_b| alpha / theta_m) substeps of T_m(h_b A), h_b = tau_b / s_b. The plan (m, alpha) minimises m s for
  max |tau_b| (m <= ACTION_MAX_DEGREE), alpha = max(d_p, d_{p+1}), d_p = ||A^p||_1^(1/p) from exact small powers
  (p(p-1) <= m + 1; as many powers as a quarter of the cost of the plan from ||A||_1 pays for). Each substep stops
  per vector z[b, :, p] once ||v_{k-1}||_inf + ||v_k||_inf <= u ||y||_inf; its later terms are zero. Gradients: the
  exact reverse of that recurrence (z: the action of h A^T; A and tau: sums of outer products): on the CPU a fused
  kernel that reads the terms and per-vector term counts the forward recorded when autograd needed them
  (dense_action_record) or else runs the recurrence again; `taylor_action_backward` elsewhere.
* dense_propagate per level: shared (0-d) tau -> expm(tau A) once, then one GEMM. Per-sample tau -> the action or
  one expm(tau_b A) per sample + bmm, whichever the flop model (`choose_algorithm`) says is cheaper; float32 matrices
  that would need more than 4 squarings are formed and exponentiated in float64 (`expm_in_float64`).

The plan and the cost model run in C++ (the op dense_action_plan, csrc/dense_plan.cpp); hkd/ops/dense_plan.py is
their Python twin (`reference_plan`) for builds without the extension, and the tests check that the two agree.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hkd.ops import _backend, reference
from hkd.ops.dense_plan import action_substeps, dense_action_plan


# ---- plain-PyTorch composites: the action (reference backend) and the gradient of every action backend ------
def _apply(A: Tensor, v: Tensor) -> Tensor:
    """A v per position: A (d, d) or (P, d, d), v (B, d, P); a shared A is one GEMM over all B P columns."""
    return torch.einsum("ij,bjp->bip", A, v) if A.dim() == 2 else torch.einsum("pij,bjp->bip", A, v)


def _substep(A: Tensor, x: Tensor, h: Tensor, m: int, record: list | None = None) -> Tensor:
    """y = T_m(h A) x with the per-vector convergence test (vectors x[b, :, p]; h (b, 1, 1)). With `record`, appends
    (input v_{k-1}, A v_{k-1}, live_k, keep_k) per term: whether the vector takes term k, and term k + 1."""
    u = 2.0**-53 if x.dtype == torch.float64 else 2.0**-24
    y = v = x
    previous = x.detach().abs().amax(1).double()
    live = torch.ones_like(previous, dtype=torch.bool)
    for k in range(1, m + 1):
        if not bool(live.any()):
            break
        Av = _apply(A, v)
        term = Av * (h / k)
        y = y + term
        with torch.no_grad():
            norm = term.abs().amax(1).double()
            keep = ~(live & (previous + norm <= u * y.abs().amax(1).double()))
            if record is not None:
                record.append((v, Av, live.clone(), keep))
            live &= keep
            previous = norm
        v = term * keep.unsqueeze(1)
    return y


def _sorted_substeps(tau: Tensor, m: int, alpha: float) -> tuple[Tensor, list[int], Tensor]:
    """Samples by substeps, most first: (order, active count per substep, s_b in that order)."""
    steps = action_substeps(tau, m, alpha)
    order = torch.sort(steps, descending=True, stable=True).indices
    steps = steps[order]
    rising = steps.flip(0).cpu()
    counts = len(steps) - torch.searchsorted(rising, torch.arange(int(rising[-1]), dtype=rising.dtype), right=True)
    return order, counts.tolist(), steps


def _advance(A: Tensor, y: Tensor, h: Tensor, m: int, n: int) -> Tensor:
    """y with its first n samples advanced by one substep."""
    step = _substep(A, y[:n], h[:n], m)
    return step if n == len(y) else torch.cat((step, y[n:]))


def taylor_action(z: Tensor, A: Tensor, tau: Tensor, plan: Tensor) -> Tensor:
    """exp(tau_b A) z_b by the Taylor recurrence with plain PyTorch ops (differentiable): the action composite."""
    m, alpha = int(plan[0]), float(plan[1])
    if not math.isfinite(alpha) or not bool(torch.isfinite(A).all()):
        return torch.full_like(z, math.nan)
    if z.numel() == 0:
        return z.clone()
    order, counts, steps = _sorted_substeps(tau, m, alpha)
    h = (tau[order] / steps.to(tau.dtype)).reshape(-1, 1, 1)
    y = z[order]
    for n in counts:  # substep j: the first n samples (those with s_b > j)
        y = _advance(A, y, h, m, n)
    return y[torch.argsort(order)]


def taylor_action_backward(
    grad: Tensor, z: Tensor, A: Tensor, tau: Tensor, plan: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact reverse of `taylor_action`'s recurrence: (grad_z, grad_A, grad_tau)."""
    m, alpha = int(plan[0]), float(plan[1])
    if not math.isfinite(alpha) or not bool(torch.isfinite(A).all()):
        nan = math.nan
        return torch.full_like(z, nan), torch.full_like(A, nan), torch.full_like(tau, nan)
    grad_A = torch.zeros_like(A)
    if z.numel() == 0:
        return torch.zeros_like(z), grad_A, torch.zeros_like(tau)
    order, counts, steps = _sorted_substeps(tau, m, alpha)
    h = (tau[order] / steps.to(tau.dtype)).reshape(-1, 1, 1)
    starts, y = [], z[order]  # the state of the active samples at the start of each substep
    for j, n in enumerate(counts):
        starts.append(y[:n])
        if j + 1 < len(counts):
            y = _advance(A, y, h, m, n)
    At = A.transpose(-1, -2)
    g = grad[order].clone()
    grad_h = torch.zeros_like(tau)
    outer = "bip,bjp->ij" if A.dim() == 2 else "bip,bjp->pij"
    for x in reversed(starts):
        n = len(x)
        record: list = []
        _substep(A, x, h[:n], m, record)
        gy, gv = g[:n], torch.zeros_like(x)  # gv: dL/d(input of the next term)
        for k in range(len(record), 0, -1):
            v, Av, live, keep = record[k - 1]
            # dL/d(term k); zero where the vector had stopped (its gradient ends there: no subnormal tails)
            gterm = torch.where(live.unsqueeze(1), gy + gv * keep.unsqueeze(1), 0.0)
            grad_A = grad_A + torch.einsum(outer, gterm * (h[:n] / k), v)
            grad_h[:n] += (gterm * Av).sum(dim=(1, 2)) / k
            gv = _apply(At, gterm) * (h[:n] / k)
        g[:n] = gy + gv
    inverse = torch.argsort(order)
    return g[inverse], grad_A, (grad_h / steps.to(tau.dtype))[inverse]


# ---- custom ops: autograd and fake kernels, shared by the C++/CUDA ops and the Triton ops -------------------
# The ops return contiguous tensors whatever the inputs' strides (the kernels read contiguous copies).
def _frechet_adjoint(expm_op, A: Tensor, grad: Tensor) -> Tensor:
    """L(A^T, G), the gradient of exp at A, as the top-right block of exp([[A^T, G], [0, A^T]]): built from the
    op itself, so that autograd can differentiate it again."""
    n = A.shape[-1]
    At = A.transpose(-1, -2)
    block = torch.cat((torch.cat((At, grad), -1), torch.cat((torch.zeros_like(At), At), -1)), -2)
    return expm_op(block)[..., :n, n:]


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _save_record(ctx, inputs, output):
    """The action's inputs and the record of its terms (not differentiable; no zero gradients made for it)."""
    ctx.save_for_backward(*inputs, *output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _register(
    expm: str, action: str, expm_op, expm_backward_op=None, action_backward_op=None, action_record: str | None = None
) -> None:
    """Fake kernels and autograd for an (expm, action) pair of ops, and the action's recording twin if there is one
    (its record of the Taylor terms goes to the fused backward op). Without a fused backward op, and under
    create_graph (double backward), the gradients are differentiable composites: the Frechet adjoint from the expm
    op itself, and the plain-PyTorch reverse of the action's recurrence."""

    def expm_backward(ctx, grad):
        (A,) = ctx.saved_tensors
        if expm_backward_op is None or torch.is_grad_enabled():
            return _frechet_adjoint(expm_op, A, grad)
        return expm_backward_op(A, grad)

    def action_backward(ctx, grad, *_):  # (*_: the gradients of the record, which has none)
        z, A, tau, plan, *record = ctx.saved_tensors
        if grad is None:  # (the record's op does not make zero gradients for an unused output)
            return None, None, None, None
        if action_backward_op is None or torch.is_grad_enabled():
            return (*taylor_action_backward(grad, z, A, tau, plan), None)
        return (*action_backward_op(grad, z, A, tau, plan, *record), None)

    # (a triton_op would use itself as fake kernel, which fails under TRITON_INTERPRET=1: it launches the kernel)
    torch.library.register_fake(expm)(lambda A: A.new_empty(A.shape))
    torch.library.register_fake(action)(lambda z, A, tau, plan: z.new_empty(z.shape))
    torch.library.register_autograd(expm, expm_backward, setup_context=_save_inputs)
    torch.library.register_autograd(action, action_backward, setup_context=_save_inputs)
    if action_record is not None:
        torch.library.register_fake(action_record)(_fake_record)
        torch.library.register_autograd(action_record, action_backward, setup_context=_save_record)


def _fake_record(z, A, tau, plan):
    """dense_action_record's outputs: the result and a record whose sizes depend on tau's values."""
    ctx = torch.library.get_ctx()
    record, terms = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return z.new_empty(z.shape), z.new_empty(record), z.new_empty(terms, dtype=torch.int32)


def _fake_action_backward(grad, z, A, tau, plan, record=None, terms=None):
    return z.new_empty(z.shape), A.new_empty(A.shape), tau.new_empty(tau.shape)


def _taylor_action_backward_op(grad, z, A, tau, plan, record=None, terms=None):
    """dense_action_backward off the CPU: the plain-PyTorch reverse (there is no record to read)."""
    return taylor_action_backward(grad, z, A, tau, plan)


if _backend.extension_loaded():
    torch.library.register_fake("hkd::expm_backward")(lambda A, grad: A.new_empty(A.shape))
    torch.library.register_fake("hkd::dense_action_backward")(_fake_action_backward)
    # CPU: the fused kernel (csrc/cpu/dense.cpp); CUDA: the plain-PyTorch reverse of the same recurrence
    torch.library.impl("hkd::dense_action_backward", "CUDA")(_taylor_action_backward_op)
    _register(
        "hkd::expm",
        "hkd::dense_action",
        torch.ops.hkd.expm,
        torch.ops.hkd.expm_backward,
        torch.ops.hkd.dense_action_backward,
        "hkd::dense_action_record",
    )


_TRITON_OPS = None


def _triton_ops():
    """(expm, action): the Triton kernels as custom ops, defined on first use (Triton is optional)."""
    global _TRITON_OPS
    if _TRITON_OPS is None:
        from hkd.kernels import dense as kernels

        def expm_triton(A: Tensor) -> Tensor:
            return kernels.expm(A)

        def action_triton(z: Tensor, A: Tensor, tau: Tensor, plan: Tensor) -> Tensor:
            if z.shape[1] > kernels.MAX_N:  # GEMM-bound: the plain-PyTorch recurrence
                return taylor_action(z, A, tau, plan)
            return kernels.action(z, A, tau, plan)

        def action_backward(grad: Tensor, z: Tensor, A: Tensor, tau: Tensor, plan: Tensor):
            if z.shape[1] > kernels.MAX_N:
                return taylor_action_backward(grad, z, A, tau, plan)
            return kernels.action_backward(grad, z, A, tau, plan)

        expm_op = torch.library.triton_op("hkd::expm_triton", expm_triton, mutates_args=())
        action_op = torch.library.triton_op("hkd::dense_action_triton", action_triton, mutates_args=())
        _register("hkd::expm_triton", "hkd::dense_action_triton", expm_op, None, action_backward)
        _TRITON_OPS = (expm_op, action_op)
    return _TRITON_OPS


# ---- fronts ------------------------------------------------------------------------------------------------
def _expm(A: Tensor, backend: str) -> Tensor:
    if backend == "reference" or A.shape[-1] == 0:  # 0 x 0 matrices: their (empty) exponential needs no kernel
        return reference.expm(A)
    if backend == "triton":
        return _triton_ops()[0](A)
    return torch.ops.hkd.expm(A)


def _action(z: Tensor, A: Tensor, tau: Tensor, backend: str, plan: Tensor | None = None) -> Tensor:
    """exp(tau_b A_p) z[b, :, p], z (B, d, P), with the plan of `dense_action_plan` (computed here when not given)."""
    if plan is None:
        plan = dense_action_plan(A.detach(), tau.detach(), z.shape[2])
    if backend == "reference" or A.shape[-1] == 0:
        return taylor_action(z, A, tau, plan)
    if backend == "triton":
        return _triton_ops()[1](z, A, tau, plan)
    if backend == "cpu" and _needs_grad(z, A, tau) and not torch.compiler.is_compiling():
        return torch.ops.hkd.dense_action_record(z, A, tau, plan)[0]  # the backward reads the terms, not recomputes
    return torch.ops.hkd.dense_action(z, A, tau, plan)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


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
            # the plan and the cost model need A's powers and max |tau| (syncs); a traced graph takes the action
            plan = dense_action_plan(A.detach(), t.detach(), positions)
            if torch.compiler.is_compiling() or plan[2] > 0:
                y = _action(flat, A, t, backend, plan)
            else:  # (B, d, d) or (B, P, d, d); plan[2] < 0: float32 matrices formed and exponentiated in float64
                wide = torch.float64 if plan[2] < 0 else dtype
                M = _expm(t.to(wide).reshape(-1, *([1] * A.dim())) * A.to(wide), backend).to(dtype)
                y = torch.bmm(M, flat) if A.dim() == 2 else torch.einsum("bpij,bjp->bip", M, flat)
        out.append(y.reshape(z.shape).to(z.dtype))
    return out
