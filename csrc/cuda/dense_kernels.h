// Launchers of the torch-free dense-op kernels (csrc/cuda/dense.cu), called by the glue csrc/cuda/dense.cpp.
// Raw pointers, contiguous row-major data; every launcher returns a cudaError_t as int (0: success).
#pragma once
#include <cstdint>

namespace hkd::cuda {

constexpr int kExpmOnChipMaxN = 32;    // expm: one block per matrix, all of it in shared memory
constexpr int kActionOnChipMaxD = 64;  // action: the generator and a tile of the state in shared memory

// out[b] = exp(A[b]) for `count` matrices n x n (n <= kExpmOnChipMaxN); plan per matrix from its 1-norm.
int launch_expm_float(const float* A, float* out, int64_t count, int n, void* stream);
int launch_expm_double(const double* A, double* out, int64_t count, int n, void* stream);

// out[b] = L(A[b]^T, G[b]), the gradient of exp at A[b] (n <= kExpmOnChipMaxN); kDoesNotFit when the shared
// memory it needs (16 n^2 elements) exceeds the device's limit: use the batched-GEMM path then.
constexpr int kDoesNotFit = -1;
int launch_expm_frechet_float(const float* A, const float* G, float* out, int64_t count, int n, void* stream);
int launch_expm_frechet_double(const double* A, const double* G, double* out, int64_t count, int n, void* stream);

// out[b, :, p] = T_m(h_b A_p)^(s_b) z[b, :, p], s_b and h_b = tau_b / s_b from the plan (degree, alpha) (csrc/dense.h),
// each substep truncated per vector by the convergence test; z (B, d, P), A (d, d) (shared) or (P, d, d).
int launch_action_float(const float* z, const float* A, const float* tau, float* out, int64_t B, int d, int64_t P,
                        bool shared, int degree, double alpha, void* stream);
int launch_action_double(const double* z, const double* A, const double* tau, double* out, int64_t B, int d,
                         int64_t P, bool shared, int degree, double alpha, void* stream);

}  // namespace hkd::cuda
