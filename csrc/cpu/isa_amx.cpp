// AMX build (Sapphire Rapids and later): the avx512 level's kernels, with the large-M GEMMs on
// the tile unit (amx_gemm.h).
#include "isa_prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(                                                                  \
    __attribute__((                                                                            \
        target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512bf16,amx-tile," \
               "amx-int8,amx-bf16,avx2,fma,f16c,popcnt,bmi,bmi2"))),                           \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target( \
    "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512bf16,amx-tile,amx-int8,amx-bf16,avx2,fma,f16c,popcnt,bmi,bmi2")
#endif

#define TORCHSLIM_ISA_NS amx
#include "amx_gemm.h"

namespace torchslim::cpu::amx {

// Where the tile multiplies take over from the VNNI dot kernels (measured on Sapphire Rapids,
// 2 threads, the benchmark's layers). int8: at M = 1-2 both stream the weights at memory speed
// and the dot kernels lead by 0-10%; at M = 4 the two are within 5%, either way by layer; at
// M = 8 the tiles lead by 1.5-2.3x, at M = 512 by 5x. int4: the tiles pay a fixed cost per
// weight strip (unpacking, and a multiply a block), 4x the dot kernel's whole time at M = 1;
// at M = 8 they lead by 1.07-1.19x, at M = 16 by 2.1-2.2x, at M = 512 by 3.4-3.9x.
constexpr int64_t kPanelMinM = 4;
constexpr int64_t kW4PanelMinM = 8;

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = avx512::kernel_table();
    t.isa = Isa::kAmx;
    t.int8_gemm = &amx_int8_gemm;
    t.int8_pack_panels = &int8_pack_panels;
    t.int8_panel_min_m = kPanelMinM;
    t.w4_gemm = &amx_w4_gemm;
    t.w4_pack_panels = &w4_pack_panels;
    t.w4_panel_min_m = kW4PanelMinM;
    return t;
  }();
  return table;
}

}  // namespace torchslim::cpu::amx

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
