// int4 weight-only (W4A16) GEMM for sm_80 / sm_90a, in the style of Marlin: the weights are
// shuffled offline (int4_gemm.h, the tc layout) so that every lane loads 16 bytes per k tile and
// finds in them the mma.sync B fragments it needs; the codes are dequantized in registers and
// never touch shared memory.
//
// Math (python/torchslim/reference/int4.py is the specification):
//
//   w[n, k]   = (code[n, k] - zeros[n, g]) * scales[n, g],  g = k / G
//   out[m, n] = sum_k x[m, k] * w[n, k] + bias[n]
//
// Kernels:
//
//   w4a16_tc_kernel   grid (N / 64 / 4 warps, split_k, M / (16 kMT)); warp w of block (bx, by, bz)
//                     owns the 64 output columns 64 (4 bx + w) and rows 16 kMT bz .. of them, over
//                     the k tiles of slice by. Per k tile a lane loads its 16 bytes of codes
//                     (kPrefetch tiles ahead, evict-first: the weights are read once), turns each
//                     pair of codes into a pair of fp16 / bf16 with one shift + lop3 + hsub2
//                     (exact: 1024 + c and 128 + c are representable), then subtracts the group's
//                     zero point and multiplies by its scale (hsub2, hmul2): 8 n8 tiles x 4
//                     values. The A fragments (x) come from global memory through L1, shared by
//                     the 4 warps.
//   splitk_reduce     split_k > 1: out = sum of the fp32 partial slices in a fixed order + bias.
//
// The weights are rounded exactly as the reference dequantizes in T: s and z rounded to T, then
// (c - z) and its product with s each rounded in T.
#include <algorithm>
#include <climits>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "int4_gemm.h"

namespace torchslim::cuda {
namespace {

using detail::ceil_div;
using detail::Epilogue;
using detail::is_aligned;

constexpr int kWarps = 4;  // warps per block, one 64-column tile each
constexpr int kThreads = 32 * kWarps;
constexpr int kPrefetch = 4;  // k tiles of codes in flight per lane (16 bytes each)
constexpr int64_t kMinTilesPerSplit = 8;
constexpr int64_t kMaxGridX = INT_MAX;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int kReduceThreads = 256;

// Rows of x per block: 16 kMT.
constexpr int m_tiles_for(int64_t M) { return M <= 16 ? 1 : (M <= 32 ? 2 : 4); }

// The packed pair type of T and the bits of (B, B) for the exponent trick: B + c (c in 0..15)
// is exact with c in the low mantissa bits (fp16: B = 1024; bf16: B = 128).
template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
  static constexpr uint32_t kBias = 0x64006400u;
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr uint32_t kBias = 0x43004300u;
};

template <typename T>
__device__ __forceinline__ typename Pair<T>::type as_pair(uint32_t bits) {
  typename Pair<T>::type v;
  memcpy(&v, &bits, sizeof(bits));
  return v;
}

template <typename T>
__device__ __forceinline__ uint32_t as_bits(typename Pair<T>::type v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits;
}

// (v, v) as a pair of T, rounded to nearest.
template <typename T>
__device__ __forceinline__ uint32_t splat(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return as_bits<T>(__float2half2_rn(v));
  } else {
    return as_bits<T>(__float2bfloat162_rn(v));
  }
}

// The codes at nibbles S and S + 4 of `word`, dequantized to a pair of T: (c - z) * s with each
// operation rounded in T, as the reference does. scale2 = (s, s), zero2 = (z, z).
template <typename T, int S>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, uint32_t scale2, uint32_t zero2) {
  const uint32_t biased = ((word >> (4 * S)) & 0x000f000fu) | Pair<T>::kBias;  // (B + c0, B + c1)
  const auto codes = __hsub2(as_pair<T>(biased), as_pair<T>(Pair<T>::kBias));  // exact
  return as_bits<T>(__hmul2(__hsub2(codes, as_pair<T>(zero2)), as_pair<T>(scale2)));
}

// x[row, k .. k + 1] as one 32-bit word (zero for rows past M). kPairLoads: x 4-byte aligned with
// an even row stride, so the pair is one aligned load.
template <typename T, bool kPairLoads>
__device__ __forceinline__ uint32_t load_x_pair(const T* row, int64_t k, bool valid) {
  if (!valid) return 0u;
  if constexpr (kPairLoads) {
    return __ldg(reinterpret_cast<const uint32_t*>(row + k));
  } else {
    const auto* p = reinterpret_cast<const unsigned short*>(row + k);
    return uint32_t(__ldg(p)) | (uint32_t(__ldg(p + 1)) << 16);
  }
}

// The scale and zero-point pairs of group g for this lane's 8 columns n0 + 8 j.
template <typename T>
__device__ __forceinline__ void load_group(const void* scales, const void* zeros, DType dtype,
                                           int64_t groups, int64_t n0, int64_t g,
                                           uint32_t (&scale2)[8], uint32_t (&zero2)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t i = (n0 + 8 * j) * groups + g;
    scale2[j] = splat<T>(detail::load_as_float(scales, i, dtype));
    zero2[j] = splat<T>(detail::load_as_float(zeros, i, dtype));
  }
}

// See the file comment. x: (M, K) T, row stride ldx; w_tc: the tc layout as 16-byte words;
// scales, zeros: (N, K / group_size) of `scale_dtype`. With gridDim.y > 1, ep.out is the fp32
// workspace (split_k, M, N) and slice blockIdx.y is written at offset blockIdx.y * M * N.
template <typename T, int kMT, bool kPairLoads>
__global__ void __launch_bounds__(kThreads)
    w4a16_tc_kernel(const T* __restrict__ x, int64_t ldx, const uint4* __restrict__ w_tc,
                    const void* __restrict__ scales, const void* __restrict__ zeros,
                    DType scale_dtype, int64_t group_size, int64_t M, int64_t N, int64_t K,
                    int64_t tiles_per_split, Epilogue ep) {
  const int lane = threadIdx.x & 31;
  const int64_t c = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (c * kInt4TcTileN >= N) return;  // whole warp; no block-level synchronisation below
  const int r = lane >> 2, q = lane & 3;
  const int64_t k_tiles = K / kInt4TcTileK;
  const int64_t t_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t t_end = min(k_tiles, t_begin + tiles_per_split);
  const int64_t m0 = int64_t(blockIdx.z) * 16 * kMT;

  // This lane's rows of the A fragments: m0 + 16 mt + r and 8 below, from column 2q.
  const T* xrow[kMT][2];
  bool xvalid[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + 16 * mt + 8 * h + r;
      xvalid[mt][h] = row < M;
      xrow[mt][h] = x + (xvalid[mt][h] ? row : 0) * ldx + 2 * q;
    }
  }

  float acc[kMT][8][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.0f;
    }
  }

  const uint4* wp = w_tc + c * k_tiles * 32 + lane;  // k tile t at wp[32 t]
  const int64_t groups = K / group_size, tiles_per_group = group_size / kInt4TcTileK;
  const int64_t n0 = c * kInt4TcTileN + r;
  uint32_t scale2[8], zero2[8];
  int64_t group = -1;

  auto step = [&](const uint4& codes, int64_t t) {
    const int64_t g = t / tiles_per_group;  // warp-uniform
    if (g != group) {
      load_group<T>(scales, zeros, scale_dtype, groups, n0, g, scale2, zero2);
      group = g;
    }
    const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
    uint32_t b[8][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j0 = 2 * i, j1 = 2 * i + 1;
      b[j0][0] = dequant_pair<T, 0>(words[i], scale2[j0], zero2[j0]);
      b[j1][0] = dequant_pair<T, 1>(words[i], scale2[j1], zero2[j1]);
      b[j0][1] = dequant_pair<T, 2>(words[i], scale2[j0], zero2[j0]);
      b[j1][1] = dequant_pair<T, 3>(words[i], scale2[j1], zero2[j1]);
    }
    const int64_t k = t * kInt4TcTileK;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      const uint32_t a[4] = {
          load_x_pair<T, kPairLoads>(xrow[mt][0], k, xvalid[mt][0]),
          load_x_pair<T, kPairLoads>(xrow[mt][1], k, xvalid[mt][1]),
          load_x_pair<T, kPairLoads>(xrow[mt][0], k + 8, xvalid[mt][0]),
          load_x_pair<T, kPairLoads>(xrow[mt][1], k + 8, xvalid[mt][1]),
      };
#pragma unroll
      for (int j = 0; j < 8; ++j) detail::mma_16816<T>(acc[mt][j], a, b[j]);
    }
  };

  // Two register buffers of kPrefetch tiles: one is consumed while the other is in flight.
  uint4 buf[2][kPrefetch] = {};
  auto load = [&](uint4(&dst)[kPrefetch], int64_t t0) {
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
      if (t0 + i < t_end) dst[i] = __ldcs(wp + (t0 + i) * 32);
    }
  };
  auto run = [&](const uint4(&src)[kPrefetch], int64_t t0) {
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
      if (t0 + i < t_end) step(src[i], t0 + i);
    }
  };
  load(buf[0], t_begin);
  for (int64_t t = t_begin; t < t_end; t += 2 * kPrefetch) {
    load(buf[1], t + kPrefetch);
    run(buf[0], t);
    load(buf[0], t + 2 * kPrefetch);
    run(buf[1], t + kPrefetch);
  }

  Epilogue out = ep;
  if (gridDim.y > 1) out.out = static_cast<float*>(ep.out) + int64_t(blockIdx.y) * M * N;
  detail::store_fragments(out, acc, m0 + r, c * kInt4TcTileN + 2 * q, M, N);
}

// out[m, n] = sum_s partial[s, m, n] + bias[n], the slices added in order s = 0, 1, ...
__global__ void __launch_bounds__(kReduceThreads)
    splitk_reduce_kernel(const float* __restrict__ partial, int split_k, int64_t M, int64_t N,
                         Epilogue ep) {
  const int64_t i = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (i >= M * N) return;
  float sum = 0.0f;
  for (int s = 0; s < split_k; ++s) sum += partial[s * M * N + i];
  const int64_t rows[1] = {i / N}, cols[1] = {i % N};
  detail::store_block(ep, rows, cols, M, N, [&](int, int) { return sum; });
}

template <typename T, int kMT>
cudaError_t launch_tc(const T* x, int64_t ldx, const uint8_t* w_tc, const void* scales,
                      const void* zeros, DType scale_dtype, int64_t group_size, const Epilogue& ep,
                      int64_t M, int64_t N, int64_t K, int split_k, float* workspace,
                      cudaStream_t stream) {
  const int64_t grid_x = ceil_div(N / kInt4TcTileN, kWarps), grid_z = ceil_div(M, 16 * kMT);
  if (grid_x > kMaxGridX || grid_z > kMaxGridYZ || split_k > kMaxGridYZ) {
    return cudaErrorInvalidValue;
  }
  const int64_t tiles_per_split = ceil_div(K / kInt4TcTileK, split_k);
  Epilogue kernel_ep = ep;
  if (split_k > 1)
    kernel_ep = Epilogue{nullptr, nullptr, nullptr, DType::kFloat32, workspace, N, DType::kFloat32};
  const bool pairs = is_aligned(x, 4) && (M == 1 || ldx % 2 == 0);
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(split_k),
                  static_cast<unsigned>(grid_z));
  const auto* w = reinterpret_cast<const uint4*>(w_tc);
  const cudaError_t status = TORCHSLIM_BOOL_SWITCH(pairs, kPairs, {
    w4a16_tc_kernel<T, kMT, kPairs><<<grid, kThreads, 0, stream>>>(
        x, ldx, w, scales, zeros, scale_dtype, group_size, M, N, K, tiles_per_split, kernel_ep);
    return cudaGetLastError();
  });
  if (status != cudaSuccess || split_k == 1) return status;
  const int64_t blocks = ceil_div(M * N, kReduceThreads);
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;
  splitk_reduce_kernel<<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(
      workspace, split_k, M, N, ep);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_m_tiles(const T* x, int64_t ldx, const uint8_t* w_tc, const void* scales,
                             const void* zeros, DType scale_dtype, int64_t group_size,
                             const Epilogue& ep, int64_t M, int64_t N, int64_t K, int split_k,
                             float* workspace, cudaStream_t stream) {
  switch (m_tiles_for(M)) {
    case 1:
      return launch_tc<T, 1>(x, ldx, w_tc, scales, zeros, scale_dtype, group_size, ep, M, N, K,
                             split_k, workspace, stream);
    case 2:
      return launch_tc<T, 2>(x, ldx, w_tc, scales, zeros, scale_dtype, group_size, ep, M, N, K,
                             split_k, workspace, stream);
    default:
      return launch_tc<T, 4>(x, ldx, w_tc, scales, zeros, scale_dtype, group_size, ep, M, N, K,
                             split_k, workspace, stream);
  }
}

}  // namespace

int w4a16_tc_default_split_k(int64_t M, int64_t N, int64_t K, int sm_count) {
  if (M <= 0 || N <= 0 || K <= 0) return 1;
  // One wave of 4 blocks (16 warps) per multiprocessor keeps enough 16-byte loads in flight.
  const int64_t blocks =
      ceil_div(ceil_div(N, kInt4TcTileN), kWarps) * ceil_div(M, 16 * m_tiles_for(M));
  const int64_t target = 4 * int64_t(sm_count > 0 ? sm_count : 1);
  const int64_t most = std::max<int64_t>(1, K / kInt4TcTileK / kMinTilesPerSplit);
  return static_cast<int>(std::min({ceil_div(target, blocks), most, kMaxGridYZ}));
}

cudaError_t w4a16_tc_gemm(const void* x, int64_t ldx, DType x_dtype, const uint8_t* w_tc,
                          const void* scales, const void* zeros, DType scale_dtype,
                          int64_t group_size, const void* bias, DType bias_dtype, void* out,
                          int64_t ldo, int64_t M, int64_t N, int64_t K, int split_k,
                          float* workspace, cudaStream_t stream) {
  TORCHSLIM_CUDA_REQUIRE(M >= 0 && N >= 0 && K > 0 && ldx >= 0 && ldo >= 0);
  TORCHSLIM_CUDA_REQUIRE(x_dtype == DType::kFloat16 || x_dtype == DType::kBFloat16);
  TORCHSLIM_CUDA_REQUIRE(detail::is_float_dtype(scale_dtype));
  TORCHSLIM_CUDA_REQUIRE(bias == nullptr || detail::is_float_dtype(bias_dtype));
  TORCHSLIM_CUDA_REQUIRE(N % kInt4TcTileN == 0 && K % kInt4TcTileK == 0);
  TORCHSLIM_CUDA_REQUIRE(group_size > 0 && group_size % kInt4TcTileK == 0 && K % group_size == 0);
  TORCHSLIM_CUDA_REQUIRE(split_k >= 1);
  if (M == 0 || N == 0) return cudaSuccess;
  TORCHSLIM_CUDA_REQUIRE(x != nullptr && w_tc != nullptr && is_aligned(w_tc, 16));
  TORCHSLIM_CUDA_REQUIRE(scales != nullptr && zeros != nullptr);
  TORCHSLIM_CUDA_REQUIRE(out != nullptr && (M == 1 || ldo >= N));
  TORCHSLIM_CUDA_REQUIRE(split_k == 1 || workspace != nullptr);

  const Epilogue ep{nullptr, nullptr, bias, bias_dtype, out, ldo, x_dtype};
  if (x_dtype == DType::kFloat16) {
    return dispatch_m_tiles(static_cast<const __half*>(x), ldx, w_tc, scales, zeros, scale_dtype,
                            group_size, ep, M, N, K, split_k, workspace, stream);
  }
  return dispatch_m_tiles(static_cast<const __nv_bfloat16*>(x), ldx, w_tc, scales, zeros,
                          scale_dtype, group_size, ep, M, N, K, split_k, workspace, stream);
}

}  // namespace torchslim::cuda
