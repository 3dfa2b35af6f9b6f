// The vocabulary of every torch-facing file: LibTorch's stable ABI (torch/csrc/stable: tensors, ops and the library
// macros, all through C shims) and its header-only parts (dtypes, float16/bfloat16), so that one build of hkd._C
// loads on every torch from TORCH_TARGET_VERSION on. Nothing here binds an at:: or c10:: C++ symbol.
#pragma once

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace hkd {

using Tensor = torch::stable::Tensor;
using torch::headeronly::ScalarType;
using IntArray = torch::headeronly::IntHeaderOnlyArrayRef;

template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

// A failed check: one line naming what is wrong (a RuntimeError in Python).
#define HKD_CHECK(cond, ...) \
  if (!(cond)) throw std::runtime_error(::hkd::str(__VA_ARGS__))

// A shape as [2, 3], for messages.
struct Shape {
  IntArray sizes;
};
inline std::ostream& operator<<(std::ostream& out, Shape s) {
  out << '[';
  for (size_t i = 0; i < s.sizes.size(); ++i) out << (i ? ", " : "") << s.sizes[i];
  return out << ']';
}
inline Shape shape(const Tensor& t) { return {t.sizes()}; }
inline const char* name(ScalarType t) { return torch::headeronly::toString(t); }

inline bool same_sizes(IntArray a, IntArray b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// float16 and bfloat16 compute in float32 (ATen's opmath type), the others in themselves.
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<c10::Half> {
  using type = float;
};
template <>
struct OpMath<c10::BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;
inline ScalarType opmath_type(ScalarType t) {
  return t == ScalarType::Half || t == ScalarType::BFloat16 ? ScalarType::Float : t;
}
inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// f(T{}) with T the C++ type of a float32 or float64 dtype (and float16, bfloat16 with Half).
template <bool Half = false, typename F>
void dispatch_floating(ScalarType t, const char* op, F&& f) {
  if (t == ScalarType::Float) return f(float{});
  if (t == ScalarType::Double) return f(double{});
  if constexpr (Half) {
    if (t == ScalarType::Half) return f(c10::Half{});
    if (t == ScalarType::BFloat16) return f(c10::BFloat16{});
  }
  HKD_CHECK(false, op, ": unsupported dtype ", name(t));
}

// Typed data pointers (the stable ones check the dtype on every call).
template <typename T>
const T* data(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_data(const Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

inline Tensor empty(std::vector<int64_t> sizes, ScalarType dtype, const Tensor& like) {
  return torch::stable::empty(sizes, dtype, std::nullopt, like.device());
}
inline Tensor zeros(std::vector<int64_t> sizes, ScalarType dtype, const Tensor& like) {
  return torch::stable::new_zeros(like, sizes, dtype);
}
inline Tensor to(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}
// An op by name through the dispatcher (the stable route for ops without a stable wrapper); its first result.
template <typename... Args>
Tensor call(const char* op, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}
// t * s and t / s, on t's device (s as a 0-d tensor of t's dtype, as ATen treats a Python number)
inline Tensor scaled(const Tensor& t, double s) {
  return call("aten::mul", "Tensor", t, torch::stable::full({}, s, t.scalar_type(), std::nullopt, t.device()));
}
inline Tensor divided(const Tensor& t, double s) {
  return call("aten::div", "Tensor", t, torch::stable::full({}, s, t.scalar_type(), std::nullopt, t.device()));
}
// A float64 CPU tensor holding `values`.
inline Tensor host_tensor(const std::vector<double>& values) {
  Tensor t = torch::stable::empty({int64_t(values.size())}, ScalarType::Double, std::nullopt,
                                  torch::stable::Device(torch::headeronly::DeviceType::CPU));
  std::copy(values.begin(), values.end(), mutable_data<double>(t));
  return t;
}
inline Tensor cpu(const Tensor& t) {
  return t.is_cpu() ? t : torch::stable::to(t, torch::stable::Device(torch::headeronly::DeviceType::CPU));
}

#ifdef HKD_WITH_CUDA
// The current CUDA stream of a device (a cudaStream_t).
inline void* current_cuda_stream(const Tensor& on) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(on.get_device_index(), &stream));
  return stream;
}
#endif

}  // namespace hkd
