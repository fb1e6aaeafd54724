// int4 weight-only (W4A16) GEMM for NVIDIA GPUs (sm_80 / sm_90a): the host API.
//
// No torch headers: plain device pointers, element strides, sizes and a stream in; a
// cudaError_t out (cudaErrorInvalidValue for bad arguments, otherwise cudaGetLastError() after
// the launches; the kernels run asynchronously on `stream`). The specification is
// python/torchslim/reference/int4.py:
//
//   w[n, k]   = (code[n, k] - zeros[n, k / G]) * scales[n, k / G]
//   out[m, n] = sum_k x[m, k] * w[n, k] + bias[n]          (fp32 accumulation)
//
// The codes come pre-shuffled in the tensor-core ("tc") layout, so that one 16-byte load per lane
// holds exactly the mma.sync B fragments that lane needs (reference/int4.py, pack_int4_tc):
//   the (N, K) codes are cut into tiles of 64 columns (n) x 16 k; tile (c, t) is 512 contiguous
//   bytes at offset (c * K / 16 + t) * 512, lane l's 16 bytes at 16 l within it. With r = l / 4,
//   q = l % 4, 32-bit word i (i = 0..3) of the lane holds the eight codes
//       nibble s + 4e  =  code[64c + 8(2i + s % 2) + r, 16t + 8(s / 2) + 2q + e],  s = 0..3, e =
//       0..1
//   so (word >> 4s) & 0x000f000f is the pair (k, k + 1) of register b[s / 2] of the m16n8k16 B
//   fragment of the n8 tile 2i + s % 2.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace torchslim::cuda {

// Tile of the tc layout: 64 output channels x 16 k, 512 bytes.
constexpr int64_t kInt4TcTileN = 64;
constexpr int64_t kInt4TcTileK = 16;
constexpr int64_t kInt4TcTileBytes = kInt4TcTileN * kInt4TcTileK / 2;

// The number of K splits w4a16_tc_gemm should use for this shape on a GPU with `sm_count`
// multiprocessors: enough thread blocks to fill the GPU at small M, each split at least 8 k tiles.
int w4a16_tc_default_split_k(int64_t M, int64_t N, int64_t K, int sm_count);

// out = x @ w.T + bias on tensor cores (mma.sync m16n8k16, fp32 accumulation). Each lane streams
// its 16 bytes of codes per tile straight into registers (no shared memory), turns them into
// fp16 / bf16 pairs with a bit trick (exact), subtracts the group's zero point and multiplies by
// its scale in T (rounded as the reference rounds), and runs 8 mma per m16 tile. Built for small M
// (decode): the weights are read once per 64 rows of x.
//   x:        (M, K) x_dtype (kFloat16 / kBFloat16), row stride ldx.
//   w_tc:     the codes in the tc layout, N * K / 2 bytes, 16-byte aligned.
//   scales, zeros: (N, K / G) scale_dtype (kFloat16 / kBFloat16 / kFloat32), contiguous.
//   group_size: G, a multiple of 16 dividing K (K itself for one group per row).
//   bias:     (N,) bias_dtype (float dtype) or nullptr.
//   out:      (M, N) x_dtype, row stride ldo (>= N when M > 1).
//   split_k:  1 .. 65535: K is cut into this many slices run by separate thread blocks; with
//             more than one, the fp32 partial sums go to `workspace` (split_k * M * N floats)
//             and a second kernel adds them up in a fixed order (deterministic) with the bias.
// Requires N % 64 == 0 and K % 16 == 0 (what the layout can hold).
cudaError_t w4a16_tc_gemm(const void* x, int64_t ldx, DType x_dtype, const uint8_t* w_tc,
                          const void* scales, const void* zeros, DType scale_dtype,
                          int64_t group_size, const void* bias, DType bias_dtype, void* out,
                          int64_t ldo, int64_t M, int64_t N, int64_t K, int split_k,
                          float* workspace, cudaStream_t stream);

}  // namespace torchslim::cuda
