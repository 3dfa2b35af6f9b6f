// CPU kernels of the dense ops (hkd/ops/dense.py): expm, expm_backward (adjoint Frechet derivative),
// dense_action (exp(tau_b A_p) z[b, :, p]). One matrix or one cache-sized block of the state per task
// (at::parallel_for); a small register-blocked GEMM compiled for AVX-512, AVX2 and SSE2, chosen at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/denormals.h"
#include "expm.h"

namespace {

using hkd::expm::Plan;

#define HKD_INLINE inline __attribute__((always_inline))

template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
};

// C[i, j] = rs[i * rs_stride] * sum_k L[i, k] R[k, j]; then Y[i, j] += C[i, j] when Y is given.
template <typename T, int VB, int MR>
HKD_INLINE void gemm_rows(int i0, int N, int K, const T* L, long ldl, const T* R, long ldr, T* C, long ldc,
                          const T* rs, long rs_stride, T* Y, long ldy) {
  using V = typename Vec<T, VB>::type;
  constexpr int W = VB / sizeof(T);
  int j = 0;
  for (; j + 2 * W <= N; j += 2 * W) {
    V acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) acc0[r] = V{} , acc1[r] = V{};
    for (int k = 0; k < K; ++k) {
      V b0, b1;
      std::memcpy(&b0, R + k * ldr + j, VB);
      std::memcpy(&b1, R + k * ldr + j + W, VB);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const T a = L[(i0 + r) * ldl + k];
        acc0[r] += a * b0;
        acc1[r] += a * b1;
      }
    }
    for (int r = 0; r < MR; ++r) {
      const T s = rs[(i0 + r) * rs_stride];
      V c0 = s * acc0[r], c1 = s * acc1[r];
      T* c = C + (i0 + r) * ldc + j;
      std::memcpy(c, &c0, VB);
      std::memcpy(c + W, &c1, VB);
      if (Y) {
        T* y = Y + (i0 + r) * ldy + j;
        V y0, y1;
        std::memcpy(&y0, y, VB);
        std::memcpy(&y1, y + W, VB);
        y0 += c0, y1 += c1;
        std::memcpy(y, &y0, VB);
        std::memcpy(y + W, &y1, VB);
      }
    }
  }
  for (; j < N; ++j) {
    for (int r = 0; r < MR; ++r) {
      T acc = 0;
      for (int k = 0; k < K; ++k) acc += L[(i0 + r) * ldl + k] * R[k * ldr + j];
      const T c = rs[(i0 + r) * rs_stride] * acc;
      C[(i0 + r) * ldc + j] = c;
      if (Y) Y[(i0 + r) * ldy + j] += c;
    }
  }
}

template <typename T, int VB>
HKD_INLINE void gemm(int M, int N, int K, const T* L, long ldl, const T* R, long ldr, T* C, long ldc,
                     const T* rs = nullptr, long rs_stride = 0, T* Y = nullptr, long ldy = 0) {
  static const T one = 1;
  if (!rs) rs = &one, rs_stride = 0;
  constexpr int MR = VB >= 64 ? 8 : 4;
  int i = 0;
  for (; i + MR <= M; i += MR) gemm_rows<T, VB, MR>(i, N, K, L, ldl, R, ldr, C, ldc, rs, rs_stride, Y, ldy);
  for (; i < M; ++i) gemm_rows<T, VB, 1>(i, N, K, L, ldl, R, ldr, C, ldc, rs, rs_stride, Y, ldy);
}

template <typename T>
double norm1(const T* A, int n, long row_stride, long col_stride) {
  double best = 0;
  for (int j = 0; j < n; ++j) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += std::abs(double(A[i * row_stride + j * col_stride]));
    if (std::isnan(s)) return s;
    best = std::max(best, s);
  }
  return best;
}

// exp(A) (n x n, row-major) with plan p; with E, also the Frechet derivative L(A, E) of the same approximant.
// work: (2 q + 4) n^2 elements.
template <typename T, int VB>
HKD_INLINE void expm_matrix(const T* A, const T* E, T* out, T* Lout, int n, Plan p, T* work) {
  const long nn = long(n) * n;
  if (!p.finite) {
    std::fill(out, out + nn, std::numeric_limits<T>::quiet_NaN());
    if (Lout) std::fill(Lout, Lout + nn, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  const int m = p.degree, q = hkd::expm::ps_block(m);
  T* pw[8];   // pw[i] = X^i, i = 1..q
  T* dpw[8];  // their derivatives in direction E / 2^s
  for (int i = 1; i <= q; ++i) pw[i] = work + (i - 1) * nn, dpw[i] = work + (q + i - 1) * nn;
  T *Y = work + 2 * q * nn, *tmp = Y + nn, *dY = tmp + nn, *dtmp = dY + nn;
  const T scale = std::ldexp(T(1), -p.steps);
  for (long k = 0; k < nn; ++k) pw[1][k] = A[k] * scale;
  if (E)
    for (long k = 0; k < nn; ++k) dpw[1][k] = E[k] * scale;
  for (int i = 2; i <= q; ++i) {
    gemm<T, VB>(n, n, n, pw[i - 1], n, pw[1], n, pw[i], n);
    if (E) {
      gemm<T, VB>(n, n, n, dpw[i - 1], n, pw[1], n, dpw[i], n);
      gemm<T, VB>(n, n, n, pw[i - 1], n, dpw[1], n, tmp, n);
      for (long k = 0; k < nn; ++k) dpw[i][k] += tmp[k];
    }
  }
  auto c = [m](int k) { return k <= m ? T(hkd::expm::inv_factorial(k)) : T(0); };
  // dst (+)= B_j = sum_{i<q} c(jq + i) X^i, ddst (+)= its derivative
  auto block = [&](int j, T* dst, T* ddst) {
    for (int i = 1; i < q; ++i) {
      const T ci = c(j * q + i);
      for (long k = 0; k < nn; ++k) dst[k] += ci * pw[i][k];
      if (E)
        for (long k = 0; k < nn; ++k) ddst[k] += ci * dpw[i][k];
    }
    for (int d = 0; d < n; ++d) dst[d * (n + 1)] += c(j * q);
  };
  std::fill(Y, Y + nn, T(0));
  if (E) std::fill(dY, dY + nn, T(0));
  int j = m / q;
  if (m % q == 0) {  // B_{m/q} = c(m) I: fold it in without a product
    --j;
    const T cm = c(m);
    for (long k = 0; k < nn; ++k) Y[k] = cm * pw[q][k];
    if (E)
      for (long k = 0; k < nn; ++k) dY[k] = cm * dpw[q][k];
  }
  block(j, Y, dY);
  for (--j; j >= 0; --j) {  // Y <- B_j + X^q Y
    if (E) {
      gemm<T, VB>(n, n, n, dpw[q], n, Y, n, dtmp, n);
      gemm<T, VB>(n, n, n, pw[q], n, dY, n, tmp, n);
      for (long k = 0; k < nn; ++k) dY[k] = dtmp[k] + tmp[k];
    }
    gemm<T, VB>(n, n, n, pw[q], n, Y, n, tmp, n);
    std::swap(Y, tmp);
    std::fill(tmp, tmp + nn, T(0));
    block(j, Y, dY);
  }
  for (int i = 0; i < p.steps; ++i) {  // squaring: Y <- Y^2, dY <- Y dY + dY Y
    if (E) {
      gemm<T, VB>(n, n, n, Y, n, dY, n, dtmp, n);
      gemm<T, VB>(n, n, n, dY, n, Y, n, tmp, n);
      for (long k = 0; k < nn; ++k) dY[k] = dtmp[k] + tmp[k];
    }
    gemm<T, VB>(n, n, n, Y, n, Y, n, tmp, n);
    std::swap(Y, tmp);
  }
  std::memcpy(out, Y, nn * sizeof(T));
  if (E) std::memcpy(Lout, dY, nn * sizeof(T));
}

// One block of the state, evolved in place by the Taylor substeps (csrc/expm.h). Row mode: the rows are samples,
// sorted by their substeps (non-increasing), state S (rows x d), S <- S A^T with per-row h; column mode: one sample's
// positions, S (d x cols), S <- A S, one h. A vector (a row, or a column) stops its substep once it has converged:
// its later terms are zero. y: the state and result; v, w: scratch of the same size; hk: rows; norms: 4 per vector.
template <typename T, int VB>
HKD_INLINE void action_block(bool row_mode, int rows, int cols, const T* Aop, int d, const T* h, const int* steps,
                             int degree, T* y, T* v, T* w, T* hk, double* norms) {
  constexpr bool is_double = sizeof(T) == 8;
  const int vectors = row_mode ? rows : cols;
  double *previous = norms, *term = norms + vectors, *sum = term + vectors, *live = sum + vectors;
  for (int step = 0; step < steps[0]; ++step) {
    int active = row_mode ? 0 : rows;  // row mode: the rows still taking substeps (a prefix)
    if (row_mode)
      while (active < rows && steps[active] > step) ++active;
    const int n = row_mode ? active : vectors;
    const long size = long(row_mode ? active : rows) * cols;
    std::memcpy(v, y, size * sizeof(T));
    std::fill(previous, previous + n, 0.0);
    for (long e = 0; e < size; ++e) {
      const long c = row_mode ? e / cols : e % cols;
      previous[c] = std::max(previous[c], double(std::abs(v[e])));
    }
    int left = n;
    std::fill(live, live + n, 1.0);
    for (int k = 1; k <= degree && left > 0; ++k) {
      if (row_mode) {
        for (int r = 0; r < active; ++r) hk[r] = h[r] / T(k);
        gemm<T, VB>(active, cols, d, v, cols, Aop, d, w, cols, hk, 1);
      } else {
        hk[0] = h[0] / T(k);
        gemm<T, VB>(rows, cols, d, Aop, d, v, cols, w, cols, hk, 0);
      }
      // y += term; then the convergence test per vector, whose later terms are zero once it passes
      std::fill(term, term + n, 0.0);
      std::fill(sum, sum + n, 0.0);
      for (long e = 0; e < size; ++e) {
        const long c = row_mode ? e / cols : e % cols;
        y[e] += w[e];
        term[c] = std::max(term[c], double(std::abs(w[e])));
        sum[c] = std::max(sum[c], double(std::abs(y[e])));
      }
      for (int c = 0; c < n; ++c) {
        if (!live[c] || !hkd::expm::converged(previous[c], term[c], sum[c], is_double)) {
          previous[c] = term[c];
          continue;
        }
        live[c] = 0.0, --left;
        if (row_mode) std::fill(w + long(c) * cols, w + long(c + 1) * cols, T(0));
        else
          for (int i = 0; i < rows; ++i) w[long(i) * cols + c] = T(0);
      }
      std::swap(v, w);
    }
  }
}

// ---- instruction-set variants: the same code compiled three times, chosen once at run time ----------------
#define HKD_VARIANT(NAME, TARGET, VB)                                                                            \
  template <typename T>                                                                                          \
  __attribute__((target(TARGET))) void NAME##_expm(const T* A, const T* E, T* out, T* L, int n, Plan p, T* w) { \
    expm_matrix<T, VB>(A, E, out, L, n, p, w);                                                                   \
  }                                                                                                              \
  template <typename T>                                                                                          \
  __attribute__((target(TARGET))) void NAME##_action(bool row_mode, int rows, int cols, const T* Aop, int d,    \
                                                     const T* h, const int* steps, int degree, T* y, T* v, T* w, \
                                                     T* hk, double* norms) {                                     \
    action_block<T, VB>(row_mode, rows, cols, Aop, d, h, steps, degree, y, v, w, hk, norms);                     \
  }
#if defined(__x86_64__) || defined(__i386__)
HKD_VARIANT(avx512, "avx512f,avx512dq", 64)
HKD_VARIANT(avx2, "avx2,fma", 32)
HKD_VARIANT(sse2, "sse2", 16)

enum class Isa { avx512, avx2, sse2 };
Isa isa() {
  static const Isa value = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") ? Isa::avx512
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")    ? Isa::avx2
                                                                                                 : Isa::sse2;
  return value;
}

template <typename T>
void expm_dispatch(const T* A, const T* E, T* out, T* L, int n, Plan p, T* w) {
  switch (isa()) {
    case Isa::avx512: return avx512_expm<T>(A, E, out, L, n, p, w);
    case Isa::avx2: return avx2_expm<T>(A, E, out, L, n, p, w);
    default: return sse2_expm<T>(A, E, out, L, n, p, w);
  }
}

template <typename T>
void action_dispatch(bool row_mode, int rows, int cols, const T* Aop, int d, const T* h, const int* steps, int degree,
                     T* y, T* v, T* w, T* hk, double* norms) {
  switch (isa()) {
    case Isa::avx512: return avx512_action<T>(row_mode, rows, cols, Aop, d, h, steps, degree, y, v, w, hk, norms);
    case Isa::avx2: return avx2_action<T>(row_mode, rows, cols, Aop, d, h, steps, degree, y, v, w, hk, norms);
    default: return sse2_action<T>(row_mode, rows, cols, Aop, d, h, steps, degree, y, v, w, hk, norms);
  }
}
#else  // other architectures: one 16-byte-vector variant, the compiler's own target
template <typename T>
void expm_dispatch(const T* A, const T* E, T* out, T* L, int n, Plan p, T* w) {
  expm_matrix<T, 16>(A, E, out, L, n, p, w);
}

template <typename T>
void action_dispatch(bool row_mode, int rows, int cols, const T* Aop, int d, const T* h, const int* steps, int degree,
                     T* y, T* v, T* w, T* hk, double* norms) {
  action_block<T, 16>(row_mode, rows, cols, Aop, d, h, steps, degree, y, v, w, hk, norms);
}
#endif

// Tasks 0..count-1, ordered by cost (most first), dealt round-robin to the worker threads. Each thread calls
// setup(tasks) once (its scratch), with flush-to-zero set; tasks(body) then runs body(t) for that thread's tasks.
template <typename Setup>
void for_each_task(int64_t count, const Setup& setup) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    const hkd::FlushDenormals ftz;
    for (int64_t worker = first; worker < last; ++worker)
      setup([&](const auto& body) {
        for (int64_t t = worker; t < count; t += threads) body(t);
      });
  });
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "hkd::", name, ": expected CPU tensors");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "hkd::", name,
              ": expected float32 or float64, got ", t.scalar_type());
}

// ---- ops --------------------------------------------------------------------------------------------------
// exp(A) for A (..., n, n); with grad, the adjoint of the Frechet derivative: L(A^T, grad), using the plan of A.
at::Tensor expm_impl(const at::Tensor& A_in, const at::Tensor* grad_in) {
  check_float(A_in, "expm");
  TORCH_CHECK(A_in.dim() >= 2 && A_in.size(-1) == A_in.size(-2), "hkd::expm: expected (..., n, n), got ",
              A_in.sizes());
  const int n = A_in.size(-1);
  at::Tensor A = A_in.contiguous().reshape({-1, n, n});
  at::Tensor G = grad_in ? grad_in->to(A.scalar_type()).contiguous().reshape({-1, n, n}) : at::Tensor();
  at::Tensor out = at::empty_like(A);
  const int64_t count = A.size(0);
  if (count == 0 || n == 0) return out.reshape(A_in.sizes());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "hkd_expm_cpu", [&] {
    const scalar_t* a = A.data_ptr<scalar_t>();
    const scalar_t* g = G.defined() ? G.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    const bool is_double = std::is_same_v<scalar_t, double>;
    const long nn = long(n) * n;
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      const hkd::FlushDenormals ftz;
      std::vector<scalar_t> work((2 * 8 + 6) * nn), expA(nn);
      scalar_t* at_ = work.data() + (2 * 8 + 4) * nn;
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* ab = a + b * nn;
        const Plan p = hkd::expm::expm_plan(norm1(ab, n, n, 1), is_double);
        if (!g) {
          expm_dispatch<scalar_t>(ab, nullptr, o + b * nn, nullptr, n, p, work.data());
        } else {  // L(A^T, G) = L(A, G^T)^T: evaluate with A^T
          for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) at_[i * n + j] = ab[j * n + i];
          expm_dispatch<scalar_t>(at_, g + b * nn, expA.data(), o + b * nn, n, p, work.data());
        }
      }
    });
  });
  return out.reshape(A_in.sizes());
}

at::Tensor expm_cpu(const at::Tensor& A) { return expm_impl(A, nullptr); }
at::Tensor expm_backward_cpu(const at::Tensor& A, const at::Tensor& grad) { return expm_impl(A, &grad); }

// z (B, d, P); A (d, d) shared or (P, d, d) per position; tau (B,); the plan (degree m, alpha) from
// hkd.ops.dense.action_plan: sample b takes s_b = ceil(|tau_b| alpha / theta_m) substeps of h_b = tau_b / s_b.
at::Tensor dense_action_cpu(const at::Tensor& z_in, const at::Tensor& A_in, const at::Tensor& tau_in,
                             const at::Tensor& plan) {
  check_float(z_in, "dense_action");
  TORCH_CHECK(z_in.dim() == 3, "hkd::dense_action: z must be (B, d, P), got ", z_in.sizes());
  const int64_t B = z_in.size(0), d = z_in.size(1), P = z_in.size(2);
  const bool shared = A_in.dim() == 2;
  TORCH_CHECK((shared && A_in.size(0) == d && A_in.size(1) == d) ||
                  (A_in.dim() == 3 && A_in.size(0) == P && A_in.size(1) == d && A_in.size(2) == d),
              "hkd::dense_action: A must be (d, d) or (P, d, d) for z ", z_in.sizes(), ", got ", A_in.sizes());
  TORCH_CHECK(tau_in.dim() == 1 && tau_in.size(0) == B, "hkd::dense_action: tau must be (B,), got ", tau_in.sizes());
  TORCH_CHECK(plan.numel() == 2, "hkd::dense_action: plan must be (degree, alpha), got ", plan.sizes());
  const at::Tensor plan_host = plan.to(at::kCPU, at::kDouble).contiguous();
  const double degree_value = plan_host.data_ptr<double>()[0], alpha = plan_host.data_ptr<double>()[1];
  TORCH_CHECK(degree_value >= 1 && degree_value <= hkd::expm::kMaxDegree, "hkd::dense_action: degree must be in [1, ",
              hkd::expm::kMaxDegree, "], got ", degree_value);
  const int degree = int(degree_value);
  at::Tensor z = z_in.contiguous();
  at::Tensor A = A_in.to(z.scalar_type()).contiguous();
  at::Tensor tau = tau_in.to(z.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(z);
  if (out.numel() == 0) return out;
  if (!(alpha >= 0 && alpha <= 1e300) || !A.isfinite().all().item<bool>()) return out.fill_(NAN);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "hkd_dense_action_cpu", [&] {
    using T = scalar_t;
    const bool is_double = std::is_same_v<T, double>;
    const int m = int(degree);
    const T* zp = z.data_ptr<T>();
    const T* ap = A.data_ptr<T>();
    const T* tp = tau.data_ptr<T>();
    T* op = out.data_ptr<T>();
    // samples by substeps, most first: a block of rows then shrinks to a prefix as its samples finish
    std::vector<int64_t> order(B);
    std::vector<int> steps(B);
    std::vector<T> h(B);
    for (int64_t b = 0; b < B; ++b) order[b] = b;
    for (int64_t b = 0; b < B; ++b) steps[b] = hkd::expm::action_substeps(double(tp[b]), m, alpha, is_double);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return steps[a] > steps[b]; });
    for (int64_t b = 0; b < B; ++b) h[b] = tp[b] / T(steps[b]);
    // block size: three state blocks in about 192 KiB (L2)
    const int64_t budget = std::max<int64_t>(16, (192 * 1024) / (3 * int64_t(sizeof(T)) * d));
    if (shared && P > 1) {  // column mode: task = (sample, block of positions), S <- A S
      const int64_t pb = std::min<int64_t>(P, budget), nblk = (P + pb - 1) / pb;
      for_each_task(B * nblk, [&](auto&& tasks) {
        std::vector<T> buf(3 * d * pb + 1);
        std::vector<double> norms(4 * pb);
        tasks([&](int64_t t) {
          const int64_t b = order[t / nblk], p0 = (t % nblk) * pb, cols = std::min(pb, P - p0);
          T *y = buf.data(), *v = y + d * cols, *w = v + d * cols, *hk = buf.data() + 3 * d * pb;
          for (int64_t i = 0; i < d; ++i) std::memcpy(y + i * cols, zp + (b * d + i) * P + p0, cols * sizeof(T));
          action_dispatch<T>(false, d, cols, ap, d, &h[b], &steps[b], m, y, v, w, hk, norms.data());
          for (int64_t i = 0; i < d; ++i) std::memcpy(op + (b * d + i) * P + p0, y + i * cols, cols * sizeof(T));
        });
      });
    } else {  // row mode: task = (position, block of samples in substep order), S (rows x d) <- S A_p^T
      const int64_t nb = std::min<int64_t>(B, budget), nblk = (B + nb - 1) / nb;
      at::Tensor At = A.transpose(-1, -2).contiguous();
      const T* atp = At.data_ptr<T>();
      std::vector<T> h_sorted(B);
      std::vector<int> steps_sorted(B);
      for (int64_t r = 0; r < B; ++r) h_sorted[r] = h[order[r]], steps_sorted[r] = steps[order[r]];
      for_each_task(P * nblk, [&](auto&& tasks) {
        std::vector<T> buf(3 * nb * d + nb);
        std::vector<double> norms(4 * nb);
        tasks([&](int64_t t) {
          const int64_t p = t % P, r0 = (t / P) * nb, rows = std::min(nb, B - r0);
          T *y = buf.data(), *v = y + rows * d, *w = v + rows * d, *hk = buf.data() + 3 * nb * d;
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < d; ++i) y[r * d + i] = zp[(order[r0 + r] * d + i) * P + p];
          action_dispatch<T>(true, rows, d, atp + (shared ? 0 : p * d * d), d, &h_sorted[r0], &steps_sorted[r0], m,
                             y, v, w, hk, norms.data());
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < d; ++i) op[(order[r0 + r] * d + i) * P + p] = y[r * d + i];
        });
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hkd, CPU, m) {
  m.impl("expm", &expm_cpu);
  m.impl("expm_backward", &expm_backward_cpu);
  m.impl("dense_action", &dense_action_cpu);
}
