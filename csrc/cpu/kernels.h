// The CPU kernel interface: plain pointers and strides, no torch.
//
// Each ISA level (portable, avx2, avx512) compiles the same kernel templates into its own
// namespace and exposes them through a KernelTable; the binding layer picks the table of the
// active level and splits the work into (m, n) blocks across threads. A kernel call computes one
// block [m0, m1) x [n0, n1) of the output and touches nothing outside it.
#pragma once

#include <cstdint>

#include "torchslim/cpu_features.h"

namespace torchslim::cpu {

// Storage type of float activations and outputs; bf16 is carried as raw uint16 bits.
enum class ScalarType : int { kFloat32 = 0, kBFloat16 = 1, kInt32 = 2 };

// Symmetric per-row int8 quantization (torchslim.reference.quantize_per_token):
//   scale[m] = max_k |x[m, k]| / 127  (1 if the row is all zeros)
//   q[m, k]  = clamp(round_half_even(x[m, k] / scale[m]), -127, 127)
struct QuantizeArgs {
  const void* x;  // (M, K) fp32 or bf16, row stride ldx, unit column stride
  int64_t ldx;
  ScalarType x_type;
  int8_t* q;  // (M, K) int8 codes, row stride ldq
  int64_t ldq;
  float* scale;  // (M,) fp32
  int64_t K;
};

// out[m, n] = acc[m, n] * a_scale[m] * b_scale[n] + bias[n],  acc = sum_k a[m, k] * b[n, k]
// or, with out_type kInt32 (scales and bias null), the exact int32 accumulator itself.
struct Int8GemmArgs {
  const int8_t* a;  // (M, K) int8 activation codes in [-127, 127], row stride lda
  int64_t lda;
  const int8_t* b;  // (N, K) int8 weight codes, row stride ldb (one row per output column)
  int64_t ldb;
  const float* a_scale;  // (M,) fp32, or null for int32 output
  const float* b_scale;  // (N,) fp32, or null for int32 output
  const float* bias;     // (N,) fp32 or null
  void* out;             // (M, N) of out_type, row stride ldo
  int64_t ldo;
  ScalarType out_type;
  int64_t M, N, K;
};

// out[m, n] = (sum_k x[m, k] * w[n, k]) * w_scale[n] + bias[n]   (int8 -> fp32 in registers)
struct W8A16Args {
  const float* x;  // (M, K) fp32, row stride ldx
  int64_t ldx;
  const int8_t* w;  // (N, K) int8, row stride ldw
  int64_t ldw;
  const float* w_scale;  // (N,) fp32
  const float* bias;     // (N,) fp32 or null
  void* out;             // (M, N) fp32 or bf16, row stride ldo
  int64_t ldo;
  ScalarType out_type;
  int64_t M, N, K;
};

struct KernelTable {
  Isa isa;
  void (*quantize_rows)(const QuantizeArgs& args, int64_t m0, int64_t m1);
  void (*int8_gemm)(const Int8GemmArgs& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  void (*w8a16_gemm)(const W8A16Args& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
};

namespace portable {
const KernelTable& kernel_table();
}
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 {
const KernelTable& kernel_table();
}
namespace avx512 {
const KernelTable& kernel_table();
}
#endif

// The table of the active ISA level (see cpu_features.h).
const KernelTable& active_kernels();

}  // namespace torchslim::cpu
