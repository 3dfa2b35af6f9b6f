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
from torch import Tensor
from torch.library import wrap_triton

from hkd.ops.dense import THETA, action_substeps

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
def _action_kernel(z_ptr, a_ptr, tau_ptr, steps_ptr, plan_ptr, out_ptr, B, d, P, unit_roundoff, ROW_MODE: tl.constexpr,
                   SHARED: tl.constexpr, AXIS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    i = tl.arange(0, BLOCK_D)
    degree = tl.load(plan_ptr).to(tl.int32)
    if ROW_MODE:  # program (position p, samples b0..b0+BLOCK): V (BLOCK x d) <- V A_p^T; vectors are rows
        p = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        off = (b[:, None].to(tl.int64) * d + i[None, :]) * P + p
        mask = (b[:, None] < B) & (i[None, :] < d)
        a_base = a_ptr if SHARED else a_ptr + p * d * d
        At = tl.load(a_base + i[None, :] * d + i[:, None], mask=(i[:, None] < d) & (i[None, :] < d), other=0.0)
        steps = tl.load(steps_ptr + b, mask=b < B, other=0).to(tl.int32)
        h = (tl.load(tau_ptr + b, mask=b < B, other=0.0) / tl.maximum(steps, 1))[:, None]
    else:  # program (sample b, positions p0..p0+BLOCK): V (d x BLOCK) <- A V; vectors are columns
        bb = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        off = (bb * d + i[:, None]) * P + p[None, :]
        mask = (i[:, None] < d) & (p[None, :] < P)
        At = tl.load(a_ptr + i[:, None] * d + i[None, :], mask=(i[:, None] < d) & (i[None, :] < d), other=0.0)
        steps = tl.load(steps_ptr + bb + 0 * p).to(tl.int32)
        h = tl.load(tau_ptr + bb) / tl.load(steps_ptr + bb)
    y = tl.load(z_ptr + off, mask=mask, other=0.0)
    for step in range(tl.max(steps, axis=0)):
        active = steps > step
        v = tl.where(tl.expand_dims(active, AXIS), y, 0.0)
        previous = tl.max(tl.abs(v), axis=AXIS).to(tl.float64)
        live = active.to(tl.int32)
        k = 1
        while (k <= degree) & (tl.max(live, axis=0) > 0):
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
            v = tl.where(tl.expand_dims(done, AXIS), 0.0, v)
            previous = term
            k += 1
    tl.store(out_ptr + off, y, mask=mask)


def action(z: Tensor, A: Tensor, tau: Tensor, plan: Tensor) -> Tensor:
    """exp(tau_b A_p) z[b, :, p] by the plan of hkd.ops.dense.dense_action_plan (degree m, alpha): s_b substeps of the
    degree-m Taylor polynomial, each stopped per vector by the convergence test (hkd/ops/dense.py); z (B, d, P),
    A (d, d) or (P, d, d), tau (B,). NaN where A or alpha is not finite."""
    B, d, P = z.shape
    if d > MAX_N:
        raise ValueError(f"the Triton action keeps d <= {MAX_N} channels on chip, got {d}")
    z, A, tau = z.contiguous(), A.contiguous(), tau.contiguous()
    plan = plan.to(device=z.device, dtype=torch.float64)
    steps = action_substeps(tau, plan[0].long(), plan[1]).to(torch.int32)
    out = torch.empty_like(z)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(d))
    row_mode = A.dim() == 3 or P == 1
    if row_mode:
        block = 16 if B <= 16 else 32
        grid = (P, triton.cdiv(B, block))
    else:
        block = max(16, min(64, triton.next_power_of_2(P)))
        grid = (B, triton.cdiv(P, block))
    u = 2.0**-53 if z.dtype == torch.float64 else 2.0**-24
    wrap_triton(_action_kernel)[grid](z, A, tau, steps, plan, out, B, d, P, u, ROW_MODE=row_mode, SHARED=A.dim() == 2,
                                      AXIS=1 if row_mode else 0, BLOCK_D=block_d, BLOCK=block)  # fmt: skip
    return torch.where(torch.isfinite(A).all() & torch.isfinite(plan[1]), out, math.nan)
