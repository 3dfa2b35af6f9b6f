// CUDA kernels of hkd::spectral_propagate and its backward, torch-free (the maths: csrc/spectral.h).
//   forward:  ONE launch for all levels (up to kMaxLevels): each block belongs to one level (a by-value table of
//             level descriptors, multi-tensor style) and maps kForwardItems (b, k, p) elements per thread.
//   backward: ONE launch: each thread owns one (k, p) entry for a slice of the batch (gridDim.y slices), so the
//             parameter gradients reduce over the batch in registers (no atomics); d/dtau is reduced per warp
//             with shuffles into a (slice, warp, B) buffer that the caller sums (deterministic).
// float16 / bfloat16 latents are stored as 16-bit words and converted with PTX / bit arithmetic (no CUDA headers,
// so that NVRTC compiles this file for the sm_70 check); arithmetic is float32, or float64 for float64 latents.
#include "spectral.h"

#include "cuda/launch.h"

namespace hkd::spectral::cuda {

struct Half {
  unsigned short bits;
};
struct BFloat16 {
  unsigned short bits;
};

__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(Half v) {
#ifdef HKD_CUDA_EMULATE
  return hkd::emu::half_bits_to_float(v.bits);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
#endif
}
__device__ __forceinline__ float to_compute(BFloat16 v) { return __uint_as_float(static_cast<unsigned>(v.bits) << 16); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t to_storage(float v);
template <>
__device__ __forceinline__ float to_storage<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ Half to_storage<Half>(float v) {
  Half h;
#ifdef HKD_CUDA_EMULATE
  h.bits = hkd::emu::float_to_half_bits_rn(v);
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
#endif
  return h;
}
template <>
__device__ __forceinline__ BFloat16 to_storage<BFloat16>(float v) {  // round to nearest even, NaN stays NaN
  const unsigned u = __float_as_uint(v);
  BFloat16 b;
  b.bits = (u & 0x7fffffffu) > 0x7f800000u ? static_cast<unsigned short>((u >> 16) | 0x40u)
                                           : static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return b;
}
template <typename scalar_t>
__device__ __forceinline__ scalar_t to_storage(double v) {
  return v;
}

// The level of a block: levels are few, the table is uniform across the block.
__device__ __forceinline__ int level_of(const Args& args, long long block) {
  int l = 0;
  while (l + 1 < args.levels && block >= args.first_block[l + 1]) ++l;
  return l;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kForwardThreads) spectral_forward(const Args args) {
  const int l = level_of(args, blockIdx.x);
  const LevelArgs& L = args.level[l];
  const scalar_t* __restrict__ z = static_cast<const scalar_t*>(L.z);
  scalar_t* __restrict__ out = static_cast<scalar_t*>(L.out);
  const acc_t* __restrict__ alpha = static_cast<const acc_t*>(L.alpha);
  const acc_t* __restrict__ beta = static_cast<const acc_t*>(L.beta);
  const acc_t* __restrict__ tau = static_cast<const acc_t*>(args.tau);
  const long long P = L.positions, plane = L.pairs * P, n = args.batch * plane;
  const long long start = (blockIdx.x - args.first_block[l]) * (long long)(kForwardThreads * kForwardItems);
#pragma unroll
  for (int item = 0; item < kForwardItems; ++item) {
    const long long e = start + item * kForwardThreads + threadIdx.x;  // (b, k, p) flattened
    if (e >= n) break;
    const long long b = e / plane, q = e - b * plane, k = q / P;
    const long long x_at = b * 2 * plane + q + k * P;  // plane 2k of sample b, position p
    const long long param = L.per_position ? q : k;
    const Rotation<acc_t> r = rotation(alpha[param], beta[param], tau[b * args.tau_stride]);
    acc_t xe, ye;
    evolve(r, acc_t(to_compute(z[x_at])), acc_t(to_compute(z[x_at + P])), xe, ye);
    out[x_at] = to_storage<scalar_t>(xe);
    out[x_at + P] = to_storage<scalar_t>(ye);
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t, bool Latents, bool Terms>
__global__ void __launch_bounds__(kBackwardThreads) spectral_backward(const Args args) {
  const int l = level_of(args, blockIdx.x);
  const LevelArgs& L = args.level[l];
  const scalar_t* __restrict__ z = static_cast<const scalar_t*>(L.z);
  const scalar_t* __restrict__ grad = static_cast<const scalar_t*>(L.grad);
  scalar_t* __restrict__ grad_z = static_cast<scalar_t*>(L.out);
  const acc_t* __restrict__ tau = static_cast<const acc_t*>(args.tau);
  const long long P = L.positions, plane = L.pairs * P;
  const long long q = (blockIdx.x - args.first_block[l]) * kBackwardThreads + threadIdx.x;  // (k, p) flattened
  const bool active = q < plane;  // inactive lanes still join the warp reductions
  const long long k = active ? q / P : 0, param = L.per_position ? (active ? q : 0) : k;
  const acc_t a = static_cast<const acc_t*>(L.alpha)[param], w = static_cast<const acc_t*>(L.beta)[param];
  const long long slice = (args.batch + gridDim.y - 1) / gridDim.y;
  const long long b0 = blockIdx.y * slice, b1 = b0 + slice < args.batch ? b0 + slice : args.batch;
  const long long warps = args.first_block[args.levels] * (kBackwardThreads / 32);
  const long long warp = blockIdx.x * (kBackwardThreads / 32) + threadIdx.x / 32;
  acc_t* tau_partial = static_cast<acc_t*>(args.tau_partial);
  if (tau_partial) tau_partial += (blockIdx.y * warps + warp) * args.batch;
  acc_t ga = 0, gw = 0;
#pragma unroll 2
  for (long long b = b0; b < b1; ++b) {
    const acc_t t = tau[b * args.tau_stride];
    const Rotation<acc_t> r = rotation(a, w, t);
    const long long x_at = b * 2 * plane + q + k * P;
    acc_t gx = 0, gy = 0;
    if (active) gx = to_compute(grad[x_at]), gy = to_compute(grad[x_at + P]);
    if (Latents && active) {
      acc_t u, v;
      evolve_transposed(r, gx, gy, u, v);
      grad_z[x_at] = to_storage<scalar_t>(u);
      grad_z[x_at + P] = to_storage<scalar_t>(v);
    }
    if (Terms) {
      acc_t Pt = 0, Qt = 0;
      if (active) generator_terms(r, acc_t(to_compute(z[x_at])), acc_t(to_compute(z[x_at + P])), gx, gy, Pt, Qt);
      ga += t * Pt, gw += t * Qt;
      if (tau_partial) {
        const acc_t sum = warp_sum(a * Pt + w * Qt);
        if (threadIdx.x % 32 == 0) tau_partial[b] = sum;
      }
    }
  }
  if (Terms && active && L.grad_alpha) {
    static_cast<acc_t*>(L.grad_alpha)[blockIdx.y * plane + q] = ga;
    static_cast<acc_t*>(L.grad_beta)[blockIdx.y * plane + q] = gw;
  }
}

// Explicit instantiations: the launchers below use them, and NVRTC (which skips host code) compiles them.
#define HKD_SPECTRAL_KERNELS(S, A)                                   \
  template __global__ void spectral_forward<S, A>(const Args);       \
  template __global__ void spectral_backward<S, A, true, true>(const Args);  \
  template __global__ void spectral_backward<S, A, true, false>(const Args); \
  template __global__ void spectral_backward<S, A, false, true>(const Args);
HKD_SPECTRAL_KERNELS(float, float)
HKD_SPECTRAL_KERNELS(double, double)
HKD_SPECTRAL_KERNELS(Half, float)
HKD_SPECTRAL_KERNELS(BFloat16, float)

#ifndef __CUDACC_RTC__
template <typename S, typename A>
static cudaError_t forward_as(const Args& args, cudaStream_t stream) {
  const long long blocks = args.first_block[args.levels];
  return blocks ? launch_kernel(spectral_forward<S, A>, dim3(static_cast<unsigned>(blocks)), kForwardThreads, 0, stream,
                                args)
                : cudaSuccess;
}

template <typename S, typename A>
static cudaError_t backward_as(const Args& args, bool latents, bool terms, int chunks, cudaStream_t stream) {
  const long long blocks = args.first_block[args.levels];
  if (!blocks || !(latents || terms)) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(chunks));
  void (*kernel)(const Args) = latents && terms ? spectral_backward<S, A, true, true>
                               : latents        ? spectral_backward<S, A, true, false>
                                                : spectral_backward<S, A, false, true>;
  return launch_kernel(kernel, grid, kBackwardThreads, 0, stream, args);
}

int launch_forward(const Args& args, DType dtype, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return forward_as<float, float>(args, s);
    case kFloat64: return forward_as<double, double>(args, s);
    case kFloat16: return forward_as<Half, float>(args, s);
    case kBFloat16: return forward_as<BFloat16, float>(args, s);
  }
  return cudaErrorInvalidValue;
}

int launch_backward(const Args& args, DType dtype, bool need_latents, bool need_terms, int chunks, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return backward_as<float, float>(args, need_latents, need_terms, chunks, s);
    case kFloat64: return backward_as<double, double>(args, need_latents, need_terms, chunks, s);
    case kFloat16: return backward_as<Half, float>(args, need_latents, need_terms, chunks, s);
    case kBFloat16: return backward_as<BFloat16, float>(args, need_latents, need_terms, chunks, s);
  }
  return cudaErrorInvalidValue;
}
#endif

}  // namespace hkd::spectral::cuda
