// AVX-512 (F, BW, VL, DQ) + VNNI build of the CPU kernels (Cascade Lake, Ice Lake, Sapphire
// Rapids, Zen 4 and later).
#include "isa_prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(                                                                    \
    __attribute__((                                                                              \
        target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,popcnt,bmi,bmi2"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,popcnt,bmi,bmi2")
#endif

#define TORCHSLIM_ISA_AVX512 1
#define TORCHSLIM_ISA_NS avx512
#define TORCHSLIM_ISA_LEVEL Isa::kAvx512
// clang-format off: isa_table.h comes last, it names the kernels of the others
#include "attention.h"
#include "int4_gemm.h"
#include "int8_gemm.h"
#include "sparse_gemm.h"
#include "sliced_gemm.h"
#include "isa_table.h"
// clang-format on

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
