// The dense ops' checked inputs, shared by the CPU and CUDA glue (defined in csrc/cpu/dense.cpp; the callers check
// the device).
#pragma once
#include <ATen/ATen.h>

namespace hkd::dense {

struct ActionInputs {
  at::Tensor z, A, tau;  // contiguous, in z's dtype
  int degree;
  double alpha;
  int64_t B, d, P;
  bool shared;  // A (d, d) for every position
  bool finite;  // alpha and A finite: otherwise every result is NaN
};

// A (..., n, n) float32 or float64 as a contiguous (count, n, n) batch (expm, expm_backward).
at::Tensor checked_matrices(const at::Tensor& A, const char* op);

ActionInputs checked_action_inputs(const at::Tensor& z, const at::Tensor& A, const at::Tensor& tau,
                                   const at::Tensor& plan, const char* op);

}  // namespace hkd::dense
