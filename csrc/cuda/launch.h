// The one way csrc/cuda/*.cu launches a kernel: kernel<<<grid, block, shared_bytes, stream>>>(args...), or under
// HKD_CUDA_EMULATE the same kernel on the host (csrc/cuda/emulate/emulate.h). Returns a cudaError_t.
#pragma once
#ifndef __CUDACC_RTC__
#include <cstddef>

#ifdef HKD_CUDA_EMULATE
#include "emulate/emulate.h"
#else
#include <cuda_runtime.h>
#endif

namespace hkd {

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args... args) {
#ifdef HKD_CUDA_EMULATE
  (void)stream;
  return hkd::emu::launch(kernel, grid, block, shared_bytes, args...);
#else
  kernel<<<grid, block, shared_bytes, stream>>>(args...);
  return cudaGetLastError();
#endif
}

}  // namespace hkd
#endif
