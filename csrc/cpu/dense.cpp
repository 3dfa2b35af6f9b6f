// CPU kernels of the dense ops (hkd/ops/dense.py): expm, expm_backward (adjoint Frechet derivative),
// dense_action (exp(tau_b A_p) z[b, :, p]) and dense_action_backward (the exact reverse of its recurrence). One matrix
// or one cache-sized block of the state per task (torch's parallel_for). expm: a small register-blocked GEMM compiled
// for AVX-512, AVX2 and SSE2, chosen at run time; the action: ATen's BLAS on each worker thread, through the C shim
// aoti_torch_cpu_addmm_out (no dispatcher on the way).
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/denormals.h"
#include "dense.h"
#include "inputs.h"
#include "stable.h"

namespace {

using hkd::Tensor;
using hkd::dense::Plan;

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
  const int m = p.degree, q = hkd::dense::ps_block(m);
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
  auto c = [m](int k) { return k <= m ? T(hkd::dense::inv_factorial(k)) : T(0); };
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

// A row-major matrix (rows x cols, leading dimension ld) in place, or read as its transpose.
template <typename T>
struct View {
  const T* data;
  long rows, cols, ld;
  bool transposed = false;
  Tensor tensor() const {
    const auto dtype = sizeof(T) == 8 ? hkd::ScalarType::Double : hkd::ScalarType::Float;
    const torch::stable::Device host(torch::headeronly::DeviceType::CPU);
    return transposed ? torch::stable::from_blob(const_cast<T*>(data), {cols, rows}, {1, ld}, host, dtype)
                      : torch::stable::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, host, dtype);
  }
};

// C = alpha L R (accumulate: C += alpha L R), C row-major with leading dimension ldc, by ATen's BLAS on this thread.
template <typename T>
void matmul(const View<T>& L, const View<T>& R, T* C, long ldc, T alpha, bool accumulate) {
  const long M = L.transposed ? L.cols : L.rows, N = R.transposed ? R.rows : R.cols;
  const Tensor c = View<T>{C, M, N, ldc}.tensor();
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch_cpu_addmm_out(c.get(), c.get(), L.tensor().get(), R.tensor().get(), accumulate ? 1 : 0, alpha));
}

// norm[c] = max |x| over vector c of an n x cols block (row mode: row c, column mode: column c).
template <typename T>
void max_abs(bool row_mode, int n, int cols, const T* x, double* norm) {
  if (row_mode) {
    for (int i = 0; i < n; ++i) {
      const T* xi = x + long(i) * cols;
      T row = 0;
#pragma omp simd reduction(max : row)
      for (int j = 0; j < cols; ++j) row = std::max(row, std::abs(xi[j]));
      norm[i] = row;
    }
    return;
  }
  std::fill(norm, norm + cols, 0.0);
  for (int i = 0; i < n; ++i) {
    const T* xi = x + long(i) * cols;
#pragma omp simd
    for (int j = 0; j < cols; ++j) norm[j] = std::max(norm[j], double(std::abs(xi[j])));
  }
}

// w *= h / k (per row in row mode, h[0] in column mode), y += w, then term and sum = max_abs of w and y.
template <typename T>
void add_term(bool row_mode, int n, int cols, const T* h, int k, T* y, T* w, double* term, double* sum) {
  if (row_mode) {  // one pass per row
    for (int i = 0; i < n; ++i) {
      const T hk = h[i] / T(k);
      T *wi = w + long(i) * cols, *yi = y + long(i) * cols, w_max = 0, y_max = 0;
#pragma omp simd reduction(max : w_max, y_max)
      for (int j = 0; j < cols; ++j) {
        wi[j] *= hk, yi[j] += wi[j];
        w_max = std::max(w_max, std::abs(wi[j])), y_max = std::max(y_max, std::abs(yi[j]));
      }
      term[i] = w_max, sum[i] = y_max;
    }
    return;
  }
  const T hk = h[0] / T(k);
  for (int i = 0; i < n; ++i) {
    T *wi = w + long(i) * cols, *yi = y + long(i) * cols;
#pragma omp simd
    for (int j = 0; j < cols; ++j) wi[j] *= hk, yi[j] += wi[j];
  }
  max_abs(false, n, cols, w, term);
  max_abs(false, n, cols, y, sum);
}

// One Taylor substep of a block of the state, in place: y <- T_m(h A) y (csrc/dense.h). Row mode: the rows of y
// (n x cols) are the vectors (samples), per-row h, y <- y A^T; column mode: the columns of y (n x cols) are the vectors
// (one sample's positions), one h, y <- A y. Terms v_0 = y, v_k = (h / k) A v_{k-1}; a vector stops once it has
// converged, its later terms being zero. Without a record, v and w are scratch of y's size; with one (room for
// degree + 1 blocks of y's size), v_0 .. v_K stay there and terms[c] says how many terms vector c took.
// Returns K, the terms the block took. A: d x d, row-major; norms: 4 per vector.
template <typename T>
int action_substep(bool row_mode, int n, int cols, const T* A, int d, const T* h, int degree, T* y, T* v, T* w,
                   double* norms, T* record, int* terms) {
  constexpr bool is_double = sizeof(T) == 8;
  const int vectors = row_mode ? n : cols;
  const long size = long(n) * cols;
  double *previous = norms, *term = norms + vectors, *sum = term + vectors, *live = sum + vectors;
  if (record) v = record, w = record + size;
  std::memcpy(v, y, size * sizeof(T));
  max_abs(row_mode, n, cols, v, previous);
  if (terms) std::fill(terms, terms + vectors, degree);
  int left = vectors, k = 1;
  int active = n;  // row mode: the rows past the last live one take no more terms (rows of one substep count by |h|)
  std::fill(live, live + vectors, 1.0);
  for (; k <= degree && left > 0; ++k) {
    if (row_mode) matmul<T>({v, active, d, cols}, {A, d, d, d, true}, w, cols, T(1), false);
    else matmul<T>({A, d, d, d}, {v, d, cols, cols}, w, cols, T(1), false);
    if (record) std::fill(w + long(active) * cols, w + size, T(0));  // (a recorded term is zero past them)
    // term = (h / k) A v; y += term; then the convergence test per vector, whose later terms are zero once it passes
    add_term(row_mode, active, cols, h, k, y, w, term, sum);
    for (int c = 0; c < (row_mode ? active : vectors); ++c) {
      if (!live[c] || !hkd::dense::converged(previous[c], term[c], sum[c], is_double)) {
        previous[c] = term[c];
        continue;
      }
      live[c] = 0.0, --left;
      if (terms) terms[c] = k;
      if (row_mode) std::fill(w + long(c) * cols, w + long(c + 1) * cols, T(0));
      else
        for (int i = 0; i < n; ++i) w[long(i) * cols + c] = T(0);
    }
    while (row_mode && active > 0 && !live[active - 1]) --active;
    if (record) v = w, w += size;
    else std::swap(v, w);
  }
  if (record) std::fill(w, record + (degree + 1) * size, T(0));  // (the reserved terms it did not take)
  return k - 1;
}

// The rows of a row-mode block (sorted by their substeps, non-increasing) still taking substep `step`: a prefix.
inline int active_rows(const int* steps, int rows, int step) {
  int active = 0;
  while (active < rows && steps[active] > step) ++active;
  return active;
}

// One block of the state evolved by all its substeps (action_substep): row mode, rows x cols with per-row h and
// substeps; column mode, rows x cols with one h and steps[0] substeps. v, w: scratch like y. With a record (the
// block's share of dense_action_record's, see record_offsets), each substep keeps its terms there (degree + 1 blocks
// of its active part reserved) and how many terms each of its vectors took in `terms`.
template <typename T>
void action_block(bool row_mode, int rows, int cols, const T* A, int d, const T* h, const int* steps, int degree, T* y,
                  T* v, T* w, double* norms, T* record = nullptr, int* terms = nullptr) {
  for (int step = 0; step < steps[0]; ++step) {
    const int n = row_mode ? active_rows(steps, rows, step) : rows;
    action_substep<T>(row_mode, n, cols, A, d, h, degree, y, v, w, norms, record, terms);
    if (record) record += long(degree + 1) * n * cols, terms += row_mode ? n : cols;
  }
}

// Scratch memory left uninitialised: each use writes before it reads (std::vector would zero it on every call).
template <typename T>
class Scratch {
 public:
  explicit Scratch(size_t n = 0) : data_(n ? new T[n] : nullptr), size_(n) {}
  T* data() const { return data_.get(); }
  size_t size() const { return size_; }
  void resize(size_t n) {  // (the contents are not kept)
    if (n > size_) data_.reset(new T[n]), size_ = n;
  }

 private:
  std::unique_ptr<T[]> data_;
  size_t size_;
};

// Scratch of the action's backward for one block of `size` elements (rows x cols) and `vectors` vectors. The record
// and the substeps' start states are used only when the forward kept no record.
template <typename T>
struct BackwardScratch {
  Scratch<T> starts, record, y, g_term, g_next, u;
  std::vector<double> norms;
  std::vector<int> terms;
  BackwardScratch(long size, int vectors, int degree, bool recompute)
      : record(recompute ? (degree + 1) * size : 0),
        y(size),
        g_term(size),
        g_next(size),
        u(size),
        norms(4 * vectors),
        terms(recompute ? vectors : 0) {}
};

// The reverse of one substep of an n x cols block from its record (terms v_0 .. v_K, and how many terms each vector
// took): term k = (h / k) A v_{k-1} reached y (the vectors that took it) and, through v_k, term k + 1. g: the gradient
// of the substep's output, replaced by that of its input; grad_A += the gradient of A, grad_h (as action_block_backward)
// += that of h.
template <typename T>
void substep_backward(bool row_mode, int n, int cols, const T* A, int d, const T* h, const T* record, const int* terms,
                      T* g, T* grad_A, double* grad_h, BackwardScratch<T>& s) {
  const long size = long(n) * cols;
  const int K = *std::max_element(terms, terms + (row_mode ? n : cols));
  T *gt = s.g_term.data(), *gv = s.g_next.data(), *u = s.u.data();
  std::fill(gv, gv + size, T(0));
  for (int k = K; k >= 1; --k) {
    const T* V = record + (k - 1) * size;
    int rows = n;  // row mode: up to the last row that took term k (the rest have zero gradients there)
    while (row_mode && rows > 0 && terms[rows - 1] < k) --rows;
    for (int i = 0; i < rows; ++i) {  // (the vectors that took term k)
      const long row = long(i) * cols;
#pragma omp simd
      for (int j = 0; j < cols; ++j) gt[row + j] = k <= terms[row_mode ? i : j] ? g[row + j] + gv[row + j] : T(0);
    }
    if (row_mode) {  // u = gt A; grad_h += <V, u> / k; gv = (h / k) u; grad_A += ((h / k) gt)^T V
      matmul<T>({gt, rows, d, cols}, {A, d, d, d}, u, cols, T(1), false);
      for (int r = 0; r < rows; ++r) {
        const T hk = h[r] / T(k);
        double dot = 0;
#pragma omp simd reduction(+ : dot)
        for (long e = long(r) * cols; e < long(r + 1) * cols; ++e)
          dot += double(V[e]) * double(u[e]), gv[e] = hk * u[e], gt[e] *= hk;
        grad_h[r] += dot / k;
      }
      matmul<T>({gt, rows, d, cols, true}, {V, rows, d, cols}, grad_A, d, T(1), true);
    } else {  // u = A^T gt; grad_h += <V, u> / k; gv = (h / k) u; grad_A += (h / k) gt V^T
      const T hk = h[0] / T(k);
      matmul<T>({A, d, d, d, true}, {gt, d, cols, cols}, u, cols, T(1), false);
      double dot = 0;
#pragma omp simd reduction(+ : dot)
      for (long e = 0; e < size; ++e) dot += double(V[e]) * double(u[e]), gv[e] = hk * u[e];
      grad_h[0] += dot / k;
      matmul<T>({gt, d, cols, cols}, {V, d, cols, cols, true}, grad_A, d, hk, true);
    }
  }
#pragma omp simd
  for (long e = 0; e < size; ++e) g[e] += gv[e];
}

// The exact reverse of action_block, substep by substep from the last. With the forward's record (as action_block
// wrote it) the terms are read from there; without one, the substeps run again, keeping the state at the start of
// each, then in reverse order each runs once more, recording its terms. g: the upstream gradient of the block (like
// y), replaced by the gradient of its input z; grad_A (d x d, row-major) += the gradient of A; grad_h[r] (row mode;
// column mode: grad_h[0]) += the gradient of h.
template <typename T>
void action_block_backward(bool row_mode, int rows, int cols, const T* A, int d, const T* h, const int* steps,
                           int degree, const T* z, T* g, T* grad_A, double* grad_h, BackwardScratch<T>& s,
                           const T* record = nullptr, const int* terms = nullptr) {
  const long full = long(rows) * cols;
  if (record) {
    std::vector<long> offsets(steps[0] + 1, 0);  // the record of each substep, in vectors
    for (int step = 0; step < steps[0]; ++step)
      offsets[step + 1] = offsets[step] + (row_mode ? active_rows(steps, rows, step) : cols);
    const long vector = long(degree + 1) * (row_mode ? cols : rows);
    for (int step = steps[0] - 1; step >= 0; --step) {
      const int n = row_mode ? active_rows(steps, rows, step) : rows;
      substep_backward<T>(row_mode, n, cols, A, d, h, record + offsets[step] * vector, terms + offsets[step], g,
                          grad_A, grad_h, s);
    }
    return;
  }
  if (s.starts.size() < size_t(steps[0] * full)) s.starts.resize(steps[0] * full);
  T* y = s.y.data();
  std::memcpy(s.starts.data(), z, full * sizeof(T));
  for (int step = 0; step + 1 < steps[0]; ++step) {  // (g_term, u: scratch here)
    std::memcpy(y, s.starts.data() + step * full, full * sizeof(T));
    const int n = row_mode ? active_rows(steps, rows, step) : rows;
    action_substep<T>(row_mode, n, cols, A, d, h, degree, y, s.g_term.data(), s.u.data(), s.norms.data(), nullptr,
                      nullptr);
    std::memcpy(s.starts.data() + (step + 1) * full, y, full * sizeof(T));
  }
  for (int step = steps[0] - 1; step >= 0; --step) {
    const int n = row_mode ? active_rows(steps, rows, step) : rows;
    std::memcpy(y, s.starts.data() + step * full, long(n) * cols * sizeof(T));
    action_substep<T>(row_mode, n, cols, A, d, h, degree, y, nullptr, nullptr, s.norms.data(), s.record.data(),
                      s.terms.data());
    substep_backward<T>(row_mode, n, cols, A, d, h, s.record.data(), s.terms.data(), g, grad_A, grad_h, s);
  }
}

// ---- instruction-set variants of expm: the same code compiled three times, chosen once at run time --------
#if defined(__x86_64__) || defined(__i386__)
#define HKD_VARIANT(NAME, TARGET, VB)                                                                 \
  template <typename T>                                                                               \
  __attribute__((target(TARGET))) void NAME(const T* A, const T* E, T* out, T* L, int n, Plan p, T* w) { \
    expm_matrix<T, VB>(A, E, out, L, n, p, w);                                                        \
  }
HKD_VARIANT(expm_avx512, "avx512f,avx512dq", 64)
HKD_VARIANT(expm_avx2, "avx2,fma", 32)
HKD_VARIANT(expm_sse2, "sse2", 16)

template <typename T>
void expm_dispatch(const T* A, const T* E, T* out, T* L, int n, Plan p, T* w) {
  static const int isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") ? 2
                         : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")    ? 1
                                                                                               : 0;
  if (isa == 2) return expm_avx512<T>(A, E, out, L, n, p, w);
  if (isa == 1) return expm_avx2<T>(A, E, out, L, n, p, w);
  return expm_sse2<T>(A, E, out, L, n, p, w);
}
#else  // other architectures: one 16-byte-vector variant, the compiler's own target
template <typename T>
void expm_dispatch(const T* A, const T* E, T* out, T* L, int n, Plan p, T* w) {
  expm_matrix<T, 16>(A, E, out, L, n, p, w);
}
#endif

// The worker threads of `count` tasks.
int64_t workers_for(int64_t count) {
  return std::max<int64_t>(1, std::min<int64_t>(torch::stable::get_num_threads(), count));
}

// Tasks 0..count-1, ordered by cost (most first), dealt round-robin to the workers (workers_for(count) threads).
// Each worker calls setup(worker, tasks) once (its scratch), with flush-to-zero set; tasks(body) then runs body(t) for
// that worker's tasks.
template <typename Setup>
void for_each_task(int64_t count, const Setup& setup) {
  const int64_t workers = workers_for(count);
  torch::stable::parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
    const hkd::FlushDenormals ftz;
    for (int64_t worker = first; worker < last; ++worker)
      setup(worker, [&](const auto& body) {
        for (int64_t t = worker; t < count; t += workers) body(t);
      });
  });
}

// ---- ops --------------------------------------------------------------------------------------------------
// exp(A) for A (..., n, n); with grad, the adjoint of the Frechet derivative: L(A^T, grad), using the plan of A.
Tensor expm_impl(const Tensor& A_in, const Tensor* grad_in) {
  HKD_CHECK(A_in.is_cpu(), "hkd::expm: expected CPU tensors");
  const Tensor A = hkd::dense::checked_matrices(A_in, grad_in ? "expm_backward" : "expm");
  const int n = A.size(-1);
  const std::optional<Tensor> G =
      grad_in ? std::optional<Tensor>(torch::stable::reshape(
                    torch::stable::contiguous(hkd::to(*grad_in, A.scalar_type())), {-1, n, n}))
              : std::nullopt;
  const Tensor out = torch::stable::empty_like(A);
  const int64_t count = A.size(0);
  if (count == 0 || n == 0) return torch::stable::reshape(out, A_in.sizes());
  hkd::dispatch_floating(A.scalar_type(), "hkd::expm", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* a = hkd::data<scalar_t>(A);
    const scalar_t* g = G ? hkd::data<scalar_t>(*G) : nullptr;
    scalar_t* o = hkd::mutable_data<scalar_t>(out);
    const bool is_double = std::is_same_v<scalar_t, double>;
    const long nn = long(n) * n;
    torch::stable::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      const hkd::FlushDenormals ftz;
      std::vector<scalar_t> work((2 * 8 + 6) * nn), expA(nn);
      scalar_t* at_ = work.data() + (2 * 8 + 4) * nn;
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* ab = a + b * nn;
        const Plan p = hkd::dense::expm_plan(norm1(ab, n, n, 1), is_double);
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
  return torch::stable::reshape(out, A_in.sizes());
}

Tensor expm_cpu(Tensor A) { return expm_impl(A, nullptr); }
Tensor expm_backward_cpu(Tensor A, Tensor grad) { return expm_impl(A, &grad); }

// ---- the action ------------------------------------------------------------------------------------------
// Samples by substeps, most first (a block of rows then shrinks to a prefix as its samples finish), then by |tau| (the
// rows of a substep that converge first, with the smallest |h|, tend to be its last): sample order[r] takes steps[r]
// substeps of h[r] = tau / steps (csrc/dense.h action_substeps).
template <typename T>
struct Schedule {
  std::vector<int64_t> order;
  std::vector<int> steps;
  std::vector<T> h;
  Schedule(const T* tau, int64_t B, int degree, double alpha) : order(B), steps(B), h(B) {
    std::vector<int> by_sample(B);
    std::vector<double> size(B);  // |tau| (NaN: 0), which orders the samples of equal substeps by |h|
    for (int64_t b = 0; b < B; ++b) {
      order[b] = b, by_sample[b] = hkd::dense::action_substeps(double(tau[b]), degree, alpha, sizeof(T) == 8);
      size[b] = std::isnan(double(tau[b])) ? 0.0 : std::abs(double(tau[b]));
    }
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return by_sample[a] != by_sample[b] ? by_sample[a] > by_sample[b] : size[a] > size[b];
    });
    for (int64_t r = 0; r < B; ++r) steps[r] = by_sample[order[r]], h[r] = tau[order[r]] / T(steps[r]);
  }
};

// The action's tasks. Row mode (per-position A, or P = 1): task = (position, block of samples in substep order), the
// block's rows are vectors, S (rows x d) <- S A_p^T. Column mode (shared A, P > 1): task = (sample, block of
// positions), the block's columns are vectors, S (d x cols) <- A S. Blocks: three state blocks in about 192 KiB (L2).
struct Blocks {
  int64_t B, d, P, block, per, tasks;  // per: blocks per position (row mode) or per sample (column mode)
  bool row_mode, shared;
  Blocks(int64_t B, int64_t d, int64_t P, bool shared, size_t element)
      : B(B), d(d), P(P), shared(shared), row_mode(!shared || P == 1) {
    const int64_t budget = std::max<int64_t>(16, (192 * 1024) / (3 * int64_t(element) * d));
    block = std::max<int64_t>(1, std::min<int64_t>(row_mode ? B : P, budget));
    per = ((row_mode ? B : P) + block - 1) / block;
    tasks = (row_mode ? P : B) * per;
  }
  // task t: the sample rank r (column mode) or position p (row mode), its first sample rank or position, its count
  struct Task {
    int64_t index, first, count, rows, cols;
  };
  Task task(int64_t t) const {
    const int64_t index = row_mode ? t % P : t / per, first = (row_mode ? t / P : t % per) * block;
    const int64_t count = std::min(block, (row_mode ? B : P) - first);
    return {index, first, count, row_mode ? count : d, row_mode ? d : count};
  }
  // the task's block of a (B, d, P) tensor, in the kernels' layout, and back
  template <typename T>
  void gather(const Task& t, const int64_t* order, const T* src, T* dst) const {
    if (row_mode && P == 1)  // (rows of z are contiguous)
      for (int64_t r = 0; r < t.count; ++r) std::memcpy(dst + r * d, src + order[t.first + r] * d, d * sizeof(T));
    else if (row_mode)
      for (int64_t r = 0; r < t.count; ++r)
        for (int64_t i = 0; i < d; ++i) dst[r * d + i] = src[(order[t.first + r] * d + i) * P + t.index];
    else
      for (int64_t i = 0; i < d; ++i)
        std::memcpy(dst + i * t.count, src + (order[t.index] * d + i) * P + t.first, t.count * sizeof(T));
  }
  template <typename T>
  void scatter(const Task& t, const int64_t* order, const T* src, T* dst) const {
    if (row_mode && P == 1)
      for (int64_t r = 0; r < t.count; ++r) std::memcpy(dst + order[t.first + r] * d, src + r * d, d * sizeof(T));
    else if (row_mode)
      for (int64_t r = 0; r < t.count; ++r)
        for (int64_t i = 0; i < d; ++i) dst[(order[t.first + r] * d + i) * P + t.index] = src[r * d + i];
    else
      for (int64_t i = 0; i < d; ++i)
        std::memcpy(dst + (order[t.index] * d + i) * P + t.first, src + i * t.count, t.count * sizeof(T));
  }
  // the rank of the task's first sample in the schedule (its h and steps)
  int64_t rank(const Task& t) const { return row_mode ? t.first : t.index; }
};

}  // namespace


namespace {

// dense_action_record's record: per task (in task order), the records of its substeps as action_block writes them,
// in units of one vector's substep ((degree + 1) d elements of the record, one term count); offsets[t] = the units
// before task t. Beyond kMaxRecordBytes the forward keeps nothing and the backward runs the substeps again.
constexpr int64_t kMaxRecordBytes = int64_t(256) << 20;

template <typename T>
std::vector<int64_t> record_offsets(const Blocks& blocks, const Schedule<T>& sched) {
  std::vector<int64_t> offsets(blocks.tasks + 1, 0);
  for (int64_t t = 0; t < blocks.tasks; ++t) {
    const Blocks::Task task = blocks.task(t);
    int64_t units = 0;
    if (blocks.row_mode)
      for (int64_t r = task.first; r < task.first + task.count; ++r) units += sched.steps[r];
    else
      units = int64_t(sched.steps[task.index]) * task.count;
    offsets[t + 1] = offsets[t] + units;
  }
  return offsets;
}

// exp(tau_b A_p) z[b, :, p]; with keep, also the record of its Taylor terms and the terms each vector took in each
// substep (empty tensors when they would exceed kMaxRecordBytes, or when there is nothing to record).
using Triple = std::tuple<Tensor, Tensor, Tensor>;

Triple action_forward(const Tensor& z, const Tensor& A, const Tensor& tau, const Tensor& plan, bool keep,
                      const char* op) {
  HKD_CHECK(z.is_cpu(), "hkd::", op, ": expected CPU tensors");
  const hkd::dense::ActionInputs in = hkd::dense::checked_action_inputs(z, A, tau, plan, op);
  Tensor out = torch::stable::empty_like(in.z), record = torch::stable::new_empty(in.z, {0}),
         terms = torch::stable::new_empty(in.z, {0}, hkd::ScalarType::Int);
  if (out.numel() == 0) return {out, record, terms};
  if (!in.finite) return {torch::stable::fill_(out, NAN), record, terms};
  hkd::dispatch_floating(in.z.scalar_type(), "hkd::dense_action", [&](auto tag) {
    using T = decltype(tag);
    const Schedule<T> sched(hkd::data<T>(in.tau), in.B, in.degree, in.alpha);
    const Blocks blocks(in.B, in.d, in.P, in.shared, sizeof(T));
    const int64_t d = in.d, size = blocks.block * d, vector = (in.degree + 1) * d;
    std::vector<int64_t> offsets;
    if (keep) {
      offsets = record_offsets(blocks, sched);
      if (offsets.back() * vector * int64_t(sizeof(T)) <= kMaxRecordBytes) {
        record = torch::stable::new_empty(in.z, {offsets.back() * vector});
        terms = torch::stable::new_empty(terms, {offsets.back()});
      }
    }
    const T *zp = hkd::data<T>(in.z), *ap = hkd::data<T>(in.A);
    T *yp = hkd::mutable_data<T>(out), *rp = record.numel() ? hkd::mutable_data<T>(record) : nullptr;
    int* tp = record.numel() ? hkd::mutable_data<int>(terms) : nullptr;
    for_each_task(blocks.tasks, [&](int64_t, auto&& tasks) {
      Scratch<T> buf(3 * size);
      std::vector<double> norms(4 * blocks.block);
      tasks([&](int64_t t) {
        const Blocks::Task task = blocks.task(t);
        const int64_t r = blocks.rank(task);
        T *y = buf.data(), *v = y + size, *w = v + size;
        blocks.gather(task, sched.order.data(), zp, y);
        action_block<T>(blocks.row_mode, task.rows, task.cols, ap + (in.shared ? 0 : task.index * d * d), d,
                        &sched.h[r], &sched.steps[r], in.degree, y, v, w, norms.data(),
                        rp ? rp + offsets[t] * vector : nullptr, tp ? tp + offsets[t] : nullptr);
        blocks.scatter(task, sched.order.data(), y, yp);
      });
    });
  });
  return {out, record, terms};
}

Tensor dense_action_cpu(Tensor z, Tensor A, Tensor tau, Tensor plan) {
  return std::get<0>(action_forward(z, A, tau, plan, false, "dense_action"));
}

Triple dense_action_record_cpu(Tensor z, Tensor A, Tensor tau, Tensor plan) {
  return action_forward(z, A, tau, plan, true, "dense_action_record");
}

// The exact reverse of dense_action (same plan, substeps and per-vector term counts): (grad_z, grad_A, grad_tau). With
// dense_action_record's record and terms (non-empty) it reads the forward's Taylor terms, otherwise it recomputes them.
Triple dense_action_backward_cpu(Tensor grad, Tensor z, Tensor A, Tensor tau, Tensor plan,
                                 std::optional<Tensor> record_in, std::optional<Tensor> terms_in) {
  HKD_CHECK(z.is_cpu() && grad.is_cpu(), "hkd::dense_action_backward: expected CPU tensors");
  const hkd::dense::ActionInputs in = hkd::dense::checked_action_inputs(z, A, tau, plan, "dense_action_backward");
  HKD_CHECK(hkd::same_sizes(grad.sizes(), z.sizes()), "hkd::dense_action_backward: grad must be like z ",
            hkd::shape(z), ", got ", hkd::shape(grad));
  const bool recorded = record_in.has_value() && record_in->numel() > 0;
  HKD_CHECK(recorded == (terms_in.has_value() && terms_in->numel() > 0),
            "hkd::dense_action_backward: give both or neither of dense_action_record's record and terms");
  const Tensor G = torch::stable::contiguous(hkd::to(grad, in.z.scalar_type()));
  Tensor grad_z = torch::stable::new_zeros(in.z, in.z.sizes()), grad_A = torch::stable::new_zeros(in.A, in.A.sizes()),
         grad_tau = torch::stable::new_zeros(in.tau, in.tau.sizes());
  auto result = [&] {
    return std::make_tuple(grad_z, hkd::to(grad_A, A.scalar_type()), hkd::to(grad_tau, tau.scalar_type()));
  };
  if (in.z.numel() == 0) return result();
  if (!in.finite) {
    torch::stable::fill_(grad_z, NAN), torch::stable::fill_(grad_A, NAN), torch::stable::fill_(grad_tau, NAN);
    return result();
  }
  hkd::dispatch_floating(in.z.scalar_type(), "hkd::dense_action_backward", [&](auto tag) {
    using T = decltype(tag);
    const Schedule<T> sched(hkd::data<T>(in.tau), in.B, in.degree, in.alpha);
    const Blocks blocks(in.B, in.d, in.P, in.shared, sizeof(T));
    const int64_t d = in.d, size = blocks.block * d, workers = workers_for(blocks.tasks),
                  vector = (in.degree + 1) * d;
    std::vector<int64_t> offsets;
    std::optional<Tensor> record, terms;
    if (recorded) {
      offsets = record_offsets(blocks, sched);
      record = torch::stable::contiguous(*record_in), terms = torch::stable::contiguous(*terms_in);
      HKD_CHECK(record->scalar_type() == in.z.scalar_type() && record->numel() == offsets.back() * vector &&
                    terms->scalar_type() == hkd::ScalarType::Int && terms->numel() == offsets.back(),
                "hkd::dense_action_backward: record and terms are not dense_action_record's for these inputs");
    }
    // per worker: its share of grad_A and of the gradients of h
    std::vector<T> partial_A(workers * in.A.numel(), T(0));
    std::vector<double> partial_h(workers * in.B, 0.0);
    const T *zp = hkd::data<T>(in.z), *gp = hkd::data<T>(G), *ap = hkd::data<T>(in.A);
    const T* rp = recorded ? hkd::data<T>(*record) : nullptr;
    const int* tp = recorded ? hkd::data<int>(*terms) : nullptr;
    T* gzp = hkd::mutable_data<T>(grad_z);
    for_each_task(blocks.tasks, [&](int64_t worker, auto&& tasks) {
      BackwardScratch<T> scratch(size, int(blocks.block), in.degree, !recorded);
      Scratch<T> zb(recorded ? 0 : size), gb(size);
      std::vector<double> gh(blocks.block);
      T* ga = partial_A.data() + worker * in.A.numel();
      double* ph = partial_h.data() + worker * in.B;
      tasks([&](int64_t t) {
        const Blocks::Task task = blocks.task(t);
        const int64_t r = blocks.rank(task), offset = in.shared ? 0 : task.index * d * d;
        if (!recorded) blocks.gather(task, sched.order.data(), zp, zb.data());
        blocks.gather(task, sched.order.data(), gp, gb.data());
        std::fill(gh.begin(), gh.end(), 0.0);
        action_block_backward<T>(blocks.row_mode, task.rows, task.cols, ap + offset, d, &sched.h[r], &sched.steps[r],
                                 in.degree, zb.data(), gb.data(), ga + offset, gh.data(), scratch,
                                 rp ? rp + offsets[t] * vector : nullptr, tp ? tp + offsets[t] : nullptr);
        blocks.scatter(task, sched.order.data(), gb.data(), gzp);
        for (int64_t i = 0; i < (blocks.row_mode ? task.count : 1); ++i) ph[sched.order[r + i]] += gh[i];
      });
    });
    T* ga = hkd::mutable_data<T>(grad_A);  // the workers' shares summed in worker order
    for (int64_t w = 0; w < workers; ++w)
      for (int64_t i = 0; i < in.A.numel(); ++i) ga[i] = w ? ga[i] + partial_A[w * in.A.numel() + i] : partial_A[i];
    T* gt = hkd::mutable_data<T>(grad_tau);
    for (int64_t rank = 0; rank < in.B; ++rank) {  // h = tau / s
      double sum = 0;
      for (int64_t w = 0; w < workers; ++w) sum += partial_h[w * in.B + sched.order[rank]];
      gt[sched.order[rank]] = T(sum / sched.steps[rank]);
    }
  });
  return result();
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(hkd, CPU, m) {
  m.impl("expm", TORCH_BOX(&expm_cpu));
  m.impl("expm_backward", TORCH_BOX(&expm_backward_cpu));
  m.impl("dense_action", TORCH_BOX(&dense_action_cpu));
  m.impl("dense_action_record", TORCH_BOX(&dense_action_record_cpu));
  m.impl("dense_action_backward", TORCH_BOX(&dense_action_backward_cpu));
}
