// int8 kernels for sm_80 / sm_90a: per-token quantization, W8A8 GEMM, W8A16 GEMM.
//
// Math (python/torchslim/reference/int8.py is the specification):
//
//   quantize_per_token   scale[m]  = amax_k |x[m, k]| / 127        (1 if that is 0, NaN if the
//                                                                    row holds an inf or a NaN)
//                        x_q[m, k] = clamp(rint(x[m, k] / scale[m]), -127, 127)
//   int8_scaled_mm       acc[m, n] = sum_k a[m, k] * b[n, k]       (int32, exact)
//                        out[m, n] = acc[m, n] * a_scale[m] * b_scale[n] + bias[n]
//   int8_weight_only     acc[m, n] = sum_k x[m, k] * w[n, k]       (fp32 accumulation)
//                        out[m, n] = acc[m, n] * w_scale[n] + bias[n]
//
// Kernels (all row-major, K contiguous; "aligned" = 16-byte aligned base and leading dims):
//
//   quantize_per_token_kernel  one 256-thread block per row: amax pass, then code pass (the row
//                              is re-read from L1/L2); 8-element vector loads when aligned.
//   gemv_kernel                M <= 8, both GEMMs: one warp per row n of the (N, K) int8
//                              matrix, 16-byte loads of w and x, dp4a (int8 x) or fp32 FMA;
//                              up to 8 activation rows share each weight load.
//   int8_gemm_kernel           M > 8, int8 x int8: block tile 128x128x64, 8 warps of 64x32,
//                              3-stage cp.async pipeline, ldmatrix + mma.sync.m16n8k32.s8.
//   w8_tc_gemm_kernel          M > 8, fp16/bf16 x int8: block tile 128x128x32, 8 warps of
//                              64x32, 4-stage cp.async pipeline, int8 -> fp16/bf16 in registers,
//                              mma.sync.m16n8k16 with fp32 accumulation.
//   w8_f32_gemm_kernel         M > 8, fp32 x int8: 64x64x16 shared-memory SIMT tile, fp32 FMA.
//
// The tensor-core kernels take a template flag kAligned; without alignment (odd K, odd leading
// dims, offset pointers) the same kernel stages tiles with bounds-checked scalar loads instead
// of cp.async. Out-of-range rows and k beyond K are zero-filled in shared memory, never read.
#include <climits>
#include <type_traits>

#include "common.cuh"
#include "int8_gemm.h"

namespace torchslim::cuda {
namespace {

using detail::ceil_div;
using detail::chunk_elems;
using detail::copy_chunk;
using detail::Epilogue;
using detail::is_aligned;
using detail::swz_row64;

constexpr int64_t kMaxGridX = INT_MAX;
constexpr int64_t kMaxGridY = 65535;

// =============================================================================================
// quantize_per_token
// =============================================================================================

constexpr int kQuantThreads = 256;
constexpr int kQuantVec = 8;  // elements per vector access on the aligned path

// |v| as fp32 bits: non-negative floats order like their bit patterns and NaN sorts above
// +inf, so an unsigned max gives amax (NaN-propagating, unaffected by -ftz).
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

__device__ __forceinline__ int32_t quantize_code(float v, float scale) {
  return min(max(detail::round_to_int(detail::div_rn(v, scale)), -127), 127);
}

// Eight consecutive elements of p (16-byte aligned) widened to fp32.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = detail::bits16_to_float<T>(words[i] & 0xffffu);
      v[2 * i + 1] = detail::bits16_to_float<T>(words[i] >> 16);
    }
  }
}

// Block-wide max of one value per thread (called once per block).
__device__ __forceinline__ uint32_t block_max(uint32_t v) {
  __shared__ uint32_t partial[kQuantThreads / 32];
  v = __reduce_max_sync(0xffffffffu, v);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  v = partial[0];
#pragma unroll
  for (int i = 1; i < kQuantThreads / 32; ++i) v = max(v, partial[i]);
  return v;
}

// Grid: (M,) blocks of kQuantThreads; block m quantizes row m.
//   x: (M, K) T, row stride ldx.  x_q: (M, K) int8 contiguous.  x_scale: (M,) fp32.
// kVec: x 16-byte aligned with 16-byte row pitch, K % 8 == 0, x_q 8-byte aligned.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_per_token_kernel(const T* __restrict__ x, int64_t ldx, int64_t K,
                              int8_t* __restrict__ x_q, float* __restrict__ x_scale) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * ldx;
  int8_t* qr = x_q + row * K;

  uint32_t amax = 0;
  if constexpr (kVec) {
    for (int64_t k = int64_t(threadIdx.x) * kQuantVec; k < K; k += kQuantThreads * kQuantVec) {
      float v[kQuantVec];
      load8(xr + k, v);
#pragma unroll
      for (int e = 0; e < kQuantVec; ++e) amax = max(amax, abs_bits(v[e]));
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kQuantThreads) {
      amax = max(amax, abs_bits(detail::to_float(xr[k])));
    }
  }
  amax = block_max(amax);

  // scale = amax / 127 (IEEE), replaced by 1 when it is +-0 (compared as bits: immune to FTZ).
  // A row holding an inf or a NaN (amax's bits at or above inf's) has no scale: NaN, codes 0.
  const bool finite = amax < 0x7f800000u;
  float scale =
      finite ? detail::div_rn(__uint_as_float(amax), 127.0f) : __uint_as_float(0x7fc00000u);
  if ((__float_as_uint(scale) & 0x7fffffffu) == 0) scale = 1.0f;
  if (threadIdx.x == 0) x_scale[row] = scale;

  if constexpr (kVec) {
    for (int64_t k = int64_t(threadIdx.x) * kQuantVec; k < K; k += kQuantThreads * kQuantVec) {
      float v[kQuantVec];
      load8(xr + k, v);
      uint32_t packed[2] = {0u, 0u};
#pragma unroll
      for (int e = 0; e < kQuantVec; ++e) {
        const uint32_t code = finite ? static_cast<uint8_t>(quantize_code(v[e], scale)) : 0u;
        packed[e / 4] |= code << (8 * (e % 4));
      }
      *reinterpret_cast<uint2*>(qr + k) = make_uint2(packed[0], packed[1]);
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kQuantThreads) {
      qr[k] = finite ? static_cast<int8_t>(quantize_code(detail::to_float(xr[k]), scale)) : 0;
    }
  }
}

// =============================================================================================
// GEMV path (M <= 8), shared by both GEMMs
// =============================================================================================

constexpr int kGemvWarps = 4;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int64_t kGemvMaxRows = 8;

__device__ __forceinline__ float s8_byte(uint32_t word, int i) {
  return static_cast<float>(static_cast<int8_t>((word >> (8 * i)) & 0xffu));
}

// Sixteen consecutive elements of p (16-byte aligned) widened to fp32.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&v)[16]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float part[8];
    load8(p + 8 * h, part);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[8 * h + e] = part[e];
  }
}

// Per-activation-type arithmetic of the GEMV: int8 x -> exact int32 dp4a; float x -> fp32 FMA.
template <typename XT>
struct GemvOps {
  using Acc = float;
  struct Weights {  // 16 weight codes as fp32, converted once and shared by all rows
    float f[16];
    __device__ __forceinline__ explicit Weights(const int4& w) {
      const uint32_t words[4] = {static_cast<uint32_t>(w.x), static_cast<uint32_t>(w.y),
                                 static_cast<uint32_t>(w.z), static_cast<uint32_t>(w.w)};
#pragma unroll
      for (int i = 0; i < 16; ++i) f[i] = s8_byte(words[i / 4], i % 4);
    }
  };
  static __device__ __forceinline__ float dot16(const XT* x, const Weights& w, float acc) {
    float xv[16];
    load16(x, xv);
#pragma unroll
    for (int i = 0; i < 16; ++i) acc = fmaf(xv[i], w.f[i], acc);
    return acc;
  }
  static __device__ __forceinline__ float dot1(XT x, int8_t w, float acc) {
    return fmaf(detail::to_float(x), static_cast<float>(w), acc);
  }
};

template <>
struct GemvOps<int8_t> {
  using Acc = int32_t;
  struct Weights {
    int4 v;
    __device__ __forceinline__ explicit Weights(const int4& w) : v(w) {}
  };
  static __device__ __forceinline__ int32_t dot16(const int8_t* x, const Weights& w, int32_t acc) {
    const int4 xv = *reinterpret_cast<const int4*>(x);
    acc = __dp4a(xv.x, w.v.x, acc);
    acc = __dp4a(xv.y, w.v.y, acc);
    acc = __dp4a(xv.z, w.v.z, acc);
    acc = __dp4a(xv.w, w.v.w, acc);
    return acc;
  }
  static __device__ __forceinline__ int32_t dot1(int8_t x, int8_t w, int32_t acc) {
    return acc + static_cast<int32_t>(x) * static_cast<int32_t>(w);
  }
};

// Grid: (ceil(N / kGemvWarps), ceil(M / kRows)); warp w of block (bx, by) computes
// out[by*kRows : by*kRows + kRows, bx*kGemvWarps + w].
//   x: (M, K) XT (int8 / fp16 / bf16 / fp32), row stride ldx.  w: (N, K) int8, row stride ldw.
// kVec: x and w 16-byte aligned with 16-byte row pitches; k < K & ~15 then goes 16 elements per
// lane per step, the remaining K % 16 columns one per lane.
template <typename XT, int kRows, bool kVec>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(const XT* __restrict__ x, int64_t ldx, const int8_t* __restrict__ w, int64_t ldw,
                int64_t M, int64_t N, int64_t K, Epilogue ep) {
  using Ops = GemvOps<XT>;
  using Acc = typename Ops::Acc;
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  const int64_t m0 = int64_t(blockIdx.y) * kRows;
  if (n >= N) return;  // whole warp: no block-level synchronisation below
  const int rows = static_cast<int>(min(int64_t(kRows), M - m0));
  const int8_t* wr = w + n * ldw;

  Acc acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = Acc(0);

  int64_t k_scalar = 0;  // first column handled by the scalar loop
  if constexpr (kVec) {
    k_scalar = K & ~int64_t(15);
#pragma unroll 2
    for (int64_t k = int64_t(lane) * 16; k < k_scalar; k += 32 * 16) {
      const typename Ops::Weights wk(__ldg(reinterpret_cast<const int4*>(wr + k)));
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) acc[r] = Ops::dot16(x + (m0 + r) * ldx + k, wk, acc[r]);
      }
    }
  }
  for (int64_t k = k_scalar + lane; k < K; k += 32) {
    const int8_t wk = wr[k];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < rows) acc[r] = Ops::dot1(x[(m0 + r) * ldx + k], wk, acc[r]);
    }
  }

  // Reduce across the warp; lane r then stores row r.
  Acc mine = Acc(0);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    acc[r] = detail::warp_sum(acc[r]);
    if (lane == r) mine = acc[r];
  }
  if (lane < rows) {
    const int64_t row[1] = {m0 + lane}, col[1] = {n};
    detail::store_block(ep, row, col, M, N, [&](int, int) { return mine; });
  }
}

template <typename XT, int kRows>
cudaError_t launch_gemv_rows(const XT* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t M,
                             int64_t N, int64_t K, const Epilogue& ep, cudaStream_t stream) {
  const int64_t grid_x = ceil_div(N, kGemvWarps), grid_y = ceil_div(M, kRows);
  if (grid_x > kMaxGridX || grid_y > kMaxGridY) return cudaErrorInvalidValue;
  const bool vec = is_aligned(x, 16) && is_aligned(w, 16) &&
                   (M == 1 || (ldx * int64_t(sizeof(XT))) % 16 == 0) && (N == 1 || ldw % 16 == 0);
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  return TORCHSLIM_BOOL_SWITCH(vec, kVec, {
    gemv_kernel<XT, kRows, kVec><<<grid, kGemvThreads, 0, stream>>>(x, ldx, w, ldw, M, N, K, ep);
    return cudaGetLastError();
  });
}

// Picks the row-block size: the smallest of 1, 2, 4, 8 that covers M (M <= 8 here).
template <typename XT>
cudaError_t launch_gemv(const XT* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t M,
                        int64_t N, int64_t K, const Epilogue& ep, cudaStream_t stream) {
  if (M <= 1) return launch_gemv_rows<XT, 1>(x, ldx, w, ldw, M, N, K, ep, stream);
  if (M <= 2) return launch_gemv_rows<XT, 2>(x, ldx, w, ldw, M, N, K, ep, stream);
  if (M <= 4) return launch_gemv_rows<XT, 4>(x, ldx, w, ldw, M, N, K, ep, stream);
  return launch_gemv_rows<XT, 8>(x, ldx, w, ldw, M, N, K, ep, stream);
}

// =============================================================================================
// int8 x int8 tensor-core GEMM (M > 8)
// =============================================================================================

namespace mm8 {
constexpr int kBM = 128, kBN = 128, kBK = 64;  // block tile; kBK in int8 elements = bytes
constexpr int kStages = 3;
constexpr int kThreads = 256;  // 8 warps: 2 (M) x 4 (N)
constexpr int kWarpsN = 4;
constexpr int kWM = 64, kWN = 32;  // warp tile
constexpr int kMTiles = kWM / 16, kNTiles = kWN / 8;
constexpr int kTileA = kBM * kBK, kTileB = kBN * kBK;  // bytes
constexpr int kStageBytes = kTileA + kTileB;
constexpr int kSmemBytes = kStages * kStageBytes;  // 48 KiB
static_assert(kBM == kBN, "one loader serves both operand tiles");
static_assert((kBM * kBK / 16) % kThreads == 0, "chunks per thread must be whole");
}  // namespace mm8

// Stages rows [row0, row0 + 128) x columns [k0, k0 + 64) of the (rows, K) int8 matrix g (row
// stride ld) into a 128 x 64-byte swizzled tile; out-of-range bytes are zero.
template <bool kAsync>
__device__ __forceinline__ void load_s8_tile(uint8_t* tile, const int8_t* g, int64_t ld,
                                             int64_t row0, int64_t rows, int64_t k0, int64_t K) {
  using namespace mm8;
#pragma unroll
  for (int i = 0; i < kBM * kBK / 16 / kThreads; ++i) {
    const int id = threadIdx.x + i * kThreads;
    const int r = id >> 2, c = id & 3;
    const int64_t gr = row0 + r, gk = k0 + c * 16;
    const int bytes = chunk_elems(gr, rows, gk, K, 16);
    copy_chunk<kAsync>(tile + swz_row64(r, c), g + (bytes > 0 ? gr * ld + gk : 0), bytes);
  }
}

// Grid: (ceil(M / 128), ceil(N / 128)); block (bx, by) computes out[bx*128 +: 128, by*128 +: 128].
//   a: (M, K) int8, row stride lda.  b: (N, K) int8, row stride ldb.  Dynamic smem: kSmemBytes.
// Fragments (PTX m16n8k32 .s8, g = lane / 4, t = lane % 4): A regs {a0, a1, a2, a3} hold rows
// {g, g+8, g, g+8} x bytes {4t..4t+3, same, 16+4t.., same}; B regs {b0, b1} hold column n = g x
// k {4t..4t+3, 16+4t..}; C regs {c0, c1, c2, c3} hold (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
// One ldmatrix.x4 yields a whole A fragment, or the B fragments of two adjacent n8 tiles.
template <bool kAligned>
__global__ void __launch_bounds__(mm8::kThreads, 2)
    int8_gemm_kernel(const int8_t* __restrict__ a, int64_t lda, const int8_t* __restrict__ b,
                     int64_t ldb, int64_t M, int64_t N, int64_t K, Epilogue ep) {
  using namespace mm8;
  extern __shared__ __align__(128) uint8_t smem[];
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int64_t k_tiles = ceil_div(K, kBK);

  auto load_stage = [&](int stage, int64_t kt) {
    uint8_t* sa = smem + stage * kStageBytes;
    load_s8_tile<kAligned>(sa, a, lda, m0, M, kt * kBK, K);
    load_s8_tile<kAligned>(sa + kTileA, b, ldb, n0, N, kt * kBK, K);
  };

  int32_t acc[kMTiles][kNTiles][4];
  detail::zero_fragments(acc);

  detail::start_pipeline<kStages>(k_tiles, load_stage);

  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    detail::cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt visible to all; everyone is done with tile kt-1's stage
    const int64_t next = kt + kStages - 1;
    if (next < k_tiles) load_stage(static_cast<int>(next % kStages), next);
    detail::cp_async_commit();

    const uint8_t* sa = smem + static_cast<int>(kt % kStages) * kStageBytes;
    const uint8_t* sb = sa + kTileA;
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      uint32_t af[kMTiles][4];
      uint32_t bf[kNTiles][2];
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        // lanes 0-15: rows 0-15 at k chunk 2ks; lanes 16-31: rows 0-15 at chunk 2ks+1.
        const int r = wm * kWM + mi * 16 + (lane & 15);
        detail::ldmatrix_x4(af[mi], sa + swz_row64(r, 2 * ks + (lane >> 4)));
      }
#pragma unroll
      for (int nj = 0; nj < kNTiles / 2; ++nj) {
        // matrices: (n 0-7, chunk 2ks), (n 0-7, 2ks+1), (n 8-15, 2ks), (n 8-15, 2ks+1).
        const int r = wn * kWN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t q[4];
        detail::ldmatrix_x4(q, sb + swz_row64(r, 2 * ks + ((lane >> 3) & 1)));
        bf[2 * nj][0] = q[0];
        bf[2 * nj][1] = q[1];
        bf[2 * nj + 1][0] = q[2];
        bf[2 * nj + 1][1] = q[3];
      }
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNTiles; ++ni) detail::mma_s8_16832(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  detail::cp_async_wait<0>();

  detail::store_fragments(ep, acc, m0 + wm * kWM + (lane >> 2), n0 + wn * kWN + 2 * (lane & 3), M,
                          N);
}

template <bool kAligned>
cudaError_t launch_int8_gemm(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t M,
                             int64_t N, int64_t K, const Epilogue& ep, cudaStream_t stream) {
  const int64_t grid_x = ceil_div(M, mm8::kBM), grid_y = ceil_div(N, mm8::kBN);
  if (grid_x > kMaxGridX || grid_y > kMaxGridY) return cudaErrorInvalidValue;
  auto kernel = int8_gemm_kernel<kAligned>;
  cudaError_t err = detail::set_smem_limit(kernel, mm8::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  kernel<<<grid, mm8::kThreads, mm8::kSmemBytes, stream>>>(a, lda, b, ldb, M, N, K, ep);
  return cudaGetLastError();
}

// =============================================================================================
// W8A16 tensor-core GEMM (M > 8, fp16 / bf16 activations)
// =============================================================================================

namespace w8 {
constexpr int kBM = 128, kBN = 128, kBK = 32;  // kBK in elements
constexpr int kStages = 4;
constexpr int kThreads = 256;  // 8 warps: 2 (M) x 4 (N)
constexpr int kWarpsN = 4;
constexpr int kWM = 64, kWN = 32;
constexpr int kMTiles = kWM / 16, kNTiles = kWN / 8;
constexpr int kTileX = kBM * kBK * 2;  // bytes: 64-byte rows of 32 fp16/bf16
constexpr int kTileW = kBN * kBK;      // bytes: 32-byte rows of 32 int8
constexpr int kStageBytes = kTileX + kTileW;
constexpr int kSmemBytes = kStages * kStageBytes;  // 48 KiB
static_assert((kBM * kBK * 2 / 16) % kThreads == 0 && kBN * kBK / 16 == kThreads,
              "chunks per thread must be whole");
}  // namespace w8

// x tile (64-byte rows): chunk c of row r goes to chunk c ^ (2 * ((r / 2) % 2)). The A loads
// below read 8 bytes per lane from chunks {2j, 2j+1} of rows g = 0..7; with this swizzle the
// rows of each half-warp (g = 0..3 or 4..7) cover all 32 banks exactly once.
__device__ __forceinline__ int swz_x(int r, int c) {
  return r * 64 + ((c ^ (((r >> 1) & 1) << 1)) << 4);
}

// w tile (32-byte rows): chunk c of row r goes to chunk c ^ ((r / 4) % 2), so chunk c of 8
// consecutive rows (one ldmatrix matrix) covers 8 distinct 16-byte bank groups.
__device__ __forceinline__ int swz_w(int r, int c) { return r * 32 + ((c ^ ((r >> 2) & 1)) << 4); }

// Grid: (ceil(M / 128), ceil(N / 128)). T = __half or __nv_bfloat16. Dynamic smem: kSmemBytes.
//   x: (M, K) T, row stride ldx.  w: (N, K) int8, row stride ldw.
//
// k permutation. The B fragment of mma.m16n8k16 wants, per lane (g = lane/4, t = lane%4),
// w[n=g][k=2t, 2t+1] and w[n=g][k=2t+8, 2t+9]; ldmatrix on the int8 tile hands each lane the
// four consecutive bytes w[g][4t .. 4t+3] instead. A dot product does not care about the order
// of k as long as A and B agree, so within every 16-wide k step we let the mma's logical column
// 2t+i (i = 0, 1) be physical column 4t+i and logical column 2t+8+i be physical 4t+2+i. Then
//   B: b0 = (w[g][4t], w[g][4t+1]),   b1 = (w[g][4t+2], w[g][4t+3])   -- one ldmatrix word,
//   A: a0 = (x[g][4t], x[g][4t+1]),   a2 = (x[g][4t+2], x[g][4t+3])   -- one 8-byte load,
//      a1, a3 likewise from row g+8.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(w8::kThreads, 2)
    w8_tc_gemm_kernel(const T* __restrict__ x, int64_t ldx, const int8_t* __restrict__ w,
                      int64_t ldw, int64_t M, int64_t N, int64_t K, Epilogue ep) {
  using namespace w8;
  extern __shared__ __align__(128) uint8_t smem[];
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int g = lane >> 2, t = lane & 3;
  const int64_t k_tiles = ceil_div(K, kBK);

  auto load_stage = [&](int stage, int64_t kt) {
    uint8_t* sx = smem + stage * kStageBytes;
    uint8_t* sw = sx + kTileX;
    const int64_t k0 = kt * kBK;
#pragma unroll
    for (int i = 0; i < kBM * kBK * 2 / 16 / kThreads; ++i) {  // x: 128 rows x 4 chunks of 8
      const int id = tid + i * kThreads;
      const int r = id >> 2, c = id & 3;
      const int64_t gr = m0 + r, gk = k0 + c * 8;
      const int elems = chunk_elems(gr, M, gk, K, 8);
      copy_chunk<kAligned>(sx + swz_x(r, c), x + (elems > 0 ? gr * ldx + gk : 0),
                           elems * int(sizeof(T)));
    }
    {  // w: 128 rows x 2 chunks of 16
      const int r = tid >> 1, c = tid & 1;
      const int64_t gr = n0 + r, gk = k0 + c * 16;
      const int bytes = chunk_elems(gr, N, gk, K, 16);
      copy_chunk<kAligned>(sw + swz_w(r, c), w + (bytes > 0 ? gr * ldw + gk : 0), bytes);
    }
  };

  float acc[kMTiles][kNTiles][4];
  detail::zero_fragments(acc);

  detail::start_pipeline<kStages>(k_tiles, load_stage);

  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    detail::cp_async_wait<kStages - 2>();
    __syncthreads();
    const int64_t next = kt + kStages - 1;
    if (next < k_tiles) load_stage(static_cast<int>(next % kStages), next);
    detail::cp_async_commit();

    const uint8_t* sx = smem + static_cast<int>(kt % kStages) * kStageBytes;
    const uint8_t* sw = sx + kTileX;

    // Weight codes for the whole 32-wide k tile: wq[ni][j] = w[n = g][16j + 4t .. 16j + 4t + 3].
    uint32_t wq[kNTiles][2];
#pragma unroll
    for (int nj = 0; nj < kNTiles / 2; ++nj) {
      // matrices: (n 0-7, chunk 0), (n 0-7, chunk 1), (n 8-15, chunk 0), (n 8-15, chunk 1).
      const int r = wn * kWN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
      uint32_t q[4];
      detail::ldmatrix_x4(q, sw + swz_w(r, (lane >> 3) & 1));
      wq[2 * nj][0] = q[0];
      wq[2 * nj][1] = q[1];
      wq[2 * nj + 1][0] = q[2];
      wq[2 * nj + 1][1] = q[3];
    }

#pragma unroll
    for (int j = 0; j < kBK / 16; ++j) {
      uint32_t bf[kNTiles][2];
#pragma unroll
      for (int ni = 0; ni < kNTiles; ++ni)
        detail::s8x4_to_pairs<T>(wq[ni][j], bf[ni][0], bf[ni][1]);
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        // Physical columns 16j + 4t .. +3 = bytes 32j + 8t .. +7 = chunk 2j + t/2, offset 8(t%2).
        const int r = wm * kWM + mi * 16 + g;
        const int c = 2 * j + (t >> 1), off = (t & 1) * 8;
        const uint2 lo = *reinterpret_cast<const uint2*>(sx + swz_x(r, c) + off);
        const uint2 hi = *reinterpret_cast<const uint2*>(sx + swz_x(r + 8, c) + off);
        const uint32_t af[4] = {lo.x, hi.x, lo.y, hi.y};
#pragma unroll
        for (int ni = 0; ni < kNTiles; ++ni) detail::mma_16816<T>(acc[mi][ni], af, bf[ni]);
      }
    }
  }
  detail::cp_async_wait<0>();

  detail::store_fragments(ep, acc, m0 + wm * kWM + g, n0 + wn * kWN + 2 * t, M, N);
}

template <typename T, bool kAligned>
cudaError_t launch_w8_tc_gemm(const T* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t M,
                              int64_t N, int64_t K, const Epilogue& ep, cudaStream_t stream) {
  const int64_t grid_x = ceil_div(M, w8::kBM), grid_y = ceil_div(N, w8::kBN);
  if (grid_x > kMaxGridX || grid_y > kMaxGridY) return cudaErrorInvalidValue;
  auto kernel = w8_tc_gemm_kernel<T, kAligned>;
  cudaError_t err = detail::set_smem_limit(kernel, w8::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  kernel<<<grid, w8::kThreads, w8::kSmemBytes, stream>>>(x, ldx, w, ldw, M, N, K, ep);
  return cudaGetLastError();
}

// =============================================================================================
// W8A32 SIMT GEMM (M > 8, fp32 activations)
// =============================================================================================

namespace f32 {
constexpr int kBM = 64, kBN = 64, kBK = 16;
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each (strided by 16)
}  // namespace f32

// Grid: (ceil(M / 64), ceil(N / 64)). Thread (tx, ty) = (tid % 16, tid / 16) computes
// out[m0 + ty + 16i, n0 + tx + 16j] for i, j in 0..3. Any alignment; bounds-checked loads.
//   x: (M, K) fp32, row stride ldx.  w: (N, K) int8, row stride ldw.
__global__ void __launch_bounds__(f32::kThreads)
    w8_f32_gemm_kernel(const float* __restrict__ x, int64_t ldx, const int8_t* __restrict__ w,
                       int64_t ldw, int64_t M, int64_t N, int64_t K, Epilogue ep) {
  using namespace f32;
  __shared__ float xs[kBK][kBM + 1];  // k-major, padded against bank conflicts
  __shared__ float ws[kBK][kBN + 1];
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
    for (int i = 0; i < kBM * kBK / kThreads; ++i) {
      const int id = threadIdx.x + i * kThreads;
      const int r = id / kBK, kk = id % kBK;  // consecutive threads read consecutive k
      const int64_t gk = k0 + kk, gm = m0 + r, gn = n0 + r;
      xs[kk][r] = (gm < M && gk < K) ? x[gm * ldx + gk] : 0.0f;
      ws[kk][r] = (gn < N && gk < K) ? static_cast<float>(w[gn * ldw + gk]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float xv[4], wv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) wv[j] = ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
    }
    __syncthreads();
  }

  int64_t rows[4], cols[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) rows[i] = m0 + ty + 16 * i, cols[i] = n0 + tx + 16 * i;
  detail::store_block(ep, rows, cols, M, N, [&](int i, int j) { return acc[i][j]; });
}

cudaError_t launch_w8_f32_gemm(const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t M,
                               int64_t N, int64_t K, const Epilogue& ep, cudaStream_t stream) {
  const int64_t grid_x = ceil_div(M, f32::kBM), grid_y = ceil_div(N, f32::kBN);
  if (grid_x > kMaxGridX || grid_y > kMaxGridY) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  w8_f32_gemm_kernel<<<grid, f32::kThreads, 0, stream>>>(x, ldx, w, ldw, M, N, K, ep);
  return cudaGetLastError();
}

// Path selection of int8_weight_only_gemm for activation type T.
template <typename T>
cudaError_t launch_weight_only(const T* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t M,
                               int64_t N, int64_t K, const Epilogue& ep, cudaStream_t stream) {
  if (M <= kGemvMaxRows) return launch_gemv<T>(x, ldx, w, ldw, M, N, K, ep, stream);
  if constexpr (std::is_same_v<T, float>) {
    return launch_w8_f32_gemm(x, ldx, w, ldw, M, N, K, ep, stream);
  } else {
    const bool aligned =
        is_aligned(x, 16) && is_aligned(w, 16) && ldx % 8 == 0 && (N == 1 || ldw % 16 == 0);
    return TORCHSLIM_BOOL_SWITCH(aligned, kAligned, {
      return launch_w8_tc_gemm<T, kAligned>(x, ldx, w, ldw, M, N, K, ep, stream);
    });
  }
}

}  // namespace

// =============================================================================================
// Public entry points: argument checks, then path selection.
// =============================================================================================

cudaError_t quantize_per_token(const void* x, int64_t ldx, DType x_dtype, int64_t M, int64_t K,
                               int8_t* x_q, float* x_scale, cudaStream_t stream) {
  TORCHSLIM_CUDA_REQUIRE(M >= 0 && K >= 0 && ldx >= 0);
  TORCHSLIM_CUDA_REQUIRE(detail::is_float_dtype(x_dtype));
  if (M == 0) return cudaSuccess;
  TORCHSLIM_CUDA_REQUIRE(x_scale != nullptr);
  TORCHSLIM_CUDA_REQUIRE(K == 0 || (x != nullptr && x_q != nullptr));
  TORCHSLIM_CUDA_REQUIRE(M <= kMaxGridX);
  return TORCHSLIM_DISPATCH_FLOAT(x_dtype, T, {
    const bool vec = is_aligned(x, 16) && (M == 1 || (ldx * int64_t(sizeof(T))) % 16 == 0) &&
                     K % kQuantVec == 0 && is_aligned(x_q, 8);
    return TORCHSLIM_BOOL_SWITCH(vec, kVec, {
      quantize_per_token_kernel<T, kVec><<<static_cast<unsigned>(M), kQuantThreads, 0, stream>>>(
          static_cast<const T*>(x), ldx, K, x_q, x_scale);
      return cudaGetLastError();
    });
  });
}

cudaError_t int8_scaled_mm(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb,
                           const float* a_scale, const float* b_scale, const void* bias,
                           DType bias_dtype, void* out, int64_t ldo, DType out_dtype, int64_t M,
                           int64_t N, int64_t K, cudaStream_t stream) {
  TORCHSLIM_CUDA_REQUIRE(M >= 0 && N >= 0 && K >= 0 && lda >= 0 && ldb >= 0 && ldo >= 0);
  TORCHSLIM_CUDA_REQUIRE(detail::is_float_dtype(out_dtype) || out_dtype == DType::kInt32);
  TORCHSLIM_CUDA_REQUIRE(out_dtype != DType::kInt32 ||
                         (a_scale == nullptr && b_scale == nullptr && bias == nullptr));
  TORCHSLIM_CUDA_REQUIRE(bias == nullptr || detail::is_float_dtype(bias_dtype));
  if (M == 0 || N == 0) return cudaSuccess;
  TORCHSLIM_CUDA_REQUIRE(out != nullptr && (M == 1 || ldo >= N));
  TORCHSLIM_CUDA_REQUIRE(K == 0 || (a != nullptr && b != nullptr));

  const Epilogue ep{a_scale, b_scale, bias, bias_dtype, out, ldo, out_dtype};
  if (M <= kGemvMaxRows) return launch_gemv<int8_t>(a, lda, b, ldb, M, N, K, ep, stream);
  const bool aligned =
      is_aligned(a, 16) && is_aligned(b, 16) && lda % 16 == 0 && (N == 1 || ldb % 16 == 0);
  return TORCHSLIM_BOOL_SWITCH(aligned, kAligned, {
    return launch_int8_gemm<kAligned>(a, lda, b, ldb, M, N, K, ep, stream);
  });
}

cudaError_t int8_weight_only_gemm(const void* x, int64_t ldx, DType x_dtype, const int8_t* w,
                                  int64_t ldw, const float* w_scale, const void* bias,
                                  DType bias_dtype, void* out, int64_t ldo, int64_t M, int64_t N,
                                  int64_t K, cudaStream_t stream) {
  TORCHSLIM_CUDA_REQUIRE(M >= 0 && N >= 0 && K >= 0 && ldx >= 0 && ldw >= 0 && ldo >= 0);
  TORCHSLIM_CUDA_REQUIRE(detail::is_float_dtype(x_dtype));
  TORCHSLIM_CUDA_REQUIRE(bias == nullptr || detail::is_float_dtype(bias_dtype));
  if (M == 0 || N == 0) return cudaSuccess;
  TORCHSLIM_CUDA_REQUIRE(out != nullptr && (M == 1 || ldo >= N));
  TORCHSLIM_CUDA_REQUIRE(K == 0 || (x != nullptr && w != nullptr));

  const Epilogue ep{nullptr, w_scale, bias, bias_dtype, out, ldo, x_dtype};
  return TORCHSLIM_DISPATCH_FLOAT(x_dtype, T, {
    return launch_weight_only<T>(static_cast<const T*>(x), ldx, w, ldw, M, N, K, ep, stream);
  });
}

}  // namespace torchslim::cuda
