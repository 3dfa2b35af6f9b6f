"""The dense action's plan (Al-Mohy and Higham 2011) and the cost model behind dense_propagate's choice between the
action and one exp(tau_b A) per sample: the Python twin of csrc/dense_plan.cpp (the op dense_action_plan), for
builds without the extension; the tests check that the two agree, and that THETA equals csrc/dense.h's table.
The algorithms are described in hkd/ops/dense.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hkd.ops import _backend

# theta_m, m = 1..55 (csrc/dense.h)
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
# The action's degree cap, theta_m ~ 3.5: the terms (h A)^k z / k! stay below about e^3.5 ||z|| for normal A, so
# cancellation in the sum costs at most ~30 u (degree 55 lets them reach e^13 in float32, and the rounding with them).
ACTION_MAX_DEGREE = {torch.float64: 30, torch.float32: 20}
EXPM_DEGREES = (1, 2, 4, 6, 9, 12, 16, 20, 25, 30)


def max_powers(dtype: torch.dtype) -> int:
    """The powers of A the plan can use: alpha_p from ||A^p||_1 and ||A^(p+1)||_1 needs p (p - 1) <= m + 1, m at most
    the action's degree cap (as csrc/dense.h max_powers)."""
    p = 1
    while (p + 1) * p <= ACTION_MAX_DEGREE[torch.float64 if dtype == torch.float64 else torch.float32] + 1:
        p += 1
    return p + 1


def _theta(dtype: torch.dtype) -> tuple[float, ...]:
    return THETA[torch.float64 if dtype == torch.float64 else torch.float32]


def ps_cost(m: int) -> int:
    """Matrix products of T_m by Paterson-Stockmeyer."""
    q = math.isqrt(m - 1) + 1 if m > 1 else 1
    return q - 1 + m // q - (m % q == 0)


def _substeps_for(tau_max: float, alpha: float, m: int, theta: tuple[float, ...]) -> int:
    x = math.ceil(tau_max * alpha / theta[m - 1]) if math.isfinite(tau_max * alpha) else MAX_SUBSTEPS
    return min(max(x, 1), MAX_SUBSTEPS)


def _power_norms(A: Tensor, norm: float, count: int) -> list[float]:
    """d_p = max over positions of ||A^p||_1^(1/p), p = 1..count (exact powers of A / ||A||_1: no overflow)."""
    X = A / norm
    power, d = X, [norm]
    for p in range(2, count + 1):
        power = power @ X
        d.append(norm * float(torch.linalg.matrix_norm(power.double(), ord=1).max()) ** (1 / p))
    return d


def action_plan(A: Tensor, tau_max: float, columns: int, dtype: torch.dtype) -> tuple[int, float]:
    """(degree m, alpha) for exp(tau_b A) z with |tau_b| <= tau_max over `columns` vectors (B P); A (d, d) or (P, d, d).
    alpha is NaN when A or tau_max is not finite."""
    norm = float(torch.linalg.matrix_norm(A.detach().double(), ord=1).max()) if A.numel() else 0.0
    if not (math.isfinite(norm) and math.isfinite(tau_max)):
        return 1, math.nan
    theta = _theta(dtype)[: ACTION_MAX_DEGREE[torch.float64 if dtype == torch.float64 else torch.float32]]

    def best(d: list[float]) -> tuple[int, float, int]:  # (m, alpha, m s): fewest terms, then fewest substeps
        plans = []
        for m in range(1, len(theta) + 1):
            alphas = [d[0]] + [max(d[p - 1], d[p]) for p in range(2, len(d)) if p * (p - 1) <= m + 1]
            s = _substeps_for(tau_max, min(alphas), m, theta)
            plans.append((m * s, s, m, min(alphas)))
        cost, _, m, alpha = min(plans)
        return m, alpha, cost

    m, alpha, cost = best([norm])
    if A.shape[-1] == 0:  # an empty level: nothing to evolve
        return m, alpha
    # one power of A costs (matrices d^3) / (d^2 columns) Taylor terms; spend at most a quarter of the plan on them
    power_cost = (A.shape[0] if A.dim() == 3 else 1) * A.shape[-1] / max(columns, 1)
    powers = min(max_powers(dtype), 1 + int(cost / (4 * power_cost)))
    if powers >= 3 and norm > 0:
        m, alpha, _ = best(_power_norms(A.detach().to(dtype), norm, powers))
    return m, alpha


def action_substeps(tau: Tensor, m: int | Tensor, alpha: float | Tensor) -> Tensor:
    """s_b = ceil(|tau_b| alpha / theta_m) in [1, MAX_SUBSTEPS], float64 (as csrc/dense.h action_substeps); m and
    alpha may be numbers or 0-d tensors (a plan's entries: no host sync)."""
    theta = torch.tensor(_theta(tau.dtype), dtype=torch.float64, device=tau.device)[m - 1]
    x = torch.ceil(tau.double().abs() * alpha / theta)
    return torch.where(x >= 1, x, 1.0).clamp(max=MAX_SUBSTEPS)


def squarings(x: Tensor) -> Tensor:
    """ceil(log2(x)) clamped to [0, 64], exactly (from the binary exponent; NaN stays NaN), as csrc/dense_plan.cpp."""
    mantissa, exponent = torch.frexp(x)
    s = (exponent - (mantissa == 0.5).int()).double()
    return torch.where(x.isnan(), math.nan, torch.where(x.isinf(), 64.0, s.clamp(0, 64)))


def expm_terms(norms: Tensor, dtype: torch.dtype) -> Tensor:
    """Matrix products of hkd's expm for each ||A||_1 in `norms`: min over degrees of cost(m) + squarings."""
    theta = _theta(dtype)
    return torch.stack([ps_cost(m) + squarings(norms / theta[m - 1]) for m in EXPM_DEGREES]).amin(0)


def expm_in_float64(max_norm: float, dtype: torch.dtype) -> bool:
    """Whether the per-sample exp(tau_b A) of float32 matrices runs in float64 (max_norm: max ||tau_b A||_1): when
    float32 would square more than 4 times at the top degree (as csrc/dense.h expm_in_float64)."""
    return dtype != torch.float64 and max_norm > 16 * _theta(dtype)[EXPM_DEGREES[-1] - 1]


def choose_algorithm(A: Tensor, tau: Tensor, positions: int, degree: int, alpha: float) -> str:
    """Per-sample tau: "action" (at most m s_b Taylor terms for sample b, each 2 d^2 P flops) or "expm" (one
    exp(tau_b A) per sample (and position): (cost(m) + s) 2 d^3 each, by the plan hkd's expm makes for
    ||tau_b A||_1, then the GEMM 2 d^2 B P), or "expm64": the same with float32 matrices in float64
    (`expm_in_float64`), at twice the cost. The action's side uses the action's own plan (degree, alpha)."""
    if not math.isfinite(alpha):
        return "action"
    d = A.shape[-1]
    terms = degree * float(action_substeps(tau, degree, alpha).sum())
    norms = tau.double().abs().cpu() * float(torch.linalg.matrix_norm(A.double(), ord=1).max()) if A.numel() else 0.0
    products = float(expm_terms(torch.as_tensor(norms), tau.dtype).sum()) * (A.shape[0] if A.dim() == 3 else 1)
    wide = expm_in_float64(float(torch.as_tensor(norms).max()) if len(tau) else 0.0, A.dtype)
    action = terms * 2 * d * d * positions
    per_sample = products * 2 * d**3 * (2 if wide else 1) + 2 * d * d * len(tau) * positions
    return "action" if action <= per_sample else "expm64" if wide else "expm"


def reference_plan(A: Tensor, tau: Tensor, positions: int) -> Tensor:
    """The action's plan for z (B, d, P = positions), A (d, d) or (P, d, d), tau (B,): a float64 CPU tensor (degree m,
    alpha, choice: 1 if the action is cheaper than one expm per sample, else 0, or -1 for "expm64"). The op
    dense_action_plan computes the same in C++ (csrc/dense_plan.cpp); this is its twin for builds without the
    extension."""
    A, tau = A.detach(), tau.detach()
    tau_max = float(tau.abs().max()) if tau.numel() else 0.0
    m, alpha = action_plan(A, tau_max, len(tau) * positions, A.dtype)
    choice = {"action": 1.0, "expm": 0.0, "expm64": -1.0}[choose_algorithm(A, tau, positions, m, alpha)]
    return torch.tensor([m, alpha, choice], dtype=torch.float64)


if _backend.extension_loaded():
    dense_action_plan = torch.ops.hkd.dense_action_plan
else:
    dense_action_plan = torch.library.custom_op("hkd::dense_action_plan", reference_plan, mutates_args=())
torch.library.register_fake("hkd::dense_action_plan")(lambda A, tau, positions: torch.empty(3, dtype=torch.float64))
