// STABLE_TORCH_LIBRARY_IMPL(hkd, CUDA): the dense ops on the GPU. Small sizes run the on-chip kernels of
// csrc/cuda/dense.cu; larger n (and the Frechet adjoint) run the same Paterson-Stockmeyer Taylor algorithm
// (csrc/dense.h) as batched GEMMs (cuBLAS), with one plan for the batch from its largest 1-norm. Tensor arithmetic
// goes through the stable ops and, for ops without a stable wrapper, the dispatcher (hkd::call), never with a
// Scalar argument (numbers travel as 0-d tensors).
#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "cuda/dense_kernels.h"
#include "dense.h"
#include "inputs.h"
#include "stable.h"

namespace {

using hkd::Tensor;
using hkd::ScalarType;
using hkd::dense::Plan;

void check(const Tensor& t, const char* op) { HKD_CHECK(t.is_cuda(), "hkd::", op, ": expected CUDA tensors"); }

void check_launch(int err, const char* op) { HKD_CHECK(err == 0, "hkd::", op, ": CUDA launch failed (error ", err, ")"); }

Tensor add(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b, -1.0); }
Tensor mul(const Tensor& a, const Tensor& b) { return hkd::call("aten::mul", "Tensor", a, b); }
Tensor abs(const Tensor& a) { return hkd::call("aten::abs", "", a); }
Tensor number(double x, const Tensor& like) {  // a 0-d tensor of like's dtype and device
  return torch::stable::full({}, x, like.scalar_type(), std::nullopt, like.device());
}
Tensor on_device(const Tensor& host, ScalarType dtype, const Tensor& like) {
  return torch::stable::to(host, dtype, std::nullopt, like.device());
}
bool any(const Tensor& t) {
  const Tensor host = hkd::cpu(hkd::call("aten::any", "", t));
  return *static_cast<const bool*>(host.const_data_ptr());
}

double max_norm1(const Tensor& A) {  // max over the batch of max_j sum_i |A_ij|; NaN if any is NaN
  const Tensor norms = torch::stable::contiguous(
      hkd::cpu(hkd::to(torch::stable::amax(torch::stable::sum(abs(A), std::vector<int64_t>{-2}), -1),
                       ScalarType::Double)));
  const double* x = hkd::data<double>(norms);
  double best = 0;
  for (int64_t i = 0; i < norms.numel(); ++i) best = std::isnan(x[i]) || std::isnan(best) ? NAN : std::max(best, x[i]);
  return best;
}

// exp(A) and, with E, the Frechet derivative L(A, E) of the same approximant: batched GEMMs, one plan.
std::pair<Tensor, std::optional<Tensor>> expm_gemm(const Tensor& A, const std::optional<Tensor>& E, Plan p) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (!p.finite) {
    const Tensor full = torch::stable::fill_(torch::stable::empty_like(A), nan);
    return {full, E ? std::optional<Tensor>(torch::stable::fill_(torch::stable::empty_like(A), nan)) : std::nullopt};
  }
  const int m = p.degree, q = hkd::dense::ps_block(m);
  const double scale = std::ldexp(1.0, -p.steps);
  std::vector<Tensor> pw{A, hkd::scaled(A, scale)}, dpw{A, E ? hkd::scaled(*E, scale) : A};  // ([0]: unused)
  for (int i = 2; i <= q; ++i) {
    pw.push_back(torch::stable::matmul(pw[i - 1], pw[1]));
    if (E) dpw.push_back(add(torch::stable::matmul(dpw[i - 1], pw[1]), torch::stable::matmul(pw[i - 1], dpw[1])));
  }
  auto c = [m](int k) { return k <= m ? hkd::dense::inv_factorial(k) : 0.0; };
  const int64_t n = A.size(-1);
  std::vector<double> identity(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i) identity[i * (n + 1)] = 1.0;
  const Tensor eye = on_device(torch::stable::view(hkd::host_tensor(identity), {n, n}), A.scalar_type(), A);
  auto block = [&](int j) {
    Tensor b = hkd::scaled(eye, c(j * q));
    for (int i = 1; i < q; ++i) b = add(b, hkd::scaled(pw[i], c(j * q + i)));
    return b;
  };
  auto dblock = [&](int j) {
    Tensor b = torch::stable::new_zeros(A, A.sizes());
    for (int i = 1; i < q; ++i) b = add(b, hkd::scaled(dpw[i], c(j * q + i)));
    return b;
  };
  int j = m / q;
  Tensor Y = torch::stable::new_zeros(A, A.sizes()), dY = torch::stable::new_zeros(A, A.sizes());
  if (m % q == 0) {
    --j;
    Y = hkd::scaled(pw[q], c(m));
    if (E) dY = hkd::scaled(dpw[q], c(m));
  }
  Y = add(Y, block(j));
  if (E) dY = add(dY, dblock(j));
  for (--j; j >= 0; --j) {
    if (E) dY = add(add(torch::stable::matmul(dpw[q], Y), torch::stable::matmul(pw[q], dY)), dblock(j));
    Y = add(torch::stable::matmul(pw[q], Y), block(j));
  }
  for (int i = 0; i < p.steps; ++i) {
    if (E) dY = add(torch::stable::matmul(Y, dY), torch::stable::matmul(dY, Y));
    Y = torch::stable::matmul(Y, Y);
  }
  return {Y, E ? std::optional<Tensor>(dY) : std::nullopt};
}

Tensor expm_cuda(Tensor A_in) {
  check(A_in, "expm");
  const torch::stable::accelerator::DeviceGuard guard(A_in.get_device_index());
  const Tensor A = hkd::dense::checked_matrices(A_in, "expm");
  const int64_t n = A.size(-1);
  if (A.numel() == 0) return torch::stable::empty_like(A_in);
  if (n > hkd::cuda::kExpmOnChipMaxN) {
    const Plan p = hkd::dense::expm_plan(max_norm1(A), A.scalar_type() == ScalarType::Double);
    return torch::stable::reshape(expm_gemm(A, std::nullopt, p).first, A_in.sizes());
  }
  const Tensor out = torch::stable::empty_like(A);
  void* stream = hkd::current_cuda_stream(A);
  const hkd::cuda::ExpmArgs args{A.const_data_ptr(), nullptr, out.mutable_data_ptr(), A.size(0), int(n),
                                 A.scalar_type() == ScalarType::Double};
  check_launch(hkd::cuda::launch_expm(args, stream), "expm");
  return torch::stable::reshape(out, A_in.sizes());
}

// L(A^T, grad): on chip for n <= 32 when it fits; else batched GEMMs with the plan of the batch's largest ||A||_1
Tensor expm_backward_cuda(Tensor A_in, Tensor grad) {
  check(A_in, "expm_backward");
  const torch::stable::accelerator::DeviceGuard guard(A_in.get_device_index());
  const Tensor A = hkd::dense::checked_matrices(A_in, "expm_backward");
  const int64_t n = A.size(-1);
  if (A.numel() == 0) return torch::stable::empty_like(A_in);
  const Tensor G = torch::stable::reshape(torch::stable::contiguous(hkd::to(grad, A.scalar_type())), {-1, n, n});
  if (n <= hkd::cuda::kExpmOnChipMaxN) {  // on chip, the plan of each matrix (as the forward)
    const Tensor out = torch::stable::empty_like(A);
    void* stream = hkd::current_cuda_stream(A);
    const hkd::cuda::ExpmArgs args{A.const_data_ptr(), G.const_data_ptr(), out.mutable_data_ptr(), A.size(0), int(n),
                                   A.scalar_type() == ScalarType::Double};
    const int err = hkd::cuda::launch_expm(args, stream);
    if (err != hkd::cuda::kDoesNotFit) {
      check_launch(err, "expm_backward");
      return torch::stable::reshape(out, A_in.sizes());
    }
  }
  const Plan p = hkd::dense::expm_plan(max_norm1(A), A.scalar_type() == ScalarType::Double);
  return torch::stable::reshape(*expm_gemm(torch::stable::transpose(A, -1, -2), G, p).second, A_in.sizes());
}

// The action with the plan (degree, alpha) of hkd.ops.dense.action_plan (csrc/dense.h): on chip for d <= 64, else
// the same recurrence as batched GEMMs (per-sample substeps by masking, the convergence test per vector).
Tensor dense_action_cuda(Tensor z_in, Tensor A_in, Tensor tau_in, Tensor plan) {
  check(z_in, "dense_action");
  const hkd::dense::ActionInputs in = hkd::dense::checked_action_inputs(z_in, A_in, tau_in, plan, "dense_action");
  const Tensor &z = in.z, &A = in.A, &tau = in.tau;
  const int64_t B = in.B, d = in.d, P = in.P;
  const bool shared = in.shared, is_double = z.scalar_type() == ScalarType::Double;
  const int degree = in.degree;
  const double alpha = in.alpha;
  const torch::stable::accelerator::DeviceGuard guard(z.get_device_index());
  if (z.numel() == 0) return torch::stable::empty_like(z);
  if (!in.finite) return torch::stable::fill_(torch::stable::empty_like(z), std::numeric_limits<double>::quiet_NaN());
  if (d > hkd::cuda::kActionOnChipMaxD || (!shared || P == 1 ? P : B) > 65535) {  // the GEMM composite
    const Tensor tau_host = torch::stable::contiguous(hkd::to(hkd::cpu(tau), ScalarType::Double));
    const double* t = hkd::data<double>(tau_host);
    std::vector<double> steps(B), steps_bp(B * P);  // per sample, and per vector (b, p)
    for (int64_t b = 0; b < B; ++b) {
      steps[b] = hkd::dense::action_substeps(t[b], int(degree), alpha, is_double);
      std::fill(steps_bp.begin() + b * P, steps_bp.begin() + (b + 1) * P, steps[b]);
    }
    const Tensor s = on_device(hkd::host_tensor(steps), z.scalar_type(), z);
    const Tensor s_bp = on_device(torch::stable::view(hkd::host_tensor(steps_bp), {B, P}), z.scalar_type(), z);
    const int max_steps = int(*std::max_element(steps.begin(), steps.end()));
    const Tensor h = torch::stable::reshape(hkd::call("aten::div", "Tensor", tau, s), {-1, 1, 1});
    const double u = is_double ? 1.1102230246251565e-16 : 5.9604644775390625e-08;
    auto apply = [&](const Tensor& v) {
      return shared ? torch::stable::matmul(A, v)
                    : torch::stable::permute(torch::stable::matmul(A, torch::stable::permute(v, {2, 1, 0})), {2, 1, 0});
    };
    auto max_abs = [&](const Tensor& v) {  // per vector (b, p), in float64
      return hkd::to(torch::stable::amax(abs(v), 1), ScalarType::Double);
    };
    Tensor y = z;
    for (int step = 0; step < max_steps; ++step) {
      Tensor live = hkd::call("aten::gt", "Tensor", s_bp, number(step, s_bp));  // per vector (b, p)
      Tensor v = mul(y, torch::stable::unsqueeze(live, 1));
      Tensor previous = max_abs(v);
      for (int k = 1; k <= degree && any(live); ++k) {
        v = mul(apply(v), hkd::divided(h, k));
        y = add(y, v);
        const Tensor term = max_abs(v);
        const Tensor bound = hkd::scaled(max_abs(y), u);
        const Tensor done = torch::stable::bitwise_and(live, hkd::call("aten::le", "Tensor", add(previous, term), bound));
        const Tensor going = hkd::call("aten::logical_not", "", done);
        live = torch::stable::bitwise_and(live, going);
        v = mul(v, torch::stable::unsqueeze(going, 1));
        previous = term;
      }
    }
    return y;
  }
  const Tensor out = torch::stable::empty_like(z);
  void* stream = hkd::current_cuda_stream(z);
  const hkd::cuda::ActionArgs args{z.const_data_ptr(), A.const_data_ptr(), tau.const_data_ptr(), out.mutable_data_ptr(),
                                   B, int(d), P, shared, int(degree), alpha, is_double};
  check_launch(hkd::cuda::launch_action(args, stream), "dense_action");
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(hkd, CUDA, m) {
  m.impl("expm", TORCH_BOX(&expm_cuda));
  m.impl("expm_backward", TORCH_BOX(&expm_backward_cuda));
  m.impl("dense_action", TORCH_BOX(&dense_action_cuda));
}
