// CUDA on the CPU, for tests: the pieces of CUDA that csrc/cuda/*.cu uses, as host C++ under HKD_CUDA_EMULATE.
//
// A launch runs its blocks one after another. A block's threads are fibers (ucontext) on the calling thread: each
// runs until it reaches __syncthreads, a warp shuffle or its end, and the order in which the ready fibers run
// between those points is the schedule (in order, reversed, or a seeded shuffle; blocks are ordered the same way).
// A read of shared memory that another thread has not yet written (a missing barrier) then sees a stale value or
// the poison (all bits set: NaN) that fills the dynamic shared memory at each block's start. Strict where CUDA says
// "undefined": a barrier that some threads of the block never reach, a shuffle with lanes outside its mask or a
// warp whose lanes do not all arrive, a write past the launch's dynamic shared memory, or more than 48 KiB of it
// without cudaFuncSetAttribute, each fail the launch with a message (cudaGetLastError / cudaGetErrorString).
//
// Fibers rather than OS threads: a block has up to 1024 threads and the kernels cross a barrier every few hundred
// instructions; a fiber switch is a function call's worth of work (plus a signal-mask syscall), an OS-thread
// barrier of 256 threads on 2 cores costs scheduler round trips for every thread. Fibers also make the
// interleaving exact and reproducible, which is what a schedule is.
#pragma once
#ifndef HKD_CUDA_EMULATE
#error "csrc/cuda/emulate/emulate.h is the host emulation of CUDA; define HKD_CUDA_EMULATE"
#endif

#include <math.h>  // the C maths functions in the global namespace, as CUDA device code calls them

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

// --- keywords ----------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// static and extern __shared__ alike: one copy per OS thread, and a launch runs all its blocks on one OS thread,
// one block at a time; the dynamic array (extern) is defined by HKD_EMULATE_DYNAMIC_SHARED
#define __shared__ thread_local
// (__restrict__ is a GCC and Clang keyword)

// --- the runtime types the kernels and their launchers use --------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
typedef int cudaError_t;
enum : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr int warpSize = 32;

namespace hkd::emu {

enum Schedule : int { kInOrder = 0, kReversed = 1, kShuffled = 2 };

// What the emulated device and scheduler are: set by the tests (hkd_emu::configure).
struct Config {
  int schedule = kInOrder;
  long long seed = 0;
  int sm_count = 132;           // an H100 SXM
  int shared_optin = 232448;    // its opt-in dynamic shared memory per block (227 KiB)
};
Config& config();

// The last launch, for tests that check what a launch covered.
struct LaunchRecord {
  dim3 grid, block;
  long long shared_bytes = 0, launches = 0, barriers = 0, shuffles = 0;
};
LaunchRecord& last_launch();

// 16-bit float conversions as the PTX instructions do them: cvt.f32.f16 (exact) and cvt.rn.f16.f32 (round to
// nearest even; NaN -> the canonical NaN 0x7fff, as the device).
inline float half_bits_to_float(unsigned short h) {
  const unsigned sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  unsigned bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {  // zero or subnormal: mantissa * 2^-24, exact in float
    float f = float(mantissa) * 5.9604644775390625e-08f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline unsigned short float_to_half_bits_rn(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  const unsigned short sign = static_cast<unsigned short>((u >> 16) & 0x8000u);
  const unsigned a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fff;                     // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;            // >= 65520 (the tie above 65504) rounds to infinity
  if (a < 0x38800000u) {                                  // below 2^-14: a subnormal half (or zero)
    if (a < 0x33000000u) return sign;                     // below 2^-25 (tie at 2^-25 goes to the even zero)
    const unsigned shift = 126 - (a >> 23);               // mantissa (with its leading 1) >> shift = units of 2^-24
    const unsigned m = (a & 0x7fffffu) | 0x800000u;
    const unsigned q = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    return sign | static_cast<unsigned short>(q + (rest > half || (rest == half && (q & 1u))));
  }
  const unsigned rounded = a + 0xfffu + ((a >> 13) & 1u);  // round to nearest even at bit 13
  return sign | static_cast<unsigned short>((rounded - 0x38000000u) >> 13);
}

// --- the scheduler (csrc/cuda/emulate/runtime.cpp) --------------------------------------------------------------
// Runs entry(call) once for every thread of every block; returns a cudaError_t (the message: error_string).
int run(dim3 grid, dim3 block, size_t shared_bytes, const void* kernel, void (*entry)(void*), void* call);
const char* error_string(int error);
int take_last_error();
void barrier();                 // __syncthreads
int barrier_or(int predicate);  // __syncthreads_or
unsigned long long shuffle_down(unsigned mask, unsigned long long value, unsigned delta, int width);
void set_max_dynamic_shared(const void* kernel, int bytes);
// The dynamic shared memory array of one kernel namespace (HKD_EMULATE_DYNAMIC_SHARED): this OS thread's copy.
constexpr size_t kSharedArena = 256 * 1024;
bool register_dynamic_shared(unsigned char* (*array)());

// kernel<<<grid, block, shared_bytes>>>(args...): the arguments are converted to the kernel's parameter types once,
// as CUDA copies them to the parameter space, and every thread calls the kernel with that copy.
template <typename... Params, typename... Args>
int launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  } call{kernel, std::tuple<std::decay_t<Params>...>(args...)};
  auto entry = [](void* c) {
    auto* self = static_cast<Call*>(c);
    std::apply(self->kernel, self->params);
  };
  return run(grid, block, shared_bytes, reinterpret_cast<const void*>(kernel), entry, &call);
}

}  // namespace hkd::emu

// --- per-thread indices: the scheduler sets them before it resumes each fiber ------------------------------------
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// --- device functions --------------------------------------------------------------------------------------------
inline void __syncthreads() { hkd::emu::barrier(); }
inline int __syncthreads_or(int predicate) { return hkd::emu::barrier_or(predicate); }

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move up to 64 bits");
  unsigned long long bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = hkd::emu::shuffle_down(mask, bits, delta, width);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}

// --- the runtime API the launchers call ------------------------------------------------------------------------
inline cudaError_t cudaGetLastError() { return hkd::emu::take_last_error(); }
inline const char* cudaGetErrorString(cudaError_t error) { return hkd::emu::error_string(error); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  *value = attr == cudaDevAttrMultiProcessorCount ? hkd::emu::config().sm_count : hkd::emu::config().shared_optin;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute /*attr*/, int value) {
  if (value < 0 || value > hkd::emu::config().shared_optin) return cudaErrorInvalidValue;
  hkd::emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}

// The dynamic shared memory (`extern __shared__ T name[];` in the kernels of namespace ns): defined once, in the
// translation unit that includes the .cu file.
#define HKD_EMULATE_DYNAMIC_SHARED(ns, name)                                                            \
  namespace ns {                                                                                        \
  alignas(256) thread_local unsigned char name[::hkd::emu::kSharedArena];                               \
  static const bool hkd_emulate_##name##_registered =                                                   \
      ::hkd::emu::register_dynamic_shared([]() -> unsigned char* { return name; });                     \
  }
