// Portable build of the CPU kernels: any CPU, the compiler's baseline instructions.
#include "isa_prelude.h"

#define TORCHSLIM_ISA_NS portable
#define TORCHSLIM_ISA_LEVEL Isa::kPortable
// clang-format off: isa_table.h comes last, it names the kernels of the others
#include "attention.h"
#include "int4_gemm.h"
#include "int8_gemm.h"
#include "sparse_gemm.h"
#include "sliced_gemm.h"
#include "isa_table.h"
// clang-format on
