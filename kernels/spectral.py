"""Triton kernels of hkd.ops.spectral_propagate (the convention: hkd/ops/reference.py; maths: csrc/spectral.h).

Levels are fused: one launch covers up to MAX_LEVELS levels (the blocks of level l follow those of level l - 1;
HKD has 3-4 levels, more are launched in groups of MAX_LEVELS). The forward maps one element per (b, k, p);
the backward maps one element per (k, p) and loops over the batch, so the parameter gradients reduce in
registers (no atomics), and d/dtau is summed per block into a (blocks, B) buffer reduced afterwards.

`forward` and `backward` become custom ops through torch.library.triton_op in hkd/ops/spectral.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from hkd.kernels.launch import wrap_triton
from torch import Tensor

MAX_LEVELS = 4
FORWARD_BLOCK = 1024
BACKWARD_BLOCK = 128


@triton.jit
def _rotation(alpha, beta, t):
    # The angle beta t in float64 (exact for float32 inputs), reduced by pi/2 there as in csrc/spectral.h: sin and
    # cos then see |r| <= pi/4 in the compute dtype; r is clamped so that a huge angle still gives a rotation.
    x = beta.to(tl.float64) * t.to(tl.float64)
    j = tl.floor(x * 0.63661977236758134308 + 0.5)
    r = (x - j * 1.57079632673412561417) - j * 6.07710050650619224932e-11
    r = tl.where(r > 0.7854, 0.7854, tl.where(r < -0.7854, -0.7854, r)).to(alpha.dtype)
    q = j - 4.0 * tl.floor(j * 0.25)  # j mod 4, or NaN / garbage for a non-finite or huge angle
    q = tl.where((q >= 0.0) & (q < 4.0), q, 0.0).to(tl.int32)
    s, c = tl.sin(r), tl.cos(r)
    sq, cq = tl.where((q & 1) != 0, c, s), tl.where((q & 1) != 0, s, c)
    return tl.exp(alpha * t), tl.where(((q + 1) & 2) != 0, -cq, cq), tl.where((q & 2) != 0, -sq, sq)


@triton.jit
def _forward_level(z, out, alpha, beta, pairs, P, param_k, param_p, block, tau, tau_stride, B, BLOCK: tl.constexpr):
    idx = block * BLOCK + tl.arange(0, BLOCK)  # (b, k, p) flattened
    plane = pairs * P
    mask = idx < B * plane
    b, k, p = idx // plane, (idx % plane) // P, idx % P
    a = tl.load(alpha + k * param_k + p * param_p, mask=mask)
    w = tl.load(beta + k * param_k + p * param_p, mask=mask)
    t = tl.load(tau + b * tau_stride, mask=mask)
    s, c, n = _rotation(a, w, t)
    x_at = b * 2 * plane + 2 * k * P + p
    x = tl.load(z + x_at, mask=mask).to(a.dtype)
    y = tl.load(z + x_at + P, mask=mask).to(a.dtype)
    tl.store(out + x_at, (s * (c * x - n * y)).to(out.dtype.element_ty), mask=mask)
    tl.store(out + x_at + P, (s * (n * x + c * y)).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(
    tau, tau_stride, B,
    z0, out0, alpha0, beta0, pairs0, P0, pk0, pp0,
    z1, out1, alpha1, beta1, pairs1, P1, pk1, pp1, first1,
    z2, out2, alpha2, beta2, pairs2, P2, pk2, pp2, first2,
    z3, out3, alpha3, beta3, pairs3, P3, pk3, pp3, first3,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if pid < first1:
        _forward_level(z0, out0, alpha0, beta0, pairs0, P0, pk0, pp0, pid, tau, tau_stride, B, BLOCK)
    elif pid < first2:
        _forward_level(z1, out1, alpha1, beta1, pairs1, P1, pk1, pp1, pid - first1, tau, tau_stride, B, BLOCK)
    elif pid < first3:
        _forward_level(z2, out2, alpha2, beta2, pairs2, P2, pk2, pp2, pid - first2, tau, tau_stride, B, BLOCK)
    else:
        _forward_level(z3, out3, alpha3, beta3, pairs3, P3, pk3, pp3, pid - first3, tau, tau_stride, B, BLOCK)


@triton.jit
def _backward_level(
    z, grad, grad_z, alpha, beta, grad_alpha, grad_beta, pairs, P, param_k, param_p, block, tau, tau_stride, B,
    tau_partial, NEED_LATENTS: tl.constexpr, NEED_TERMS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    q = block * BLOCK + tl.arange(0, BLOCK)  # (k, p) flattened: this program owns these over the batch
    plane = pairs * P
    mask = q < plane
    k, p = q // P, q % P
    a = tl.load(alpha + k * param_k + p * param_p, mask=mask, other=0.0)
    w = tl.load(beta + k * param_k + p * param_p, mask=mask, other=0.0)
    ga = tl.zeros_like(a)
    gw = tl.zeros_like(a)
    pid = tl.program_id(0)
    for b in range(B):
        t = tl.load(tau + b * tau_stride)
        s, c, n = _rotation(a, w, t)
        x_at = b * 2 * plane + 2 * k * P + p
        gx = tl.load(grad + x_at, mask=mask, other=0.0).to(a.dtype)
        gy = tl.load(grad + x_at + P, mask=mask, other=0.0).to(a.dtype)
        if NEED_LATENTS:
            tl.store(grad_z + x_at, (s * (c * gx + n * gy)).to(grad_z.dtype.element_ty), mask=mask)
            tl.store(grad_z + x_at + P, (s * (c * gy - n * gx)).to(grad_z.dtype.element_ty), mask=mask)
        if NEED_TERMS:
            x = tl.load(z + x_at, mask=mask, other=0.0).to(a.dtype)
            y = tl.load(z + x_at + P, mask=mask, other=0.0).to(a.dtype)
            xe, ye = s * (c * x - n * y), s * (n * x + c * y)
            Pt, Qt = gx * xe + gy * ye, gy * xe - gx * ye
            ga += t * Pt
            gw += t * Qt
            tl.store(tau_partial + pid * B + b, tl.sum(a * Pt + w * Qt, axis=0))
    if NEED_TERMS:  # per position; shared parameters are summed over positions afterwards
        tl.store(grad_alpha + q, ga, mask=mask)
        tl.store(grad_beta + q, gw, mask=mask)


@triton.jit
def _backward_kernel(
    tau, tau_stride, B, tau_partial,
    z0, g0, gz0, alpha0, beta0, ga0, gb0, pairs0, P0, pk0, pp0,
    z1, g1, gz1, alpha1, beta1, ga1, gb1, pairs1, P1, pk1, pp1, first1,
    z2, g2, gz2, alpha2, beta2, ga2, gb2, pairs2, P2, pk2, pp2, first2,
    z3, g3, gz3, alpha3, beta3, ga3, gb3, pairs3, P3, pk3, pp3, first3,
    NEED_LATENTS: tl.constexpr, NEED_TERMS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if pid < first1:
        _backward_level(z0, g0, gz0, alpha0, beta0, ga0, gb0, pairs0, P0, pk0, pp0, pid, tau, tau_stride, B,
                        tau_partial, NEED_LATENTS, NEED_TERMS, BLOCK)  # fmt: skip
    elif pid < first2:
        _backward_level(z1, g1, gz1, alpha1, beta1, ga1, gb1, pairs1, P1, pk1, pp1, pid - first1, tau, tau_stride, B,
                        tau_partial, NEED_LATENTS, NEED_TERMS, BLOCK)  # fmt: skip
    elif pid < first3:
        _backward_level(z2, g2, gz2, alpha2, beta2, ga2, gb2, pairs2, P2, pk2, pp2, pid - first2, tau, tau_stride, B,
                        tau_partial, NEED_LATENTS, NEED_TERMS, BLOCK)  # fmt: skip
    else:
        _backward_level(z3, g3, gz3, alpha3, beta3, ga3, gb3, pairs3, P3, pk3, pp3, pid - first3, tau, tau_stride, B,
                        tau_partial, NEED_LATENTS, NEED_TERMS, BLOCK)  # fmt: skip


def _geometry(z: Tensor, alpha: Tensor) -> tuple[int, int, int, int]:
    """pairs, positions P, and the parameter strides over (k, p): (P, 1) per position, (1, 0) shared."""
    P = math.prod(z.shape[2:])
    return z.shape[1] // 2, P, *((P, 1) if alpha.dim() > 1 else (1, 0))


def _groups(n: int):
    return [range(i, min(i + MAX_LEVELS, n)) for i in range(0, n, MAX_LEVELS)]


def _launch_args(levels: list[list], blocks: list[int]) -> tuple[list, int]:
    """The per-level argument groups (missing levels repeat the last one and are never reached) and the grid."""
    firsts = [sum(blocks[: i + 1]) for i in range(len(blocks))]
    args = []
    for i in range(MAX_LEVELS):
        j = min(i, len(levels) - 1)
        args += levels[j] + ([firsts[i - 1] if i <= len(levels) else firsts[-1]] if i else [])
    return args, firsts[-1]


def _check_size(latents: list[Tensor]) -> None:
    if max(z.numel() for z in latents) >= 2**31:
        raise ValueError("spectral_propagate (triton): a level has 2^31 or more elements; the kernels index in int32")


def forward(latents: list[Tensor], alphas: list[Tensor], betas: list[Tensor], tau: Tensor) -> list[Tensor]:
    _check_size(latents)
    out = [torch.empty_like(z) for z in latents]
    B = latents[0].shape[0]
    tau_stride = 1 if tau.dim() else 0
    for group in _groups(len(latents)):
        levels, blocks = [], []
        for i in group:
            pairs, P, pk, pp = _geometry(latents[i], alphas[i])
            levels.append([latents[i], out[i], alphas[i], betas[i], pairs, P, pk, pp])
            blocks.append(triton.cdiv(B * pairs * P, FORWARD_BLOCK))
        args, grid = _launch_args(levels, blocks)
        if grid:
            wrap_triton(_forward_kernel)[(grid,)](tau, tau_stride, B, *args, BLOCK=FORWARD_BLOCK)
    return out


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
    _check_size(latents)
    B = latents[0].shape[0]
    need_terms = need_params or need_tau
    grad_z = [torch.empty_like(z) for z in latents] if need_latents else []
    # per position even for shared parameters (summed over positions below)
    flat = [(a.shape[0], math.prod(z.shape[2:])) for z, a in zip(latents, alphas, strict=True)]
    grad_alpha = [alphas[0].new_empty(shape) for shape in flat] if need_terms else []
    grad_beta = [alphas[0].new_empty(shape) for shape in flat] if need_terms else []
    tau_stride = 1 if tau.dim() else 0
    partials = []
    for group in _groups(len(latents)):
        levels, blocks = [], []
        for i in group:
            pairs, P, pk, pp = _geometry(latents[i], alphas[i])
            gz = grad_z[i] if need_latents else latents[i]  # never written without NEED_LATENTS
            ga, gb = (grad_alpha[i], grad_beta[i]) if need_terms else (alphas[i], betas[i])
            levels.append([latents[i], grads[i], gz, alphas[i], betas[i], ga, gb, pairs, P, pk, pp])
            blocks.append(triton.cdiv(pairs * P, BACKWARD_BLOCK) if B else 0)
        args, grid = _launch_args(levels, blocks)
        partial = tau.new_zeros(grid if need_terms else 0, B)
        if grid and (need_latents or need_terms):
            wrap_triton(_backward_kernel)[(grid,)](
                tau, tau_stride, B, partial, *args,
                NEED_LATENTS=need_latents, NEED_TERMS=need_terms, BLOCK=BACKWARD_BLOCK,
            )  # fmt: skip
        partials.append(partial)
    grad_tau = tau.new_empty(0)
    if need_tau:
        per_sample = torch.cat(partials).sum(0)
        grad_tau = per_sample if tau.dim() else per_sample.sum()
    if not need_params:
        return grad_z, [], [], grad_tau
    if B == 0:
        grad_alpha, grad_beta = [g.zero_() for g in grad_alpha], [g.zero_() for g in grad_beta]
    for i, a in enumerate(alphas):
        if a.dim() > 1:
            grad_alpha[i], grad_beta[i] = grad_alpha[i].view(a.shape), grad_beta[i].view(a.shape)
        else:
            grad_alpha[i], grad_beta[i] = grad_alpha[i].sum(1), grad_beta[i].sum(1)
    return grad_z, grad_alpha, grad_beta, grad_tau
