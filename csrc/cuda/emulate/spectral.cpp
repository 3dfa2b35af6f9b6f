// csrc/cuda/spectral.cu, compiled by the host compiler on the emulation (its device branches: __CUDA_ARCH__, with
// the host's expf / sincosf / sincos standing in for CUDA's).
#define HKD_CUDA_EMULATE
#include "emulate.h"
#define __CUDA_ARCH__ 700
#include "cuda/spectral.cu"

namespace hkd::spectral::cuda {  // the kernels' 16-bit conversions, for the bit-exact tests
float emulated_to_compute(unsigned short bits, bool bfloat16) {
  return bfloat16 ? to_compute(BFloat16{bits}) : to_compute(Half{bits});
}
unsigned short emulated_to_storage(float v, bool bfloat16) {
  return bfloat16 ? to_storage<BFloat16>(v).bits : to_storage<Half>(v).bits;
}
}  // namespace hkd::spectral::cuda
