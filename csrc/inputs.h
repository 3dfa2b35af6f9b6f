// The checked inputs of every op, shared by the CPU and CUDA glue (csrc/inputs.cpp): the shapes, dtypes and devices
// each kernel relies on for memory safety, returned as contiguous tensors (the kernels index them so; a no-op for
// contiguous ones): strided, expanded (stride 0), sliced or channels_last arguments are copied. The callers check the
// device type.
#pragma once
#include <vector>

#include "stable.h"

namespace hkd::spectral {

struct Inputs {
  std::vector<Tensor> latents, alphas, betas;  // latents (B, d, *S); alphas, betas (d/2,) or (d/2, *S), opmath dtype
  Tensor tau;                                  // 0-d or (B,), opmath dtype
  int64_t batch;
};

Inputs checked_inputs(const std::vector<Tensor>& latents, const std::vector<Tensor>& alphas,
                      const std::vector<Tensor>& betas, const Tensor& tau);
// The upstream gradients of the backward, checked against the latents.
std::vector<Tensor> checked_grads(const std::vector<Tensor>& grads, const std::vector<Tensor>& latents);

}  // namespace hkd::spectral

namespace hkd::dense {

struct ActionInputs {
  Tensor z, A, tau;  // contiguous, in z's dtype
  int degree;
  double alpha;
  int64_t B, d, P;
  bool shared;  // A (d, d) for every position
  bool finite;  // alpha and A finite: otherwise every result is NaN
};

// A (..., n, n) float32 or float64 as a contiguous (count, n, n) batch (expm, expm_backward).
Tensor checked_matrices(const Tensor& A, const char* op);

ActionInputs checked_action_inputs(const Tensor& z, const Tensor& A, const Tensor& tau, const Tensor& plan,
                                   const char* op);

}  // namespace hkd::dense
