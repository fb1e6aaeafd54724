// 2:4 sparse GEMM on the sparse tensor cores of NVIDIA GPUs (sm_80 / sm_90a): the host API.
//
// No torch headers: plain device pointers, element strides, sizes and a stream in; a
// cudaError_t out (cudaErrorInvalidValue for bad arguments, otherwise cudaGetLastError() after
// the launch; the kernel runs asynchronously on `stream`). The specification is
// python/torchslim/reference/sparse.py (sparse24_linear):
//
//   out[m, n] = sum_k x[m, k] * W[n, k] * scales[n] + bias[n]
//
// where W (N, K) is given in the 2:4 format: G = ceil(K / 4) groups of 4 columns per row, each
// keeping 2 values, with their 2-bit columns in `meta` (byte b of a row: groups 2b and 2b + 1,
// bits 0-1 and 2-3 the first group's two columns, 4-5 and 6-7 the second's). This is the
// metadata layout of mma.sp itself, so the kernel reads the format as it is stored.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace torchslim::cuda {

// out = x @ W.T * scales + bias, fp32 accumulation (mma.sp m16n8k32).
//   x:      (M, K) dtype (kFloat16 / kBFloat16), row stride ldx elements (unit last stride).
//   values: (N, 2G) dtype (the same as x), the kept values, row stride ldv elements.
//   meta:   (N, ceil(G / 2)) uint8, row stride ldm bytes.
//   scales: (N,) fp32, or nullptr (= 1).
//   bias:   (N,) bias_dtype (float dtype), or nullptr.
//   out:    (M, N) dtype, row stride ldo elements (>= N when M > 1). The operands' rows may
//           overlap (a row stride of 0 repeats one row).
// Every metadata nibble of the format names two distinct columns in increasing order, which is
// what the tensor cores need. Tiles of W with any other nibble (two values on one column, or a
// decreasing pair) are computed by a scalar path with the reference's rule (each value is added
// at the column its index names), so every input gets the reference's result. Metadata of
// groups past the end (the high nibble of an odd G's last byte) is ignored.
// 16-byte cp.async staging when x and values are 16-byte aligned with leading dims divisible by
// 8 elements and meta is 8-byte aligned with ldm divisible by 8; otherwise bounds-checked loads.
cudaError_t sparse24_gemm(const void* x, int64_t ldx, DType dtype, const void* values, int64_t ldv,
                          const uint8_t* meta, int64_t ldm, const float* scales, const void* bias,
                          DType bias_dtype, void* out, int64_t ldo, int64_t M, int64_t N, int64_t K,
                          cudaStream_t stream);

}  // namespace torchslim::cuda
