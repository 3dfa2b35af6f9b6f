"""Kernel benchmarks that ship with the package (`hkd bench`): every usable backend of the fused ops side by side with
its baseline, as ratios, in one run. Rows are timed interleaved (round-robin over the rows, minimum per row) so that
load on a shared machine hits every row alike. The Triton interpreter is not a timing vehicle: Triton rows appear
only on a GPU.

spectral  hkd.ops.spectral_propagate on workload W: B = 64 (and larger B), three levels of 256 channels at
          32x32, 16x16, 8x8, per-position generators, per-sample tau, float32. Rows: the floor (a copy of the same
          bytes: `clone` allocates its output like the op does, `copy_` writes into a preallocated buffer), the eager
          composite (hkd.ops.reference), torch.compile of that composite (the baseline), every usable backend;
          forward, and forward + backward (gradients for latents, alphas and betas; tau needs none).
dense     hkd.ops.dense_propagate with per-sample tau_b ~ U(0, tau_max), tau_max in {1, 80}, z (B, d, P), one shared A
          (d x d) of each matrix class (`dense_generator`), float32, against the better of two plain-PyTorch composites:
          the Taylor loop with a convergence test (`taylor_composite`) and one torch.linalg.matrix_exp(tau_b A) per
          sample then bmm; forward and forward + backward, each backend's action kernel also forced, scipy's
          expm_multiply (float64, one shared tau = tau_max / 2) as an outside reference point, and the relative error
          of each against float64. First the "plain" workload (256, 256, 1), A = randn / 16,
          tau_b ~ U(0, 2). And hkd.ops.expm against torch.linalg.matrix_exp, forward and forward + backward.
          Ratio = baseline time / row time (> 1: faster than the baseline).
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable

import torch

from hkd.ops import _backend, dense, dense_plan, dense_propagate, expm, reference, spectral_propagate

SPECTRAL_LEVELS = [(256, 32, 32), (256, 16, 16), (256, 8, 8)]


def fast_backends(device: torch.device) -> list[str]:
    """The compiled backends worth timing here (not the reference, not Triton under its CPU interpreter)."""
    return [b for b in ("cpu", "cuda", "triton") if _backend.usable(b, device) and not _backend.triton_interpreted()]


def describe(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return (
        f"{device.type} ({where}; {os.cpu_count()} cpus, {torch.get_num_threads()} threads), torch {torch.__version__}"
    )


def measure(
    rows: dict[str, Callable[[], object]], repeats: int, device: torch.device, clock=time.perf_counter
) -> dict[str, float]:
    """Minimum seconds per row over `repeats` interleaved rounds, after one warm-up call each (which also compiles).
    clock: wall time by default; time.process_time counts only the CPU time this process used (on a shared machine,
    not the time it waited for a core), which is the op's time when it runs on one thread."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in rows.values():
        fn()
    best = dict.fromkeys(rows, math.inf)
    for _ in range(repeats):
        for name, fn in rows.items():
            sync()
            start = clock()
            fn()
            sync()
            best[name] = min(best[name], clock() - start)
    return best


def dense_clock(device: torch.device):
    """Process CPU time on one CPU thread (immune to a shared machine's load), else wall time."""
    return time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


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

MATRIX_CLASSES = ("gaussian 2", "gaussian 15", "gaussian 60", "skew-symmetric", "non-normal", "hkd-like")
CLASS_WORKLOADS = [(256, 64, 1), (32, 32, 64)]  # (B, d, P)
TAU_MAXES = (1.0, 80.0)
SCIPY_ROW = "scipy expm_multiply (shared tau, f64)"


def dense_generator(kind: str, d: int, device=None) -> torch.Tensor:
    """A d x d generator of one matrix class (float64); "plain": randn / 16 as it is (spectral radius ~1).
    gaussian N: randn shifted so that its rightmost eigenvalue has real part 0 (exp(tau A) stays bounded for tau up
    to 80), scaled to ||A||_1 = N. skew-symmetric: every eigenvalue imaginary, ||A||_1 = 60. non-normal: upper
    triangular, diagonal in [-1, -0.1], off-diagonal entries randn * 2. hkd-like: 2x2 rotation-scaling blocks with alpha
    in [-0.05, 0] and beta in [-10, 10], in a random orthogonal basis."""
    g = torch.randn(d, d, dtype=torch.float64)
    if kind == "plain":
        A = g / 16
    elif kind.startswith("gaussian"):
        A = g - torch.linalg.eigvals(g).real.max() * torch.eye(d, dtype=torch.float64)
        A *= float(kind.split()[1]) / torch.linalg.matrix_norm(A, ord=1)
    elif kind == "skew-symmetric":
        A = (g - g.T) * (60 / torch.linalg.matrix_norm(g - g.T, ord=1))
    elif kind == "non-normal":
        A = torch.triu(g, 1) * 2 + torch.diag(-torch.linspace(1.0, 0.1, d, dtype=torch.float64))
    elif kind == "hkd-like":
        alpha, beta = -torch.rand(d // 2, dtype=torch.float64) * 0.05, (torch.rand(d // 2) * 20 - 10).double()
        blocks = torch.zeros(d, d, dtype=torch.float64)
        i = torch.arange(0, d - 1, 2)
        blocks[i, i] = blocks[i + 1, i + 1] = alpha
        blocks[i, i + 1], blocks[i + 1, i] = -beta, beta
        Q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
        A = Q @ blocks @ Q.T
    else:
        raise ValueError(f"unknown matrix class {kind!r}; choose one of {MATRIX_CLASSES + ('plain',)}")
    return A.to(device)


def taylor_composite(z, A, tau, tol: float = 1e-7):
    """The plain-PyTorch Taylor loop: s = ceil(||tau A||_1 / 3) substeps, each stopped once the term's max-abs falls
    below tol times the sum's."""
    s = max(1, math.ceil(float(tau.detach().abs().max()) * float(torch.linalg.matrix_norm(A.detach(), ord=1)) / 3))
    h = (tau / s)[:, None, None]
    y = z
    for _ in range(s):
        v, k = y, 0
        while k < 200:
            k += 1
            v = (A @ v) * (h / k)
            y = y + v
            if float(v.detach().abs().max()) <= tol * float(y.detach().abs().max()):
                break
    return y


def per_sample_expm(z, A, tau):
    """The composite that forms every exp(tau_b A) with torch.linalg.matrix_exp, then applies them by bmm."""
    return torch.bmm(torch.linalg.matrix_exp(tau[:, None, None] * A), z)


def _dense_op(backend: str):
    return lambda z, A, tau: dense_propagate([z], [A], tau, backend=backend)[0]


def _scipy_expm_multiply():
    try:
        from scipy.sparse.linalg import expm_multiply
    except ImportError:
        return None
    return expm_multiply


def bench_dense(
    device="cpu",
    repeats: int = 3,
    workloads=CLASS_WORKLOADS,
    classes=MATRIX_CLASSES,
    tau_maxes=TAU_MAXES,
    expms=((1024, 32), (256, 64)),
    plain: bool = True,
    out=print,
) -> None:
    """dense_propagate with per-sample tau over matrix classes, against the better plain-PyTorch composite."""
    device = torch.device(device)
    clock = "process CPU time" if dense_clock(device) is time.process_time else "wall time"
    out(f"# hkd bench dense: {describe(device)}, float32; min of {repeats} interleaved rounds, {clock}")
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        out(f"# load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    torch.manual_seed(0)
    if plain:
        _class_table(256, 256, 1, ("plain",), 2.0, device, repeats, out)
    for B, d, P in workloads:
        for tau_max in tau_maxes:
            _class_table(B, d, P, classes, tau_max, device, repeats, out)
    for count, n in expms:
        _expm_table(count, n, device, repeats, out)
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        out(f"\n# load average at the end (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


def _class_table(B: int, d: int, P: int, classes, tau_max: float, device, repeats: int, out) -> None:
    """One workload and tau_max: a column per matrix class, a row per method; ratio = the better composite's time /
    the row's time (> 1: faster), forward and forward + backward (gradients for z, A and tau)."""
    expm_multiply = _scipy_expm_multiply()
    cells: dict[str, dict[str, tuple[float, float]]] = {}  # row -> class -> (seconds, ratio)
    notes: dict[str, list[str]] = {"||A||_1": [], "plan m, alpha, mean s": [], "cost model": []}
    errors: dict[str, list[str]] = {}
    for kind in classes:
        A64 = dense_generator(kind, d)
        z = torch.randn(B, d, P, device=device)
        tau = torch.rand(B, device=device) * tau_max
        A = A64.float().to(device)
        leaves = [t.clone().requires_grad_() for t in (z, A, tau)]
        G = torch.randn_like(z)
        plan = dense_plan.dense_action_plan(A, tau, P)
        m, alpha = int(plan[0]), float(plan[1])
        notes["||A||_1"].append(f"{float(torch.linalg.matrix_norm(A64, ord=1)):.1f}")
        mean_steps = float(dense_plan.action_substeps(tau, m, alpha).mean())
        notes["plan m, alpha, mean s"].append(f"{m}, {alpha:.3g}, {mean_steps:.1f}")
        notes["cost model"].append({1.0: "action", 0.0: "expm", -1.0: "expm (float64)"}[float(plan[2])])
        fwd = {
            "composite Taylor (PyTorch)": lambda z=z, A=A, tau=tau: taylor_composite(z, A, tau),
            "composite per-sample expm (PyTorch)": lambda z=z, A=A, tau=tau: per_sample_expm(z, A, tau),
        }
        for b in fast_backends(device):
            fwd[f"dense_propagate {b}"] = lambda z=z, A=A, tau=tau, b=b: dense_propagate([z], [A], tau, backend=b)[0]
            fwd[f"  {b} action kernel"] = lambda z=z, A=A, tau=tau, b=b: dense._action(z, A, tau, b)
        if expm_multiply is not None and device.type == "cpu":
            Z, A_np, t_mean = z.double().permute(1, 0, 2).reshape(d, -1).numpy(), A64.numpy(), tau_max / 2
            fwd[SCIPY_ROW] = lambda A_np=A_np, Z=Z, t=t_mean: expm_multiply(t * A_np, Z)

        def fwd_bwd(f, leaves=leaves, G=G):
            for leaf in leaves:
                leaf.grad = None
            torch.autograd.backward(f(*leaves), G)

        bwd = {
            "fwd+bwd composite Taylor": lambda: fwd_bwd(taylor_composite),
            "fwd+bwd composite per-sample expm": lambda: fwd_bwd(per_sample_expm),
        }
        for b in fast_backends(device):
            bwd[f"fwd+bwd dense_propagate {b}"] = lambda b=b: fwd_bwd(_dense_op(b))
        exact = torch.bmm(reference.expm(tau.double()[:, None, None] * A64.to(device)), z.double())
        for name, f in fwd.items():
            if name != SCIPY_ROW:
                err = float((f().double() - exact).norm() / exact.norm())
                errors.setdefault(name, []).append(f"{err:.1e}")
        if SCIPY_ROW in fwd:
            shared = torch.linalg.matrix_exp(tau_max / 2 * A64) @ torch.from_numpy(Z)
            err = float((torch.from_numpy(fwd[SCIPY_ROW]()) - shared).norm() / shared.norm())
            errors.setdefault(SCIPY_ROW, []).append(f"{err:.1e}")
        t = measure(fwd | bwd, repeats, device, dense_clock(device))
        base = min(t["composite Taylor (PyTorch)"], t["composite per-sample expm (PyTorch)"])
        base_bwd = min(t["fwd+bwd composite Taylor"], t["fwd+bwd composite per-sample expm"])
        for name, seconds in t.items():
            ratio = (base_bwd if name.startswith("fwd+bwd") else base) / seconds
            cells.setdefault(name, {})[kind] = (seconds, ratio)
    out(f"\nB={B} d={d} P={P}, tau_b ~ U(0, {tau_max:g}): ms and ratio to the better composite (> 1: faster)")
    out(f"  {'':<38}" + "".join(f"{kind:>20}" for kind in classes))
    for name, values in notes.items():
        out(f"  {name:<38}" + "".join(f"{v:>20}" for v in values))
    for name, per_class in cells.items():
        row = "".join(
            f"{per_class[k][0] * 1e3:11.2f} {per_class[k][1]:7.2f}x" if k in per_class else f"{'':>20}" for k in classes
        )
        out(f"  {name:<38}{row}")
    out("  relative error against float64 (per-sample expm; scipy: against its shared-tau product)")
    for name, values in errors.items():
        out(f"  {'error ' + name.strip():<38}" + "".join(f"{v:>20}" for v in values))


def _table(out, t: dict[str, float], baseline: float) -> None:
    for name, seconds in t.items():
        out(f"  {name:<36} {seconds * 1e3:10.2f} ms {baseline / seconds:7.2f}x")


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
    t = measure(fwd | bwd, repeats, device, dense_clock(device))
    norm = float(torch.linalg.matrix_norm(A, ord=1).mean())
    out(f"\nexpm {count} x {n}x{n} (||A||_1 ~ {norm:.1f}); ratio to torch.linalg.matrix_exp")
    _table(out, {k: t[k] for k in fwd}, t["torch.linalg.matrix_exp"])
    _table(out, {k: t[k] for k in bwd}, t["fwd+bwd matrix_exp"])
