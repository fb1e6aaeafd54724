// See registry.h.
#include "bindings/registry.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>

#include "torchslim/checks.h"

namespace torchslim::registry {
namespace {

namespace py = pybind11;

// The backends torchslim.backend(name) can force (torchslim/ops/_registry.py BACKENDS), and
// how many contexts forcing each are open in any thread. Python keeps the exact choice (per
// context); a C++ kernel runs only while no other backend is forced, else it defers to Python.
constexpr std::array<const char*, 4> kBackends = {"cpu", "triton", "cuda", "reference"};
std::array<std::atomic<int64_t>, kBackends.size()> g_forced_scopes{};

size_t backend_index(const std::string& name) {
  for (size_t i = 0; i < kBackends.size(); ++i) {
    if (name == kBackends[i]) return i;
  }
  TORCHSLIM_CHECK(false, "backend must be one of cpu, triton, cuda, reference, got '", name, "'");
  return 0;
}

// Op name -> Python impl. Never destroyed: the objects must not be released after the
// interpreter has finalised.
std::unordered_map<std::string, py::object>& impls() {
  static auto* table = new std::unordered_map<std::string, py::object>();
  return *table;
}

}  // namespace

bool automatic(const char* backend) {
  for (size_t i = 0; i < kBackends.size(); ++i) {
    if (std::strcmp(kBackends[i], backend) != 0 &&
        g_forced_scopes[i].load(std::memory_order_relaxed) != 0) {
      return false;
    }
  }
  const char* env = std::getenv("TORCHSLIM_BACKEND");
  return env == nullptr || env[0] == '\0' || std::strcmp(env, backend) == 0;
}

py::object python_impl(const char* op) {
  const auto it = impls().find(op);
  TORCHSLIM_CHECK_RUNTIME(it != impls().end(), "torchslim::", op,
                          " has no Python impl registered (import torchslim first)");
  return it->second;
}

void linear_autograd_cpu(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack) {
  const std::size_t count = op.schema().arguments().size();
  const auto args = torch::jit::last(*stack, count);
  bool grad = false;
  if (at::GradMode::is_enabled()) {
    for (const c10::IValue& a : args) grad = grad || (a.isTensor() && a.toTensor().requires_grad());
  }
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
    return;
  }
  at::Tensor out;
  {
    py::gil_scoped_acquire gil;
    py::tuple inputs(count);
    for (std::size_t i = 0; i < count; ++i) {
      const c10::IValue& a = args[i];
      if (a.isTensor()) {
        inputs[i] = py::cast(a.toTensor());
      } else if (a.isInt()) {  // the linear ops' other arguments: ints and absent tensors
        inputs[i] = py::int_(a.toInt());
      } else {
        TORCHSLIM_CHECK_RUNTIME(a.isNone(), "torchslim::", op.schema().name(),
                                ": no gradient path for an argument of type ", a.tagKind());
        inputs[i] = py::none();
      }
    }
    const std::string& qualified = op.schema().name();  // torchslim::<op>
    const std::string grad_impl = qualified.substr(qualified.find("::") + 2) + ":grad";
    out = python_impl(grad_impl.c_str())(*inputs).cast<at::Tensor>();
  }
  torch::jit::drop(*stack, count);
  stack->emplace_back(std::move(out));
}

void bind(py::module_& m) {
  m.def(
      "set_python_impl", [](const std::string& op, py::object fn) { impls()[op] = std::move(fn); },
      "Registers the Python impl of torchslim::<op>, the fallback of its C++ kernels",
      py::arg("op"), py::arg("fn"));
  m.def(
      "python_impl", [](const std::string& op) { return python_impl(op.c_str()); },
      "The Python impl registered for torchslim::<op>", py::arg("op"));
  m.def(
      "forced_backend_scope",
      [](const std::string& backend, int64_t delta) {
        return g_forced_scopes[backend_index(backend)].fetch_add(delta) + delta;
      },
      "Counts the open torchslim.backend(backend) contexts (delta +1 on entry, -1 on exit); "
      "returns the count",
      py::arg("backend"), py::arg("delta"));
}

}  // namespace torchslim::registry
