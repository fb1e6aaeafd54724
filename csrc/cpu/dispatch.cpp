// Maps the active ISA level to its kernel table.
#include "kernels.h"

namespace torchslim::cpu {

const KernelTable& active_kernels() {
  switch (active_isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAmx:
      return amx::kernel_table();
    case Isa::kAvx512:
      return avx512::kernel_table();
    case Isa::kAvx2:
      return avx2::kernel_table();
#endif
    default:
      return portable::kernel_table();
  }
}

}  // namespace torchslim::cpu
