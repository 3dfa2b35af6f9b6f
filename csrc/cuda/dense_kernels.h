// Launchers of the torch-free dense-op kernels (csrc/cuda/dense.cu), called by the glue csrc/cuda/dense.cpp.
// Raw pointers, contiguous row-major data, float32 or float64; each launcher returns a cudaError_t as int (0: success).
#pragma once
#include <cstdint>

namespace hkd::cuda {

constexpr int kExpmOnChipMaxN = 32;    // expm: one block per matrix, all of it in shared memory
constexpr int kActionOnChipMaxD = 64;  // action: the generator and a tile of the state in shared memory

// out[b] = exp(A[b]) (G null), or out[b] = L(A[b]^T, G[b]), the gradient of exp at A[b] in the direction G[b], for
// `count` matrices n x n (n <= kExpmOnChipMaxN); plan per matrix from its 1-norm.
struct ExpmArgs {
  const void* A;
  const void* G;
  void* out;
  int64_t count;
  int n;
  bool is_double;
};
// kDoesNotFit: the gradient's shared memory (16 n^2 elements) exceeds the device's limit: use the batched-GEMM path.
constexpr int kDoesNotFit = -1;
int launch_expm(const ExpmArgs& args, void* stream);

// out[b, :, p] = T_m(h_b A_p)^(s_b) z[b, :, p], s_b and h_b = tau_b / s_b from the plan (degree, alpha) (csrc/dense.h),
// each substep truncated per vector by the convergence test; z (B, d, P), A (d, d) (shared) or (P, d, d), tau (B,).
struct ActionArgs {
  const void *z, *A, *tau;
  void* out;
  int64_t B;
  int d;
  int64_t P;
  bool shared;
  int degree;
  double alpha;
  bool is_double;
};
int launch_action(const ActionArgs& args, void* stream);

}  // namespace hkd::cuda
