// Macros shared by every kernel header (csrc/spectral.h, csrc/dense.h): compiled by the host compiler, nvcc and
// NVRTC alike.
#pragma once

// HKD_HD: a function for host and device, inlined into its callers (and the vectorised loops that call it).
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define HKD_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define HKD_HD inline __attribute__((always_inline))
#else
#define HKD_HD inline
#endif
