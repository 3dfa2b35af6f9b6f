// csrc/cuda/dense.cu, compiled by the host compiler on the emulation (its device branches: __CUDA_ARCH__).
#define HKD_CUDA_EMULATE
#include "emulate.h"
#define __CUDA_ARCH__ 700
#include "cuda/dense.cu"

HKD_EMULATE_DYNAMIC_SHARED(hkd::cuda, smem_raw)
