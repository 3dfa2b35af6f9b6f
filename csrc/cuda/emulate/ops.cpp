// torch.ops.hkd_emu: the CUDA launchers of csrc/cuda/*.cu run on the host emulation (emulate.h), for the tests
// (tests/ops/test_cuda_emulated.py). The tensor side mirrors the cuda glue (csrc/cuda/spectral.cpp, dense.cpp) on
// contiguous CPU tensors, each inside NaN guard zones; what the kernels leave unwritten is NaN (device memory from
// at::empty is not zero).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#define HKD_CUDA_EMULATE
#include "cuda/dense_kernels.h"
#include "emulate.h"
#include "spectral.h"

namespace hkd::spectral::cuda {
float emulated_to_compute(unsigned short bits, bool bfloat16);
unsigned short emulated_to_storage(float v, bool bfloat16);
}  // namespace hkd::spectral::cuda

namespace {

namespace sc = hkd::spectral::cuda;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

void check_launch(int error, const char* op) {
  TORCH_CHECK(error == 0, "hkd_emu::", op, ": ", cudaGetErrorString(error));
}

// Global memory with guard zones: every tensor a kernel sees lies inside a larger buffer. An input's margins are NaN
// (a read past its ends sees NaN), an output's are kSentinel, which no kernel writes: a write past an end, even of a
// NaN read past another tensor's end, fails the op after the launch (check_guards). Outputs start as NaN.
constexpr int64_t kGuard = 2048;   // elements either side
constexpr double kSentinel = -4096.0;  // exact in every float dtype
struct Guarded {
  at::Tensor buffer;
  int64_t numel;
  bool output;
};
thread_local std::vector<Guarded> guarded_buffers;

at::Tensor guarded(const at::Tensor& t, bool copy) {
  at::Tensor buffer = at::full({t.numel() + 2 * kGuard}, copy ? kNaN : kSentinel, t.options());
  at::Tensor view = buffer.narrow(0, kGuard, t.numel()).view(t.sizes());
  copy ? view.copy_(t) : view.fill_(kNaN);
  guarded_buffers.push_back({buffer, t.numel(), !copy});
  return view;
}
at::Tensor poisoned(const at::Tensor& like) { return guarded(like, false); }
std::vector<at::Tensor> guarded(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) out.push_back(guarded(t, true));
  return out;
}

void check_guards(const char* op) {
  auto buffers = std::move(guarded_buffers);
  guarded_buffers.clear();
  for (const auto& g : buffers)
    for (const at::Tensor& margin : {g.buffer.narrow(0, 0, kGuard), g.buffer.narrow(0, kGuard + g.numel, kGuard)})
      TORCH_CHECK(g.output ? margin.eq(kSentinel).all().item<bool>() : margin.isnan().all().item<bool>(),
                  "hkd_emu::", op, ": the kernel wrote outside ", g.output ? "an output" : "an input", " of ", g.numel,
                  " elements");
}

void configure(int64_t schedule, int64_t seed, int64_t sm_count, int64_t shared_optin) {
  TORCH_CHECK(schedule >= 0 && schedule <= 2, "hkd_emu::configure: schedule 0 (in order), 1 (reversed), 2 (shuffled)");
  hkd::emu::config() = {int(schedule), seed, int(sm_count), int(shared_optin)};
}

std::vector<int64_t> last_launch() {
  const auto& r = hkd::emu::last_launch();
  return {r.grid.x, r.grid.y, r.block.x, r.shared_bytes, r.launches, r.barriers, r.shuffles};
}

sc::DType dtype_of(const at::Tensor& z) {
  switch (z.scalar_type()) {
    case at::kFloat: return sc::kFloat32;
    case at::kDouble: return sc::kFloat64;
    case at::kHalf: return sc::kFloat16;
    case at::kBFloat16: return sc::kBFloat16;
    default: TORCH_CHECK(false, "hkd_emu: unsupported latent dtype ", z.scalar_type());
  }
}

void check_contiguous(at::TensorList tensors, const char* what) {
  for (const auto& t : tensors) TORCH_CHECK(t.is_contiguous() && t.is_cpu(), "hkd_emu: ", what, " must be contiguous");
}

std::vector<at::Tensor> spectral_forward(at::TensorList latents_in, at::TensorList alphas_in, at::TensorList betas_in,
                                         const at::Tensor& tau_in) {
  check_contiguous(latents_in, "latents"), check_contiguous(alphas_in, "alphas"), check_contiguous(betas_in, "betas");
  guarded_buffers.clear();  // (left over when a launch failed)
  const auto latents = guarded(latents_in), alphas = guarded(alphas_in), betas = guarded(betas_in);
  const at::Tensor tau = guarded(tau_in, true);
  std::vector<at::Tensor> out;
  for (const auto& z : latents) out.push_back(poisoned(z));
  for (size_t begin = 0; begin < latents.size(); begin += sc::kMaxLevels) {
    const size_t end = std::min(latents.size(), begin + sc::kMaxLevels);
    sc::Args args = sc::make_args(latents, alphas, betas, tau, begin, end);
    for (size_t l = begin; l < end; ++l) args.level[l - begin].out = out[l].mutable_data_ptr();
    sc::plan_blocks(args, false);
    check_launch(sc::launch_forward(args, dtype_of(latents[0]), nullptr), "spectral_propagate");
  }
  check_guards("spectral_propagate");
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> spectral_backward(
    at::TensorList grads_in, at::TensorList latents_in, at::TensorList alphas_in, at::TensorList betas_in,
    const at::Tensor& tau_in, bool need_latents, bool need_params, bool need_tau) {
  check_contiguous(grads_in, "grads"), check_contiguous(latents_in, "latents");
  guarded_buffers.clear();  // (left over when a launch failed)
  const auto grads = guarded(grads_in), latents = guarded(latents_in);
  const auto alphas = guarded(alphas_in), betas = guarded(betas_in);
  const at::Tensor tau = guarded(tau_in, true);
  const int64_t batch = latents[0].size(0);
  const bool need_terms = need_params || need_tau;
  std::vector<at::Tensor> grad_latents, grad_alphas, grad_betas;
  at::Tensor grad_tau = need_tau ? at::zeros_like(tau) : tau.new_empty({0});
  if (need_latents)
    for (const auto& z : latents) grad_latents.push_back(poisoned(z));
  int64_t entries = 0;
  for (const auto& z : latents) entries += z.size(1) / 2 * hkd::spectral::positions_of(z);
  int sms = 0;
  check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "spectral_propagate_backward");
  const int chunks = sc::backward_chunks(entries, batch, sms);
  std::vector<at::Tensor> partial_alphas, partial_betas;
  if (need_params)
    for (size_t l = 0; l < latents.size(); ++l) {
      const auto shape = std::vector<int64_t>{chunks, alphas[l].size(0), hkd::spectral::positions_of(latents[l])};
      const auto options = alphas[l].options();
      partial_alphas.push_back(batch ? poisoned(at::empty(shape, options)) : at::zeros(shape, options));
      partial_betas.push_back(poisoned(partial_alphas.back()));
    }
  for (size_t begin = 0; begin < latents.size() && (need_latents || need_terms); begin += sc::kMaxLevels) {
    const size_t end = std::min(latents.size(), begin + sc::kMaxLevels);
    sc::Args args = sc::backward_args(latents, alphas, betas, tau, grads, grad_latents, partial_alphas,
                                      partial_betas, begin, end);
    const int64_t blocks = sc::plan_blocks(args, true);
    at::Tensor tau_partial;
    if (need_tau) {
      tau_partial = poisoned(at::empty({chunks, blocks * (sc::kBackwardThreads / 32), batch}, tau.options())).zero_();
      args.tau_partial = tau_partial.mutable_data_ptr();
    }
    check_launch(sc::launch_backward(args, dtype_of(latents[0]), need_latents, need_terms, chunks, nullptr),
                 "spectral_propagate_backward");
    if (need_tau) grad_tau += tau.dim() == 1 ? tau_partial.sum({0, 1}) : tau_partial.sum();
  }
  check_guards("spectral_propagate_backward");
  if (need_params)
    for (size_t l = 0; l < latents.size(); ++l) {
      const bool shared = alphas[l].dim() == 1;
      const auto reduce = [&](const at::Tensor& partial) {
        return shared ? partial.sum(at::IntArrayRef{0, 2}) : partial.sum(0).view(alphas[l].sizes());
      };
      grad_alphas.push_back(reduce(partial_alphas[l]));
      grad_betas.push_back(reduce(partial_betas[l]));
    }
  return {grad_latents, grad_alphas, grad_betas, grad_tau};
}

// The kernels' 16-bit conversions, elementwise: bits (int16) -> float32, float32 -> bits.
at::Tensor to_compute(const at::Tensor& bits, bool bfloat16) {
  const at::Tensor in = bits.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kFloat));
  const int16_t* b = in.data_ptr<int16_t>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i) o[i] = sc::emulated_to_compute(static_cast<unsigned short>(b[i]), bfloat16);
  return out;
}

at::Tensor to_storage(const at::Tensor& values, bool bfloat16) {
  const at::Tensor in = values.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kShort));
  const float* v = in.data_ptr<float>();
  int16_t* o = out.data_ptr<int16_t>();
  for (int64_t i = 0; i < in.numel(); ++i) o[i] = static_cast<int16_t>(sc::emulated_to_storage(v[i], bfloat16));
  return out;
}

// The on-chip dense kernels: A (count, n, n), G like A, z (B, d, P), tau (B,), all contiguous, one float dtype.
at::Tensor expm(const at::Tensor& A_in) {
  check_contiguous({A_in}, "A");
  guarded_buffers.clear();  // (left over when a launch failed)
  const at::Tensor A = guarded(A_in, true);
  at::Tensor out = poisoned(A);
  const hkd::cuda::ExpmArgs args{A.const_data_ptr(), nullptr, out.mutable_data_ptr(), A.size(0), int(A.size(-1)),
                                 A.scalar_type() == at::kDouble};
  check_launch(hkd::cuda::launch_expm(args, nullptr), "expm");
  check_guards("expm");
  return out;
}

// (L(A^T, G), true), or (NaN, false) when the device's shared memory is too small (the glue then uses GEMMs)
std::tuple<at::Tensor, bool> expm_frechet(const at::Tensor& A_in, const at::Tensor& G_in) {
  check_contiguous({A_in, G_in}, "A and G");
  guarded_buffers.clear();  // (left over when a launch failed)
  const at::Tensor A = guarded(A_in, true), G = guarded(G_in, true);
  at::Tensor out = poisoned(A);
  const hkd::cuda::ExpmArgs args{A.const_data_ptr(), G.const_data_ptr(), out.mutable_data_ptr(), A.size(0),
                                 int(A.size(-1)), A.scalar_type() == at::kDouble};
  const int err = hkd::cuda::launch_expm(args, nullptr);
  check_launch(err == hkd::cuda::kDoesNotFit ? 0 : err, "expm_backward");
  check_guards("expm_backward");
  return {out, err != hkd::cuda::kDoesNotFit};
}

at::Tensor dense_action(const at::Tensor& z_in, const at::Tensor& A_in, const at::Tensor& tau_in, int64_t degree,
                        double alpha) {
  check_contiguous({z_in, A_in, tau_in}, "z, A and tau");
  guarded_buffers.clear();  // (left over when a launch failed)
  const at::Tensor z = guarded(z_in, true), A = guarded(A_in, true), tau = guarded(tau_in, true);
  at::Tensor out = poisoned(z);
  const hkd::cuda::ActionArgs args{z.const_data_ptr(), A.const_data_ptr(), tau.const_data_ptr(), out.mutable_data_ptr(),
                                   z.size(0), int(z.size(1)), z.size(2), A.dim() == 2, int(degree), alpha,
                                   z.scalar_type() == at::kDouble};
  check_launch(hkd::cuda::launch_action(args, nullptr), "dense_action");
  check_guards("dense_action");
  return out;
}

}  // namespace

TORCH_LIBRARY(hkd_emu, m) {
  m.def("configure(int schedule, int seed, int sm_count, int shared_optin) -> ()", &configure);
  m.def("last_launch() -> int[]", &last_launch);
  m.def("spectral_propagate(Tensor[] latents, Tensor[] alphas, Tensor[] betas, Tensor tau) -> Tensor[]",
        &spectral_forward);
  m.def("spectral_propagate_backward(Tensor[] grads, Tensor[] latents, Tensor[] alphas, Tensor[] betas, Tensor tau, "
        "bool need_latents, bool need_params, bool need_tau) -> (Tensor[], Tensor[], Tensor[], Tensor)",
        &spectral_backward);
  m.def("to_compute(Tensor bits, bool bfloat16) -> Tensor", &to_compute);
  m.def("to_storage(Tensor values, bool bfloat16) -> Tensor", &to_storage);
  m.def("expm(Tensor A) -> Tensor", &expm);
  m.def("expm_frechet(Tensor A, Tensor G) -> (Tensor, bool)", &expm_frechet);
  m.def("dense_action(Tensor z, Tensor A, Tensor tau, int degree, float alpha) -> Tensor", &dense_action);
}
