// The torchslim._C pybind11 module: kernels bound per backend, plus build and CPU facts.
#include <torch/extension.h>

#include <limits>
#include <string>

#include "bindings/registry.h"
#include "cpu/kernels.h"
#include "torchslim/checks.h"
#include "torchslim/cpu_features.h"

namespace torchslim {
void bind_cpu(pybind11::module_& m);
void bind_cpu_sparse(pybind11::module_& m);
#ifdef TORCHSLIM_WITH_CUDA
void bind_cuda(pybind11::module_& m);
#endif
}  // namespace torchslim

namespace {

namespace py = pybind11;
using torchslim::cpu::Isa;

py::dict cpu_features() {
  const auto& f = torchslim::cpu::cpu_features();
  py::dict d;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["popcnt"] = f.popcnt;
  d["bmi1"] = f.bmi1;
  d["bmi2"] = f.bmi2;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vl"] = f.avx512vl;
  d["avx512dq"] = f.avx512dq;
  d["avx512vnni"] = f.avx512vnni;
  d["avx512bf16"] = f.avx512bf16;
  d["avx512vbmi"] = f.avx512vbmi;
  d["avx512vbmi2"] = f.avx512vbmi2;
  d["avx512vpopcntdq"] = f.avx512vpopcntdq;
  d["avx_vnni"] = f.avx_vnni;
  d["amx_tile"] = f.amx_tile;
  d["amx_int8"] = f.amx_int8;
  d["amx_bf16"] = f.amx_bf16;
  d["os_allows_tiles"] = f.os_allows_tiles;
  return d;
}

void set_isa(const std::string& name) {
  Isa isa;
  std::string names;
  for (Isa level : torchslim::cpu::kAllIsas) {
    names += std::string(names.empty() ? "'" : ", '") + torchslim::cpu::isa_name(level) + "'";
  }
  TORCHSLIM_CHECK(torchslim::cpu::parse_isa(name.c_str(), &isa), "isa must be one of ", names,
                  ", got '", name, "'");
  TORCHSLIM_CHECK(torchslim::cpu::set_active_isa(isa), "isa '", name,
                  "' is not supported by this CPU; the best it supports is '",
                  torchslim::cpu::isa_name(torchslim::cpu::best_supported_isa()), "'");
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : torchslim::cpu::kAllIsas) {
    if (torchslim::cpu::isa_supported(isa)) out.emplace_back(torchslim::cpu::isa_name(isa));
  }
  return out;
}

// Which kernel variants the active level's table holds (the level alone does not say: some
// paths also depend on CPU features or on the shape).
py::dict cpu_kernel_paths() {
  const torchslim::cpu::KernelTable& kt = torchslim::cpu::active_kernels();
  py::dict d;
  d["int8_tiles_from_m"] = kt.int8_pack_panels ? py::cast(kt.int8_panel_min_m) : py::none();
  // W8A8's strips by K: the M from which they run, for K up to each key.
  if (kt.int8_strip_min_m != nullptr) {
    py::dict by_k;
    for (const int64_t K : {1024, 2048, 4096, 65536}) by_k[py::cast(K)] = kt.int8_strip_min_m(K);
    d["int8_strips_from_m"] = by_k;
  } else {
    d["int8_strips_from_m"] = py::none();
  }
  d["int8_weight_only_tiles_from_m"] =
      kt.w8a16_pack_panels ? py::cast(kt.w8a16_panel_min_m) : py::none();
  d["int8_weight_only_bf16_pairs_from_m"] =
      kt.w8a16_pair_gemm ? py::cast(kt.w8a16_pair_min_m) : py::none();
  // int4's by the activation's run (32, 64, 128).
  const auto by_run = [](int64_t (*min_m)(int64_t)) -> py::object {
    if (min_m == nullptr) return py::none();
    py::dict out;
    for (const int64_t run : {32, 64, 128}) out[py::cast(run)] = min_m(run);
    return out;
  };
  d["int4_tiles_from_m"] = kt.w4_pack_panels ? by_run(kt.w4_panel_min_m) : py::none();
  d["int4_strips_from_m"] = by_run(kt.w4_strip_min_m);
  d["attention_tiles_from_rows"] =
      kt.attention_pack ? py::cast(kt.attention_tile_min_rows) : py::none();
  const bool fp32_tiles = kt.attention_pack != nullptr &&
                          kt.attention_tile_fp32_min_rows < std::numeric_limits<int64_t>::max();
  d["attention_fp32_tiles_from_rows_per_kv_head"] =
      fp32_tiles ? py::cast(kt.attention_tile_fp32_min_rows) : py::none();
  d["sparse_bf16_dot"] = kt.bf16_dot;
  d["sparse24_w8a8_strips_from_m"] =
      kt.sparse24_q8_strip_min_m < std::numeric_limits<int64_t>::max()
          ? py::cast(kt.sparse24_q8_strip_min_m)
          : py::none();
  // Bitmask's and sliced W8A8's by K: the M from which they run, for K up to each key.
  const auto sparse_by_k = [](int64_t (*min_m)(int64_t)) -> py::object {
    py::dict out;
    for (const int64_t K : {1024, 65536}) {
      const int64_t m = min_m(K);
      if (m < std::numeric_limits<int64_t>::max()) out[py::cast(K)] = m;
    }
    return out.empty() ? py::none() : py::object(out);
  };
  d["bitmask_w8a8_strips_from_m"] = sparse_by_k(kt.bitmask_q8_strip_min_m);
  d["sliced_w8a8_strips_from_m"] = sparse_by_k(kt.sliced_q8_strip_min_m);
  return d;
}

py::object int4_bf16_tiles_from_m(int64_t run, int64_t n) {
  const torchslim::cpu::KernelTable& kt = torchslim::cpu::active_kernels();
  TORCHSLIM_CHECK(run == 32 || run == 64 || run == 128, "run must be 32, 64 or 128, got ", run);
  TORCHSLIM_CHECK(n >= 0, "n must be non-negative, got ", n);
  return kt.w4_bf16_min_m ? py::cast(kt.w4_bf16_min_m(run, n)) : py::none();
}

py::dict build_info() {
  py::dict d;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  d["torch"] = TORCHSLIM_TORCH_VERSION;
#ifdef TORCHSLIM_WITH_CUDA
  d["with_cuda"] = true;
#else
  d["with_cuda"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torchslim compiled kernels";
  m.def("cpu_features", &cpu_features, "Features of this CPU (CPUID + XGETBV)");
  m.def(
      "isa", [] { return std::string(torchslim::cpu::isa_name(torchslim::cpu::active_isa())); },
      "The ISA level the CPU kernels use now");
  m.def(
      "best_isa",
      [] { return std::string(torchslim::cpu::isa_name(torchslim::cpu::best_supported_isa())); },
      "The best ISA level this CPU supports");
  m.def("supported_isas", &supported_isas, "ISA levels this CPU can run, lowest first");
  m.def("set_isa", &set_isa, "Force an ISA level (portable | avx2 | avx512 | amx)",
        py::arg("name"));
  m.def("cpu_kernel_paths", &cpu_kernel_paths,
        "Kernel variants of the active ISA level: int8_tiles_from_m (the M from which the int8 "
        "GEMM runs on AMX tiles, or None), int8_strips_from_m (for K up to each key, the M from "
        "which it runs on AVX-512 or AVX2 weight strips, or None), "
        "int8_weight_only_tiles_from_m (the same as the first for W8A16), "
        "int8_weight_only_bf16_pairs_from_m (the M from which W8A16 on bf16 x runs on VDPBF16PS "
        "against weight strips of bf16 pairs, or None), int4_tiles_from_m (per "
        "activation run of 32, 64 and 128 columns, the M from which int4 runs on the int8 tiles "
        "with Q8 x; None: no such tiles), "
        "int4_strips_from_m (per run, the M from which it runs on AVX-512 or AVX2 weight strips), "
        "attention_tiles_from_rows (the rows of a work item from which attention's products run "
        "on bf16 pairs: AMX tiles, or VDPBF16PS at the avx512 level on a CPU with AVX512_BF16; "
        "None: never), attention_fp32_tiles_from_rows_per_kv_head (the same for fp32, by query "
        "rows per key/value head; None: never), sparse_bf16_dot");
  m.def("int4_bf16_tiles_from_m", &int4_bf16_tiles_from_m,
        "The M from which the active ISA level runs int4 on bf16 tiles with bf16 x, for an "
        "activation run (32, 64 or 128 columns) and a layer of n output columns; None: no such "
        "tiles",
        py::arg("run"), py::arg("n"));
  m.def("build_info", &build_info, "Compiler and options of this build");
  torchslim::registry::bind(m);
  torchslim::bind_cpu(m);
  torchslim::bind_cpu_sparse(m);
#ifdef TORCHSLIM_WITH_CUDA
  torchslim::bind_cuda(m);
#endif
}
