// TORCH_LIBRARY_IMPL(hkd, CUDA): tensors in, the torch-free launchers of csrc/cuda/spectral.cu out.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "spectral.h"

namespace hkd::spectral {

// defined in csrc/cpu/spectral.cpp: the checks, and the inputs as contiguous tensors (the kernels index them so)
using Inputs = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;
Inputs checked_inputs(at::TensorList latents, at::TensorList alphas, at::TensorList betas, const at::Tensor& tau);
std::vector<at::Tensor> checked_grads(at::TensorList grads, const std::vector<at::Tensor>& latents);

namespace {

cuda::DType dtype_of(const at::Tensor& z) {
  switch (z.scalar_type()) {
    case at::kFloat: return cuda::kFloat32;
    case at::kDouble: return cuda::kFloat64;
    case at::kHalf: return cuda::kFloat16;
    case at::kBFloat16: return cuda::kBFloat16;
    default: TORCH_CHECK(false, "spectral_propagate: unsupported latent dtype ", z.scalar_type());
  }
}

int64_t positions_of(const at::Tensor& z) { return c10::multiply_integers(z.sizes().slice(2)); }

// The levels [begin, end) as launch arguments.
cuda::Args make_args(at::TensorList latents, at::TensorList alphas, at::TensorList betas, const at::Tensor& tau,
                     size_t begin, size_t end) {
  cuda::Args args{};
  args.levels = static_cast<int>(end - begin);
  args.batch = latents[0].size(0);
  args.tau = tau.const_data_ptr();
  args.tau_stride = tau.dim() == 1 ? 1 : 0;
  for (size_t l = begin; l < end; ++l) {
    auto& L = args.level[l - begin];
    L.z = latents[l].const_data_ptr();
    L.alpha = alphas[l].const_data_ptr();
    L.beta = betas[l].const_data_ptr();
    L.pairs = latents[l].size(1) / 2;
    L.positions = positions_of(latents[l]);
    L.per_position = alphas[l].dim() > 1;
  }
  return args;
}

void check_launch(int error) {
  TORCH_CHECK(error == 0, "spectral_propagate: CUDA error: ", cudaGetErrorString(cudaError_t(error)));
}

std::vector<at::Tensor> forward_cuda(at::TensorList latents_in, at::TensorList alphas_in, at::TensorList betas_in,
                                     const at::Tensor& tau_in) {
  std::vector<at::Tensor> latents, alphas, betas;
  at::Tensor tau;
  std::tie(latents, alphas, betas, tau) = checked_inputs(latents_in, alphas_in, betas_in, tau_in);
  const c10::cuda::CUDAGuard guard(latents[0].device());
  std::vector<at::Tensor> out;
  for (const auto& z : latents) out.push_back(at::empty_like(z));
  for (size_t begin = 0; begin < latents.size(); begin += cuda::kMaxLevels) {
    const size_t end = std::min(latents.size(), begin + cuda::kMaxLevels);
    cuda::Args args = make_args(latents, alphas, betas, tau, begin, end);
    for (size_t l = begin; l < end; ++l) args.level[l - begin].out = out[l].mutable_data_ptr();
    cuda::plan_blocks(args, false);
    check_launch(cuda::launch_forward(args, dtype_of(latents[0]), c10::cuda::getCurrentCUDAStream().stream()));
  }
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> backward_cuda(
    at::TensorList grads_in, at::TensorList latents_in, at::TensorList alphas_in, at::TensorList betas_in,
    const at::Tensor& tau_in, bool need_latents, bool need_params, bool need_tau) {
  std::vector<at::Tensor> latents, alphas, betas;
  at::Tensor tau;
  std::tie(latents, alphas, betas, tau) = checked_inputs(latents_in, alphas_in, betas_in, tau_in);
  const auto grads = checked_grads(grads_in, latents);
  const c10::cuda::CUDAGuard guard(latents[0].device());
  const int64_t batch = latents[0].size(0);
  const bool need_terms = need_params || need_tau;
  std::vector<at::Tensor> grad_latents, grad_alphas, grad_betas;
  at::Tensor grad_tau = need_tau ? at::zeros_like(tau) : tau.new_empty({0});
  if (need_latents)
    for (const auto& z : latents) grad_latents.push_back(at::empty_like(z));
  // Split the batch into slices when the (k, p) entries alone would leave the GPU underfilled.
  int64_t entries = 0;
  for (const auto& z : latents) entries += z.size(1) / 2 * positions_of(z);
  int sms = 0;
  check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, latents[0].get_device()));
  const int chunks = cuda::backward_chunks(entries, batch, sms);
  std::vector<at::Tensor> partial_alphas, partial_betas;
  if (need_params)
    for (size_t l = 0; l < latents.size(); ++l) {
      // every slice's threads write all their entries; with B = 0 there is no launch
      const auto shape = std::vector<int64_t>{chunks, alphas[l].size(0), positions_of(latents[l])};
      partial_alphas.push_back(batch ? at::empty(shape, alphas[l].options()) : at::zeros(shape, alphas[l].options()));
      partial_betas.push_back(at::empty_like(partial_alphas.back()));
    }
  for (size_t begin = 0; begin < latents.size() && (need_latents || need_terms); begin += cuda::kMaxLevels) {
    const size_t end = std::min(latents.size(), begin + cuda::kMaxLevels);
    cuda::Args args = make_args(latents, alphas, betas, tau, begin, end);
    for (size_t l = begin; l < end; ++l) {
      auto& L = args.level[l - begin];
      L.grad = grads[l].const_data_ptr();
      L.out = need_latents ? grad_latents[l].mutable_data_ptr() : nullptr;
      L.grad_alpha = need_params ? partial_alphas[l].mutable_data_ptr() : nullptr;
      L.grad_beta = need_params ? partial_betas[l].mutable_data_ptr() : nullptr;
    }
    const int64_t blocks = cuda::plan_blocks(args, true);
    at::Tensor tau_partial;
    if (need_tau) {  // every (slice, warp) row writes only its slice's samples: start from zeros
      tau_partial = at::zeros({chunks, blocks * (cuda::kBackwardThreads / 32), batch}, tau.options());
      args.tau_partial = tau_partial.mutable_data_ptr();
    }
    check_launch(cuda::launch_backward(args, dtype_of(latents[0]), need_latents, need_terms, chunks,
                                       c10::cuda::getCurrentCUDAStream().stream()));
    if (need_tau) grad_tau += tau.dim() == 1 ? tau_partial.sum({0, 1}) : tau_partial.sum();
  }
  if (need_params)
    for (size_t l = 0; l < latents.size(); ++l) {
      const bool shared = alphas[l].dim() == 1;
      const auto reduce = [&](const at::Tensor& partial) {  // over batch slices (and positions when shared)
        return shared ? partial.sum(at::IntArrayRef{0, 2}) : partial.sum(0).view(alphas[l].sizes());
      };
      grad_alphas.push_back(reduce(partial_alphas[l]));
      grad_betas.push_back(reduce(partial_betas[l]));
    }
  return {grad_latents, grad_alphas, grad_betas, grad_tau};
}

}  // namespace
}  // namespace hkd::spectral

TORCH_LIBRARY_IMPL(hkd, CUDA, m) {
  m.impl("spectral_propagate", &hkd::spectral::forward_cuda);
  m.impl("spectral_propagate_backward", &hkd::spectral::backward_cuda);
}
