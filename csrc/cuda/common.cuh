// Shared device helpers of the torchslim CUDA kernels (no torch headers):
//   * dispatch macros (TORCHSLIM_DISPATCH_FLOAT, TORCHSLIM_BOOL_SWITCH) for the host launchers;
//   * the fused GEMM epilogue (scales, bias, output dtype chosen at run time, switched on once
//     per thread block of outputs rather than per element);
//   * thin inline-PTX wrappers: cp.async (with zero fill), ldmatrix, mma.sync (s8 and f16/bf16),
//     and the sparse mma.sp (f16/bf16, 2:4);
//   * shared-memory staging of tile chunks, with cp.async or with bounds-respecting loads;
//   * IEEE fp32 division and round-half-even conversion written in PTX, so that build flags
//     such as --use_fast_math or -ftz=true cannot change the bits of quantization codes.
// Needs sm_80 or newer (cp.async, bf16 mma).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "dtype.h"

// Runs the statement block `...` (which must `return` a cudaError_t) with `T` bound to the C++
// type of the floating DType `dtype` (__half, __nv_bfloat16 or float). Any other dtype returns
// cudaErrorInvalidValue. Example:
//   return TORCHSLIM_DISPATCH_FLOAT(x_dtype, T, { return launch<T>(...); });
#define TORCHSLIM_DISPATCH_FLOAT(dtype, T, ...)   \
  [&]() -> cudaError_t {                          \
    switch (dtype) {                              \
      case ::torchslim::cuda::DType::kFloat16: {  \
        using T = __half;                         \
        __VA_ARGS__                               \
      }                                           \
      case ::torchslim::cuda::DType::kBFloat16: { \
        using T = __nv_bfloat16;                  \
        __VA_ARGS__                               \
      }                                           \
      case ::torchslim::cuda::DType::kFloat32: {  \
        using T = float;                          \
        __VA_ARGS__                               \
      }                                           \
      default:                                    \
        return cudaErrorInvalidValue;             \
    }                                             \
  }()

// Runs the statement block `...` (which must `return` a cudaError_t) with the compile-time
// constant `NAME` equal to the run-time bool `cond` (flash-attention's BOOL_SWITCH).
#define TORCHSLIM_BOOL_SWITCH(cond, NAME, ...) \
  [&]() -> cudaError_t {                       \
    if (cond) {                                \
      static constexpr bool NAME = true;       \
      __VA_ARGS__                              \
    } else {                                   \
      static constexpr bool NAME = false;      \
      __VA_ARGS__                              \
    }                                          \
  }()

// Returns from the enclosing function when `expr` is false (argument validation).
#define TORCHSLIM_CUDA_REQUIRE(expr)           \
  do {                                         \
    if (!(expr)) return cudaErrorInvalidValue; \
  } while (0)

namespace torchslim::cuda::detail {

inline bool is_float_dtype(DType t) {
  return t == DType::kFloat16 || t == DType::kBFloat16 || t == DType::kFloat32;
}

inline bool is_aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Kernels whose dynamic shared memory exceeds the default 48 KiB must opt in first.
template <typename Kernel>
cudaError_t set_smem_limit(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// ---------------------------------------------------------------------------------------------
// Scalar conversions.

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// The fp16 / bf16 (T) value with bit pattern `bits` (low 16 bits), widened to fp32.
template <typename T>
__device__ __forceinline__ float bits16_to_float(uint32_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  } else {
    return __uint_as_float(bits << 16);  // bf16 is the high half of an fp32
  }
}

// p[i] of run-time dtype t, widened to fp32 (t is uniform across the warp: no divergence).
__device__ __forceinline__ float load_as_float(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// IEEE-754 fp32 division, round to nearest even, subnormals kept (immune to -ftz/fast-math).
__device__ __forceinline__ float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Round half to even to int32, saturating; NaN gives 0 (PTX cvt semantics).
__device__ __forceinline__ int32_t round_to_int(float v) {
  int32_t r;
  asm("cvt.rni.s32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
}

// ---------------------------------------------------------------------------------------------
// Epilogue: out[m, n] = acc * a_scale[m] * b_scale[n] + bias[n], in fp32 in that order (explicit
// _rn operations: no FMA contraction), then rounded to the output dtype. Null pointers mean
// "scale 1" / "no bias". With out_dtype kInt32 an int32 accumulator is stored as is (the
// launchers reject scales and bias in that case).

struct Epilogue {
  const float* a_scale;  // (M,) fp32 or nullptr
  const float* b_scale;  // (N,) fp32 or nullptr
  const void* bias;      // (N,) bias_dtype or nullptr
  DType bias_dtype;
  void* out;  // (M, N) out_dtype, row stride ldo elements
  int64_t ldo;
  DType out_dtype;
};

__device__ __forceinline__ float acc_to_float(float a) { return a; }
__device__ __forceinline__ float acc_to_float(int32_t a) { return __int2float_rn(a); }

template <typename OutT>
__device__ __forceinline__ OutT float_to(float v) {
  if constexpr (std::is_same_v<OutT, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<OutT, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else if constexpr (std::is_same_v<OutT, int32_t>) {
    return __float2int_rn(v);
  } else {
    return v;
  }
}

template <typename OutT, int R, int C, typename AccFn>
__device__ __forceinline__ void store_block_as(const Epilogue& ep, const int64_t (&rows)[R],
                                               const int64_t (&cols)[C], int64_t M, int64_t N,
                                               const AccFn& acc) {
  float row_scale[R], col_scale[C], col_bias[C];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    row_scale[i] = (ep.a_scale != nullptr && rows[i] < M) ? ep.a_scale[rows[i]] : 1.0f;
  }
#pragma unroll
  for (int j = 0; j < C; ++j) {
    const bool in = cols[j] < N;
    col_scale[j] = (ep.b_scale != nullptr && in) ? ep.b_scale[cols[j]] : 1.0f;
    col_bias[j] =
        (ep.bias != nullptr && in) ? load_as_float(ep.bias, cols[j], ep.bias_dtype) : 0.0f;
  }
  OutT* out = static_cast<OutT*>(ep.out);
#pragma unroll
  for (int i = 0; i < R; ++i) {
    if (rows[i] >= M) continue;
#pragma unroll
    for (int j = 0; j < C; ++j) {
      if (cols[j] >= N) continue;
      const auto a = acc(i, j);
      OutT* dst = out + rows[i] * ep.ldo + cols[j];
      if constexpr (std::is_same_v<OutT, int32_t> &&
                    std::is_same_v<std::remove_cv_t<decltype(a)>, int32_t>) {
        *dst = a;  // exact accumulator
      } else {
        float v = __fmul_rn(__fmul_rn(acc_to_float(a), row_scale[i]), col_scale[j]);
        if (ep.bias != nullptr) v = __fadd_rn(v, col_bias[j]);
        *dst = float_to<OutT>(v);
      }
    }
  }
}

// Stores a thread's R x C block of outputs: rows[i], cols[j] are global coordinates (entries
// >= M / >= N are skipped) and acc(i, j) returns the int32 or fp32 accumulator. Scales and bias
// are read once per row / column and the output dtype is switched on once per block.
template <int R, int C, typename AccFn>
__device__ __forceinline__ void store_block(const Epilogue& ep, const int64_t (&rows)[R],
                                            const int64_t (&cols)[C], int64_t M, int64_t N,
                                            const AccFn& acc) {
  switch (ep.out_dtype) {
    case DType::kFloat16:
      store_block_as<__half>(ep, rows, cols, M, N, acc);
      break;
    case DType::kBFloat16:
      store_block_as<__nv_bfloat16>(ep, rows, cols, M, N, acc);
      break;
    case DType::kInt32:
      store_block_as<int32_t>(ep, rows, cols, M, N, acc);
      break;
    default:
      store_block_as<float>(ep, rows, cols, M, N, acc);
      break;
  }
}

// Epilogue of a warp tile of kMT x kNT mma fragments (m16n8, C layout: element e of fragment
// (mi, ni) is at row row0 + 16mi + 8(e/2), column col0 + 8ni + e%2), where row0 = first row of
// the warp tile + lane/4 and col0 = first column + 2(lane%4).
template <int kMT, int kNT, typename Acc>
__device__ __forceinline__ void store_fragments(const Epilogue& ep, const Acc (&acc)[kMT][kNT][4],
                                                int64_t row0, int64_t col0, int64_t M, int64_t N) {
  int64_t rows[2 * kMT], cols[2 * kNT];
#pragma unroll
  for (int i = 0; i < 2 * kMT; ++i) rows[i] = row0 + 16 * (i / 2) + 8 * (i % 2);
#pragma unroll
  for (int j = 0; j < 2 * kNT; ++j) cols[j] = col0 + 8 * (j / 2) + (j % 2);
  store_block(ep, rows, cols, M, N,
              [&](int i, int j) { return acc[i / 2][j / 2][2 * (i % 2) + (j % 2)]; });
}

// ---------------------------------------------------------------------------------------------
// Inline-PTX wrappers (sm_80+).

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; copies src_bytes (0..16) bytes and zero-fills the rest.
// dst and src must be 16-byte aligned; with src_bytes == 0 nothing is read from src.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}

// 8-byte global -> shared copy (through L1); copies src_bytes (0..8) bytes and zero-fills the
// rest. dst and src must be 8-byte aligned; with src_bytes == 0 nothing is read from src.
__device__ __forceinline__ void cp_async_8(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the 16-byte row addresses of matrix i, and r[i]
// receives matrix i's fragment: lane l holds row l/4, b16 columns 2(l%4) and 2(l%4)+1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// D = A (16x32 s8, row) * B (32x8 s8, col) + D, s32 accumulate (wraps on overflow).
__device__ __forceinline__ void mma_s8_16832(int32_t (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D = A (16x16, row) * B (16x8, col) + D with fp32 accumulate; T is __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Sparse D = A (16x32, 2:4 along k, row) * B (32x8, col) + D with fp32 accumulate; T is __half
// or __nv_bfloat16. `a` holds A's kept values as a 16x16 matrix in the A layout of mma.m16n8k16;
// `e` holds the 2-bit column of each kept value within its group of 4 (sparsity selector 0:
// lanes 4g and 4g+1 supply the metadata of rows g and g+8, for k 0-15 and 16-31 respectively).
// Every metadata nibble must name two distinct columns in increasing order.
template <typename T>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[4], uint32_t e) {
#if (__CUDACC_VER_MAJOR__ > 12) || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5)
#define TORCHSLIM_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32."
#else
#define TORCHSLIM_MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32."
#endif
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(TORCHSLIM_MMA_SP
                 "f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, "
                 "{%0, %1, %2, %3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                   "r"(b[3]), "r"(e));
  } else {
    asm volatile(TORCHSLIM_MMA_SP
                 "bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, "
                 "{%0, %1, %2, %3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                   "r"(b[3]), "r"(e));
  }
#undef TORCHSLIM_MMA_SP
}

// Four int8 codes (bytes 0..3 of q, byte 0 lowest) -> two packed pairs of T (fp16 or bf16):
// lo = (q.b0, q.b1), hi = (q.b2, q.b3), the first element in the low 16 bits. Exact: every
// int8 value is representable in both formats.
template <typename T>
__device__ __forceinline__ void s8x4_to_pairs(uint32_t q, uint32_t& lo, uint32_t& hi) {
  if constexpr (std::is_same_v<T, __half>) {
    // Bias each byte to u = s + 128 in [0, 255]; the fp16 with bits 0x64uu is 1024 + u exactly,
    // so subtracting 1152 (0x6480) leaves s. Two prmt + two hsub2 for four values.
    const uint32_t u = q ^ 0x80808080u;
    uint32_t l = __byte_perm(u, 0x64646464u, 0x4140);
    uint32_t h = __byte_perm(u, 0x64646464u, 0x4342);
    const __half2 magic = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));
    __half2 lh = __hsub2(*reinterpret_cast<__half2*>(&l), magic);
    __half2 hh = __hsub2(*reinterpret_cast<__half2*>(&h), magic);
    lo = *reinterpret_cast<uint32_t*>(&lh);
    hi = *reinterpret_cast<uint32_t*>(&hh);
  } else {
    const float f0 = static_cast<float>(static_cast<int8_t>(q & 0xff));
    const float f1 = static_cast<float>(static_cast<int8_t>((q >> 8) & 0xff));
    const float f2 = static_cast<float>(static_cast<int8_t>((q >> 16) & 0xff));
    const float f3 = static_cast<float>(static_cast<int8_t>(q >> 24));
    __nv_bfloat162 l = __floats2bfloat162_rn(f0, f1);
    __nv_bfloat162 h = __floats2bfloat162_rn(f2, f3);
    lo = *reinterpret_cast<uint32_t*>(&l);
    hi = *reinterpret_cast<uint32_t*>(&h);
  }
}

// ---------------------------------------------------------------------------------------------
// Shared-memory staging for the tensor-core kernels.

// Copies one kWidth-byte (8 or 16) shared-memory chunk from src: the first `bytes` (0..kWidth)
// bytes, zeros after. kAsync: cp.async (src and dst kWidth-byte aligned). Otherwise
// bounds-respecting byte loads and one shared store (src may have any alignment; nothing past
// src[bytes - 1] is read).
template <bool kAsync, int kWidth = 16>
__device__ __forceinline__ void copy_chunk(void* dst, const void* src, int bytes) {
  static_assert(kWidth == 8 || kWidth == 16, "chunks are 8 or 16 bytes");
  if constexpr (kAsync) {
    if constexpr (kWidth == 16) {
      cp_async_16(dst, src, bytes);
    } else {
      cp_async_8(dst, src, bytes);
    }
  } else {
    const uint8_t* s = static_cast<const uint8_t*>(src);
    uint32_t word[kWidth / 4] = {};
#pragma unroll
    for (int e = 0; e < kWidth; ++e) {
      if (e < bytes) word[e / 4] |= uint32_t(s[e]) << (8 * (e % 4));
    }
    if constexpr (kWidth == 16) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(word[0], word[1], word[2], word[3]);
    } else {
      *reinterpret_cast<uint2*>(dst) = make_uint2(word[0], word[1]);
    }
  }
}

// Byte offset of 16-byte chunk c (0..3) of row r in a tile of 64-byte rows. Two rows fill a
// 128-byte bank line; XOR-ing c with (r / 2) % 4 spreads chunk c of 8 consecutive rows over the
// 8 distinct 16-byte bank groups, so ldmatrix (8 rows, one chunk each) is conflict-free.
__device__ __forceinline__ int swz_row64(int r, int c) {
  return r * 64 + ((c ^ ((r >> 1) & 3)) << 4);
}

// The same for 128-byte rows (one bank line each): chunk c (0..7) of row r at chunk c ^ (r % 8).
__device__ __forceinline__ int swz_row128(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// The prologue of a kStages-deep cp.async pipeline over k_tiles tiles: load_stage(stage, tile)
// for tiles 0 .. kStages-2, one commit group per tile, empty ones included, so that in the main
// loop cp_async_wait<kStages - 2>() always means "this thread's copies of tile kt have landed".
template <int kStages, typename Load>
__device__ __forceinline__ void start_pipeline(int64_t k_tiles, const Load& load_stage) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, int64_t(s));
    cp_async_commit();
  }
}

// Zeroes a warp's accumulator fragments.
template <typename Acc, int A, int B>
__device__ __forceinline__ void zero_fragments(Acc (&acc)[A][B][4]) {
#pragma unroll
  for (int i = 0; i < A; ++i)
#pragma unroll
    for (int j = 0; j < B; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = Acc(0);
}

// Number of valid elements (0..width) of the chunk starting at column k of row `row`.
__device__ __forceinline__ int chunk_elems(int64_t row, int64_t rows, int64_t k, int64_t K,
                                           int width) {
  if (row >= rows || k >= K) return 0;
  return static_cast<int>(min(K - k, int64_t(width)));
}

// Warp-wide sum (every lane gets the result).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int32_t warp_sum(int32_t v) { return __reduce_add_sync(0xffffffffu, v); }

}  // namespace torchslim::cuda::detail
