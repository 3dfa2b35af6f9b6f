// CUDA kernels of the dense ops, torch-free (raw pointers + sizes); the maths is csrc/dense.h.
//   expm_onchip: one block per matrix (n <= 32), the Paterson-Stockmeyer powers, the Horner state and the
//                squarings all in shared memory; (m, s) per matrix from its 1-norm.
//   expm_frechet_onchip: the gradient L(A^T, G) the same way, derivatives carried alongside (when it fits).
//   action:      one block per (sample, tile of positions) ("column" mode, shared generator: V <- A V) or per
//                (position, tile of samples) ("row" mode: V <- V A_p^T, per-row h and substeps); the generator and
//                three state tiles stay in shared memory for all the Taylor terms, each substep stopping once its
//                vectors have converged: one launch for the whole action.
// NVRTC compiles this file too (sm_70 check): host-only code is guarded by __CUDACC_RTC__.
#include "dense.h"

#ifndef __CUDACC_RTC__
#include <cstdint>

#include "cuda/launch.h"

#include "cuda/dense_kernels.h"
#else
typedef long long int64_t;
#endif

namespace hkd::cuda {

using hkd::dense::Plan;
constexpr int kMaxColumns = 32;  // expm_onchip's n limit (kExpmOnChipMaxN)

template <typename T>
__device__ T nan_value() {
  return T(0) / T(0);
}

// C = L R, or C += L R with accumulate (n x n, shared memory), then a barrier. C must differ from L and R.
template <typename T>
__device__ void matmul(const T* L, const T* R, T* C, int n, bool accumulate = false) {
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
    const int i = e / n, j = e % n;
    T acc = 0;
    for (int k = 0; k < n; ++k) acc += L[i * n + k] * R[k * n + j];
    C[e] = accumulate ? C[e] + acc : acc;
  }
  __syncthreads();
}

// The plan of the n x n matrix A (csrc/dense.h expm_plan) from its 1-norm, for every thread of the block.
template <typename T>
__device__ Plan matrix_plan(const T* A, int n) {
  __shared__ double column_sum[kMaxColumns];
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += fabs(double(A[i * n + j]));
    column_sum[j] = s;
  }
  __syncthreads();
  double norm = 0;
  for (int j = 0; j < n; ++j) norm = isnan(column_sum[j]) || isnan(norm) ? column_sum[j] + norm : fmax(norm, column_sum[j]);
  return hkd::dense::expm_plan(norm, sizeof(T) == 8);
}

// The degree-m Taylor polynomial of this block's matrix (blockIdx.x, at offset `base`), evaluated by
// Paterson-Stockmeyer in blocks of q = ps_block(m) after `steps` halvings: its coefficients c(k) = 1/k! (0 past m),
// and block(pw, j, e) = sum_{i<q} c(jq + i) X^i at element e from the powers pw[i] = X^i (the identity term only
// when `identity`; a derivative's blocks have none). `finite` false: the norm is not finite, the block's output has
// been set to NaN and the kernel returns.
template <typename T>
struct Taylor {
  int m, q, n, steps;
  int64_t base;
  bool finite;
  __device__ T c(int k) const { return k <= m ? T(hkd::dense::inv_factorial(k)) : T(0); }
  __device__ T block(T* const* pw, int j, int e, bool identity) const {
    T v = identity && e / n == e % n ? c(j * q) : T(0);
    for (int i = 1; i < q; ++i) v += c(j * q + i) * pw[i][e];
    return v;
  }
};

// The prologue of both on-chip expm kernels: the plan of this block's matrix (csrc/dense.h expm_plan).
template <typename T>
__device__ Taylor<T> block_taylor(const T* A, T* out, int n) {
  const int64_t base = int64_t(blockIdx.x) * n * n;
  const Plan p = matrix_plan(A + base, n);
  if (!p.finite)
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) out[base + e] = nan_value<T>();
  return {p.degree, hkd::dense::ps_block(p.degree), n, p.steps, base, p.finite};
}

template <typename T>
__global__ void expm_onchip(const T* __restrict__ A, T* __restrict__ out, int n) {
  const Taylor<T> taylor = block_taylor(A, out, n);
  if (!taylor.finite) return;
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int nn = n * n, m = taylor.m, q = taylor.q;
  const int64_t base = taylor.base;
  T* pw[8];  // pw[i] = X^i
  for (int i = 1; i <= q; ++i) pw[i] = smem + (i - 1) * nn;
  T* Y = smem + q * nn;
  T* tmp = Y + nn;
  const T scale = T(ldexp(1.0, -taylor.steps));
  for (int e = threadIdx.x; e < nn; e += blockDim.x) pw[1][e] = A[base + e] * scale;
  __syncthreads();
  for (int i = 2; i <= q; ++i) matmul(pw[i - 1], pw[1], pw[i], n);
  const T cm = taylor.c(m);
  int j = m / q;
  const bool folded = m % q == 0;  // B_{m/q} = c(m) I: no product
  if (folded) --j;
  for (int e = threadIdx.x; e < nn; e += blockDim.x)
    Y[e] = (folded ? cm * pw[q][e] : T(0)) + taylor.block(pw, j, e, true);
  __syncthreads();
  for (--j; j >= 0; --j) {  // Y <- B_j + X^q Y
    matmul(pw[q], Y, tmp, n);
    for (int e = threadIdx.x; e < nn; e += blockDim.x) Y[e] = tmp[e] + taylor.block(pw, j, e, true);
    __syncthreads();
  }
  for (int i = 0; i < taylor.steps; ++i) {
    matmul(Y, Y, tmp, n);
    T* t = Y;
    Y = tmp, tmp = t;
  }
  for (int e = threadIdx.x; e < nn; e += blockDim.x) out[base + e] = Y[e];
}

// The gradient of exp: out = L(A^T, G), the Frechet derivative of the same approximant as expm_onchip (plan from
// ||A||_1), carried through the powers, the Horner steps and the squarings (csrc/cpu/dense.cpp expm_matrix).
template <typename T>
__global__ void expm_frechet_onchip(const T* __restrict__ A, const T* __restrict__ G, T* __restrict__ out, int n) {
  const Taylor<T> taylor = block_taylor(A, out, n);
  if (!taylor.finite) return;
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int nn = n * n, m = taylor.m, q = taylor.q;
  const int64_t base = taylor.base;
  T* pw[8];   // pw[i] = X^i, X = A^T / 2^s
  T* dpw[8];  // their derivatives in the direction G / 2^s
  for (int i = 1; i <= q; ++i) pw[i] = smem + (i - 1) * nn, dpw[i] = smem + (q + i - 1) * nn;
  T* Y = smem + 2 * q * nn;
  T* tmp = Y + nn;
  T* dY = tmp + nn;
  T* dtmp = dY + nn;
  const T scale = T(ldexp(1.0, -taylor.steps));
  for (int e = threadIdx.x; e < nn; e += blockDim.x) {
    pw[1][e] = A[base + (e % n) * n + e / n] * scale;  // transpose
    dpw[1][e] = G[base + e] * scale;
  }
  __syncthreads();
  for (int i = 2; i <= q; ++i) {  // X^i = X^{i-1} X, d(X^i) = d(X^{i-1}) X + X^{i-1} dX
    matmul(pw[i - 1], pw[1], pw[i], n);
    matmul(dpw[i - 1], pw[1], dpw[i], n);
    matmul(pw[i - 1], dpw[1], dpw[i], n, true);
  }
  const T cm = taylor.c(m);
  int j = m / q;
  const bool folded = m % q == 0;
  if (folded) --j;
  for (int e = threadIdx.x; e < nn; e += blockDim.x) {
    Y[e] = (folded ? cm * pw[q][e] : T(0)) + taylor.block(pw, j, e, true);
    dY[e] = (folded ? cm * dpw[q][e] : T(0)) + taylor.block(dpw, j, e, false);
  }
  __syncthreads();
  for (--j; j >= 0; --j) {  // Y <- B_j + X^q Y, dY <- dB_j + d(X^q) Y + X^q dY
    matmul(dpw[q], Y, dtmp, n);
    matmul(pw[q], dY, dtmp, n, true);
    matmul(pw[q], Y, tmp, n);
    for (int e = threadIdx.x; e < nn; e += blockDim.x)
      Y[e] = tmp[e] + taylor.block(pw, j, e, true), dY[e] = dtmp[e] + taylor.block(dpw, j, e, false);
    __syncthreads();
  }
  for (int i = 0; i < taylor.steps; ++i) {  // Y <- Y^2, dY <- Y dY + dY Y
    matmul(Y, dY, dtmp, n);
    matmul(dY, Y, dtmp, n, true);
    matmul(Y, Y, tmp, n);
    T* t = Y;
    Y = tmp, tmp = t;
    t = dY;
    dY = dtmp, dtmp = t;
  }
  for (int e = threadIdx.x; e < nn; e += blockDim.x) out[base + e] = dY[e];
}

// The action; tile = rows x cols of the state in shared memory. Sample b takes s_b substeps of h_b = tau_b / s_b
// (csrc/dense.h action_substeps); a vector (row mode: a row, column mode: a column) stops its substep once it has
// converged, its later terms being zero; the block stops a substep when all its vectors have.
template <typename T>
__global__ void action_onchip(const T* __restrict__ z, const T* __restrict__ A, const T* __restrict__ tau,
                              T* __restrict__ out, int64_t B, int d, int64_t P, bool row_mode, bool shared, int tile,
                              int degree, double alpha) {
  extern __shared__ unsigned char smem_raw[];
  constexpr bool is_double = sizeof(T) == 8;
  double* previous = reinterpret_cast<double*>(smem_raw);  // per vector: the last term's max-abs
  double* live = previous + tile;                           // per vector: 1 until it has converged
  T* a = reinterpret_cast<T*>(live + tile);                 // d x d
  T* y = a + d * d;                                         // state tile: row mode tile x d, column mode d x tile
  T* v = y + d * tile;
  T* w = v + d * tile;
  T* h = w + d * tile;                             // row mode: per row; column mode: h[0]
  int* steps = reinterpret_cast<int*>(h + tile);  // the same
  const int64_t first = int64_t(blockIdx.x) * tile;
  const int64_t fixed = blockIdx.y;  // column mode: the sample b; row mode: the position p
  const T* ap = A + (shared ? 0 : fixed * d * d);
  for (int e = threadIdx.x; e < d * d; e += blockDim.x) a[e] = ap[e];
  const int size = d * tile;
  for (int e = threadIdx.x; e < size; e += blockDim.x) {
    T value = 0;
    if (row_mode) {
      const int64_t b = first + e / d;
      if (b < B) value = z[(b * d + e % d) * P + fixed];
    } else {
      const int64_t pos = first + e % tile;
      if (pos < P) value = z[(fixed * d + e / tile) * P + pos];
    }
    y[e] = value;
  }
  const int samples = row_mode ? tile : 1;
  for (int r = threadIdx.x; r < samples; r += blockDim.x) {
    const int64_t b = row_mode ? first + r : fixed;
    steps[r] = b < B ? hkd::dense::action_substeps(double(tau[b]), degree, alpha, is_double) : 0;
    h[r] = b < B ? tau[b] / T(steps[r]) : T(0);
  }
  __syncthreads();
  int max_steps = 0;
  for (int r = 0; r < samples; ++r) max_steps = steps[r] > max_steps ? steps[r] : max_steps;
  // vector c: row mode, y[c * d + i]; column mode, y[i * tile + c]
  const int stride = row_mode ? 1 : tile, pitch = row_mode ? d : 1;
  for (int step = 0; step < max_steps; ++step) {
    for (int e = threadIdx.x; e < size; e += blockDim.x) v[e] = !row_mode || steps[e / d] > step ? y[e] : T(0);
    __syncthreads();
    for (int c = threadIdx.x; c < tile; c += blockDim.x) {
      double norm = 0;
      for (int i = 0; i < d; ++i) norm = fmax(norm, fabs(double(v[c * pitch + i * stride])));
      previous[c] = norm;
      live[c] = !row_mode || steps[c] > step ? 1.0 : 0.0;
    }
    __syncthreads();
    for (int k = 1; k <= degree; ++k) {
      bool any = false;
      for (int c = threadIdx.x; c < tile; c += blockDim.x) any = any || live[c] != 0.0;
      if (!__syncthreads_or(any)) break;
      for (int e = threadIdx.x; e < size; e += blockDim.x) {
        T acc = 0;
        T hk;
        if (row_mode) {  // w[r, i] = sum_l v[r, l] A[i, l]
          const int r = e / d, i = e % d;
          for (int l = 0; l < d; ++l) acc += v[r * d + l] * a[i * d + l];
          hk = h[r] / T(k);
        } else {  // w[i, c] = sum_l A[i, l] v[l, c]
          const int i = e / tile, col = e % tile;
          for (int l = 0; l < d; ++l) acc += a[i * d + l] * v[l * tile + col];
          hk = h[0] / T(k);
        }
        w[e] = hk * acc;
      }
      __syncthreads();
      for (int e = threadIdx.x; e < size; e += blockDim.x) y[e] += w[e], v[e] = w[e];
      __syncthreads();
      for (int c = threadIdx.x; c < tile; c += blockDim.x) {  // the convergence test
        double term = 0, sum = 0;
        for (int i = 0; i < d; ++i) {
          term = fmax(term, fabs(double(v[c * pitch + i * stride])));
          sum = fmax(sum, fabs(double(y[c * pitch + i * stride])));
        }
        if (live[c] != 0.0 && hkd::dense::converged(previous[c], term, sum, is_double)) {
          live[c] = 0.0;
          for (int i = 0; i < d; ++i) v[c * pitch + i * stride] = T(0);
        }
        previous[c] = term;
      }
      __syncthreads();
    }
  }
  for (int e = threadIdx.x; e < size; e += blockDim.x) {
    if (row_mode) {
      const int64_t b = first + e / d;
      if (b < B) out[(b * d + e % d) * P + fixed] = y[e];
    } else {
      const int64_t pos = first + e % tile;
      if (pos < P) out[(fixed * d + e / tile) * P + pos] = y[e];
    }
  }
}

template __global__ void expm_onchip<float>(const float*, float*, int);
template __global__ void expm_onchip<double>(const double*, double*, int);
template __global__ void expm_frechet_onchip<float>(const float*, const float*, float*, int);
template __global__ void expm_frechet_onchip<double>(const double*, const double*, double*, int);
template __global__ void action_onchip<float>(const float*, const float*, const float*, float*, int64_t, int, int64_t,
                                              bool, bool, int, int, double);
template __global__ void action_onchip<double>(const double*, const double*, const double*, double*, int64_t, int,
                                               int64_t, bool, bool, int, int, double);

#ifndef __CUDACC_RTC__
namespace {

// One block per matrix (count of them, n x n) with `bytes` of dynamic shared memory: kDoesNotFit when the device has
// less, else kernel<<<count, ...>>>(args...).
template <typename... Params, typename... Args>
int launch_per_matrix(void (*kernel)(Params...), size_t bytes, int64_t count, int n, void* stream, Args... args) {
  if (n < 1 || n > kExpmOnChipMaxN) return int(cudaErrorInvalidValue);
  if (count > 2147483647L) return int(cudaErrorInvalidConfiguration);
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return int(err);
  if (bytes + 256 > size_t(optin)) return kDoesNotFit;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return int(err);
  const int threads = n * n >= 256 ? 256 : ((n * n + 31) / 32) * 32;
  return int(launch_kernel(kernel, dim3(unsigned(count)), threads, bytes, static_cast<cudaStream_t>(stream), args...));
}

template <typename T>
int expm_launch(const ExpmArgs& a, void* stream) {
  static_assert(kExpmOnChipMaxN <= kMaxColumns);
  const T *A = static_cast<const T*>(a.A), *G = static_cast<const T*>(a.G);
  T* out = static_cast<T*>(a.out);
  if (!G) {
    const size_t bytes = size_t(6 + 2) * a.n * a.n * sizeof(T);  // q <= 6 powers, Y, tmp
    return launch_per_matrix(expm_onchip<T>, bytes, a.count, a.n, stream, A, out, a.n);
  }
  const size_t bytes = size_t(2 * 6 + 4) * a.n * a.n * sizeof(T);  // q <= 6 powers and derivatives, Y, dY, 2 scratch
  return launch_per_matrix(expm_frechet_onchip<T>, bytes, a.count, a.n, stream, A, G, out, a.n);
}

template <typename T>
int action_launch(const ActionArgs& a, void* stream) {
  const int d = a.d;
  if (d < 1 || d > kActionOnChipMaxD) return int(cudaErrorInvalidValue);
  const bool row_mode = !a.shared || a.P == 1;
  const int tile = sizeof(T) == 8 ? 8 : 32;
  const size_t bytes = 2 * tile * sizeof(double) + (size_t(d) * d + 3 * size_t(d) * tile + tile) * sizeof(T) +
                       tile * sizeof(int);
  cudaError_t err = cudaFuncSetAttribute(action_onchip<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return int(err);
  const int64_t tiles = ((row_mode ? a.B : a.P) + tile - 1) / tile;
  const int64_t fixed = row_mode ? a.P : a.B;
  if (tiles > 2147483647L || fixed > 65535) return int(cudaErrorInvalidConfiguration);
  const dim3 grid{unsigned(tiles), unsigned(fixed)};
  return int(launch_kernel(action_onchip<T>, grid, 256, bytes, static_cast<cudaStream_t>(stream),
                           static_cast<const T*>(a.z), static_cast<const T*>(a.A), static_cast<const T*>(a.tau),
                           static_cast<T*>(a.out), a.B, d, a.P, row_mode, a.shared, tile, a.degree, a.alpha));
}

}  // namespace

int launch_expm(const ExpmArgs& args, void* stream) {
  return args.is_double ? expm_launch<double>(args, stream) : expm_launch<float>(args, stream);
}
int launch_action(const ActionArgs& args, void* stream) {
  return args.is_double ? action_launch<double>(args, stream) : action_launch<float>(args, stream);
}
#endif

}  // namespace hkd::cuda
