// STABLE_TORCH_LIBRARY_IMPL(hkd, CUDA): tensors in, the torch-free launchers of csrc/cuda/spectral.cu out.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "inputs.h"
#include "spectral.h"
#include "stable.h"

namespace hkd::spectral {
namespace {

cuda::DType dtype_of(const Tensor& z) {
  switch (z.scalar_type()) {
    case ScalarType::Float: return cuda::kFloat32;
    case ScalarType::Double: return cuda::kFloat64;
    case ScalarType::Half: return cuda::kFloat16;
    case ScalarType::BFloat16: return cuda::kBFloat16;
    default: HKD_CHECK(false, "spectral_propagate: unsupported latent dtype ", name(z.scalar_type()));
  }
  return cuda::kFloat32;
}

void check_launch(int error) {
  HKD_CHECK(error == 0, "spectral_propagate: CUDA error: ", cudaGetErrorString(cudaError_t(error)));
}

std::vector<Tensor> forward_cuda(std::vector<Tensor> latents_in, std::vector<Tensor> alphas_in,
                                 std::vector<Tensor> betas_in, Tensor tau_in) {
  const Inputs in = checked_inputs(latents_in, alphas_in, betas_in, tau_in);
  const auto &latents = in.latents, &alphas = in.alphas, &betas = in.betas;
  const Tensor& tau = in.tau;
  const torch::stable::accelerator::DeviceGuard guard(latents[0].get_device_index());
  std::vector<Tensor> out;
  for (const auto& z : latents) out.push_back(torch::stable::empty_like(z));
  for (size_t begin = 0; begin < latents.size(); begin += cuda::kMaxLevels) {
    const size_t end = std::min(latents.size(), begin + cuda::kMaxLevels);
    cuda::Args args = cuda::make_args(latents, alphas, betas, tau, begin, end);
    for (size_t l = begin; l < end; ++l) args.level[l - begin].out = out[l].mutable_data_ptr();
    cuda::plan_blocks(args, false);
    check_launch(cuda::launch_forward(args, dtype_of(latents[0]), current_cuda_stream(latents[0])));
  }
  return out;
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, Tensor> backward_cuda(
    std::vector<Tensor> grads_in, std::vector<Tensor> latents_in, std::vector<Tensor> alphas_in,
    std::vector<Tensor> betas_in, Tensor tau_in, bool need_latents, bool need_params, bool need_tau) {
  const Inputs in = checked_inputs(latents_in, alphas_in, betas_in, tau_in);
  const auto &latents = in.latents, &alphas = in.alphas, &betas = in.betas;
  const Tensor& tau = in.tau;
  const auto grads = checked_grads(grads_in, latents);
  const torch::stable::accelerator::DeviceGuard guard(latents[0].get_device_index());
  const int64_t batch = in.batch;
  const bool need_terms = need_params || need_tau;
  std::vector<Tensor> grad_latents, grad_alphas, grad_betas;
  Tensor grad_tau = need_tau ? torch::stable::new_zeros(tau, tau.sizes()) : torch::stable::new_empty(tau, {0});
  if (need_latents)
    for (const auto& z : latents) grad_latents.push_back(torch::stable::empty_like(z));
  // Split the batch into slices when the (k, p) entries alone would leave the GPU underfilled.
  int64_t entries = 0;
  for (const auto& z : latents) entries += z.size(1) / 2 * positions_of(z);
  int sms = 0;
  check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, latents[0].get_device_index()));
  const int chunks = cuda::backward_chunks(entries, batch, sms);
  std::vector<Tensor> partial_alphas, partial_betas;
  if (need_params)
    for (size_t l = 0; l < latents.size(); ++l) {
      // every slice's threads write all their entries; with B = 0 there is no launch
      const auto sizes = std::vector<int64_t>{chunks, alphas[l].size(0), positions_of(latents[l])};
      partial_alphas.push_back(batch ? torch::stable::new_empty(alphas[l], sizes)
                                     : torch::stable::new_zeros(alphas[l], sizes));
      partial_betas.push_back(torch::stable::empty_like(partial_alphas.back()));
    }
  for (size_t begin = 0; begin < latents.size() && (need_latents || need_terms); begin += cuda::kMaxLevels) {
    const size_t end = std::min(latents.size(), begin + cuda::kMaxLevels);
    cuda::Args args = cuda::backward_args(latents, alphas, betas, tau, grads, grad_latents, partial_alphas,
                                          partial_betas, begin, end);
    const int64_t blocks = cuda::plan_blocks(args, true);
    std::optional<Tensor> tau_partial;
    if (need_tau) {  // every (slice, warp) row writes only its slice's samples: start from zeros
      tau_partial = torch::stable::new_zeros(tau, {chunks, blocks * (cuda::kBackwardThreads / 32), batch});
      args.tau_partial = tau_partial->mutable_data_ptr();
    }
    check_launch(cuda::launch_backward(args, dtype_of(latents[0]), need_latents, need_terms, chunks,
                                       current_cuda_stream(latents[0])));
    if (need_tau) {
      const Tensor sum = tau.dim() == 1 ? torch::stable::sum(*tau_partial, std::vector<int64_t>{0, 1})
                                        : torch::stable::sum(*tau_partial, std::vector<int64_t>{0, 1, 2});
      grad_tau = torch::stable::subtract(grad_tau, sum, -1.0);  // grad_tau + sum
    }
  }
  if (need_params)
    for (size_t l = 0; l < latents.size(); ++l) {
      const bool shared = alphas[l].dim() == 1;
      const auto reduce = [&](const Tensor& partial) {  // over batch slices (and positions when shared)
        return shared ? torch::stable::sum(partial, std::vector<int64_t>{0, 2})
                      : torch::stable::view(torch::stable::sum(partial, std::vector<int64_t>{0}), alphas[l].sizes());
      };
      grad_alphas.push_back(reduce(partial_alphas[l]));
      grad_betas.push_back(reduce(partial_betas[l]));
    }
  return {grad_latents, grad_alphas, grad_betas, grad_tau};
}

}  // namespace
}  // namespace hkd::spectral

STABLE_TORCH_LIBRARY_IMPL(hkd, CUDA, m) {
  m.impl("spectral_propagate", TORCH_BOX(&hkd::spectral::forward_cuda));
  m.impl("spectral_propagate_backward", TORCH_BOX(&hkd::spectral::backward_cuda));
}
