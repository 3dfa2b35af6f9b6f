// The maths of spectral Koopman propagation, shared by the CPU kernels (csrc/cpu/spectral.cpp) and the
// CUDA kernels (csrc/cuda/spectral.cu). Torch-free and header-light, so that NVRTC can compile it too.
//
// Channel pair k = channels (2k, 2k+1) holds the eigenvalue pair alpha +- i beta of the generator A.
// exp(tau A) acts on the pair (x, y) as complex multiplication of x + i y by exp((alpha + i beta) tau):
//     x' = s (c x - n y),   y' = s (n x + c y),   s = exp(alpha tau), c = cos(beta tau), n = sin(beta tau).
// Backward, with upstream gradients (gx', gy') and the evolved pair (x', y'):
//     gx = s (c gx' + n gy'),   gy = s (c gy' - n gx')            (the transposed rotation, same scale)
//     d/dalpha = tau P,  d/dbeta = tau Q,  d/dtau = alpha P + beta Q,
//     P = gx' x' + gy' y',   Q = gy' x' - gx' y'.
#pragma once

#ifndef __CUDACC_RTC__
#include <cmath>
#include <cstdint>
#include <cstring>
#endif

#include "common.h"

namespace hkd::spectral {

template <typename T>
struct Rotation {
  T scale, cos, sin;  // exp(alpha tau), cos(beta tau), sin(beta tau)
};

// Float32 angles: beta * tau is exact in double (a 24-bit by 24-bit product), and is reduced there by pi/2:
// r = x - j pi/2 with a two-part pi/2 whose first part has 33 bits, so j * kPio2Hi is exact for |j| < 2^20 and
// r is accurate to about 1e-16 |x| beyond. sin and cos then run in float32 on |r| <= pi/4. Past |x| ~ 2^51 the
// reduction is meaningless; r is clamped so that the rotation never scales the modulus, whatever the angle.
constexpr double kTwoOverPi = 0.63661977236758134308;
constexpr double kPio2Hi = 1.57079632673412561417, kPio2Lo = 6.07710050650619224932e-11;

HKD_HD double round_nearest(double x) {  // exact for |x| < 2^51, branch-free (vectorises without SSE4.1)
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  return (x + magic) - magic;
}

// r in [-pi/4, pi/4] (or NaN) and the quadrant q in [0, 4) with beta tau = r + q pi/2 (mod 2 pi).
HKD_HD float reduce_angle(float beta, float tau, int& q) {
  const double x = static_cast<double>(beta) * static_cast<double>(tau);
  const double j = round_nearest(x * kTwoOverPi);
  double m = j - 4.0 * round_nearest(j * 0.25);  // j mod 4 in [-2, 2] while the rounding is exact
  m = m >= -4.0 && m <= 4.0 ? m : 0.0;            // (NaN, or a huge angle: no overflow in the cast)
  q = static_cast<int>(m) & 3;
  double r = (x - j * kPio2Hi) - j * kPio2Lo;
  r = r > 0.7854 ? 0.7854 : r;  // comparisons keep NaN
  r = r < -0.7854 ? -0.7854 : r;
  return static_cast<float>(r);
}

// (sin, cos) of r + q pi/2 from (sin r, cos r).
HKD_HD void to_quadrant(int q, float s, float c, float& sin_out, float& cos_out) {
  const float sq = (q & 1) ? c : s, cq = (q & 1) ? s : c;
  sin_out = (q & 2) ? -sq : sq;
  cos_out = ((q + 1) & 2) ? -cq : cq;
}

#if !defined(__CUDA_ARCH__)
// Host float32: exp and sincos as branch-free polynomials (Cephes coefficients, <= 2 ulp for the
// arguments that occur here) so that loops over positions vectorise; libm calls would not.
HKD_HD float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

HKD_HD float round_nearest(float x) {  // exact for |x| < 2^22, no SSE4.1 needed
  const float magic = 12582912.0f;         // 1.5 * 2^23
  return (x + magic) - magic;
}

HKD_HD float exp_poly(float x) {
  const float hi = 88.72283935546875f, lo = -103.97208f;  // expf overflows above hi, is 0 below lo
  float xc = x > hi ? hi : (x < lo ? lo : x);
  float n = round_nearest(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as two factors, so that n in [-150, 128] (denormal results, the largest float) stays exact
  int32_t k = static_cast<int32_t>(n), k1 = k >> 1;
  float result = p * bits_to_float((k1 + 127) << 23) * bits_to_float((k - k1 + 127) << 23);
  result = x > hi ? INFINITY : result;
  result = x < lo ? 0.0f : result;
  return x != x ? x : result;  // NaN in, NaN out
}

// sin and cos of |r| <= pi/4.
HKD_HD void sincos_poly(float r, float& sin_out, float& cos_out) {
  float z = r * r;
  float s = -1.9515295891e-4f;
  s = s * z + 8.3321608736e-3f;
  s = s * z - 1.6666654611e-1f;
  sin_out = s * z * r + r;
  float c = 2.443315711809948e-5f;
  c = c * z - 1.388731625493765e-3f;
  c = c * z + 4.166664568298827e-2f;
  cos_out = c * z * z - 0.5f * z + 1.0f;
}
#endif

HKD_HD Rotation<float> rotation(float alpha, float beta, float tau) {
  Rotation<float> rot;
  int q;
  const float r = reduce_angle(beta, tau, q);
  float s, c;
#if defined(__CUDA_ARCH__)
  rot.scale = expf(alpha * tau);
  sincosf(r, &s, &c);
#else
  rot.scale = exp_poly(alpha * tau);
  sincos_poly(r, s, c);
#endif
  to_quadrant(q, s, c, rot.sin, rot.cos);
  return rot;
}

HKD_HD Rotation<double> rotation(double alpha, double beta, double tau) {
  Rotation<double> r;
#if defined(__CUDA_ARCH__)
  r.scale = exp(alpha * tau);
  sincos(beta * tau, &r.sin, &r.cos);
#else
  r.scale = std::exp(alpha * tau);
  r.sin = std::sin(beta * tau);
  r.cos = std::cos(beta * tau);
#endif
  return r;
}

template <typename T>
HKD_HD void evolve(const Rotation<T>& r, T x, T y, T& x_out, T& y_out) {
  x_out = r.scale * (r.cos * x - r.sin * y);
  y_out = r.scale * (r.sin * x + r.cos * y);
}

// Gradient with respect to the input pair: the transposed map.
template <typename T>
HKD_HD void evolve_transposed(const Rotation<T>& r, T gx, T gy, T& gx_out, T& gy_out) {
  gx_out = r.scale * (r.cos * gx + r.sin * gy);
  gy_out = r.scale * (r.cos * gy - r.sin * gx);
}

// P and Q of the header comment, from the upstream gradient and the input pair (x' recomputed).
template <typename T>
HKD_HD void generator_terms(const Rotation<T>& r, T x, T y, T gx, T gy, T& P, T& Q) {
  T xe, ye;
  evolve(r, x, y, xe, ye);
  P = gx * xe + gy * ye;
  Q = gy * xe - gx * ye;
}

#ifndef __CUDACC_RTC__
// The product of the sizes from dimension 2 on: a latent's positions (B, d, *S). Any tensor type with dim() and size().
template <typename Tensor>
int64_t positions_of(const Tensor& z) {
  int64_t n = 1;
  for (int64_t i = 2; i < z.dim(); ++i) n *= z.size(i);
  return n;
}
#endif

}  // namespace hkd::spectral

// --- the CUDA launchers' interface (csrc/cuda/spectral.cu), torch-free: raw pointers and sizes -------------------
namespace hkd::spectral::cuda {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
constexpr int kMaxLevels = 16;  // levels per launch (more are launched in groups)

struct LevelArgs {
  const void* z;            // (B, 2 pairs, P) latents, storage dtype
  const void* grad;         // backward: upstream gradient, like z
  void* out;                // forward: evolved latents; backward: gradient of z (or null)
  const void *alpha, *beta; // (pairs, P) or (pairs,), compute dtype (float32, or float64 for float64 latents)
  void *grad_alpha, *grad_beta;  // backward: (chunks, pairs, P) partial sums over each batch chunk (or null)
  long long pairs, positions;
  int per_position;
};

struct Args {
  LevelArgs level[kMaxLevels];
  long long first_block[kMaxLevels + 1];  // level l owns blocks [first_block[l], first_block[l + 1])
  int levels;
  long long batch;
  const void* tau;   // (B,) or one value, compute dtype
  int tau_stride;    // 1 per sample, 0 shared
  void* tau_partial; // backward: (chunks, blocks * warps per block, B) partial d/dtau sums (or null)
};

constexpr int kForwardThreads = 256, kForwardItems = 4;  // a forward block covers 1024 (b, k, p) elements
constexpr int kBackwardThreads = 256;                    // a backward block covers 256 (k, p) entries

#ifndef __CUDACC_RTC__  // host code: NVRTC compiles device code only
// Fill first_block from the levels' sizes for the forward ((b, k, p) elements) or backward ((k, p) entries).
inline long long plan_blocks(Args& args, bool backward) {
  args.first_block[0] = 0;
  for (int l = 0; l < args.levels; ++l) {
    const LevelArgs& L = args.level[l];
    const long long n = (backward ? 1 : args.batch) * L.pairs * L.positions;
    const long long per_block = backward ? kBackwardThreads : kForwardThreads * kForwardItems;
    args.first_block[l + 1] = args.first_block[l] + (args.batch ? (n + per_block - 1) / per_block : 0);
  }
  return args.first_block[args.levels];
}

// The backward's batch slices (gridDim.y): one when the (k, p) entries alone fill `sms` multiprocessors, else more,
// at least 4 samples each.
inline int backward_chunks(long long entries, long long batch, int sms) {
  const long long target = 4 * (long long)sms * 2048, most = batch / 4 < 1 ? 1 : batch / 4 > 65535 ? 65535 : batch / 4;
  const long long chunks = target / (entries > 1 ? entries : 1);
  return static_cast<int>(chunks < 1 ? 1 : chunks > most ? most : chunks);
}

// The levels [begin, end) of contiguous latents (B, d, *S), alphas and betas (d/2,) or (d/2, *S) and tau as launch
// arguments, without outputs. Any tensor type (stable or ATen) with dim(), size() and const_data_ptr().
template <typename Tensors, typename Tensor>
Args make_args(const Tensors& latents, const Tensors& alphas, const Tensors& betas, const Tensor& tau,
               size_t begin, size_t end) {
  Args args{};
  args.levels = static_cast<int>(end - begin);
  args.batch = latents[0].size(0);
  args.tau = tau.const_data_ptr();
  args.tau_stride = tau.dim() == 1 ? 1 : 0;
  for (size_t l = begin; l < end; ++l) {
    LevelArgs& L = args.level[l - begin];
    L.z = latents[l].const_data_ptr();
    L.alpha = alphas[l].const_data_ptr();
    L.beta = betas[l].const_data_ptr();
    L.pairs = latents[l].size(1) / 2;
    L.positions = positions_of(latents[l]);
    L.per_position = alphas[l].dim() > 1;
  }
  return args;
}

// The backward's launch arguments: make_args with the upstream gradients, and where the results go: the gradients of
// the latents and the per-slice parameter partials (each empty when not wanted).
template <typename Tensors, typename Tensor>
Args backward_args(const Tensors& latents, const Tensors& alphas, const Tensors& betas, const Tensor& tau,
                   const Tensors& grads, const Tensors& grad_latents, const Tensors& partial_alphas,
                   const Tensors& partial_betas, size_t begin, size_t end) {
  Args args = make_args(latents, alphas, betas, tau, begin, end);
  for (size_t l = begin; l < end; ++l) {
    LevelArgs& L = args.level[l - begin];
    L.grad = grads[l].const_data_ptr();
    L.out = grad_latents.empty() ? nullptr : grad_latents[l].mutable_data_ptr();
    L.grad_alpha = partial_alphas.empty() ? nullptr : partial_alphas[l].mutable_data_ptr();
    L.grad_beta = partial_betas.empty() ? nullptr : partial_betas[l].mutable_data_ptr();
  }
  return args;
}

// Both return a cudaError_t (0: launched). stream: a cudaStream_t.
int launch_forward(const Args& args, DType dtype, void* stream);
// chunks: the batch is split into `chunks` slices (gridDim.y), each with its own parameter and tau partials.
int launch_backward(const Args& args, DType dtype, bool need_latents, bool need_terms, int chunks, void* stream);
#endif

}  // namespace hkd::spectral::cuda
