// AMX build (Sapphire Rapids and later): the avx512 level's kernels, with the large-M GEMMs on
// the tile unit (amx_gemm.h) and bf16 attention's products too (amx_attention.h).

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
#include "amx_attention.h"  // and amx_gemm.h

namespace torchslim::cpu::amx {

// Where the tile multiplies take over from the AVX-512 kernels (measured on Sapphire Rapids,
// 2 threads, the benchmark's layers; NOTES.md). int8: at M = 1-2 both stream the weights at
// memory speed and the VNNI dot kernels lead by 0-10%; at M = 4 the two are within 5%, either
// way by layer; at M = 8 the tiles lead by 1.5-2.3x. int4: the tiles pay a fixed cost per
// weight strip (unpacking, and a multiply per block of 32), 4x the dot kernel's whole time at
// M = 1; with runs of 64 or 128 they lead from M = 8 (g128: 0.68 against 0.85 ms on 4096^2,
// 1.9-2.0 against 2.2-2.4 on 11008x4096; g64 within 10% either way), with runs of 32, whose
// every run is a half-depth multiply and a fold, from M = 16 (g32 at M = 8 took 1.4-1.5x the dot
// kernel's time on the three large layers, at M = 12 0.8-1.1x on the four, at M = 16
// 0.65-0.83x). W8A16: the weights are converted to bf16 per block of rows.
constexpr int64_t kPanelMinM = 4;
constexpr int64_t kW8A16PanelMinM = 16;
int64_t w4_panel_min_m(int64_t run) { return run <= 32 ? 16 : 8; }

// Where int4 leaves the Q8 panels for bf16 ones (x rounded to bf16, each weight dequantized to
// bf16 once per block of rows). On the int8 tiles every run of the activation's scales costs a
// fold of the sums in vector registers (amx_gemm.h), and a run of 32 a half-depth multiply, so
// the shorter the runs the sooner the bf16 tiles, which have neither, take over: runs of 32
// (g32) from M = 32, runs of 64 from 64. Runs of 128 multiply at twice the bf16 tiles' rate, but
// their Q8 panels cost more to pack than bf16 ones, a cost per activation value that a narrow
// layer spreads over few outputs: up to N = 2048 the bf16 tiles take over from M = 256
// (1536x576 at M = 256-1024 0.79-0.87x the time, 2048x1024 at M = 256-512 0.89-0.94x,
// 2048^2 and 1536^2 at M = 512 0.91-0.95x), wider from M = 512 (4096^2 0.98x, 4096x1536 0.98x,
// 4096x11008 1.0x, 11008x4096 1.02x; at M = 256 4096^2 and 11008x4096 1.08-1.1x).
// Measured by layer and M: NOTES.md.
constexpr int64_t kW4Bf16NarrowN = 2048;
int64_t w4_bf16_min_m(int64_t run, int64_t N) {
  if (run <= 32) return 32;
  if (run <= 64) return 64;
  return N <= kW4Bf16NarrowN ? 256 : 512;
}

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = avx512::kernel_table();
    t.isa = Isa::kAmx;
    t.int8_gemm = &amx_int8_gemm;
    t.int8_pack_panels = &int8_pack_panels;
    t.int8_panel_min_m = kPanelMinM;
    t.int8_strip_min_m = nullptr;  // the tiles take M from kPanelMinM, below the strips' threshold
    t.w8a16_gemm = &amx_w8a16_gemm;
    t.w8a16_pack_panels = &w8a16_pack_panels;
    t.w8a16_panel_min_m = kW8A16PanelMinM;
    t.w8a16_pair_gemm = nullptr;  // the tiles take M from kW8A16PanelMinM
    t.w4_gemm = &amx_w4_gemm;
    t.w4_pack_panels = &w4_pack_panels;
    t.w4_panel_min_m = &w4_panel_min_m;
    t.w4_bf16_min_m = &w4_bf16_min_m;
    t.w4_strip_min_m = nullptr;  // the tiles take every M the strips would (not measured below)
    t.attention = &amx_attention;
    t.attention_pack = &attention_pack;
    t.attention_tile_min_rows = kAttnTileMinRows;
    t.attention_tile_fp32_min_rows = kAttnTileFp32MinRows;
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
