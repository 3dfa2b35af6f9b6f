"""Triton kernels of the dense ops (fronts: hkd/ops/dense.py; maths: csrc/dense.h).

expm: one program per matrix (n <= 64, kept in registers): Taylor degree 16 by Paterson-Stockmeyer (6 products)
on A / 2^s, s per matrix from ||A||_1, then s squarings. action: one program per (sample, block of positions) with
the generator shared ("column" mode: V <- A V), or per (position, block of samples) for P = 1 or per-position
generators ("row" mode: V <- V A^T, per-row h and substeps); the generator stays on chip for all the Taylor terms,
each substep stopping per vector by the convergence test of hkd/ops/dense.py.
Larger n falls back to plain PyTorch (torch.linalg.matrix_exp here, the Taylor composite in hkd/ops/dense.py).
Both become custom ops through torch.library.triton_op in hkd/ops/dense.py; neither reads a tensor on the host.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from hkd.kernels.launch import wrap_triton
from torch import Tensor

from hkd.ops.dense_plan import THETA, action_substeps

MAX_N = 64


@triton.jit
def _taylor16(X, eye):
    X2 = tl.dot(X, X, input_precision="ieee")
    X3 = tl.dot(X2, X, input_precision="ieee")
    X4 = tl.dot(X3, X, input_precision="ieee")
    B3 = eye / 479001600.0 + X / 6227020800.0 + X2 / 87178291200.0 + X3 / 1307674368000.0
    B2 = eye / 40320.0 + X / 362880.0 + X2 / 3628800.0 + X3 / 39916800.0
    B1 = eye / 24.0 + X / 120.0 + X2 / 720.0 + X3 / 5040.0
    B0 = eye + X + X2 / 2.0 + X3 / 6.0
    Y = B3 + X4 / 20922789888000.0
    Y = B2 + tl.dot(X4, Y, input_precision="ieee")
    Y = B1 + tl.dot(X4, Y, input_precision="ieee")
    return B0 + tl.dot(X4, Y, input_precision="ieee")


@triton.jit
def _expm16_kernel(a_ptr, out_ptr, s_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    mask = (i < n) & (j < n)
    A = tl.load(a_ptr + pid * n * n + i * n + j, mask=mask, other=0.0)
    s = tl.load(s_ptr + pid)
    X = A * tl.exp2(-s.to(tl.float32)).to(A.dtype)
    Y = _taylor16(X, (i == j).to(A.dtype))
    for _ in range(s):
        Y = tl.dot(Y, Y, input_precision="ieee")
    tl.store(out_ptr + pid * n * n + i * n + j, Y, mask=mask)


def expm(A: Tensor) -> Tensor:
    """exp(A) for A (..., n, n), float32 or float64."""
    n = A.shape[-1]
    if n > MAX_N:
        return torch.linalg.matrix_exp(A)
    flat = A.contiguous().reshape(-1, n, n)
    out = torch.empty_like(flat)
    if flat.numel() == 0:
        return out.reshape(A.shape)
    norm = torch.linalg.matrix_norm(flat, ord=1)
    finite = torch.isfinite(norm)
    theta16 = THETA[A.dtype][16 - 1]
    s = torch.ceil(torch.log2(torch.where(finite, norm, 0.0) / theta16)).clamp(0, 64).to(torch.int32)
    wrap_triton(_expm16_kernel)[(flat.shape[0],)](flat, out, s, n, BLOCK=max(16, triton.next_power_of_2(n)))
    out = torch.where(finite[:, None, None], out, math.nan)
    return out.reshape(A.shape)


@triton.jit
def _program(z_ptr, a_ptr, tau_ptr, steps_ptr, B, d, P, ROW_MODE: tl.constexpr, SHARED: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """This program's block of the state: its offsets in z and mask, the generator as the block multiplies it (row mode:
    A_p^T; column mode: A) and the offset of A_p, the samples' substeps and h, and the sample of each vector."""
    i = tl.arange(0, BLOCK_D)
    if ROW_MODE:  # program (position p, samples b0..b0+BLOCK): V (BLOCK x d) <- V A_p^T; vectors are rows
        p = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        off = (b[:, None].to(tl.int64) * d + i[None, :]) * P + p
        mask = (b[:, None] < B) & (i[None, :] < d)
        a_off = p * d * d
        if SHARED:
            a_off = 0 * a_off
        At = tl.load(a_ptr + a_off + i[None, :] * d + i[:, None], mask=(i[:, None] < d) & (i[None, :] < d), other=0.0)
        steps = tl.load(steps_ptr + b, mask=b < B, other=0).to(tl.int32)
        h = (tl.load(tau_ptr + b, mask=b < B, other=0.0) / tl.maximum(steps, 1))[:, None]
        sample = b
    else:  # program (sample b, positions p0..p0+BLOCK): V (d x BLOCK) <- A V; vectors are columns
        bb = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        off = (bb * d + i[:, None]) * P + p[None, :]
        mask = (i[:, None] < d) & (p[None, :] < P)
        a_off = 0
        At = tl.load(a_ptr + i[:, None] * d + i[None, :], mask=(i[:, None] < d) & (i[None, :] < d), other=0.0)
        steps = tl.load(steps_ptr + bb + 0 * p).to(tl.int32)
        h = tl.load(tau_ptr + bb) / tl.load(steps_ptr + bb)
        sample = bb + 0 * p
    return off, mask, At, a_off, steps, h, sample


@triton.jit
def _substep(y, At, h, active, degree, unit_roundoff, record_ptr, RECORD: tl.constexpr, ROW_MODE: tl.constexpr,
             AXIS: tl.constexpr, TILE: tl.constexpr):  # fmt: skip
    """One Taylor substep of the active vectors: (y, terms per vector, K). With RECORD, term k's input v_{k-1} goes to
    record_ptr + (k - 1) TILE (record_ptr: this program's tile offsets)."""
    v = tl.where(tl.expand_dims(active, AXIS), y, 0.0)
    previous = tl.max(tl.abs(v), axis=AXIS).to(tl.float64)
    live = active.to(tl.int32)
    terms = tl.where(active, degree, 0)
    k = 1
    while (k <= degree) & (tl.max(live, axis=0) > 0):
        if RECORD:
            tl.store(record_ptr + (k - 1) * TILE, v)
        if ROW_MODE:
            v = tl.dot(v, At, input_precision="ieee")
        else:
            v = tl.dot(At, v, input_precision="ieee")
        v = v * (h / k)
        y += v
        term = tl.max(tl.abs(v), axis=AXIS).to(tl.float64)
        total = tl.max(tl.abs(y), axis=AXIS).to(tl.float64)
        done = (live > 0) & (previous + term <= unit_roundoff * total)
        live = tl.where(done, 0, live)
        terms = tl.where(done, k, terms)
        v = tl.where(tl.expand_dims(done, AXIS), 0.0, v)
        previous = term
        k += 1
    return y, terms, k - 1


@triton.jit
def _action_kernel(z_ptr, a_ptr, tau_ptr, steps_ptr, plan_ptr, out_ptr, B, d, P, unit_roundoff, ROW_MODE: tl.constexpr,
                   SHARED: tl.constexpr, AXIS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    off, mask, At, a_off, steps, h, sample = _program(z_ptr, a_ptr, tau_ptr, steps_ptr, B, d, P, ROW_MODE, SHARED,
                                                      BLOCK_D, BLOCK)  # fmt: skip
    degree = tl.load(plan_ptr).to(tl.int32)
    y = tl.load(z_ptr + off, mask=mask, other=0.0)
    for step in range(tl.max(steps, axis=0)):
        y = _substep(y, At, h, steps > step, degree, unit_roundoff, z_ptr, False, ROW_MODE, AXIS, 1)[0]
    tl.store(out_ptr + off, y, mask=mask)


@triton.jit
def _action_backward_kernel(z_ptr, a_ptr, tau_ptr, steps_ptr, plan_ptr, g_ptr, grad_z_ptr, grad_a_ptr, grad_h_ptr,
                            work_ptr, B, d, P, slots, unit_roundoff, ROW_MODE: tl.constexpr, SHARED: tl.constexpr,
                            AXIS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """The exact reverse of _action_kernel: the substeps run again, keeping each one's start in this program's slots
    of work (slots tiles: the substeps' starts, then the terms' inputs), then in reverse order each runs once more,
    recording its terms and how many of them every vector took, and the terms are reversed (csrc/cpu/dense.cpp).
    grad_a and grad_h (the gradient of h per sample) accumulate atomically."""
    off, mask, At, a_off, steps, h, sample = _program(z_ptr, a_ptr, tau_ptr, steps_ptr, B, d, P, ROW_MODE, SHARED,
                                                      BLOCK_D, BLOCK)  # fmt: skip
    degree = tl.load(plan_ptr).to(tl.int32)
    TILE: tl.constexpr = BLOCK * BLOCK_D
    i = tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK)
    tile = (j[:, None] * BLOCK_D + i[None, :]) if ROW_MODE else (i[:, None] * BLOCK + j[None, :])
    program = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    starts = work_ptr + program * slots * TILE + tile
    total = tl.max(steps, axis=0)
    record = starts + total * TILE
    y = tl.load(z_ptr + off, mask=mask, other=0.0)
    for step in range(total):
        tl.store(starts + step * TILE, y)
        if step + 1 < total:
            y = _substep(y, At, h, steps > step, degree, unit_roundoff, record, False, ROW_MODE, AXIS, TILE)[0]
    g = tl.load(g_ptr + off, mask=mask, other=0.0)
    grad_a = tl.zeros_like(At)
    grad_h = tl.zeros_like(tl.sum(g, axis=AXIS))
    for reverse in range(total):
        step = total - 1 - reverse
        y = tl.load(starts + step * TILE)
        y, terms, K = _substep(y, At, h, steps > step, degree, unit_roundoff, record, True, ROW_MODE, AXIS, TILE)
        gv = tl.zeros_like(g)
        for back in range(K):
            k = K - back
            V = tl.load(record + (k - 1) * TILE)
            gt = tl.where(tl.expand_dims(k <= terms, AXIS), g + gv, 0.0)  # the vectors that took term k
            if ROW_MODE:  # u = gt A; grad_A += ((h / k) gt)^T V
                u = tl.dot(gt, tl.trans(At), input_precision="ieee")
                grad_a += tl.dot(tl.trans(gt * (h / k)), V, input_precision="ieee")
            else:  # u = A^T gt; grad_A += (h / k) gt V^T
                u = tl.dot(tl.trans(At), gt, input_precision="ieee")
                grad_a += tl.dot(gt, tl.trans(V), input_precision="ieee") * (h / k)
            grad_h += tl.sum(V * u, axis=AXIS) / k
            gv = u * (h / k)
        g += gv
    tl.store(grad_z_ptr + off, g, mask=mask)
    square = (i[:, None] < d) & (i[None, :] < d)
    tl.atomic_add(grad_a_ptr + a_off + i[:, None] * d + i[None, :], grad_a, mask=square)
    tl.atomic_add(grad_h_ptr + sample, grad_h, mask=sample < B)


def _launch(z: Tensor, A: Tensor):
    """The action kernels' grid and meta-parameters for z (B, d, P) and A."""
    B, d, P = z.shape
    row_mode = A.dim() == 3 or P == 1
    if row_mode:
        block = 16 if B <= 16 else 32
        grid = (P, triton.cdiv(B, block))
    else:
        block = max(16, min(64, triton.next_power_of_2(P)))
        grid = (B, triton.cdiv(P, block))
    meta = dict(ROW_MODE=row_mode, SHARED=A.dim() == 2, AXIS=1 if row_mode else 0, BLOCK=block,
                BLOCK_D=max(16, triton.next_power_of_2(d)))  # fmt: skip
    return grid, meta, 2.0**-53 if z.dtype == torch.float64 else 2.0**-24


def _inputs(z: Tensor, A: Tensor, tau: Tensor, plan: Tensor):
    if z.shape[1] > MAX_N:
        raise ValueError(f"the Triton action keeps d <= {MAX_N} channels on chip, got {z.shape[1]}")
    plan = plan.to(device=z.device, dtype=torch.float64)
    steps = action_substeps(tau, plan[0].long(), plan[1]).to(torch.int32)
    finite = torch.isfinite(A).all() & torch.isfinite(plan[1])
    return z.contiguous(), A.contiguous(), tau.contiguous(), plan, steps, finite


def action(z: Tensor, A: Tensor, tau: Tensor, plan: Tensor) -> Tensor:
    """exp(tau_b A_p) z[b, :, p] by the plan of hkd.ops.dense_plan.dense_action_plan (degree m, alpha): s_b
    substeps of the degree-m Taylor polynomial, each stopped per vector by the convergence test (hkd/ops/dense.py);
    z (B, d, P), A (d, d) or (P, d, d), tau (B,). NaN where A or alpha is not finite."""
    z, A, tau, plan, steps, finite = _inputs(z, A, tau, plan)
    out = torch.empty_like(z)
    if out.numel() == 0:
        return out
    grid, meta, u = _launch(z, A)
    B, d, P = z.shape
    wrap_triton(_action_kernel)[grid](z, A, tau, steps, plan, out, B, d, P, u, **meta)
    return torch.where(finite, out, math.nan)


def action_backward(grad: Tensor, z: Tensor, A: Tensor, tau: Tensor, plan: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients (z, A, tau) of `action`, the exact reverse of its recurrence. It reads the largest number of
    substeps and the degree on the host (its scratch: the substeps' starts and the terms' inputs, per program)."""
    z, A, tau, plan, steps, finite = _inputs(z, A, tau, plan)
    grad_z, grad_A, grad_h = torch.zeros_like(z), torch.zeros_like(A), torch.zeros_like(tau)
    if z.numel() == 0:
        return grad_z, grad_A, grad_h
    grid, meta, u = _launch(z, A)
    B, d, P = z.shape
    slots = int(steps.max()) + int(plan[0]) + 1
    work = torch.empty(grid[0] * grid[1] * slots * meta["BLOCK"] * meta["BLOCK_D"], dtype=z.dtype, device=z.device)
    wrap_triton(_action_backward_kernel)[grid](z, A, tau, steps, plan, grad.contiguous(), grad_z, grad_A, grad_h,
                                               work, B, d, P, slots, u, **meta)  # fmt: skip
    nan = torch.tensor(math.nan, dtype=z.dtype, device=z.device)
    return tuple(torch.where(finite, g, nan) for g in (grad_z, grad_A, grad_h / steps))
