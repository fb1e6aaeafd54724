// int8 quantization and GEMM kernels for NVIDIA GPUs (sm_80 / sm_90a): the host API.
//
// No torch headers: plain device pointers, element strides, sizes and a stream in; a
// cudaError_t out (cudaErrorInvalidValue for bad arguments, otherwise cudaGetLastError() after
// the launches; the kernels run asynchronously on `stream`). The specification is
// python/torchslim/reference/int8.py:
//
//   quantize_per_token:     scale[m] = amax_k |x[m, k]| / 127  (1 if that is 0)
//                           x_q[m, k] = clamp(round_half_even(x[m, k] / scale[m]), -127, 127)
//   int8_scaled_mm:         acc[m, n] = sum_k a[m, k] * b[n, k]               (exact int32)
//                           out[m, n] = acc[m, n] * a_scale[m] * b_scale[n] + bias[n]
//   int8_weight_only_gemm:  out[m, n] = sum_k x[m, k] * (w[n, k] * w_scale[n]) + bias[n]
//
// Layouts: every matrix is row-major with unit stride along its last dim and a leading
// dimension `ld*` in elements (>= 0; it may be anything when the matrix has one row). Nothing
// is assumed about pointer alignment: the fast paths (16-byte cp.async / vector loads) are
// taken only after the pointers and leading dimensions are checked, otherwise a slower path
// with scalar loads runs. All pointers are device pointers; a pointer may be null only where
// the matrix it points to is empty (or where documented as optional).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace torchslim::cuda {

// Symmetric per-row int8 quantization; bit-exact with the reference (IEEE fp32 division and
// round-half-to-even, independent of -ftz / fast-math build flags).
//   x:       (M, K) x_dtype (kFloat16 / kBFloat16 / kFloat32), row stride ldx elements.
//   x_q:     (M, K) int8, contiguous (row stride K), codes in [-127, 127].
//   x_scale: (M,) fp32.
// The scale is replaced by 1 when amax / 127 is 0 (amax == 0, K == 0, or amax so small that the
// quotient underflows), exactly like the reference's torch.where(scale == 0, 1, scale). A NaN
// (or inf) in a row makes that row's scale NaN (inf) and its codes 0 (NaN quotients convert to 0).
cudaError_t quantize_per_token(const void* x, int64_t ldx, DType x_dtype, int64_t M, int64_t K,
                               int8_t* x_q, float* x_scale, cudaStream_t stream);

// int8 x int8 -> int32 GEMM on tensor cores (mma.sync m16n8k32) with a fused epilogue.
//   a:       (M, K) int8, row stride lda.
//   b:       (N, K) int8, row stride ldb (one row per output column: out = a @ b.T).
//   a_scale: (M,) fp32 or nullptr (= 1).   b_scale: (N,) fp32 or nullptr (= 1).
//   bias:    (N,) bias_dtype (float dtype) or nullptr.
//   out:     (M, N) out_dtype, row stride ldo (>= N when M > 1). out_dtype kInt32 stores the
//            exact accumulators and then requires a_scale, b_scale and bias to be null.
// Exact for K * 128 * 128 < 2^31 (K <= 131071); beyond that the int32 sums wrap.
// M <= 8 takes a dp4a GEMV path; larger M a 128x128x64 tiled tensor-core kernel.
cudaError_t int8_scaled_mm(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb,
                           const float* a_scale, const float* b_scale, const void* bias,
                           DType bias_dtype, void* out, int64_t ldo, DType out_dtype, int64_t M,
                           int64_t N, int64_t K, cudaStream_t stream);

// W8A16 GEMM: out = x @ (w * w_scale[:, None]).T + bias, with fp32 accumulation. The int8
// weights are converted to x_dtype in registers (never a dequantized copy in memory) and the
// per-channel scale is applied in the epilogue.
//   x:       (M, K) x_dtype (kFloat16 / kBFloat16 / kFloat32), row stride ldx.
//   w:       (N, K) int8, row stride ldw.
//   w_scale: (N,) fp32, or nullptr (= 1).
//   bias:    (N,) bias_dtype (float dtype) or nullptr.
//   out:     (M, N) x_dtype, row stride ldo (>= N when M > 1).
// M <= 8: GEMV path (one warp per weight row, 16-byte loads when aligned). Larger M: fp16/bf16
// use a 128x128x32 tensor-core kernel (mma.sync m16n8k16); fp32 a 64x64 SIMT kernel (fp32 FMA).
cudaError_t int8_weight_only_gemm(const void* x, int64_t ldx, DType x_dtype, const int8_t* w,
                                  int64_t ldw, const float* w_scale, const void* bias,
                                  DType bias_dtype, void* out, int64_t ldo, int64_t M, int64_t N,
                                  int64_t K, cudaStream_t stream);

}  // namespace torchslim::cuda
