// The dense action's plan (Al-Mohy and Higham 2011) and the cost model behind dense_propagate's choice between the
// action and one exp(tau_b A) per sample, for tensors on any device (the norms on the host, the powers of A on its
// device; the plan is a float64 CPU tensor). hkd/ops/dense.py `reference_plan` is the same algorithm in Python, for
// builds without this extension; a test checks that the two agree, and that `dense_theta` (the table of csrc/dense.h)
// equals Python's THETA.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dense.h"
#include "stable.h"

namespace {

using namespace hkd::dense;
using hkd::Tensor;

// s = ceil(tau_max alpha / theta_m) in [1, kMaxSubsteps] (kMaxSubsteps when tau_max alpha is not finite)
double substeps_for(double tau_max, double alpha, int m, bool is_double) {
  const double x = tau_max * alpha;
  if (!std::isfinite(x)) return kMaxSubsteps;
  return std::min<double>(std::max(std::ceil(x / theta(m, is_double)), 1.0), kMaxSubsteps);
}

// max over matrices of ||X||_1 for X (d, d) or (P, d, d), summed in float64 on the host (NaN if any entry is NaN)
double max_norm1(const Tensor& X) {
  if (X.numel() == 0) return 0.0;
  const Tensor x = torch::stable::contiguous(hkd::cpu(X));
  double best = 0;
  hkd::dispatch_floating(x.scalar_type(), "dense_action_plan", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* p = hkd::data<scalar_t>(x);
    const int64_t d = x.size(-1), matrices = x.numel() / (d * d);
    std::vector<double> column(d);
    for (int64_t m = 0; m < matrices; ++m, p += d * d) {
      std::fill(column.begin(), column.end(), 0.0);
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) column[j] += std::abs(double(p[i * d + j]));
      for (double c : column) best = std::isnan(c) || std::isnan(best) ? NAN : std::max(best, c);
    }
  });
  return best;
}

// ceil(log2(x)) clamped to [0, 64], exactly (from the binary exponent); NaN stays NaN
double squarings(double x) {
  if (std::isnan(x)) return x;
  if (std::isinf(x)) return 64;
  int exponent;
  const double mantissa = std::frexp(x, &exponent);
  return std::clamp(double(exponent - (mantissa == 0.5)), 0.0, 64.0);
}

struct ActionPlan {
  int degree;
  double alpha, cost;  // cost: m s, the Taylor terms of the sample with the largest |tau|
};

// The plan of fewest terms m s (then fewest substeps) for d[p - 1] = d_p = ||A^p||_1^(1/p), p = 1..d.size():
// alpha = min over the p allowed for m (p(p - 1) <= m + 1) of max(d_p, d_{p+1}), and d_1 itself.
ActionPlan best_plan(const std::vector<double>& d, double tau_max, bool is_double) {
  ActionPlan best{0, 0, std::numeric_limits<double>::infinity()};
  double best_steps = 0;
  for (int m = 1; m <= action_max_degree(is_double); ++m) {
    double alpha = d[0];
    for (size_t p = 2; p < d.size() && p * (p - 1) <= size_t(m + 1); ++p)
      alpha = std::min(alpha, std::max(d[p - 1], d[p]));
    const double s = substeps_for(tau_max, alpha, m, is_double);
    if (m * s < best.cost || (m * s == best.cost && s < best_steps)) best = {m, alpha, m * s}, best_steps = s;
  }
  return best;
}

// (degree m, alpha, choice) for exp(tau_b A) z, z (B, d, P), A (d, d) or (P, d, d), tau (B,); alpha is NaN when A
// or tau is not finite. choice: 1 if the action is cheaper than one expm per sample, else 0, or -1 when those
// matrices are float32 and go to float64 (expm_in_float64).
Tensor dense_action_plan(Tensor A, Tensor tau, int64_t positions) {
  HKD_CHECK(A.dim() == 2 || A.dim() == 3, "hkd::dense_action_plan: A must be (d, d) or (P, d, d), got ", hkd::shape(A));
  HKD_CHECK(tau.dim() <= 1, "hkd::dense_action_plan: tau must be (B,), got ", hkd::shape(tau));
  const bool is_double = A.scalar_type() == hkd::ScalarType::Double;
  const int64_t d = A.size(-1), batch = tau.numel(), matrices = A.dim() == 3 ? A.size(0) : 1;
  const double norm = max_norm1(A);
  const Tensor tau_host = torch::stable::contiguous(hkd::to(hkd::cpu(tau), hkd::ScalarType::Double));
  const double* t = hkd::data<double>(tau_host);
  double tau_max = 0.0;
  for (int64_t b = 0; b < batch; ++b) tau_max = std::isnan(t[b]) ? NAN : std::max(tau_max, std::abs(t[b]));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (!std::isfinite(norm) || !std::isfinite(tau_max)) return hkd::host_tensor({1.0, nan, 1.0});
  // the plan from ||A||_1; then from the norms of A's powers, when they cost at most a quarter of it: one power of A
  // costs (matrices d^3) / (d^2 columns) Taylor terms
  ActionPlan plan = best_plan({norm}, tau_max, is_double);
  const double power_cost = double(matrices) * d / double(std::max<int64_t>(batch * positions, 1));
  const int powers = d ? int(std::min<double>(max_powers(is_double), 1 + std::floor(plan.cost / (4 * power_cost)))) : 0;
  if (powers >= 3 && norm > 0) {
    const Tensor X = hkd::divided(A, norm);  // d_p from powers of A / ||A||_1: no overflow
    Tensor power = X;
    std::vector<double> dp{norm};
    for (int p = 2; p <= powers; ++p) {
      power = torch::stable::matmul(power, X);
      dp.push_back(norm * std::pow(max_norm1(power), 1.0 / p));
    }
    plan = best_plan(dp, tau_max, is_double);
  }
  // the cost model: the action takes m s_b Taylor terms for sample b, each 2 d^2 P flops; one expm(tau_b A) per
  // sample (and matrix) costs (cost(m) + squarings) 2 d^3 by the plan expm makes for ||tau_b A||_1, then the GEMM;
  // twice that when float32 matrices go to float64 (expm_in_float64)
  const bool tau_double = tau.scalar_type() == hkd::ScalarType::Double;
  double expm_cost[kExpmDegreeCount], expm_theta[kExpmDegreeCount];  // (per degree, once: the loop below is hot)
  for (int i = 0; i < kExpmDegreeCount; ++i)
    expm_cost[i] = ps_cost(expm_degree(i)), expm_theta[i] = theta(expm_degree(i), tau_double);
  double terms = 0, products = 0;
  for (int64_t b = 0; b < batch; ++b) {
    terms += action_substeps(t[b], plan.degree, plan.alpha, tau_double);
    double fewest = std::numeric_limits<double>::infinity();
    for (int i = 0; i < kExpmDegreeCount; ++i) {
      const double cost = expm_cost[i] + squarings(std::abs(t[b]) * norm / expm_theta[i]);
      fewest = std::isnan(cost) || std::isnan(fewest) ? nan : std::min(fewest, cost);
    }
    products += fewest;
  }
  const bool wide = expm_in_float64(tau_max * norm, is_double);
  const double action = plan.degree * terms * 2 * d * d * positions;
  const double per_sample = products * matrices * 2 * d * d * d * (wide ? 2 : 1) + 2.0 * d * d * batch * positions;
  return hkd::host_tensor({double(plan.degree), plan.alpha, action <= per_sample ? 1.0 : wide ? -1.0 : 0.0});
}

// theta_m, m = 1..kMaxDegree, of csrc/dense.h for float64 or float32
Tensor dense_theta(hkd::ScalarType dtype) {
  std::vector<double> values;
  for (int m = 1; m <= kMaxDegree; ++m) values.push_back(theta(m, dtype == hkd::ScalarType::Double));
  return hkd::host_tensor(values);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(hkd, CompositeExplicitAutograd, m) {
  m.impl("dense_action_plan", TORCH_BOX(&dense_action_plan));
  m.impl("dense_theta", TORCH_BOX(&dense_theta));
}
