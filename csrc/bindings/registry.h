// The C++ half of the op registry (torchslim/ops/_registry.py): eager calls of
// torch.ops.torchslim.<op> reach a C++ kernel without entering Python.
//
// Each op's schema and Python impl are defined in torchslim/ops (the impl validates, chooses a
// backend, and falls back to the reference). The bindings register C++ kernels for the same ops
// with torch's dispatcher (TORCH_LIBRARY_IMPL). Such a kernel runs only arguments it can prove
// valid, and only when the automatic choice applies: the same kernel the Python impl would pick.
// Anything else (a forced backend, a dtype the kernel lacks, bad input and its error message)
// goes to the Python impl, so both paths give the same result and the same errors; the C++ path
// only saves the ~55 us that the dispatcher and the impl cost in Python per call.
#pragma once

#include <torch/extension.h>
#include <torch/library.h>

namespace torchslim::registry {

// True when a kernel of `backend` may run without asking Python: no torchslim.backend(...)
// context forcing another backend is open, and TORCHSLIM_BACKEND is unset, empty or `backend`.
// (Forcing the kernel's own backend changes nothing for the arguments the kernel takes.)
bool automatic(const char* backend);

// The op's Python impl, set by torchslim.ops when it defines the op.
pybind11::object python_impl(const char* op);

// Calls the op's Python impl: the fallback of a C++ kernel for what it does not take.
template <class Result, class... Args>
Result call_python(const char* op, const Args&... args) {
  pybind11::gil_scoped_acquire gil;
  return python_impl(op)(args...).template cast<Result>();
}

// The AutogradCPU kernel of the linear ops that have a CPU kernel (a boxed kernel, so one
// serves every signature). Without an input that requires grad under grad mode it goes on to
// the CPU kernel at once; otherwise it calls the op's autograd.Function, registered as the
// Python impl "<op>:grad" (torchslim/ops/_autograd.py, which has the formula and the reasons).
void linear_autograd_cpu(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack);

inline torch::CppFunction linear_autograd() {
  return torch::CppFunction::makeFromBoxedFunction<&linear_autograd_cpu>();
}

// set_python_impl(op, fn) and the forced-backend scope counter, for torchslim.ops.
void bind(pybind11::module_& m);

}  // namespace torchslim::registry
