// CPU kernels of hkd::spectral_propagate and its backward (maths in csrc/spectral.h).
//
// Forward: nothing reduces, so each thread owns one contiguous stretch of every level's memory: the index space
// is every level's (b, k, p) in memory order, and row r = b pairs + k holds x = z[b, 2k, :] and y = z[b, 2k+1, :],
// 2P contiguous values. Threads stream through their stretch like a copy, and the fresh output pages are first
// touched in order (page faults dominate a large fresh output on CPU).
// Backward: one parallel region spans all levels, the index space is every level's flattened (pair k,
// position p) plane cut into units of U (k, p) entries. The thread owning a unit loops over the batch, so the
// parameter gradients of its (k, p) reduce over the batch in that thread (no atomics). For one sample a unit's
// planes 2k, 2k+1 are contiguous memory.
// The inner loops over positions vectorise (float32: cloned for AVX-512, AVX2 and baseline x86-64, chosen at load
// time); a shared tau's rotations are computed once per (k, p) and reused for the whole batch.
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

// The float comparisons in the polynomial exp of spectral.h only if-convert (and so vectorise) when
// they may not trap; the kernels never inspect floating-point exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "inputs.h"
#include "spectral.h"
#include "stable.h"

namespace hkd::spectral {

namespace {

template <typename scalar_t>
struct Level {
  using acc_t = opmath_t<scalar_t>;
  const scalar_t* z;
  const scalar_t* grad;  // backward only
  scalar_t* out;         // evolved latent, or its gradient in the backward
  const acc_t *alpha, *beta;
  acc_t *grad_alpha, *grad_beta;  // (d/2, P) even for shared parameters (summed over P afterwards)
  int64_t pairs, positions;
  bool per_position;
};

// A unit: entries [q0, q1) of one level's flattened (k, p) space, q = k P + p.
template <typename scalar_t>
struct Unit {
  const Level<scalar_t>& L;
  int64_t q0, q1;
  // Calls f(q, n, offset): runs of n entries q.. of one pair, whose x plane starts at `offset` for sample 0.
  template <typename F>
  void for_each_run(F&& f) const {
    const int64_t P = L.positions;
    for (int64_t q = q0; q < q1;) {
      const int64_t k = q / P, n = std::min((k + 1) * P, q1) - q;
      f(q, n, q + k * P);
      q += n;
    }
  }
  // the unit's alpha and beta as per-entry arrays (shared parameters broadcast over positions)
  void parameters(opmath_t<scalar_t>* a, opmath_t<scalar_t>* w) const {
    for_each_run([&](int64_t q, int64_t n, int64_t) {
      const int64_t k = q / L.positions;
      if (L.per_position)
        std::copy_n(L.alpha + q, n, a + (q - q0)), std::copy_n(L.beta + q, n, w + (q - q0));
      else
        std::fill_n(a + (q - q0), n, L.alpha[k]), std::fill_n(w + (q - q0), n, L.beta[k]);
    });
  }
};

// --- rows: the vectorised inner loops over n contiguous positions ------------------------------------------------
// float32 is the fast path: its rows are also compiled for AVX-512 and AVX2 and picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HKD_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HKD_VECTOR_CLONES
#endif

// (x, y) -> (xo, yo) with the rotation of (a, w, t) (s, c, sn == nullptr) or the precomputed rotation (s, c, sn).
template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
[[gnu::always_inline]] inline void forward_row_impl(int64_t n, acc_t t, const acc_t* __restrict__ a,
                                                    const acc_t* __restrict__ w, const acc_t* __restrict__ s,
                                                    const acc_t* __restrict__ c, const acc_t* __restrict__ sn,
                                                    const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                                    scalar_t* __restrict__ xo, scalar_t* __restrict__ yo) {
  acc_t xe, ye;
  if (s == nullptr)
    for (int64_t i = 0; i < n; ++i) {
      evolve(rotation(a[i], w[i], t), acc_t(x[i]), acc_t(y[i]), xe, ye);
      xo[i] = xe, yo[i] = ye;
    }
  else
    for (int64_t i = 0; i < n; ++i) {
      evolve(Rotation<acc_t>{s[i], c[i], sn[i]}, acc_t(x[i]), acc_t(y[i]), xe, ye);
      xo[i] = xe, yo[i] = ye;
    }
}

template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
void forward_row(int64_t n, acc_t t, const acc_t* a, const acc_t* w, const acc_t* s, const acc_t* c, const acc_t* sn,
                 const scalar_t* x, const scalar_t* y, scalar_t* xo, scalar_t* yo) {
  forward_row_impl(n, t, a, w, s, c, sn, x, y, xo, yo);
}
template <>
HKD_VECTOR_CLONES void forward_row(int64_t n, float t, const float* a, const float* w, const float* s, const float* c,
                                   const float* sn, const float* x, const float* y, float* xo, float* yo) {
  forward_row_impl(n, t, a, w, s, c, sn, x, y, xo, yo);
}

// The rotations of n (alpha, beta) pairs at one t (a shared tau: reused for the whole batch).
template <typename acc_t>
[[gnu::always_inline]] inline void rotation_row_impl(int64_t n, acc_t t, const acc_t* __restrict__ a,
                                                     const acc_t* __restrict__ w, acc_t* __restrict__ s,
                                                     acc_t* __restrict__ c, acc_t* __restrict__ sn) {
  for (int64_t i = 0; i < n; ++i) {
    const auto r = rotation(a[i], w[i], t);
    s[i] = r.scale, c[i] = r.cos, sn[i] = r.sin;
  }
}
template <typename acc_t>
void rotation_row(int64_t n, acc_t t, const acc_t* a, const acc_t* w, acc_t* s, acc_t* c, acc_t* sn) {
  rotation_row_impl(n, t, a, w, s, c, sn);
}
template <>
HKD_VECTOR_CLONES void rotation_row(int64_t n, float t, const float* a, const float* w, float* s, float* c, float* sn) {
  rotation_row_impl(n, t, a, w, s, c, sn);
}

// One rotation for a whole row (parameters shared over positions) applied to n positions.
template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
[[gnu::always_inline]] inline void rotate_row_impl(int64_t n, Rotation<acc_t> r, const scalar_t* __restrict__ x,
                                                   const scalar_t* __restrict__ y, scalar_t* __restrict__ xo,
                                                   scalar_t* __restrict__ yo) {
  acc_t xe, ye;
  for (int64_t i = 0; i < n; ++i) {
    evolve(r, acc_t(x[i]), acc_t(y[i]), xe, ye);
    xo[i] = xe, yo[i] = ye;
  }
}
template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
void rotate_row(int64_t n, Rotation<acc_t> r, const scalar_t* x, const scalar_t* y, scalar_t* xo, scalar_t* yo) {
  rotate_row_impl(n, r, x, y, xo, yo);
}
template <>
HKD_VECTOR_CLONES void rotate_row(int64_t n, Rotation<float> r, const float* x, const float* y, float* xo, float* yo) {
  rotate_row_impl(n, r, x, y, xo, yo);
}

// Backward of one row: the latents' gradient (Latents), and (Terms) the parameter gradients accumulated into
// ga, gw and the d/dtau terms into gt (Tau).
template <bool Latents, bool Terms, bool Tau, typename scalar_t, typename acc_t = opmath_t<scalar_t>>
[[gnu::always_inline]] inline void backward_row_impl(int64_t n, acc_t t, const acc_t* __restrict__ a,
                                                     const acc_t* __restrict__ w, const scalar_t* __restrict__ x,
                                                     const scalar_t* __restrict__ y, const scalar_t* __restrict__ gx,
                                                     const scalar_t* __restrict__ gy, scalar_t* __restrict__ gxo,
                                                     scalar_t* __restrict__ gyo, acc_t* __restrict__ ga,
                                                     acc_t* __restrict__ gw, acc_t* __restrict__ gt) {
  for (int64_t i = 0; i < n; ++i) {
    const auto r = rotation(a[i], w[i], t);
    if (Latents) {
      acc_t u, v;
      evolve_transposed(r, acc_t(gx[i]), acc_t(gy[i]), u, v);
      gxo[i] = u, gyo[i] = v;
    }
    if (Terms) {
      acc_t Pt, Qt;
      generator_terms(r, acc_t(x[i]), acc_t(y[i]), acc_t(gx[i]), acc_t(gy[i]), Pt, Qt);
      ga[i] += t * Pt, gw[i] += t * Qt;
      if (Tau) gt[i] += a[i] * Pt + w[i] * Qt;
    }
  }
}

template <bool Latents, bool Terms, bool Tau, typename scalar_t, typename acc_t = opmath_t<scalar_t>>
void backward_row(int64_t n, acc_t t, const acc_t* a, const acc_t* w, const scalar_t* x, const scalar_t* y,
                  const scalar_t* gx, const scalar_t* gy, scalar_t* gxo, scalar_t* gyo, acc_t* ga, acc_t* gw,
                  acc_t* gt) {
  backward_row_impl<Latents, Terms, Tau>(n, t, a, w, x, y, gx, gy, gxo, gyo, ga, gw, gt);
}
#define HKD_BACKWARD_ROW_FLOAT(LATENTS, TERMS, TAU)                                                                 \
  template <>                                                                                                     \
  HKD_VECTOR_CLONES void backward_row<LATENTS, TERMS, TAU, float>(                                                \
      int64_t n, float t, const float* a, const float* w, const float* x, const float* y, const float* gx,        \
      const float* gy, float* gxo, float* gyo, float* ga, float* gw, float* gt) {                                 \
    backward_row_impl<LATENTS, TERMS, TAU>(n, t, a, w, x, y, gx, gy, gxo, gyo, ga, gw, gt);                       \
  }
HKD_BACKWARD_ROW_FLOAT(true, false, false)
HKD_BACKWARD_ROW_FLOAT(true, true, false)
HKD_BACKWARD_ROW_FLOAT(true, true, true)
HKD_BACKWARD_ROW_FLOAT(false, true, false)
HKD_BACKWARD_ROW_FLOAT(false, true, true)

// --- forward: a thread's contiguous stretch ---------------------------------------------------------------------

// Forward of the elements [e0, e1) of one level's (b, k, p) space, e = (b pairs + k) P + p. S: the (scale, cos,
// sin) planes, pairs P values each, of a shared tau's rotations per (k, p) (per-position parameters), or null.
template <typename scalar_t>
void forward_range(const Level<scalar_t>& L, int64_t e0, int64_t e1, const opmath_t<scalar_t>* tau,
                   bool per_sample_tau, const opmath_t<scalar_t>* S) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t P = L.positions, m = L.pairs * P;
  const acc_t* none = nullptr;
  for (int64_t e = e0; e < e1;) {
    const int64_t r = e / P, p = e - r * P, n = std::min(P - p, e1 - e), b = r / L.pairs, k = r - b * L.pairs;
    const acc_t t = tau[per_sample_tau ? b : 0];
    const int64_t at = 2 * r * P + p;
    const scalar_t *x = L.z + at, *y = x + P;
    scalar_t *xo = L.out + at, *yo = xo + P;
    if (!L.per_position)
      rotate_row<scalar_t>(n, rotation(L.alpha[k], L.beta[k], t), x, y, xo, yo);
    else if (S != nullptr)
      forward_row<scalar_t>(n, t, none, none, S + k * P + p, S + m + k * P + p, S + 2 * m + k * P + p, x, y, xo, yo);
    else
      forward_row<scalar_t>(n, t, L.alpha + k * P + p, L.beta + k * P + p, none, none, none, x, y, xo, yo);
    e += n;
  }
}

// --- backward units: a thread's share of (k, p) entries, looping over the batch ---------------------------------

// Backward of one unit. tau_partial: this unit's row of per-sample (or, for a shared tau, one) d/dtau sums.
template <bool Latents, bool Terms, bool Tau, typename scalar_t>
void backward_unit(const Unit<scalar_t>& u, int64_t batch, const opmath_t<scalar_t>* tau, bool per_sample_tau,
                   opmath_t<scalar_t>* tau_partial) {
  using acc_t = opmath_t<scalar_t>;
  const auto& L = u.L;
  const int64_t m = u.q1 - u.q0, P = L.positions, plane = 2 * L.pairs * P;
  std::vector<acc_t> buffer(5 * m);  // alpha, beta; their gradients; d/dtau terms
  acc_t *A = buffer.data(), *W = A + m, *GA = W + m, *GW = GA + m, *GT = GW + m;
  u.parameters(A, W);
  for (int64_t b = 0; b < batch; ++b) {
    const acc_t t = tau[per_sample_tau ? b : 0];
    u.for_each_run([&](int64_t q, int64_t n, int64_t offset) {
      const int64_t j = q - u.q0, at = b * plane + offset;
      scalar_t* gz = Latents ? L.out + at : nullptr;
      backward_row<Latents, Terms, Tau, scalar_t>(n, t, A + j, W + j, L.z + at, L.z + at + P, L.grad + at,
                                                  L.grad + at + P, gz, Latents ? gz + P : nullptr, GA + j, GW + j, GT + j);
    });
    if (Tau && (per_sample_tau || b + 1 == batch)) {  // per sample, or once for a shared tau
      acc_t sum = 0;
      for (int64_t i = 0; i < m; ++i) sum += GT[i], GT[i] = 0;
      tau_partial[per_sample_tau ? b : 0] = sum;
    }
  }
  if (Terms && L.grad_alpha) {
    std::copy_n(GA, m, L.grad_alpha + u.q0);
    std::copy_n(GW, m, L.grad_beta + u.q0);
  }
}

// Cuts every level's (k, p) space into units of about equal size, enough for all threads, large enough to
// stream. Calls f(unit index, Unit) for the units of [begin, end) in parallel.
template <typename scalar_t>
struct Schedule {
  std::vector<int64_t> first;  // level l owns units [first[l], first[l + 1])
  int64_t size;
  Schedule(const std::vector<Level<scalar_t>>& levels, int64_t batch) : first{0} {
    int64_t total = 0;
    for (const auto& L : levels) total += L.pairs * L.positions;
    size = std::clamp<int64_t>(total / (8 * int64_t(torch::stable::get_num_threads())), 1024, 16384);
    for (const auto& L : levels) first.push_back(first.back() + (batch ? (L.pairs * L.positions + size - 1) / size : 0));
  }
  int64_t total() const { return first.back(); }
  template <typename F>
  void run(const std::vector<Level<scalar_t>>& levels, F&& f) const {
    torch::stable::parallel_for(0, total(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t l = std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1;
        const int64_t q0 = (i - first[l]) * size;
        const auto& L = levels[l];
        f(i, Unit<scalar_t>{L, q0, std::min(q0 + size, L.pairs * L.positions)});
      }
    });
  }
};

// A large fresh output, advised to use transparent huge pages (only a hint, as PyTorch's THP_MEM_ALLOC_ENABLE=1
// gives), so that its first touch faults in 2 MB pages rather than 4 KB ones: page faults, not arithmetic, dominate a
// fresh output of hundreds of MB.
Tensor empty_output(const Tensor& like) {
  Tensor out = torch::stable::empty_like(like);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr()),
                 bytes = static_cast<uintptr_t>(out.numel()) * out.element_size();
  const uintptr_t first = (begin + huge - 1) & ~(huge - 1), last = (begin + bytes) & ~(huge - 1);
  if (bytes >= 2 * huge && last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return out;
}

std::vector<Tensor> forward_cpu(std::vector<Tensor> latents_in, std::vector<Tensor> alphas_in,
                                std::vector<Tensor> betas_in, Tensor tau_in) {
  const Inputs in = checked_inputs(latents_in, alphas_in, betas_in, tau_in);
  const auto &latents = in.latents, &alphas = in.alphas, &betas = in.betas;
  const Tensor& tau = in.tau;
  std::vector<Tensor> out;
  for (const auto& z : latents) out.push_back(empty_output(z));
  const int64_t batch = in.batch;
  dispatch_floating<true>(latents[0].scalar_type(), "spectral_propagate", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = opmath_t<scalar_t>;
    std::vector<Level<scalar_t>> levels;
    for (size_t l = 0; l < latents.size(); ++l)
      levels.push_back({data<scalar_t>(latents[l]), nullptr, mutable_data<scalar_t>(out[l]),
                        data<acc_t>(alphas[l]), data<acc_t>(betas[l]), nullptr, nullptr,
                        latents[l].size(1) / 2, positions_of(latents[l]), alphas[l].dim() > 1});
    const acc_t* t = data<acc_t>(tau);
    const bool per_sample_tau = tau.dim() == 1;
    // a shared tau: the rotations of each (k, p) once, as (scale, cos, sin) planes, reused for the whole batch
    std::vector<std::vector<acc_t>> tables(levels.size());
    std::vector<int64_t> first{0};  // level l owns elements [first[l], first[l + 1]) of the joint index space
    for (size_t l = 0; l < levels.size(); ++l) {
      const auto& L = levels[l];
      const int64_t m = L.pairs * L.positions;
      if (!per_sample_tau && L.per_position && batch > 1) {
        tables[l].resize(3 * m);
        acc_t* S = tables[l].data();
        torch::stable::parallel_for(0, m, 4096, [&](int64_t q0, int64_t q1) {
          rotation_row(q1 - q0, t[0], L.alpha + q0, L.beta + q0, S + q0, S + m + q0, S + 2 * m + q0);
        });
      }
      first.push_back(first.back() + batch * m);
    }
    torch::stable::parallel_for(0, first.back(), 16384, [&](int64_t begin, int64_t end) {
      for (size_t l = 0; l < levels.size(); ++l) {
        const int64_t e0 = std::max(begin, first[l]), e1 = std::min(end, first[l + 1]);
        if (e0 < e1)
          forward_range(levels[l], e0 - first[l], e1 - first[l], t, per_sample_tau,
                        tables[l].empty() ? nullptr : tables[l].data());
      }
    });
  });
  return out;
}

using Gradients = std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, Tensor>;

Gradients backward_cpu(std::vector<Tensor> grads_in, std::vector<Tensor> latents_in, std::vector<Tensor> alphas_in,
                       std::vector<Tensor> betas_in, Tensor tau_in, bool need_latents, bool need_params,
                       bool need_tau) {
  const Inputs in = checked_inputs(latents_in, alphas_in, betas_in, tau_in);
  const auto &latents = in.latents, &alphas = in.alphas, &betas = in.betas;
  const Tensor& tau = in.tau;
  const auto grads = checked_grads(grads_in, latents);
  const int64_t batch = in.batch;
  std::vector<Tensor> grad_latents, grad_alphas, grad_betas;
  Tensor grad_tau = torch::stable::new_empty(tau, {0});
  if (!need_latents && !need_params && !need_tau) return {grad_latents, grad_alphas, grad_betas, grad_tau};
  const bool need_terms = need_params || need_tau;
  for (size_t l = 0; l < latents.size(); ++l) {
    if (need_latents) grad_latents.push_back(empty_output(latents[l]));
    if (need_params) {  // per position; shared parameters sum over positions below
      grad_alphas.push_back(torch::stable::new_zeros(alphas[l], {alphas[l].size(0), positions_of(latents[l])}));
      grad_betas.push_back(torch::stable::new_zeros(betas[l], {betas[l].size(0), positions_of(latents[l])}));
    }
  }
  dispatch_floating<true>(latents[0].scalar_type(), "spectral_propagate_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = opmath_t<scalar_t>;
    std::vector<Level<scalar_t>> levels;
    for (size_t l = 0; l < latents.size(); ++l)
      levels.push_back({data<scalar_t>(latents[l]), data<scalar_t>(grads[l]),
                        need_latents ? mutable_data<scalar_t>(grad_latents[l]) : nullptr, data<acc_t>(alphas[l]),
                        data<acc_t>(betas[l]), need_params ? mutable_data<acc_t>(grad_alphas[l]) : nullptr,
                        need_params ? mutable_data<acc_t>(grad_betas[l]) : nullptr, latents[l].size(1) / 2,
                        positions_of(latents[l]), alphas[l].dim() > 1});
    const Schedule<scalar_t> schedule(levels, batch);
    const bool per_sample_tau = tau.dim() == 1;
    // one row of d/dtau partial sums per unit, summed in a fixed order afterwards: deterministic
    Tensor tau_partial = torch::stable::new_zeros(tau, {need_tau ? schedule.total() : 0, per_sample_tau ? batch : 1});
    const acc_t* t = data<acc_t>(tau);
    schedule.run(levels, [&](int64_t i, const Unit<scalar_t>& u) {
      acc_t* row = need_tau ? mutable_data<acc_t>(tau_partial) + i * tau_partial.size(1) : nullptr;
      if (need_latents && !need_terms)
        backward_unit<true, false, false>(u, batch, t, per_sample_tau, row);
      else if (need_latents && !need_tau)
        backward_unit<true, true, false>(u, batch, t, per_sample_tau, row);
      else if (need_latents)
        backward_unit<true, true, true>(u, batch, t, per_sample_tau, row);
      else if (!need_tau)
        backward_unit<false, true, false>(u, batch, t, per_sample_tau, row);
      else
        backward_unit<false, true, true>(u, batch, t, per_sample_tau, row);
    });
    if (need_tau)
      grad_tau = per_sample_tau ? torch::stable::sum(tau_partial, std::vector<int64_t>{0})
                                : torch::stable::sum(tau_partial, std::vector<int64_t>{0, 1});
  });
  if (need_params)
    for (size_t l = 0; l < latents.size(); ++l)
      if (alphas[l].dim() == 1)
        grad_alphas[l] = torch::stable::sum(grad_alphas[l], std::vector<int64_t>{1}),
        grad_betas[l] = torch::stable::sum(grad_betas[l], std::vector<int64_t>{1});
      else
        grad_alphas[l] = torch::stable::view(grad_alphas[l], alphas[l].sizes()),
        grad_betas[l] = torch::stable::view(grad_betas[l], betas[l].sizes());
  return {grad_latents, grad_alphas, grad_betas, grad_tau};
}

}  // namespace
}  // namespace hkd::spectral

STABLE_TORCH_LIBRARY_IMPL(hkd, CPU, m) {
  m.impl("spectral_propagate", TORCH_BOX(&hkd::spectral::forward_cpu));
  m.impl("spectral_propagate_backward", TORCH_BOX(&hkd::spectral::backward_cpu));
}
