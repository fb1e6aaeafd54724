// CPUID-based feature detection and the run-time choice of ISA level.
#include "torchslim/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define TORCHSLIM_X86 1
#endif
#if TORCHSLIM_X86 && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace torchslim::cpu {
namespace {

#if TORCHSLIM_X86
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

// Asks the OS for the use of AMX tile data. Linux (5.16 and later) refuses tile instructions
// to a process that has not asked; other systems are not known to allow them, so they get no.
bool request_tile_data() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl codes from <asm/prctl.h>
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  uint64_t xcr0 = 0;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = ecx & (1u << 27);
  f.fma = ecx & (1u << 12);
  f.f16c = ecx & (1u << 29);
  f.popcnt = ecx & (1u << 23);
  if (osxsave) {
    xcr0 = xgetbv0();
    f.os_saves_ymm = (xcr0 & 0x6) == 0x6;    // SSE + AVX state
    f.os_saves_zmm = (xcr0 & 0xE6) == 0xE6;  // + opmask, ZMM_Hi256, Hi16_ZMM
  }
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return f;
  f.avx2 = f.os_saves_ymm && (ebx & (1u << 5));
  f.bmi1 = ebx & (1u << 3);
  f.bmi2 = ebx & (1u << 8);
  f.fma = f.fma && f.os_saves_ymm;
  f.f16c = f.f16c && f.os_saves_ymm;
  if (f.os_saves_zmm) {
    f.avx512f = ebx & (1u << 16);
    f.avx512dq = ebx & (1u << 17);
    f.avx512bw = ebx & (1u << 30);
    f.avx512vl = ebx & (1u << 31);
    f.avx512vnni = ecx & (1u << 11);
    f.avx512vbmi = ecx & (1u << 1);
    f.avx512vbmi2 = ecx & (1u << 6);
    f.avx512vpopcntdq = ecx & (1u << 14);
  }
  f.amx_bf16 = edx & (1u << 22);
  f.amx_tile = edx & (1u << 24);
  f.amx_int8 = edx & (1u << 25);
  const bool os_saves_tiles = (xcr0 & 0x60000) == 0x60000;  // XTILECFG + XTILEDATA
  f.os_allows_tiles = f.amx_tile && os_saves_tiles && request_tile_data();
  if (__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) {
    f.avx_vnni = f.os_saves_ymm && (eax & (1u << 4));
    f.avx512bf16 = f.os_saves_zmm && (eax & (1u << 5));
  }
  return f;
}
#else
CpuFeatures detect() { return {}; }
#endif

Isa initial_isa() {
  Isa isa = best_supported_isa();
  if (const char* env = std::getenv("TORCHSLIM_CPU_ISA"); env && *env) {
    Isa forced;
    // An unknown or unsupported value is ignored here; torchslim.info() reports it, and the
    // Python package validates the variable on import with a clear message.
    if (parse_isa(env, &forced) && isa_supported(forced)) isa = forced;
  }
  return isa;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kPortable:
      return "portable";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAmx:
      return "amx";
  }
  return "unknown";
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa isa : kAllIsas) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

bool isa_supported(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::kPortable:
      return true;
#if TORCHSLIM_X86
    case Isa::kAvx2:
      return f.avx2 && f.fma && f.f16c && f.popcnt && f.bmi1 && f.bmi2;
    case Isa::kAvx512:
      return isa_supported(Isa::kAvx2) && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq &&
             f.avx512vnni;
    case Isa::kAmx:
      return isa_supported(Isa::kAvx512) && f.avx512bf16 && f.avx512vbmi && f.amx_tile &&
             f.amx_int8 && f.amx_bf16 && f.os_allows_tiles;
#else
    default:
      (void)f;
      return false;
#endif
  }
  return false;
}

Isa best_supported_isa() {
  for (Isa isa : {Isa::kAmx, Isa::kAvx512, Isa::kAvx2}) {
    if (isa_supported(isa)) return isa;
  }
  return Isa::kPortable;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

bool set_active_isa(Isa isa) {
  if (!isa_supported(isa)) return false;
  active_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

}  // namespace torchslim::cpu
