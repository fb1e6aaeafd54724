// CPU feature detection and run-time ISA selection.
//
// One build runs on any x86-64: every CPU kernel is compiled once per ISA level and the level
// used is chosen at run time from CPUID, or forced lower with
// TORCHSLIM_CPU_ISA=avx512|avx2|portable (so the lower paths can be tested on a machine that has
// the higher ones).
#pragma once

#include <cstdint>

namespace torchslim::cpu {

enum class Isa : int {
  kPortable = 0,  // plain C++, whatever the compiler's baseline gives
  kAvx2 = 1,      // AVX2 + FMA + F16C + POPCNT + BMI1/2
  kAvx512 = 2,    // AVX-512 F/BW/VL/DQ + VNNI
  // kAvx512 + AVX512_BF16/VBMI + AMX-TILE/INT8/BF16, with the OS's leave to use tiles: the
  // avx512 kernels, with the large-M GEMMs on the tile unit
  kAmx = 3,
};

// Every level, lowest first.
inline constexpr Isa kAllIsas[] = {Isa::kPortable, Isa::kAvx2, Isa::kAvx512, Isa::kAmx};

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, popcnt = false, bmi1 = false, bmi2 = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false, avx512vbmi = false, avx512vbmi2 = false;
  bool avx512vpopcntdq = false;
  bool avx_vnni = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
  // The OS saves tile state (XCR0 bits 17-18) and, on Linux, granted this process the use of
  // tile data (arch_prctl ARCH_REQ_XCOMP_PERM): without both, a tile instruction faults.
  bool os_allows_tiles = false;
  bool os_saves_ymm = false, os_saves_zmm = false;
};

// Features of the CPU this process runs on (CPUID + XGETBV), detected once.
const CpuFeatures& cpu_features();

const char* isa_name(Isa isa);
// Parses "portable" | "avx2" | "avx512" | "amx"; returns false for anything else.
bool parse_isa(const char* name, Isa* out);
// Whether this CPU (and this build) can run kernels of the given level.
bool isa_supported(Isa isa);
Isa best_supported_isa();

// The level in use: TORCHSLIM_CPU_ISA if set (it may only lower the level), else the best.
Isa active_isa();
// Forces a level; returns false (and changes nothing) when the CPU cannot run it.
bool set_active_isa(Isa isa);

}  // namespace torchslim::cpu
