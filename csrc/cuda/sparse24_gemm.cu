// 2:4 sparse GEMM on the sparse tensor cores (sm_80 / sm_90a): out = x @ W.T * scales + bias,
// W (N, K) in the 2:4 format of python/torchslim/reference/sparse.py (the specification).
//
// The tensor cores take the sparse operand as A (rows x k), so the kernel computes the
// transposed product D = W @ x.T: W's rows are the mma's M dimension (m16 tiles), x's rows its N
// dimension (n8 tiles), and D[n, m] is stored to out[m, n].
//
// Block tile 128 (W rows) x 128 (x rows) x 64 (k); 8 warps of 64 W rows x 32 x rows; 3-stage
// cp.async pipeline. A stage holds, in shared memory:
//   values  128 rows x 32 kept values  (64-byte rows, swizzled; A operands by ldmatrix.x4)
//   x       128 rows x 64 k            (128-byte rows, swizzled; B operands by ldmatrix.x4)
//   meta    128 rows x 8 bytes         (the stage's 16 groups of each row)
//
// Fragments (PTX mma.sp.m16n8k32 .f16/.bf16; g = lane / 4, t = lane % 4), k step of 32, s:
//   A  the 16 x 16 kept values in the A layout of mma.m16n8k16: rows {g, g+8} x kept columns
//      {2t, 2t+1} (group t of the step) and {8+2t, 9+2t} (group t+4).
//   B  b_j = x[m = g][k = 8j + 2t, 8j + 2t + 1], j = 0..3: one ldmatrix.x4 of 8 rows x 4 chunks.
//   E  sparsity selector 0: lane 4g + h (h = 0, 1) holds groups 4h .. 4h+3 of row g in bits 0-15
//      and of row g+8 in bits 16-31, nibble j = group 4h + j, the column of the first kept value
//      in its low 2 bits. That is the order of our meta bytes: two 16-bit loads per lane.
//
// Metadata check. mma.sp is undefined for a nibble whose two columns are equal, and the
// ::ordered_metadata form needs them increasing. compress_24 never writes anything else, but the
// op takes any meta. Once a stage has landed, the thread that copied a row's 8 metadata bytes
// checks them, after setting the nibbles past N or past the last group (zero-filled by the copy,
// or the unused high nibble of an odd G's last byte) to the valid (0, 1): their values are zero.
// A block-wide vote sends a stage with any other bad nibble to a scalar path that adds each
// kept value at the column its index names, the reference's rule.
#include <climits>

#include "common.cuh"
#include "sparse24_gemm.h"

namespace torchslim::cuda {
namespace {

using detail::ceil_div;
using detail::chunk_elems;
using detail::copy_chunk;
using detail::Epilogue;
using detail::is_aligned;
using detail::swz_row128;
using detail::swz_row64;

constexpr int kBN = 128;  // rows of W per block (the mma's M)
constexpr int kBM = 128;  // rows of x per block (the mma's N)
constexpr int kBK = 64;   // k per stage
constexpr int kStages = 3;
constexpr int kThreads = 256;  // 8 warps: 2 along W rows x 4 along x rows
constexpr int kWarpsM = 4;
constexpr int kWN = 64, kWM = 32;                     // warp tile
constexpr int kWTiles = kWN / 16, kXTiles = kWM / 8;  // m16 tiles of W, n8 tiles of x
constexpr int kGroups = kBK / 4;                      // 2:4 groups per row and stage
constexpr int kMetaRow = kBK / 8;                     // metadata bytes per row and stage
constexpr int kTileV = kBN * (kBK / 2) * 2;           // bytes: 64-byte rows of kept values
constexpr int kTileX = kBM * kBK * 2;                 // bytes: 128-byte rows of x
constexpr int kTileE = kBN * kMetaRow;                // bytes
constexpr int kStageBytes = kTileV + kTileX + kTileE;
constexpr int kSmemBytes = kStages * kStageBytes;  // 75 KiB
constexpr int64_t kMaxGridY = 65535;
static_assert(kBN <= kThreads, "one thread per row copies and checks the metadata");
static_assert((kBN * kBK / 2 * 2 / 16) % kThreads == 0 && (kBM * kBK * 2 / 16) % kThreads == 0,
              "chunks per thread must be whole");

// Bit 2 of every nibble of `e` whose two 2-bit columns are not increasing (low >= high).
__device__ __forceinline__ uint32_t unordered_nibbles(uint32_t e) {
  const uint32_t lo = e & 0x33333333u, hi = (e >> 2) & 0x33333333u;
  // Per nibble 3 + hi - lo, in [0, 6]: no borrow crosses a nibble, and bit 2 is set iff hi > lo.
  return ~((hi | 0x44444444u) - lo - 0x11111111u) & 0x44444444u;
}

// Prepares one row's metadata of a landed stage for the tensor cores (see the file comment):
// `row` is its 8 bytes (groups g0 .. g0 + 15 of the row), `groups_left` = G - g0 when the row is
// inside N, else 0. Returns whether a nibble inside the matrix is not an increasing pair.
__device__ __forceinline__ bool prepare_meta_row(uint8_t* row, int64_t groups_left) {
  uint32_t* words = reinterpret_cast<uint32_t*>(row);
  bool bad = false;
#pragma unroll
  for (int w = 0; w < kMetaRow / 4; ++w) {
    const int64_t left = groups_left - 8 * w;  // groups of this word inside the matrix
    const uint32_t keep = left >= 8 ? 0xffffffffu : left <= 0 ? 0u : (1u << (4 * left)) - 1u;
    const uint32_t e = (words[w] & keep) | (0x44444444u & ~keep);
    words[w] = e;
    bad |= unordered_nibbles(e) != 0u;
  }
  return bad;
}

// Grid: (ceil(M / 128), ceil(N / 128)). T = __half or __nv_bfloat16. Dynamic smem: kSmemBytes.
// Block (bx, by) computes out[bx*128 +: 128, by*128 +: 128].
//   x: (M, K) T, row stride ldx.  values: (N, 2G) T, row stride ldv.
//   meta: (N, ceil(G / 2)) uint8, row stride ldm.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads, 2)
    sparse24_tc_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ values,
                       int64_t ldv, const uint8_t* __restrict__ meta, int64_t ldm, int64_t M,
                       int64_t N, int64_t K, Epilogue ep) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp / kWarpsM, wm = warp % kWarpsM;
  const int g = lane >> 2, t = lane & 3;
  const int64_t G = ceil_div(K, 4), kept = 2 * G, meta_bytes = ceil_div(G, 2);
  const int64_t k_tiles = ceil_div(K, kBK);

  auto load_stage = [&](int stage, int64_t kt) {
    uint8_t* sv = smem + stage * kStageBytes;
    uint8_t* sx = sv + kTileV;
    uint8_t* se = sx + kTileX;
#pragma unroll
    for (int i = 0; i < kTileV / 16 / kThreads; ++i) {  // values: 128 rows x 4 chunks of 8
      const int id = tid + i * kThreads;
      const int r = id >> 2, c = id & 3;
      const int64_t gr = n0 + r, gc = kt * (kBK / 2) + c * 8;
      const int elems = chunk_elems(gr, N, gc, kept, 8);
      copy_chunk<kAligned>(sv + swz_row64(r, c), values + (elems > 0 ? gr * ldv + gc : 0),
                           elems * int(sizeof(T)));
    }
#pragma unroll
    for (int i = 0; i < kTileX / 16 / kThreads; ++i) {  // x: 128 rows x 8 chunks of 8
      const int id = tid + i * kThreads;
      const int r = id >> 3, c = id & 7;
      const int64_t gr = m0 + r, gk = kt * kBK + c * 8;
      const int elems = chunk_elems(gr, M, gk, K, 8);
      copy_chunk<kAligned>(sx + swz_row128(r, c), x + (elems > 0 ? gr * ldx + gk : 0),
                           elems * int(sizeof(T)));
    }
    if (tid < kBN) {  // meta: row tid, 8 bytes (this thread checks them once they land)
      const int64_t gr = n0 + tid, gb = kt * kMetaRow;
      const int bytes = chunk_elems(gr, N, gb, meta_bytes, kMetaRow);
      copy_chunk<kAligned, kMetaRow>(se + tid * kMetaRow, meta + (bytes > 0 ? gr * ldm + gb : 0),
                                     bytes);
    }
  };

  float acc[kWTiles][kXTiles][4];
  detail::zero_fragments(acc);

  detail::start_pipeline<kStages>(k_tiles, load_stage);

  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    detail::cp_async_wait<kStages - 2>();  // this thread's copies of tile kt have landed
    uint8_t* sv = smem + static_cast<int>(kt % kStages) * kStageBytes;
    const uint8_t* sx = sv + kTileV;
    uint8_t* se = sv + kTileV + kTileX;
    bool bad = false;
    if (tid < kBN) {
      bad = prepare_meta_row(se + tid * kMetaRow, n0 + tid < N ? G - kt * kGroups : 0);
    }
    // Tile kt (with its prepared metadata) visible to all; everyone is done with tile kt-1.
    const bool scalar = __syncthreads_or(bad) != 0;
    const int64_t next = kt + kStages - 1;
    if (next < k_tiles) load_stage(static_cast<int>(next % kStages), next);
    detail::cp_async_commit();

    if (!scalar) {
#pragma unroll
      for (int s = 0; s < kBK / 32; ++s) {
        uint32_t af[kWTiles][4], em[kWTiles];
#pragma unroll
        for (int wi = 0; wi < kWTiles; ++wi) {
          // matrices: (rows 0-7, kept 16s..16s+7), (rows 8-15, same), then kept 16s+8..16s+15.
          const int r = wn * kWN + wi * 16 + (lane & 15);
          detail::ldmatrix_x4(af[wi], sv + swz_row64(r, 2 * s + (lane >> 4)));
          const uint8_t* e = se + (wn * kWN + wi * 16 + g) * kMetaRow + 4 * s + 2 * (t & 1);
          em[wi] = uint32_t(*reinterpret_cast<const uint16_t*>(e)) |
                   (uint32_t(*reinterpret_cast<const uint16_t*>(e + 8 * kMetaRow)) << 16);
        }
#pragma unroll
        for (int xi = 0; xi < kXTiles; ++xi) {
          // matrices j = 0..3: x rows 0-7 of the tile, k chunk 4s + j.
          uint32_t bf[4];
          detail::ldmatrix_x4(bf,
                              sx + swz_row128(wm * kWM + xi * 8 + (lane & 7), 4 * s + (lane >> 3)));
#pragma unroll
          for (int wi = 0; wi < kWTiles; ++wi) {
            detail::mma_sp_16832<T>(acc[wi][xi], af[wi], bf, em[wi]);
          }
        }
      }
    } else {
      // Scalar path: each lane adds its own outputs' products, value by value.
#pragma unroll
      for (int wi = 0; wi < kWTiles; ++wi)
#pragma unroll
        for (int xi = 0; xi < kXTiles; ++xi)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int n = wn * kWN + wi * 16 + g + 8 * (e >> 1);
            const int m = wm * kWM + xi * 8 + 2 * t + (e & 1);
            float sum = acc[wi][xi][e];
#pragma unroll 1
            for (int q = 0; q < kGroups; ++q) {
              const int nibble = (se[n * kMetaRow + q / 2] >> (4 * (q & 1))) & 0xf;
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                const int kv = 2 * q + i, kx = 4 * q + ((nibble >> (2 * i)) & 3);
                const T v = *reinterpret_cast<const T*>(sv + swz_row64(n, kv >> 3) + 2 * (kv & 7));
                const T xv =
                    *reinterpret_cast<const T*>(sx + swz_row128(m, kx >> 3) + 2 * (kx & 7));
                sum = fmaf(detail::to_float(v), detail::to_float(xv), sum);
              }
            }
            acc[wi][xi][e] = sum;
          }
    }
  }
  detail::cp_async_wait<0>();

  // D[n, m] -> out[m, n]: rows[i] are x rows (i = 2 xi + parity), cols[j] W rows (j = 2 wi + half).
  int64_t rows[2 * kXTiles], cols[2 * kWTiles];
#pragma unroll
  for (int i = 0; i < 2 * kXTiles; ++i) rows[i] = m0 + wm * kWM + 8 * (i / 2) + 2 * t + (i % 2);
#pragma unroll
  for (int j = 0; j < 2 * kWTiles; ++j) cols[j] = n0 + wn * kWN + 16 * (j / 2) + 8 * (j % 2) + g;
  detail::store_block(ep, rows, cols, M, N,
                      [&](int i, int j) { return acc[j / 2][i / 2][2 * (j % 2) + (i % 2)]; });
}

template <typename T, bool kAligned>
cudaError_t launch_sparse24(const void* x, int64_t ldx, const void* values, int64_t ldv,
                            const uint8_t* meta, int64_t ldm, int64_t M, int64_t N, int64_t K,
                            const Epilogue& ep, cudaStream_t stream) {
  const int64_t grid_x = ceil_div(M, kBM), grid_y = ceil_div(N, kBN);
  if (grid_x > INT_MAX || grid_y > kMaxGridY) return cudaErrorInvalidValue;
  auto kernel = sparse24_tc_kernel<T, kAligned>;
  cudaError_t err = detail::set_smem_limit(kernel, kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(
      static_cast<const T*>(x), ldx, static_cast<const T*>(values), ldv, meta, ldm, M, N, K, ep);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sparse24_gemm(const void* x, int64_t ldx, DType dtype, const void* values, int64_t ldv,
                          const uint8_t* meta, int64_t ldm, const float* scales, const void* bias,
                          DType bias_dtype, void* out, int64_t ldo, int64_t M, int64_t N, int64_t K,
                          cudaStream_t stream) {
  TORCHSLIM_CUDA_REQUIRE(dtype == DType::kFloat16 || dtype == DType::kBFloat16);
  TORCHSLIM_CUDA_REQUIRE(M >= 0 && N >= 0 && K >= 0);
  TORCHSLIM_CUDA_REQUIRE(bias == nullptr || detail::is_float_dtype(bias_dtype));
  if (M == 0 || N == 0) return cudaSuccess;
  TORCHSLIM_CUDA_REQUIRE(out != nullptr && (M == 1 || ldo >= N));
  // Operand rows may overlap (a broadcast x has ldx = 0); only the output's may not.
  TORCHSLIM_CUDA_REQUIRE(K == 0 || (x != nullptr && values != nullptr && meta != nullptr));
  const Epilogue ep{nullptr, scales, bias, bias_dtype, out, ldo, dtype};
  const bool aligned = is_aligned(x, 16) && ldx % 8 == 0 && is_aligned(values, 16) &&
                       ldv % 8 == 0 && is_aligned(meta, 8) && ldm % 8 == 0;
  if (dtype == DType::kFloat16) {
    return TORCHSLIM_BOOL_SWITCH(aligned, kAligned, {
      return launch_sparse24<__half, kAligned>(x, ldx, values, ldv, meta, ldm, M, N, K, ep, stream);
    });
  }
  return TORCHSLIM_BOOL_SWITCH(aligned, kAligned, {
    return launch_sparse24<__nv_bfloat16, kAligned>(x, ldx, values, ldv, meta, ldm, M, N, K, ep,
                                                    stream);
  });
}

}  // namespace torchslim::cuda
