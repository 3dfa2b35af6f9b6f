// TORCH_LIBRARY_IMPL(hkd, CUDA): the dense ops on the GPU. Small sizes run the on-chip kernels of
// csrc/cuda/dense.cu; larger n (and the Frechet adjoint) run the same Paterson-Stockmeyer Taylor algorithm
// (csrc/dense.h) as batched GEMMs (cuBLAS), with one plan for the batch from its largest 1-norm.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "cuda/dense_kernels.h"
#include "dense.h"
#include "dense_inputs.h"

namespace {

using hkd::dense::Plan;

void check(const at::Tensor& t, const char* op) { TORCH_CHECK(t.is_cuda(), "hkd::", op, ": expected CUDA tensors"); }

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "hkd::", op, ": CUDA launch failed (error ", err, ")");
}

double max_norm1(const at::Tensor& A) {  // max over the batch of max_j sum_i |A_ij|; NaN if any is NaN
  const at::Tensor norms = A.abs().sum(-2).amax(-1);
  return norms.isnan().any().item<bool>() ? std::numeric_limits<double>::quiet_NaN() : norms.max().item<double>();
}

// exp(A) and, with E, the Frechet derivative L(A, E) of the same approximant: batched GEMMs, one plan.
std::pair<at::Tensor, at::Tensor> expm_gemm(const at::Tensor& A, const std::optional<at::Tensor>& E, Plan p) {
  if (!p.finite) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {at::full_like(A, nan), E ? at::full_like(A, nan) : at::Tensor()};
  }
  const int m = p.degree, q = hkd::dense::ps_block(m);
  const double scale = std::ldexp(1.0, -p.steps);
  std::vector<at::Tensor> pw{at::Tensor(), A * scale}, dpw{at::Tensor(), E ? *E * scale : at::Tensor()};
  for (int i = 2; i <= q; ++i) {
    pw.push_back(at::matmul(pw[i - 1], pw[1]));
    if (E) dpw.push_back(at::matmul(dpw[i - 1], pw[1]) + at::matmul(pw[i - 1], dpw[1]));
  }
  auto c = [m](int k) { return k <= m ? hkd::dense::inv_factorial(k) : 0.0; };
  const at::Tensor eye = at::eye(A.size(-1), A.options());
  auto block = [&](int j) {
    at::Tensor b = eye * c(j * q);
    for (int i = 1; i < q; ++i) b = b + pw[i] * c(j * q + i);
    return b;
  };
  auto dblock = [&](int j) {
    at::Tensor b = at::zeros_like(A);
    for (int i = 1; i < q; ++i) b = b + dpw[i] * c(j * q + i);
    return b;
  };
  int j = m / q;
  at::Tensor Y = at::zeros_like(A), dY = E ? at::zeros_like(A) : at::Tensor();
  if (m % q == 0) {
    --j;
    Y = pw[q] * c(m);
    if (E) dY = dpw[q] * c(m);
  }
  Y = Y + block(j);
  if (E) dY = dY + dblock(j);
  for (--j; j >= 0; --j) {
    if (E) dY = at::matmul(dpw[q], Y) + at::matmul(pw[q], dY) + dblock(j);
    Y = at::matmul(pw[q], Y) + block(j);
  }
  for (int i = 0; i < p.steps; ++i) {
    if (E) dY = at::matmul(Y, dY) + at::matmul(dY, Y);
    Y = at::matmul(Y, Y);
  }
  return {Y, dY};
}

at::Tensor expm_cuda(const at::Tensor& A_in) {
  check(A_in, "expm");
  const c10::cuda::CUDAGuard guard(A_in.device());
  const at::Tensor A = hkd::dense::checked_matrices(A_in, "expm");
  const int64_t n = A.size(-1);
  if (A.numel() == 0) return at::empty_like(A_in);
  if (n > hkd::cuda::kExpmOnChipMaxN) {
    const Plan p = hkd::dense::expm_plan(max_norm1(A), A.scalar_type() == at::kDouble);
    return expm_gemm(A, std::nullopt, p).first.reshape(A_in.sizes());
  }
  at::Tensor out = at::empty_like(A);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const hkd::cuda::ExpmArgs args{A.const_data_ptr(), nullptr, out.mutable_data_ptr(), A.size(0), int(n),
                                 A.scalar_type() == at::kDouble};
  check_launch(hkd::cuda::launch_expm(args, stream), "expm");
  return out.reshape(A_in.sizes());
}

// L(A^T, grad): on chip for n <= 32 when it fits; else batched GEMMs with the plan of the batch's largest ||A||_1
at::Tensor expm_backward_cuda(const at::Tensor& A_in, const at::Tensor& grad) {
  check(A_in, "expm_backward");
  const c10::cuda::CUDAGuard guard(A_in.device());
  const at::Tensor A = hkd::dense::checked_matrices(A_in, "expm_backward");
  const int64_t n = A.size(-1);
  if (A.numel() == 0) return at::empty_like(A_in);
  const at::Tensor G = grad.to(A.scalar_type()).contiguous().reshape({-1, n, n});
  if (n <= hkd::cuda::kExpmOnChipMaxN) {  // on chip, the plan of each matrix (as the forward)
    at::Tensor out = at::empty_like(A);
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    const hkd::cuda::ExpmArgs args{A.const_data_ptr(), G.const_data_ptr(), out.mutable_data_ptr(), A.size(0), int(n),
                                   A.scalar_type() == at::kDouble};
    const int err = hkd::cuda::launch_expm(args, stream);
    if (err != hkd::cuda::kDoesNotFit) {
      check_launch(err, "expm_backward");
      return out.reshape(A_in.sizes());
    }
  }
  const Plan p = hkd::dense::expm_plan(max_norm1(A), A.scalar_type() == at::kDouble);
  return expm_gemm(A.transpose(-1, -2), G, p).second.reshape(A_in.sizes());
}

// The action with the plan (degree, alpha) of hkd.ops.dense.action_plan (csrc/dense.h): on chip for d <= 64, else
// the same recurrence as batched GEMMs (per-sample substeps by masking, the convergence test per vector).
at::Tensor dense_action_cuda(const at::Tensor& z_in, const at::Tensor& A_in, const at::Tensor& tau_in,
                             const at::Tensor& plan) {
  check(z_in, "dense_action");
  const hkd::dense::ActionInputs in = hkd::dense::checked_action_inputs(z_in, A_in, tau_in, plan, "dense_action");
  const at::Tensor &z = in.z, &A = in.A, &tau = in.tau;
  const int64_t B = in.B, d = in.d, P = in.P;
  const bool shared = in.shared, is_double = z.scalar_type() == at::kDouble;
  const int degree = in.degree;
  const double alpha = in.alpha;
  const c10::cuda::CUDAGuard guard(z.device());
  if (z.numel() == 0) return at::empty_like(z);
  if (!in.finite) return at::full_like(z, std::numeric_limits<double>::quiet_NaN());
  if (d > hkd::cuda::kActionOnChipMaxD || (!shared || P == 1 ? P : B) > 65535) {  // the GEMM composite
    const at::Tensor tau_host = tau.cpu().to(at::kDouble).contiguous();
    const double* t = tau_host.data_ptr<double>();
    std::vector<double> steps(B);
    for (int64_t b = 0; b < B; ++b) steps[b] = hkd::dense::action_substeps(t[b], int(degree), alpha, is_double);
    const at::Tensor s = at::tensor(steps, z.options().dtype(at::kDouble)).to(z.scalar_type());
    const int max_steps = int(*std::max_element(steps.begin(), steps.end()));
    const at::Tensor h = (tau / s).reshape({-1, 1, 1}), s_col = s.reshape({-1, 1});
    const double u = is_double ? 1.1102230246251565e-16 : 5.9604644775390625e-08;
    auto apply = [&](const at::Tensor& v) {
      return shared ? at::matmul(A, v) : at::matmul(A, v.permute({2, 1, 0})).permute({2, 1, 0});
    };
    at::Tensor y = z;
    for (int step = 0; step < max_steps; ++step) {
      at::Tensor live = (s_col > step).expand({B, P});  // per vector (b, p)
      at::Tensor v = y * live.unsqueeze(1);
      at::Tensor previous = v.abs().amax(1).to(at::kDouble);
      for (int k = 1; k <= degree && live.any().item<bool>(); ++k) {
        v = apply(v) * (h / k);
        y = y + v;
        const at::Tensor term = v.abs().amax(1).to(at::kDouble);
        const at::Tensor done = live & (previous + term <= u * y.abs().amax(1).to(at::kDouble));
        live = live & ~done;
        v = v * (~done).unsqueeze(1);
        previous = term;
      }
    }
    return y;
  }
  at::Tensor out = at::empty_like(z);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const hkd::cuda::ActionArgs args{z.const_data_ptr(), A.const_data_ptr(), tau.const_data_ptr(), out.mutable_data_ptr(),
                                   B, int(d), P, shared, int(degree), alpha, is_double};
  check_launch(hkd::cuda::launch_action(args, stream), "dense_action");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hkd, CUDA, m) {
  m.impl("expm", &expm_cuda);
  m.impl("expm_backward", &expm_backward_cuda);
  m.impl("dense_action", &dense_action_cuda);
}
