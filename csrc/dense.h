// The maths shared by every exp(A) / exp(tau A) z kernel (CPU, CUDA; mirrored in hkd/ops/dense.py and
// kernels/dense.py): torch-free, host and device.
//
// Both algorithms use the truncated Taylor series T_m(X) = sum_{k<=m} X^k / k! with scaling:
//   expm:   exp(A) = T_m(A / 2^s)^(2^s), T_m evaluated by Paterson-Stockmeyer (cost(m) matrix products),
//           (m, s) minimising cost(m) + s subject to ||A||_1 / 2^s <= theta_m (ties: fewer squarings, the
//           phase where rounding errors grow);
//   action: exp(tau_b A) z_b = (T_m(h_b A))^(s_b) z_b, h_b = tau_b / s_b, s_b = ceil(|tau_b| alpha / theta_m)
//           (Al-Mohy and Higham 2011, expm_multiply). The plan (m, alpha) comes from dense_action_plan (csrc/dense_plan.cpp;
//           its Python twin hkd/ops/dense.py plan): alpha = max(d_p, d_{p+1}), d_p = ||A^p||_1^(1/p), p(p-1) <= m+1, minimising m s. Each
//           substep stops early per vector (a column z[b, :, p]) once ||v_{k-1}||_inf + ||v_k||_inf <=
//           u ||y||_inf (terms v_k, partial sum y): its later terms are zero (`converged`).
// theta_m is the largest theta with backward-error bound h_{m+1}(theta) / theta <= u (u = 2^-53 for double,
// 2^-24 for float), h_{m+1}(x) = sum |c_k| x^k, log(e^{-x} T_m(x)) = sum_{k>m} c_k x^k (Al-Mohy and Higham
// 2009, table A.3; recomputed with mpmath, 3 digits).
#pragma once

#ifndef __CUDACC_RTC__
#include <cmath>
#endif

#include "common.h"

namespace hkd::dense {

constexpr int kMaxDegree = 55;
constexpr int kMaxSquarings = 64;     // ||A||_1 up to 2^64 * theta; beyond that exp overflows anyway
constexpr int kMaxSubsteps = 100000;  // ||tau A||_1 up to ~1e6
// The action's degree cap, theta_m ~ 3.5: the terms (h A)^k z / k! stay below about e^3.5 ||z|| for normal A, so
// cancellation in the sum costs at most ~30 u (degree 55 lets them reach e^13 in float32, and the rounding with them).
HKD_HD int action_max_degree(bool is_double) { return is_double ? 30 : 20; }
// The powers of A the plan can use: alpha_p from ||A^p||_1 and ||A^(p+1)||_1 needs p (p - 1) <= m + 1, m <= the cap.
HKD_HD int max_powers(bool is_double) {
  int p = 1;
  while ((p + 1) * p <= action_max_degree(is_double) + 1) ++p;
  return p + 1;
}
// The degrees expm chooses from (each the largest with its Paterson-Stockmeyer cost), i = 0..kExpmDegreeCount-1
constexpr int kExpmDegreeCount = 10;
HKD_HD int expm_degree(int i) {
  constexpr int degrees[kExpmDegreeCount] = {1, 2, 4, 6, 9, 12, 16, 20, 25, 30};
  return degrees[i];
}

HKD_HD double theta(int m, bool is_double) {
  constexpr double d[kMaxDegree] = {
      2.21e-16, 2.58e-08, 1.39e-05, 0.00034, 0.0024, 0.00907, 0.0238, 0.0499, 0.0896, 0.144, 0.214, 0.3, 0.4, 0.514,
      0.641,    0.78,     0.931,    1.09,    1.26,   1.44,    1.62,   1.82,   2.01,   2.22,  2.43,  2.64, 2.86, 3.08,
      3.31,     3.54,     3.77,     4.01,    4.25,   4.49,    4.73,   4.97,   5.22,   5.47,  5.72,  5.97, 6.22, 6.48,
      6.73,     6.99,     7.25,     7.5,     7.76,   8.02,    8.28,   8.55,   8.81,   9.07,  9.34,  9.6,  9.87};
  constexpr double f[kMaxDegree] = {
      1.19e-07, 0.000598, 0.0112, 0.0512, 0.131, 0.25, 0.401, 0.58, 0.78, 0.995, 1.22, 1.46, 1.71, 1.96,
      2.22,     2.48,     2.74,   3.01,   3.28,  3.55, 3.82,  4.1,  4.37, 4.65,  4.93, 5.2,  5.48, 5.76,
      6.04,     6.32,     6.6,    6.88,   7.16,  7.44, 7.72,  8.0,  8.29, 8.57,  8.85, 9.13, 9.41, 9.69,
      9.98,     10.3,     10.5,   10.8,   11.1,  11.4, 11.7,  11.9, 12.2, 12.5,  12.8, 13.1, 13.4};
  return is_double ? d[m - 1] : f[m - 1];
}

// Paterson-Stockmeyer: q = ceil(sqrt(m)) powers X^2..X^q, then floor(m/q) Horner steps in X^q
// (one fewer when q divides m, the last block being c_m I).
HKD_HD int ps_block(int m) {
  int q = 1;
  while (q * q < m) ++q;
  return q;
}
HKD_HD int ps_cost(int m) {
  const int q = ps_block(m);
  return q - 1 + m / q - (m % q == 0 ? 1 : 0);
}

struct Plan {
  int degree;     // m
  int steps;      // squarings s
  bool finite;    // false: the norm is inf or NaN and the result is NaN
};

// exp(A) by Paterson-Stockmeyer Taylor + squaring, from norm = ||A||_1.
HKD_HD Plan expm_plan(double norm, bool is_double) {
  if (!(norm <= 1e300)) return {1, 0, false};
  Plan best{30, kMaxSquarings, true};
  int best_cost = 1 << 30;
  for (int i = 0; i < kExpmDegreeCount; ++i) {
    const int m = expm_degree(i);
    int s = 0;
    double scaled = norm;
    while (scaled > theta(m, is_double) && s < kMaxSquarings) scaled *= 0.5, ++s;
    const int cost = ps_cost(m) + s;
    if (cost <= best_cost) best = {m, s, true}, best_cost = cost;  // ties: the higher degree, fewer squarings
  }
  return best;
}

// Whether dense_propagate's per-sample exp(tau_b A) of float32 matrices runs in float64 (max_norm: max ||tau_b A||_1):
// when float32 would square more than 4 times at the top degree. Each squaring about doubles the float32 result's
// rounding error, which the action's does not do; float64 costs about twice the time (benchmarks/RESULTS.md).
HKD_HD bool expm_in_float64(double max_norm, bool is_double) {
  return !is_double && max_norm > 16 * theta(expm_degree(kExpmDegreeCount - 1), false);
}

// The action's substeps for one sample: s_b = ceil(|tau_b| alpha / theta_m) in [1, kMaxSubsteps] (NaN: 1).
HKD_HD int action_substeps(double tau, int degree, double alpha, bool is_double) {
  const double x = ceil((tau < 0 ? -tau : tau) * alpha / theta(degree, is_double));
  return !(x >= 1) ? 1 : x > kMaxSubsteps ? kMaxSubsteps : int(x);
}

// The per-vector convergence test after term k: previous and current terms' max-abs against the sum's.
HKD_HD bool converged(double previous_term, double term, double sum, bool is_double) {
  const double u = is_double ? 1.1102230246251565e-16 : 5.9604644775390625e-08;  // 2^-53, 2^-24
  return previous_term + term <= u * sum;
}

HKD_HD double inv_factorial(int k) {
  double r = 1;
  for (int i = 2; i <= k; ++i) r /= i;
  return r;
}

}  // namespace hkd::dense
