// The extension hkd._C: every op's schema, declared once. Kernels attach per backend in
// csrc/cpu/*.cpp (STABLE_TORCH_LIBRARY_IMPL(hkd, CPU, m)) and csrc/cuda/*.cpp (STABLE_TORCH_LIBRARY_IMPL(hkd, CUDA, m));
// autograd and fake (meta) kernels are registered from Python, in hkd/ops/. Built on LibTorch's stable ABI and the
// Python limited API (Py_LIMITED_API, set by the build): one binary for every CPython >= 3.10 and every torch from
// TORCH_TARGET_VERSION on.
#include <Python.h>

#include "stable.h"

#ifndef HKD_CUDA_ARCHITECTURES
#define HKD_CUDA_ARCHITECTURES ""
#endif

STABLE_TORCH_LIBRARY(hkd, m) {
  // --- spectral (2x2 rotation-scaling) generators: hkd/ops/spectral.py ---------------------------
  // exp(tau A_l) z_l for every level l at once (convention: hkd/ops/reference.py). alphas[l], betas[l]:
  // (d_l/2,) or (d_l/2, *S_l), in the latents' opmath dtype like tau, which is 0-d or (B,).
  m.def("spectral_propagate(Tensor[] latents, Tensor[] alphas, Tensor[] betas, Tensor tau) -> Tensor[]");
  // Gradients of the above; a part not asked for (need_*) comes back as an empty list / empty tensor.
  m.def(
      "spectral_propagate_backward(Tensor[] grads, Tensor[] latents, Tensor[] alphas, Tensor[] betas, Tensor tau, "
      "bool need_latents, bool need_params, bool need_tau) -> (Tensor[], Tensor[], Tensor[], Tensor)");
  // --- dense generators: hkd/ops/dense.py ---------------------------------------------------------------
  // A (..., n, n) -> exp(A); expm_backward(A, grad) = L(A^T, grad), the adjoint of the Frechet derivative
  m.def("expm(Tensor A) -> Tensor");
  m.def("expm_backward(Tensor A, Tensor grad) -> Tensor");
  // The action's plan for z (B, d, P), A (d, d) or (P, d, d), tau (B,): float64 (degree, alpha, 1 if the action is
  // cheaper than one expm per sample else 0) (csrc/dense_plan.cpp); dense_theta: the Taylor table of csrc/dense.h
  m.def("dense_action_plan(Tensor A, Tensor tau, int positions) -> Tensor");
  m.def("dense_theta(ScalarType dtype) -> Tensor");
  // z (B, d, P), A (d, d) or (P, d, d), tau (B,) -> exp(tau_b A_p) z[b, :, p] (truncated Taylor, substeps)
  m.def("dense_action(Tensor z, Tensor A, Tensor tau, Tensor plan) -> Tensor");
  // dense_action_record: the same, with the record of its Taylor terms and the terms each vector took per substep
  // (CPU; empty when too large), which dense_action_backward then reads instead of running the recurrence again
  m.def("dense_action_record(Tensor z, Tensor A, Tensor tau, Tensor plan) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dense_action_backward(Tensor grad, Tensor z, Tensor A, Tensor tau, Tensor plan, Tensor? record=None, "
      "Tensor? terms=None) -> (Tensor, Tensor, Tensor)");
}

// `import hkd._C` loads the library, which registers the ops above statically; the module itself
// only says how it was built.
static PyModuleDef hkd_module = {PyModuleDef_HEAD_INIT, "_C", "hkd's compiled ops (torch.ops.hkd)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&hkd_module);
  if (module == nullptr) return nullptr;
#ifdef HKD_WITH_CUDA
  PyModule_AddObject(module, "WITH_CUDA", Py_NewRef(Py_True));
#else
  PyModule_AddObject(module, "WITH_CUDA", Py_NewRef(Py_False));
#endif
  PyModule_AddStringConstant(module, "CUDA_ARCHITECTURES", HKD_CUDA_ARCHITECTURES);
  return module;
}
