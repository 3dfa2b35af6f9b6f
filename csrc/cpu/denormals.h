// Subnormal floats make x86 arithmetic about 25x slower, and long Taylor series with per-sample scales push their
// late terms into that range. FlushDenormals sets flush-to-zero and denormals-are-zero on the calling thread for
// its lifetime and restores the previous mode afterwards. The mode is per thread: construct one inside every
// parallel_for body (each worker thread), not once around the call. No-op off x86.
#pragma once

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define HKD_HAS_MXCSR 1
#endif

namespace hkd {

class FlushDenormals {
 public:
#ifdef HKD_HAS_MXCSR
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushDenormals() { _mm_setcsr(saved_); }
#else
  FlushDenormals() = default;
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
#ifdef HKD_HAS_MXCSR
  static constexpr unsigned kFlushToZero = 0x8000;     // MXCSR bit 15
  static constexpr unsigned kDenormalsAreZero = 0x40;  // MXCSR bit 6
  unsigned saved_;
#endif
};

}  // namespace hkd
