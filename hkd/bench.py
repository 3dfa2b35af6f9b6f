"""Kernel benchmarks that ship with the package (`hkd bench`): every usable backend of the fused ops side by side with
its baseline, as ratios, in one run. Rows are timed interleaved (round-robin over the rows, minimum per row) so that
load on a shared machine hits every row alike. The Triton interpreter is not a timing vehicle: Triton rows appear
only on a GPU.

spectral  hkd.ops.spectral_propagate on workload W of issue 3: B = 64 (and larger B), three levels of 256 channels at
          32x32, 16x16, 8x8, per-position generators, per-sample tau, float32. Rows: the floor (a copy of the same
          bytes: `clone` allocates its output like the op does, `copy_` writes into a preallocated buffer), the eager
          composite (hkd.ops.reference), torch.compile of that composite (the baseline), every usable backend;
          forward, and forward + backward (gradients for latents, alphas and betas; tau needs none).
dense     hkd.ops.dense_propagate with per-sample tau, z (B, d, P), one shared A (d x d) with ||A||_1 = 2,
          tau_b ~ U(0, 1), against the better of two plain-PyTorch composites: the Taylor action (one GEMM + scale + add
          per term, the same degree and substeps as the fused kernels) and one torch.linalg.matrix_exp(tau_b A) per
          sample then bmm; each backend also forced to each algorithm. And hkd.ops.expm against torch.linalg.matrix_exp,
          forward and forward + backward. Ratio = baseline time / row time (> 1: faster than the baseline).
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable

import torch

from hkd.ops import _backend, dense, dense_propagate, expm, reference, spectral_propagate

SPECTRAL_LEVELS = [(256, 32, 32), (256, 16, 16), (256, 8, 8)]
ACTION_WORKLOADS = [(256, 256, 1), (1024, 128, 1), (256, 64, 1), (256, 64, 64), (64, 32, 1024)]  # (B, d, P)
EXPM_WORKLOADS = [(1024, 32), (256, 64)]  # (count, n)


def fast_backends(device: torch.device) -> list[str]:
    """The compiled backends worth timing here (not the reference, not Triton under its CPU interpreter)."""
    return [b for b in ("cpu", "cuda", "triton") if _backend.usable(b, device) and not _backend.triton_interpreted()]


def describe(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return (
        f"{device.type} ({where}; {os.cpu_count()} cpus, {torch.get_num_threads()} threads), torch {torch.__version__}"
    )


def measure(rows: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Minimum seconds per row over `repeats` interleaved rounds, after one warm-up call each (which also compiles)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in rows.values():
        fn()
    best = dict.fromkeys(rows, math.inf)
    for _ in range(repeats):
        for name, fn in rows.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


# -- spectral ---------------------------------------------------------------------------------------------------------


def spectral_workload(batch: int, device, levels=SPECTRAL_LEVELS):
    """Workload W at batch `batch`: latents, alphas, betas (per position) and a per-sample tau in [0, 80]."""
    latents = [torch.randn(batch, *s, device=device) for s in levels]
    alphas = [torch.randn(d // 2, h, w, device=device) * 0.01 for d, h, w in levels]
    betas = [torch.randn(d // 2, h, w, device=device) for d, h, w in levels]
    tau = torch.rand(batch, device=device) * 80
    return latents, alphas, betas, tau


def bench_spectral(
    batches=(64, 128), device="cpu", repeats: int = 15, compile: bool = True, levels=SPECTRAL_LEVELS, out=print
) -> None:
    device = torch.device(device)
    out(f"# hkd bench spectral: {describe(device)}")
    ops = {"eager composite": reference.spectral_propagate}
    if compile:
        ops["torch.compile (baseline)"] = torch.compile(reference.spectral_propagate)
    for b in fast_backends(device):
        ops[f"hkd {b}"] = lambda z, a, c, t, b=b: spectral_propagate(z, a, c, t, backend=b)
    for batch in batches:
        _spectral_table(spectral_workload(batch, device, levels), ops, device, repeats, out)


def _spectral_table(workload, ops: dict, device: torch.device, repeats: int, out) -> None:
    latents, alphas, betas, tau = workload
    batch = len(tau)
    buffers = [torch.empty_like(z) for z in latents]
    grads = [torch.randn_like(z) for z in latents]
    leaves = [t.requires_grad_() for t in (*latents, *alphas, *betas)]

    def forward(fn):
        def step():
            with torch.no_grad():
                fn(latents, alphas, betas, tau)

        return step

    def forward_backward(fn):
        return lambda: torch.autograd.backward(fn(latents, alphas, betas, tau), grads, inputs=leaves)

    rows = {
        "copy_ (preallocated)": lambda: [b.copy_(z) for b, z in zip(buffers, latents, strict=True)],
        "clone (floor)": lambda: [z.detach().clone() for z in latents],
    }
    rows |= {(name, "fwd"): forward(fn) for name, fn in ops.items()}
    rows |= {(name, "fwd+bwd"): forward_backward(fn) for name, fn in ops.items()}
    t = measure(rows, repeats, device)
    floor = t["clone (floor)"]
    base = {p: t.get(("torch.compile (baseline)", p), math.nan) for p in ("fwd", "fwd+bwd")}
    gbytes = 2 * sum(z.numel() * z.element_size() for z in latents) / 1e9
    out(f"\nB = {batch}: {gbytes:.3f} GB read + written per forward; min of {repeats}")
    out(f"{'':26} {'fwd ms':>8} {'/floor':>7} {'/compile':>9}   {'fwd+bwd ms':>10} {'/compile':>9}")
    for name in ("copy_ (preallocated)", "clone (floor)"):
        out(f"{name:26} {t[name] * 1e3:8.2f} {t[name] / floor:7.2f}")
    for name in ops:
        f, fb = t[(name, "fwd")], t[(name, "fwd+bwd")]
        out(
            f"{name:26} {f * 1e3:8.2f} {f / floor:7.2f} {f / base['fwd']:9.2f}   "
            f"{fb * 1e3:10.2f} {fb / base['fwd+bwd']:9.2f}"
        )


# -- dense ------------------------------------------------------------------------------------------------------------


def action_workload(B: int, d: int, P: int, device):
    A = torch.randn(d, d, device=device)
    A = A * (2.0 / torch.linalg.matrix_norm(A, ord=1))
    return torch.randn(B, d, P, device=device), A, torch.rand(B, device=device)


def per_sample_expm(z, A, tau):
    """The composite that forms every exp(tau_b A) with torch.linalg.matrix_exp, then applies them by bmm."""
    return torch.bmm(torch.linalg.matrix_exp(tau[:, None, None] * A), z)


def _table(out, t: dict[str, float], baseline: float) -> None:
    for name, seconds in t.items():
        out(f"  {name:<36} {seconds * 1e3:10.2f} ms {baseline / seconds:7.2f}x")


def bench_dense(device="cpu", repeats: int = 5, actions=ACTION_WORKLOADS, expms=EXPM_WORKLOADS, out=print) -> None:
    device = torch.device(device)
    out(f"# hkd bench dense: {describe(device)}, float32")
    torch.manual_seed(0)
    for B, d, P in actions:
        _action_table(B, d, P, device, repeats, out)
    for count, n in expms:
        _expm_table(count, n, device, repeats, out)


def _action_table(B: int, d: int, P: int, device: torch.device, repeats: int, out) -> None:
    z, A, tau = action_workload(B, d, P, device)
    norm = dense._action_norm(A, tau)
    m, s = dense.action_plan(norm, torch.float32)
    choice = dense.choose_algorithm(B, d, P, False, norm, torch.float32)
    rows = {
        "composite action (PyTorch)": lambda: dense.taylor_action(z, A, tau),
        "composite per-sample expm (PyTorch)": lambda: per_sample_expm(z, A, tau),
    }
    for b in fast_backends(device):
        rows[f"dense_propagate {b}"] = lambda b=b: dense_propagate([z], [A], tau, backend=b)
        rows[f"  {b} action kernel"] = lambda b=b: dense._action(z, A, tau, b)
        rows[f"  {b} per-sample expm kernel"] = lambda b=b: torch.bmm(dense._expm(tau[:, None, None] * A, b), z)
    t = measure(rows, repeats, device)
    out(f"\naction B={B} d={d} P={P} (Taylor m={m}, s={s}; cost model: {choice}); ratio to the better composite")
    _table(out, t, min(t["composite action (PyTorch)"], t["composite per-sample expm (PyTorch)"]))


def _expm_table(count: int, n: int, device: torch.device, repeats: int, out) -> None:
    A = torch.randn(count, n, n, device=device) / math.sqrt(n)
    G = torch.randn_like(A)
    Ag = A.clone().requires_grad_()

    def fwd_bwd(f):
        Ag.grad = None
        f(Ag).backward(G)

    fast = fast_backends(device)
    fwd = {"torch.linalg.matrix_exp": lambda: torch.linalg.matrix_exp(A)}
    fwd |= {f"hkd expm {b}": lambda b=b: expm(A, backend=b) for b in fast}
    bwd = {"fwd+bwd matrix_exp": lambda: fwd_bwd(torch.linalg.matrix_exp)}
    bwd |= {f"fwd+bwd hkd {b}": lambda b=b: fwd_bwd(lambda X: expm(X, backend=b)) for b in fast}
    t = measure(fwd | bwd, repeats, device)
    norm = float(torch.linalg.matrix_norm(A, ord=1).mean())
    out(f"\nexpm {count} x {n}x{n} (||A||_1 ~ {norm:.1f}); ratio to torch.linalg.matrix_exp")
    _table(out, {k: t[k] for k in fwd}, t["torch.linalg.matrix_exp"])
    _table(out, {k: t[k] for k in bwd}, t["fwd+bwd matrix_exp"])
