// The checks of csrc/inputs.h.
#include "inputs.h"

#include <cmath>

#include "dense.h"

namespace hkd::spectral {

Inputs checked_inputs(const std::vector<Tensor>& latents, const std::vector<Tensor>& alphas,
                      const std::vector<Tensor>& betas, const Tensor& tau) {
  HKD_CHECK(!latents.empty(), "spectral_propagate: empty list of levels");
  HKD_CHECK(alphas.size() == latents.size() && betas.size() == latents.size(), "spectral_propagate: ",
            latents.size(), " latents but ", alphas.size(), " alphas and ", betas.size(), " betas");
  const Tensor& z0 = latents[0];
  HKD_CHECK(z0.dim() >= 2, "spectral_propagate: level 0 latent must be (B, d, *S), got ", shape(z0));
  HKD_CHECK(is_floating(z0.scalar_type()), "spectral_propagate: latents must be floating point");
  const ScalarType param_type = opmath_type(z0.scalar_type());
  const int64_t batch = z0.size(0);
  Inputs in{{}, {}, {}, tau, batch};
  for (size_t l = 0; l < latents.size(); ++l) {
    const Tensor &z = latents[l], &alpha = alphas[l], &beta = betas[l];
    HKD_CHECK(z.dim() >= 2 && z.size(0) == batch && z.size(1) % 2 == 0, "spectral_propagate: level ", l, " latent ",
              shape(z), " must be (", batch, ", even d, *S)");
    HKD_CHECK(z.scalar_type() == z0.scalar_type(), "spectral_propagate: level ", l, " dtype differs from level 0");
    bool fits = same_sizes(alpha.sizes(), beta.sizes()) && alpha.dim() >= 1 && alpha.size(0) == z.size(1) / 2 &&
                (alpha.dim() == 1 || alpha.dim() == z.dim() - 1);
    for (int64_t i = 1; fits && alpha.dim() > 1 && i < alpha.dim(); ++i) fits = alpha.size(i) == z.size(i + 1);
    HKD_CHECK(fits, "spectral_propagate: level ", l, " alpha ", shape(alpha), " and beta ", shape(beta),
              " must both be (d/2,) or (d/2, *S) for the latent ", shape(z));
    HKD_CHECK(alpha.scalar_type() == param_type && beta.scalar_type() == param_type, "spectral_propagate: level ", l,
              " alpha and beta must be ", name(param_type));
    for (const Tensor* t : {&z, &alpha, &beta})
      HKD_CHECK(t->device() == z0.device(), "spectral_propagate: level ", l, " tensors on different devices");
    in.latents.push_back(torch::stable::contiguous(z));
    in.alphas.push_back(torch::stable::contiguous(alpha));
    in.betas.push_back(torch::stable::contiguous(beta));
  }
  HKD_CHECK(tau.scalar_type() == param_type && (tau.dim() == 0 || (tau.dim() == 1 && tau.size(0) == batch)) &&
                tau.device() == z0.device(),
            "spectral_propagate: tau must be a ", name(param_type), " scalar or (", batch,
            ",) tensor on the latents' device, got ", shape(tau));
  in.tau = torch::stable::contiguous(tau);
  return in;
}

std::vector<Tensor> checked_grads(const std::vector<Tensor>& grads, const std::vector<Tensor>& latents) {
  HKD_CHECK(grads.size() == latents.size(), "spectral_propagate_backward: ", grads.size(), " grads for ",
            latents.size(), " levels");
  std::vector<Tensor> out;
  for (size_t l = 0; l < grads.size(); ++l) {
    HKD_CHECK(same_sizes(grads[l].sizes(), latents[l].sizes()) &&
                  grads[l].scalar_type() == latents[l].scalar_type() && grads[l].device() == latents[l].device(),
              "spectral_propagate_backward: level ", l, " grad must be a tensor like its latent");
    out.push_back(torch::stable::contiguous(grads[l]));
  }
  return out;
}

}  // namespace hkd::spectral

namespace hkd::dense {

Tensor checked_matrices(const Tensor& A, const char* op) {
  HKD_CHECK(A.scalar_type() == ScalarType::Float || A.scalar_type() == ScalarType::Double, "hkd::", op,
            ": expected float32 or float64, got ", name(A.scalar_type()));
  HKD_CHECK(A.dim() >= 2 && A.size(-1) == A.size(-2), "hkd::", op, ": expected (..., n, n), got ", shape(A));
  return torch::stable::reshape(torch::stable::contiguous(A), {-1, A.size(-1), A.size(-1)});
}

namespace {

template <typename T>
bool all_finite(const T* x, int64_t count) {
  T zero = 0;  // x * 0 is NaN exactly when x is NaN or infinite
#pragma omp simd reduction(+ : zero)
  for (int64_t i = 0; i < count; ++i) zero += x[i] * T(0);
  return !std::isnan(zero);
}

// Whether every entry of a contiguous float32/float64 tensor is finite (one pass on the host).
bool all_finite(const Tensor& x) {
  const Tensor host = cpu(x);
  bool finite = true;
  dispatch_floating(host.scalar_type(), "all_finite",
                    [&](auto tag) { finite = all_finite(data<decltype(tag)>(host), host.numel()); });
  return finite;
}

}  // namespace

// The action ops' inputs, checked (any device; the caller checks it): z (B, d, P); A (d, d) shared or (P, d, d) per
// position; tau (B,); the plan (degree m, alpha) from dense_action_plan. z, A and tau come back contiguous in z's
// dtype; `finite` is false when alpha or an entry of A is not finite (the results are NaN then).
ActionInputs checked_action_inputs(const Tensor& z, const Tensor& A, const Tensor& tau, const Tensor& plan,
                                   const char* op) {
  HKD_CHECK(z.scalar_type() == ScalarType::Float || z.scalar_type() == ScalarType::Double, "hkd::", op,
            ": expected float32 or float64, got ", name(z.scalar_type()));
  HKD_CHECK(z.dim() == 3, "hkd::", op, ": z must be (B, d, P), got ", shape(z));
  const int64_t B = z.size(0), d = z.size(1), P = z.size(2);
  const bool shared = A.dim() == 2;
  HKD_CHECK((shared && A.size(0) == d && A.size(1) == d) ||
                (A.dim() == 3 && A.size(0) == P && A.size(1) == d && A.size(2) == d),
            "hkd::", op, ": A must be (d, d) or (P, d, d) for z ", shape(z), ", got ", shape(A));
  HKD_CHECK(tau.dim() == 1 && tau.size(0) == B, "hkd::", op, ": tau must be (B,), got ", shape(tau));
  HKD_CHECK(plan.dim() == 1 && plan.numel() == 3, "hkd::", op, ": plan must be dense_action_plan's (3,), got ",
            shape(plan));
  HKD_CHECK(A.device() == z.device() && tau.device() == z.device(), "hkd::", op, ": z, A and tau on one device");
  const Tensor plan_host = torch::stable::contiguous(to(cpu(plan), ScalarType::Double));
  const double degree = data<double>(plan_host)[0], alpha = data<double>(plan_host)[1];
  HKD_CHECK(degree >= 1 && degree <= kMaxDegree, "hkd::", op, ": degree must be in [1, ", kMaxDegree, "], got ",
            degree);
  ActionInputs in{torch::stable::contiguous(z),
                  torch::stable::contiguous(to(A, z.scalar_type())),
                  torch::stable::contiguous(to(tau, z.scalar_type())),
                  int(degree),
                  alpha,
                  B,
                  d,
                  P,
                  shared,
                  true};
  in.finite = alpha >= 0 && alpha <= 1e300 && (z.numel() == 0 || all_finite(in.A));
  return in;
}

}  // namespace hkd::dense
