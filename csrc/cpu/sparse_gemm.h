// Sparse GEMM for pruned weights (torchslim.reference.sparse), written once and compiled per ISA
// level (see int8_gemm.h):
//
//   sparse24_gemm  out = x . W^T + bias, W in the 2:4 format: per group of 4 columns two kept
//                  values and their 2-bit column indices (meta)
//   bitmask_gemm   the same, W in the bitmask format: a bit per weight, the nonzeros packed
//                  row by row, and each row's offset into them
//
// Both are dot-product kernels on the compressed rows: no dense weight is formed, an MR-row
// tile of x meets one weight row at a time, and M = 1 streams each compressed row once, so at
// decode the time follows the format's bytes.
//
// 2:4 gathers x rather than expanding W. One step takes kLanes kept values (8 on AVX2, 16 on
// AVX-512), i.e. 2 * kLanes columns: the step's 2-bit indices, shifted out of one meta word,
// pick the x that each value meets (AVX2: x in step order, see sparse24_order_x, so an in-lane
// vpermilps on each of two plain loads and a blend; AVX-512: one vpermt2ps over 32 columns),
// and one FMA does kLanes multiply-adds: half the FMAs of a dense dot product, the index
// arithmetic shared by the MR rows of x. Small tiles (M = 1, 2) sum in several independent FMA
// chains per row of x (kChains), as do the bitmask and csr dot kernels, so that no step waits
// out the previous one's FMA latency.
//
// Bitmask chooses per row by its density d = nnz / K:
//   d >= 1/16 expand: each kLanes columns' mask bits place the next popcount values in their
//             lanes (AVX2: a 256-entry table of vpermps indices, then a lane mask; AVX-512:
//             vexpandps) for one FMA per row of x; bf16 values against bf16 x on a CPU with
//             AVX512_BF16 and VBMI2: 32 columns a step, vpexpandw and one vdpbf16ps per row;
//   d <  1/16 walk: visit the set bits of each 64-bit mask word (tzcnt, clear lowest), one
//             scalar FMA per nonzero and row of x, four independent sums: the work follows
//             the nonzeros, not K.
// Neither reads a value outside the row's [row_offsets[n], row_offsets[n + 1]) plus at most
// a vector's width past it (never past the array); a row whose mask holds another count than its
// offsets give is reported in bad_row (the lowest such row).
//
//   csr_gemm       the same, W in the csr format: groups of 8 nonzeros, each group an 8-bit
//                  column per value from a base column; the work follows the nonzeros
//   block_gemm     the same, W in the block format: whole R x C blocks, each row of a block C
//                  contiguous values against C contiguous columns of x (plain loads)
//
// Past kSpMaxTileM rows of x, every format runs an SpMM instead (see "SpMM" below): x packed in
// panels of kSpPanel rows transposed to (K, kSpPanel), so each nonzero broadcasts its value
// against one contiguous panel row: four FMAs per nonzero for two panels (32 rows of x), and no
// work for the zeros (nnz * M / 8 FMAs where a dense GEMM does K * N * M / 8). K is walked in
// slices so that the panels' x stays in L1 while the block's weight rows pass it.
//
// For csr's dot kernel, the 8 x values a group meets are loaded one by one into a vector
// (vinsertps from memory: faster than vgatherdps on AMD Zen 3 and 4) for one FMA per row of x.
// That kernel reads x padded with NaN past K (see csr_padded_k) and checks no group: each base
// is clamped into the padded row, a column past K reads a NaN, and only a row whose sum comes out
// NaN is summed again with every group checked. The SpMM checks every group's columns against K
// before reading x (one unsigned compare of the base unless the group's window reaches past K).
// Both skip a bad group and report its row in bad_row.
//
// Every format's values may be fp32, bf16, fp16 or int8 codes; a row's sum is multiplied by
// its scale (when scales are given) before the bias is added.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "int8_gemm.h"  // simd.h, min_i64, store

namespace torchslim::cpu::TORCHSLIM_ISA_NS {
namespace {

constexpr int kSpMR = 4;  // rows of x per tile
// Rows with nnz * kWalkDensity < K are walked bit by bit, the rest expanded (see the top).
constexpr int64_t kWalkDensity = 16;

template <typename T>
inline const T* typed(const void* p) {
  return static_cast<const T*>(p);
}

// ------------------------------------------------------------------------------ ISA pieces
#if defined(TORCHSLIM_ISA_AVX512)

constexpr int64_t kLanes = 16;

// The column (0..31) of each of the step's 16 kept values, from its 32 meta bits.
inline __m512i sp24_columns(const uint8_t* meta) {
  uint32_t bits;
  __builtin_memcpy(&bits, meta, sizeof bits);
  const __m512i shift =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i group = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i index = _mm512_and_si512(
      _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(bits)), shift), _mm512_set1_epi32(3));
  return _mm512_add_epi32(index, group);
}

// Two steps' columns (meta: their 8 bytes).
inline void sp24_columns2(const uint8_t* meta, __m512i& first, __m512i& second) {
  first = sp24_columns(meta);
  second = sp24_columns(meta + 4);
}

inline __m512 sp24_gather(const float* x, __m512i columns) {
  return _mm512_permutex2var_ps(_mm512_loadu_ps(x), columns, _mm512_loadu_ps(x + 16));
}

constexpr void (*kSparse24OrderX)(const float*, int64_t, float*, int64_t, int64_t) = nullptr;

inline int expand_bits(const uint8_t* mask) {
  uint16_t bits;
  __builtin_memcpy(&bits, mask, sizeof bits);
  return bits;
}

// The next popcount(bits) values placed in the lanes whose bit is set, zeros elsewhere.
// Zen 4's vexpandps (and vpexpandw) waits for the old value of its destination even when
// zero-masked, and GCC gives every step's expand the same register: a chain of expand
// latencies, one per step, that FMA chains cannot hide. Merging into a fresh zero (vpxord, a
// zeroing idiom the renamer resolves) breaks it: 4096 x 4096 at 50% with bf16 values, one core,
// 20 to 9.7 cycles per 32 columns in a standalone loop.
// fresh_zero() is that zero, for every expand.
TORCHSLIM_INLINE inline __m512i fresh_zero() {
  __m512i zero;
  __asm__("vpxord %0, %0, %0" : "=v"(zero));
  return zero;
}

inline __m512 expand(__m512 packed, int bits) {
  return _mm512_mask_expand_ps(_mm512_castsi512_ps(fresh_zero()), static_cast<__mmask16>(bits),
                               packed);
}

#elif defined(TORCHSLIM_ISA_AVX2)

constexpr int64_t kLanes = 8;

// Lane j's column within its group of 4 (in its low 2 bits, all vpermilps reads), from the
// step's 16 meta bits.
inline __m256i sp24_columns(const uint8_t* meta) {
  uint16_t bits;
  __builtin_memcpy(&bits, meta, sizeof bits);
  return _mm256_srlv_epi32(_mm256_set1_epi32(bits), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
}

// Two steps' columns from their 32 meta bits, broadcast by the load unit (vbroadcastss).
inline void sp24_columns2(const uint8_t* meta, __m256i& first, __m256i& second) {
  const __m256i bits =
      _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(meta)));
  first = _mm256_srlv_epi32(bits, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
  second = _mm256_srlv_epi32(bits, _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30));
}

// x in 2:4 step order: each 16 columns as their groups of 4 in the order 0, 2, 1, 3 (the last
// K % 16 as they are), so a step's [groups 0 | 2] and [groups 1 | 3] are two plain loads.
void sparse24_order_x(const float* x, int64_t ldx, float* out, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * ldx;
    float* dst = out + m * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      _mm_storeu_ps(dst + k, _mm_loadu_ps(src + k));
      _mm_storeu_ps(dst + k + 4, _mm_loadu_ps(src + k + 8));
      _mm_storeu_ps(dst + k + 8, _mm_loadu_ps(src + k + 4));
      _mm_storeu_ps(dst + k + 12, _mm_loadu_ps(src + k + 12));
    }
    for (; k < K; ++k) dst[k] = src[k];
  }
}
constexpr auto kSparse24OrderX = &sparse24_order_x;

// Lanes 0-1 take group 0, 2-3 group 1, 4-5 group 2, 6-7 group 3: in-lane permutes (vpermilps,
// cheaper than the lane-crossing vpermps on AMD Zen) of [groups 0 | 2] and [groups 1 | 3], x
// in step order, and a blend.
inline __m256 sp24_gather(const float* x, __m256i columns) {
  return _mm256_blend_ps(_mm256_permutevar_ps(_mm256_loadu_ps(x), columns),
                         _mm256_permutevar_ps(_mm256_loadu_ps(x + 8), columns), 0xcc);
}

inline int expand_bits(const uint8_t* mask) { return *mask; }

// Entry m: lane j's position among m's set bits (the packed value it takes), and whether bit j
// is set (all ones) or not (zero), so an expand costs two table loads, vpermps and vandps.
struct ExpandTable {
  alignas(32) int32_t index[256][8];
  alignas(32) int32_t keep[256][8];
  constexpr ExpandTable() : index(), keep() {
    for (int m = 0; m < 256; ++m) {
      int next = 0;
      for (int j = 0; j < 8; ++j) {
        if (m >> j & 1) {
          index[m][j] = next++;
          keep[m][j] = -1;
        }
      }
    }
  }
};
constexpr ExpandTable kExpandTable{};

inline __m256 expand(__m256 packed, int bits) {
  const __m256i index =
      _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpandTable.index[bits]));
  const __m256 keep = _mm256_load_ps(reinterpret_cast<const float*>(kExpandTable.keep[bits]));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(packed, index), keep);
}

#endif

#if defined(TORCHSLIM_ISA_AVX512) || defined(TORCHSLIM_ISA_AVX2)
#define TORCHSLIM_SPARSE_VECTOR 1  // else portable: the scalar loops below do all the work
#else
constexpr void (*kSparse24OrderX)(const float*, int64_t, float*, int64_t, int64_t) = nullptr;
#endif

// KernelTable::bf16_dot (see bitmask_bf16_dot).
inline bool bf16_dot_supported() {
#if defined(TORCHSLIM_ISA_AVX512)
  return cpu_features().avx512bf16 && cpu_features().avx512vbmi2;
#else
  return false;
#endif
}

// ------------------------------------------------------------------------------ 2:4
// sums[i] += the row's groups [g0, K / 4 rounded up) against x row i, one value at a time;
// columns past K (a short last group's padding) are skipped.
// Four partial sums (by group % 4) keep the rounding error growing with K / 4, not K, as the
// vector lanes do.
template <typename T, int R>
inline void sp24_scalar(const T* v, const uint8_t* meta, const float* x, int64_t ldx, int64_t K,
                        int64_t g0, float (&sums)[kSpMR]) {
  const int64_t groups = (K + 3) / 4;
  float part[4][kSpMR] = {};
  for (int64_t grp = g0; grp < groups; ++grp) {
    const int nibble = meta[grp / 2] >> (4 * (grp & 1));
    for (int t = 0; t < 2; ++t) {
      const int64_t col = 4 * grp + (nibble >> (2 * t) & 3);
      if (col >= K) continue;
      const float w = load_f32(v + 2 * grp + t);
      for (int i = 0; i < R; ++i) part[grp & 3][i] += w * x[i * ldx + col];
    }
  }
  for (int i = 0; i < R; ++i) sums[i] += (part[0][i] + part[1][i]) + (part[2][i] + part[3][i]);
}

// Independent accumulators per row of x for a tile of R rows: one FMA chain per row would wait
// out the FMA latency every step (4 cycles on Zen 3), so small tiles take several chains.
template <int R>
constexpr int kChains = R == 1 ? 4 : (R == 2 ? 2 : 1);

// body(i, chain) for i in [0, count): A at a time on chains 0..A-1 (unrolled, so each chain
// stays a register), the last count % A on chain 0.
template <int A, class Body>
TORCHSLIM_INLINE inline void over_chains(int64_t count, const Body& body) {
  int64_t i = 0;
  for (; i + A <= count; i += A) {
#pragma GCC unroll 4
    for (int a = 0; a < A; ++a) body(i + a, a);
  }
  for (; i < count; ++i) body(i, 0);
}

// R rows' sums, each in A independent vector chains (V: FVec).
template <class V, int R, int A = kChains<R>>
struct ChainedSums {
  typename V::R acc[R][A];
  ChainedSums() {
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) acc[i][a] = V::zero();
    }
  }
  void reduce(float (&sums)[kSpMR]) {
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int a = 1; a < A; ++a) acc[i][0] = V::add(acc[i][0], acc[i][a]);
      sums[i] = V::reduce_add(acc[i][0]);
    }
  }
  void add_to(float (&sums)[kSpMR]) {
    float part[kSpMR];
    reduce(part);
    for (int i = 0; i < R; ++i) sums[i] += part[i];
  }
};

// Steps ahead that the 2:4 dot kernel prefetches its values and meta (2 KB of int8 values on
// AVX-512). With the hardware prefetchers alone, 2:4 int8 streamed 13-16 GB/s on 2 Zen 4 cores
// at K = 4096 and 11008, 19-22 GB/s with these; one thread lost more as x outgrew L1 (15 GB/s at
// K = 4096, 8 at 8192).
constexpr int64_t kSp24AheadSteps = 128;

template <typename T, int R>
inline void sp24_tile(const SparseGemmArgs& g, const float* x, int64_t ldx, int64_t n,
                      float (&sums)[kSpMR]) {
  const T* v = typed<T>(g.values) + n * g.ldv;
  const uint8_t* meta = g.meta + n * g.ldm;
  for (int i = 0; i < kSpMR; ++i) sums[i] = 0.0f;
  int64_t g0 = 0;
#if defined(TORCHSLIM_SPARSE_VECTOR)
  {
    // A step covers 2 * kLanes columns: kLanes / 2 groups, kLanes / 4 meta bytes.
    const int64_t steps = g.K / (2 * kLanes);
    constexpr int A = kChains<R>;
    ChainedSums<FVec, R> chains;
    auto& acc = chains.acc;
    const auto step = [&](int64_t s, const auto& columns, int a) TORCHSLIM_INLINE {
      __builtin_prefetch(v + (s + kSp24AheadSteps) * kLanes);
      const typename FVec::R w = FVec::load(v + s * kLanes);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        acc[i][a] = FVec::fma(w, sp24_gather(x + i * ldx + s * 2 * kLanes, columns), acc[i][a]);
      }
    };
    // Steps in pairs (one meta load for both), pair chain c feeding chains 2c and 2c + 1.
    constexpr int C = A > 1 ? A / 2 : 1;
    over_chains<C>(steps / 2, [&](int64_t p, int c) TORCHSLIM_INLINE {
      decltype(sp24_columns(meta)) first, second;
      __builtin_prefetch(meta + (2 * p + kSp24AheadSteps) * (kLanes / 4));
      sp24_columns2(meta + 2 * p * (kLanes / 4), first, second);
      step(2 * p, first, (2 * c) % A);
      step(2 * p + 1, second, (2 * c + 1) % A);
    });
    if (steps % 2) step(steps - 1, sp24_columns(meta + (steps - 1) * (kLanes / 4)), 0);
    chains.reduce(sums);
    g0 = steps * (kLanes / 2);
  }
#endif
  sp24_scalar<T, R>(v, meta, x, ldx, g.K, g0, sums);
}

// f(std::integral_constant<int, R>{}) for the next tile of R = min(rows, kSpMR) rows of x.
template <class F>
TORCHSLIM_INLINE inline void with_tile_rows(int64_t rows, const F& f) {
  switch (min_i64(kSpMR, rows)) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    default:
      return f(std::integral_constant<int, 4>{});
  }
}

// ------------------------------------------------------------------------------ bitmask
inline void report_bad_row(const SparseGemmArgs& g, int64_t n) {  // keep the lowest such row
  int64_t seen = __atomic_load_n(g.bad_row, __ATOMIC_RELAXED);
  while (
      (seen < 0 || n < seen) &&
      !__atomic_compare_exchange_n(g.bad_row, &seen, n, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

// Walk: sums[i] += every nonzero of mask bytes [b0, ceil(K / 8)) against x row i (bits past K
// are not weights and are ignored). Returns the value pointer past the last one read, or null
// when the mask asks for values past `end`.
template <typename T, int R>
inline const T* walk_bits(const uint8_t* mask, int64_t b0, int64_t K, const T* v, const T* end,
                          const float* x, int64_t ldx, float (&sums)[kSpMR]) {
  float part[4][kSpMR] = {};
  const int64_t bytes = (K + 7) / 8;
  for (int64_t b = b0; b < bytes; b += 8) {
    uint64_t word = 0;
    const int64_t take = min_i64(8, bytes - b);
    __builtin_memcpy(&word, mask + b, static_cast<unsigned long>(take));  // little endian
    if (K - 8 * b < 64) word &= (uint64_t{1} << (K - 8 * b)) - 1;
    if (v + __builtin_popcountll(word) > end) return nullptr;
    const float* xb = x + 8 * b;
    while (__builtin_popcountll(word) >= 4) {
      int64_t col[4];
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        col[t] = __builtin_ctzll(word);
        word &= word - 1;
      }
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const float w = load_f32(v + t);
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) part[t][i] += w * xb[i * ldx + col[t]];
      }
      v += 4;
    }
    for (; word; word &= word - 1, ++v) {
      const int64_t col = __builtin_ctzll(word);
      const float w = load_f32(v);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) part[0][i] += w * xb[i * ldx + col];
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) sums[i] += (part[0][i] + part[1][i]) + (part[2][i] + part[3][i]);
  return v;
}

#if defined(TORCHSLIM_SPARSE_VECTOR)
// How far ahead the bitmask vector loops prefetch their values and their mask bytes. The
// non-temporal hint keeps the two streams from evicting x from L1. Measured with a standalone
// loop on one Zen 4 core, 4096 x 11008 and 11008 x 4096 (K x N):
//   - the bf16 dot at 25% density, with the hardware prefetchers alone: 5.9 cycles a step at
//     K = 4096, and 7.3 at K = 11008 (x 22 KB, past half of L1). With these: 5.4 at both.
//   - fp32 x at 50% (bf16 values): 12.2 and 17.2 cycles per 32 columns; with these, 11.2 and 12.7.
constexpr int64_t kBitmaskValuesAhead = 2048;  // bytes
constexpr int64_t kBitmaskMaskAhead = 512;

inline void prefetch_mask(const uint8_t* mask) {
  _mm_prefetch(reinterpret_cast<const char*>(mask) + kBitmaskMaskAhead, _MM_HINT_NTA);
}
inline void prefetch_values(const void* values) {
  _mm_prefetch(static_cast<const char*>(values) + kBitmaskValuesAhead, _MM_HINT_NTA);
}

// Expand: sums[i] += the row's whole vectors of kLanes columns from mask byte b, while a full
// vector of values can be loaded in the array. Advances b; returns the value pointer past the
// last value read.
template <typename T, int R>
inline const T* bitmask_expand(const SparseGemmArgs& g, const uint8_t* mask, const T* v,
                               const float* x, int64_t ldx, int64_t& b, float (&sums)[kSpMR]) {
  const T* values = typed<T>(g.values);
  constexpr int64_t kBytes = kLanes / 8;
  const int64_t vector_bytes = g.K / kLanes * kBytes;
  ChainedSums<FVec, R> chains;
  const auto step = [&](int a) {
    const int bits = expand_bits(mask + b);
    const typename FVec::R w = expand(FVec::load(v), bits);
    v += __builtin_popcount(static_cast<unsigned>(bits));
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      chains.acc[i][a] = FVec::fma(w, FVec::load(x + i * ldx + 8 * b), chains.acc[i][a]);
    }
    b += kBytes;
  };
  constexpr int A = kChains<R>;  // a step reads at most kLanes values
  while (b + A * kBytes <= vector_bytes && (v - values) + A * kLanes <= g.values_total) {
    prefetch_mask(mask + b);
    prefetch_values(v);
#pragma GCC unroll 4
    for (int a = 0; a < A; ++a) step(a);
  }
  while (b < vector_bytes && (v - values) + kLanes <= g.values_total) step(0);
  chains.add_to(sums);
  return v;
}
#endif

#if defined(TORCHSLIM_ISA_AVX512)
// bf16 values against bf16 x (KernelTable::bf16_dot: AVX512_BF16 and VBMI2): 32 columns a
// step, vpexpandw places the step's values and one vdpbf16ps per row of x does the 32
// multiply-adds (products exact in fp32, summed in fp32), where the fp32 path takes two steps
// of widen, expand and FMA. These functions alone are compiled for the two extensions.
#define TORCHSLIM_BF16_DOT                                                         \
  __attribute__((                                                                  \
      target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,popcnt," \
             "bmi,bmi2,avx512bf16,avx512vbmi2")))

constexpr int64_t kBf16Lanes = 32;

template <int R, int A>
TORCHSLIM_BF16_DOT TORCHSLIM_INLINE inline void bf16_dot_step(const uint8_t* mask,
                                                              const uint16_t*& v, const uint16_t* x,
                                                              int64_t ldx, int64_t& b,
                                                              __m512 (&acc)[R][A], int a) {
  uint32_t bits;
  __builtin_memcpy(&bits, mask + b, sizeof bits);
  const __m512i w = _mm512_mask_expand_epi16(fresh_zero(), bits, _mm512_loadu_si512(v));
  v += __builtin_popcount(bits);
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    const __m512i xi = _mm512_loadu_si512(x + i * ldx + 8 * b);
    acc[i][a] = _mm512_dpbf16_ps(acc[i][a], (__m512bh)w, (__m512bh)xi);
  }
  b += kBf16Lanes / 8;
}

// As bitmask_expand, x in bf16 (row stride ldx), whole vectors of kBf16Lanes columns.
template <int R>
TORCHSLIM_BF16_DOT const uint16_t* bitmask_bf16_dot(const SparseGemmArgs& g, const uint8_t* mask,
                                                    const uint16_t* v, const uint16_t* x,
                                                    int64_t ldx, int64_t& b, float (&sums)[kSpMR]) {
  const uint16_t* values = typed<uint16_t>(g.values);
  constexpr int64_t kBytes = kBf16Lanes / 8;
  const int64_t vector_bytes = g.K / kBf16Lanes * kBytes;
  constexpr int A = kChains<R>;
  ChainedSums<FVec, R> chains;
  auto& acc = chains.acc;
  // Eight steps an iteration on the chains in turn; the mask prefetched once an iteration, the
  // values every other step (see kBitmaskValuesAhead).
  constexpr int kUnroll = 8;
  while (b + kUnroll * kBytes <= vector_bytes &&
         (v - values) + kUnroll * kBf16Lanes <= g.values_total) {
    prefetch_mask(mask + b);
#pragma GCC unroll 8
    for (int s = 0; s < kUnroll; ++s) {
      if (s % 2 == 0) prefetch_values(v);
      bf16_dot_step<R, A>(mask, v, x, ldx, b, acc, s % A);
    }
  }
  while (b < vector_bytes && (v - values) + kBf16Lanes <= g.values_total) {
    bf16_dot_step<R, A>(mask, v, x, ldx, b, acc, 0);
  }
  chains.add_to(sums);
  return v;
}
#endif

#if defined(TORCHSLIM_ISA_AVX512)
#define TORCHSLIM_VBMI2                                                            \
  __attribute__((                                                                  \
      target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,popcnt," \
             "bmi,bmi2,avx512vbmi2")))

// int8 values against fp32 x on a CPU with VBMI2: 64 columns a step. One vpexpandb places the
// step's values from a 64-bit mask word, then each 16 columns widen to fp32 (vpmovsxbd,
// vcvtdq2ps) for one FMA per row of x: the expand, the mask word and the value pointer's
// popcount come once per 64 columns, where bitmask_expand takes them per 16.
template <int R>
TORCHSLIM_VBMI2 const int8_t* bitmask_int8_expand(const SparseGemmArgs& g, const uint8_t* mask,
                                                  const int8_t* v, const float* x, int64_t ldx,
                                                  int64_t& b, float (&sums)[kSpMR]) {
  const int8_t* values = typed<int8_t>(g.values);
  constexpr int64_t kBytes = 8;  // 64 columns
  const int64_t vector_bytes = g.K / 64 * kBytes;
  constexpr int A = kChains<R>;
  ChainedSums<FVec, R> chains;
  auto& acc = chains.acc;
  while (b + kBytes <= vector_bytes && (v - values) + 64 <= g.values_total) {
    prefetch_mask(mask + b);
    prefetch_values(v);
    uint64_t bits;
    __builtin_memcpy(&bits, mask + b, sizeof bits);
    const __m512i w = _mm512_mask_expand_epi8(fresh_zero(), bits, _mm512_loadu_si512(v));
    v += __builtin_popcountll(bits);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 wj = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(w, j)));
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        acc[i][j % A] =
            _mm512_fmadd_ps(wj, _mm512_loadu_ps(x + i * ldx + 8 * b + 16 * j), acc[i][j % A]);
      }
    }
    b += kBytes;
  }
  chains.add_to(sums);
  return v;
}

// The set bits of mask bytes [b0, b1), b1 - b0 a multiple of 8: 512 a vpopcntq.
__attribute__((target("avx512f,avx512vpopcntdq"))) inline int64_t mask_bits(const uint8_t* mask,
                                                                            int64_t b0,
                                                                            int64_t b1) {
  __m512i bits = _mm512_setzero_si512();
  int64_t b = b0;
  for (; b + 64 <= b1; b += 64) {
    bits = _mm512_add_epi64(bits, _mm512_popcnt_epi64(_mm512_loadu_si512(mask + b)));
  }
  const auto tail = static_cast<__mmask8>(_bzhi_u32(0xff, static_cast<uint32_t>((b1 - b) / 8)));
  bits = _mm512_add_epi64(bits, _mm512_popcnt_epi64(_mm512_maskz_loadu_epi64(tail, mask + b)));
  return _mm512_reduce_add_epi64(bits);
}

// The W8A8 vector kernels' sums for R rows of x: two sets of accumulators, which consecutive
// steps alternate between so that no step waits on the last one's vpdpbusd, and each set's sum
// of -128 times the values (x's codes go in offset by 128: vpdpbusd takes them unsigned).
template <int R>
struct Q8Sums {
  __m512i acc[2][R], offset[2];
  Q8Sums() {
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) {
      offset[j] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) acc[j][i] = _mm512_setzero_si512();
    }
  }
  void add_to(uint32_t (&sums)[kSpMR]) const {
    const __m512i bias = _mm512_add_epi32(offset[0], offset[1]);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const __m512i total = _mm512_add_epi32(acc[0][i], acc[1][i]);
      sums[i] += static_cast<uint32_t>(_mm512_reduce_add_epi32(_mm512_sub_epi32(total, bias)));
    }
  }
};

// W8A8 (SparseGemmArgs::x_q8): the row's int8 codes against x's, 64 columns a step. vpexpandb
// places the step's values from memory under the mask word; one vpdpbusd per row of x multiplies
// them with x's 64 codes and sums them by fours (x offset by 128: vpdpbusd takes it unsigned),
// and one more per step, shared by the rows, sums -128 times the values. Every sum is exact in
// int32, and the step's instructions are a third of bitmask_int8_expand's. Measured on one Zen 4
// core at M = 1 (a standalone loop, 25% density, weights in L3, cycles a step):
//   - Consecutive steps alternate between two sets of accumulators: with one, each step waited
//     on the last one's vpdpbusd (7.0 against 4.4; four sets gave 4.3).
//   - The steps of a row whose mask asks for no more values than [v, end) holds (one vpopcntq
//     pass over the row's mask, where the CPU has AVX512_VPOPCNTDQ) carry no check: a check per
//     step, that its values end by `end`, took the loop from 5.0 to 6.9 cycles a step (one per
//     two or four steps: 7.3 and 5.7).
// A row that fails the pass takes the checked steps, which stop before a step whose values
// would pass `end` (walk_bits_q8 then reports the row).
template <int R>
TORCHSLIM_VBMI2 const int8_t* bitmask_q8_expand(const uint8_t* mask, const int8_t* v,
                                                const int8_t* end, const int8_t* x, int64_t ldx,
                                                int64_t K, int64_t& b, uint32_t (&sums)[kSpMR]) {
  constexpr int64_t kBytes = 8;  // 64 columns
  const int64_t vector_bytes = K / 64 * kBytes;
  // Before any vector is live (a call across them spills them). Rows of fewer than 16 steps keep
  // the checks: there the pass costs more than it saves (K = 576: 43 against 46 us for N = 1536,
  // one thread).
  static const bool vpopcnt = cpu_features().avx512vpopcntdq;
  const bool unchecked =
      vpopcnt && vector_bytes - b >= 16 * kBytes && mask_bits(mask, b, vector_bytes) <= end - v;
  const __m512i flip = _mm512_set1_epi8(-128);
  Q8Sums<R> q;
  auto& acc = q.acc;
  auto& offset = q.offset;
  // The step's byte is a local: kept in `b` (the caller's), it went through memory every step.
  int64_t at = b;
  // The steps into accumulator sets 0, 1, 0, ...; with `checked`, a step whose values would
  // pass `end` reads nothing and ends them.
  const auto steps = [&](auto checked) TORCHSLIM_VBMI2 {
    const auto step = [&](int j) TORCHSLIM_VBMI2 {
      uint64_t bits;
      __builtin_memcpy(&bits, mask + at, sizeof bits);
      const int64_t count = __builtin_popcountll(bits);
      if (decltype(checked)::value && count > end - v) return false;
      prefetch_mask(mask + at);
      prefetch_values(v);
      const __m512i w = _mm512_maskz_expandloadu_epi8(bits, v);
      v += count;
      offset[j] = _mm512_dpbusd_epi32(offset[j], flip, w);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        const __m512i xi = _mm512_xor_si512(_mm512_loadu_si512(x + i * ldx + 8 * at), flip);
        acc[j][i] = _mm512_dpbusd_epi32(acc[j][i], xi, w);
      }
      at += kBytes;
      return true;
    };
    while (at + 2 * kBytes <= vector_bytes && step(0) && step(1)) {
    }
    if (at + kBytes <= vector_bytes) step(0);
  };
  if (unchecked) {
    steps(std::false_type{});
  } else {
    steps(std::true_type{});
  }
  b = at;
  q.add_to(sums);
  return v;
}
#undef TORCHSLIM_VBMI2
#endif

// W8A8: sums[i] += the row's codes in mask bytes [b0, ceil(K / 8)) times x row i's codes, one
// value at a time, modulo 2^32 (exact while K * 127 * 128 < 2^31). Returns the value pointer past
// the last one read, or null when the mask asks for values past `end`.
template <int R>
inline const int8_t* walk_bits_q8(const uint8_t* mask, int64_t b0, int64_t K, const int8_t* v,
                                  const int8_t* end, const int8_t* x, int64_t ldx,
                                  uint32_t (&sums)[kSpMR]) {
  const int64_t bytes = (K + 7) / 8;
  for (int64_t b = b0; b < bytes; b += 8) {
    uint64_t word = 0;
    __builtin_memcpy(&word, mask + b, static_cast<unsigned long>(min_i64(8, bytes - b)));
    if (K - 8 * b < 64) word &= (uint64_t{1} << (K - 8 * b)) - 1;
    if (__builtin_popcountll(word) > end - v) return nullptr;
    for (; word; word &= word - 1, ++v) {
      const int64_t col = 8 * b + __builtin_ctzll(word);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) sums[i] += static_cast<uint32_t>(int32_t{*v} * x[i * ldx + col]);
    }
  }
  return v;
}

// W8A8: row n of W against rows [m, m + R) of x_q8: the vector steps where the CPU has VBMI2,
// then walk_bits_q8 from where they stopped.
template <int R>
void bitmask_q8_tile(const SparseGemmArgs& g, int64_t m, int64_t n, uint32_t (&sums)[kSpMR]) {
  const uint8_t* mask = g.meta + n * g.ldm;
  const int8_t* values = typed<int8_t>(g.values);
  const int8_t* v = values + g.row_offsets[n];
  const int8_t* end = values + g.row_offsets[n + 1];
  const int8_t* x = g.x_q8 + m * g.ldx_q8;
  for (int i = 0; i < kSpMR; ++i) sums[i] = 0;
  int64_t b = 0;
#if defined(TORCHSLIM_ISA_AVX512)
  static const bool vbmi2 = cpu_features().avx512vbmi2;
  if (vbmi2) v = bitmask_q8_expand<R>(mask, v, end, x, g.ldx_q8, g.K, b, sums);
#endif
  v = walk_bits_q8<R>(mask, b, g.K, v, end, x, g.ldx_q8, sums);
  if (v != end) report_bad_row(g, n);
}

// Row n of W against rows [m, m + R) of x: the vector steps (expand, or the bf16 dot when the
// caller gave bf16 x), then walk_bits from where they stopped.
template <typename T, int R>
inline void bitmask_tile(const SparseGemmArgs& g, int64_t m, int64_t n, float (&sums)[kSpMR]) {
  const uint8_t* mask = g.meta + n * g.ldm;
  const T* values = typed<T>(g.values);
  const T* v = values + g.row_offsets[n];
  const T* end = values + g.row_offsets[n + 1];
  const float* x = g.x + m * g.ldx;
  for (int i = 0; i < kSpMR; ++i) sums[i] = 0.0f;
  int64_t b = 0;
#if defined(TORCHSLIM_SPARSE_VECTOR)
  if (kWalkDensity * (end - v) >= g.K) {
#if defined(TORCHSLIM_ISA_AVX512)
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (g.x_bf16 != nullptr) {
        v = bitmask_bf16_dot<R>(g, mask, v, g.x_bf16 + m * g.ldx_bf16, g.ldx_bf16, b, sums);
      }
    }
    if constexpr (std::is_same_v<T, int8_t>) {
      static const bool vbmi2 = cpu_features().avx512vbmi2;
      if (vbmi2) v = bitmask_int8_expand<R>(g, mask, v, x, g.ldx, b, sums);
    }
#endif
    v = bitmask_expand<T, R>(g, mask, v, x, g.ldx, b, sums);  // what the bf16 dot left
    if (v > end) v = nullptr;
  }
#endif
  if (v != nullptr) v = walk_bits<T, R>(mask, b, g.K, v, end, x, g.ldx, sums);
  if (v != end) report_bad_row(g, n);
}

// ------------------------------------------------------------------------------ csr
constexpr int64_t kCsrGroup = 8;
constexpr int64_t kCsrWindow = 256;

// Whether every column of a group (its 8 offsets from column `first`) is in [0, K): the rare
// check, out of line so that the hot loops keep their registers.
__attribute__((noinline)) bool csr_columns_fit(int64_t first, const uint8_t* columns, int64_t K) {
  for (int t = 0; t < kCsrGroup; ++t) {
    const int64_t col = first + columns[t];
    if (col < 0 || col >= K) return false;
  }
  return true;
}

// The highest base whose whole window [8 * base, 8 * base + 256) lies in [0, K), or -1: a
// group with a base in [0, that] fits whatever its offsets (one unsigned compare).
inline int64_t csr_safe_base(int64_t K) {
  return K >= kCsrWindow ? (K - kCsrWindow) / kCsrGroup : -1;
}

#if defined(TORCHSLIM_SPARSE_VECTOR)
// 8 values of a group as fp32 (AVX2 instructions, also on the AVX-512 level).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline __m256 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// 4 values as fp32 in the low half of a vector, zeros in the high half (for 4-column steps).
inline __m256 load4(const float* p) { return _mm256_zextps128_ps256(_mm_loadu_ps(p)); }
inline __m128i load4_bytes(const void* p, int bytes) {
  uint64_t bits = 0;
  __builtin_memcpy(&bits, p, bytes);
  return _mm_cvtsi64_si128(static_cast<long long>(bits));
}
inline __m256 load4(const uint16_t* p) {
  const __m128i u = _mm_slli_epi32(_mm_cvtepu16_epi32(load4_bytes(p, 8)), 16);
  return _mm256_zextps128_ps256(_mm_castsi128_ps(u));
}
inline __m256 load4(const Half* p) {
  return _mm256_zextps128_ps256(_mm_cvtph_ps(load4_bytes(p, 8)));
}
inline __m256 load4(const int8_t* p) {
  return _mm256_zextps128_ps256(_mm_cvtepi32_ps(_mm_cvtepi8_epi32(load4_bytes(p, 4))));
}

// v with *p in the lane Imm names: vinsertps with its memory operand, one instruction where
// _mm_insert_ps of an _mm_load_ss is two (GCC does not fold the load). A loop over cached csr
// rows (K = 4096, one Zen 4 core) took 1.82 ns a group so, 1.97 with the pair.
template <int Imm>
TORCHSLIM_INLINE inline __m128 insert_from(__m128 v, const float* p) {
  __asm__("vinsertps %2, %1, %0, %0" : "+v"(v) : "m"(*p), "i"(Imm));
  return v;
}

// x[columns[t]] for the 8 column offsets of a group, x from the group's first column. The
// first four offsets are byte loads, the last four shifted out of one 32-bit load: the
// address work split between the load and the integer units.
TORCHSLIM_INLINE inline __m256 csr_gather(const float* x, const uint8_t* columns) {
  __m128 lo = _mm_load_ss(x + columns[0]);
  lo = insert_from<0x10>(lo, x + columns[1]);
  lo = insert_from<0x20>(lo, x + columns[2]);
  lo = insert_from<0x30>(lo, x + columns[3]);
  uint32_t o;
  __builtin_memcpy(&o, columns + 4, sizeof o);
  __m128 hi = _mm_load_ss(x + (o & 255));
  hi = insert_from<0x10>(hi, x + (o >> 8 & 255));
  hi = insert_from<0x20>(hi, x + (o >> 16 & 255));
  hi = insert_from<0x30>(hi, x + (o >> 24));
  return _mm256_set_m128(hi, lo);
}
#endif

// Groups summed into a block's accumulators before those are added to the row's: the rounding
// error grows with the groups per block plus the blocks, not with the row's nonzeros.
constexpr int64_t kCsrBlock = 32;

// body(group, first column, offsets, chain) for groups [begin, end), A groups at a time on
// chains 0..A-1 (unrolled), the rest on chain 0. Checked: only groups whose columns fit in
// [0, K), false when one did not (it was skipped); else every group, its base clamped to
// ceil(K / 8) (x padded: see csr_padded_k), and true.
template <int A, bool Checked, class Body>
TORCHSLIM_INLINE inline bool for_csr_range(const SparseGemmArgs& g, int64_t begin, int64_t end,
                                           const Body& body) {
  bool fits = true;
  const int64_t safe = csr_safe_base(g.K);
  const uint32_t limit = static_cast<uint32_t>((g.K + kCsrGroup - 1) / kCsrGroup);
  const auto visit = [&](int64_t grp, int a) TORCHSLIM_INLINE {
    const int16_t base = g.bases[grp];
    const uint8_t* columns = g.meta + kCsrGroup * grp;
    if constexpr (!Checked) {
      const uint32_t clamped = std::min(uint32_t{static_cast<uint16_t>(base)}, limit);
      body(grp, kCsrGroup * int64_t{clamped}, columns, a);
    } else {
      const int64_t first = kCsrGroup * int64_t{base};
      if (int64_t{static_cast<uint16_t>(base)} <= safe || csr_columns_fit(first, columns, g.K)) {
        body(grp, first, columns, a);
      } else {
        fits = false;
      }
    }
  };
  int64_t grp = begin;
  for (; grp + A <= end; grp += A) {
#pragma GCC unroll 4
    for (int a = 0; a < A; ++a) visit(grp + a, a);
  }
  for (; grp < end; ++grp) visit(grp, 0);
  return fits;
}

// for_csr_range over row n's groups, flush() after each kCsrBlock of them.
template <int A, bool Checked, class Body, class Flush>
inline bool for_csr_groups(const SparseGemmArgs& g, int64_t n, const Body& body,
                           const Flush& flush) {
  bool fits = true;
  const int64_t end = g.row_offsets[n + 1];
  for (int64_t block = g.row_offsets[n]; block < end; block += kCsrBlock) {
    fits &= for_csr_range<A, Checked>(g, block, min_i64(block + kCsrBlock, end), body);
    flush();
  }
  return fits;
}

// Groups ahead that the csr dot kernel prefetches its values and column offsets (as 2:4's).
constexpr int64_t kCsrAheadGroups = 64;

template <typename T, int R, bool Checked>
inline void csr_tile(const SparseGemmArgs& g, const float* x, int64_t ldx, int64_t n,
                     float (&sums)[kSpMR]) {
  const T* v = typed<T>(g.values);
  bool fits;
#if defined(TORCHSLIM_SPARSE_VECTOR)
  constexpr int A = kChains<R>;
  __m256 acc[R][A], total[R];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    total[i] = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int a = 0; a < A; ++a) acc[i][a] = _mm256_setzero_ps();
  }
  fits = for_csr_groups<A, Checked>(
      g, n,
      [&](int64_t grp, int64_t first, const uint8_t* columns, int a) TORCHSLIM_INLINE {
        __builtin_prefetch(v + kCsrGroup * (grp + kCsrAheadGroups));
        __builtin_prefetch(columns + kCsrGroup * kCsrAheadGroups);
        const __m256 w = load8(v + kCsrGroup * grp);
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) {
          acc[i][a] = _mm256_fmadd_ps(w, csr_gather(x + i * ldx + first, columns), acc[i][a]);
        }
      },
      [&] {
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
          for (int a = 0; a < A; ++a) {
            total[i] = _mm256_add_ps(total[i], acc[i][a]);
            acc[i][a] = _mm256_setzero_ps();
          }
        }
      });
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) sums[i] = hsum_ps(total[i]);
#else
  float acc[kCsrGroup][kSpMR] = {}, total[kCsrGroup][kSpMR] = {};  // per slot, as the lanes
  fits = for_csr_groups<1, Checked>(
      g, n,
      [&](int64_t grp, int64_t first, const uint8_t* columns, int) TORCHSLIM_INLINE {
        for (int t = 0; t < kCsrGroup; ++t) {
          const float w = load_f32(v + kCsrGroup * grp + t);
          const float* xt = x + first + columns[t];
          for (int i = 0; i < R; ++i) acc[t][i] += w * xt[i * ldx];
        }
      },
      [&] {
        for (int t = 0; t < kCsrGroup; ++t) {
          for (int i = 0; i < R; ++i) {
            total[t][i] += acc[t][i];
            acc[t][i] = 0.0f;
          }
        }
      });
  for (int i = 0; i < R; ++i) {
    float s = 0.0f;
    for (int t = 0; t < kCsrGroup; ++t) s += total[t][i];
    sums[i] = s;
  }
#endif
  if (!fits) report_bad_row(g, n);
}

// Row n's sums for tile of R rows of x: unchecked (x padded), then checked where a sum is NaN
// (a bad column, or a NaN or infinity of x: see csr_padded_k).
template <typename T, int R>
inline void csr_tile_padded(const SparseGemmArgs& g, const float* x, int64_t ldx, int64_t n,
                            float (&sums)[kSpMR]) {
  csr_tile<T, R, false>(g, x, ldx, n, sums);
  bool nan = false;
  for (int i = 0; i < R; ++i) nan |= std::isnan(sums[i]);
  if (nan) csr_tile<T, R, true>(g, x, ldx, n, sums);
}

// out[m, n] = row n's sum times its scale, plus its bias: every format's epilogue.
inline void store_sum(const SparseGemmArgs& g, int64_t m, int64_t n, float sum) {
  const float scale = g.scales ? g.scales[n] : 1.0f, bias = g.bias ? g.bias[n] : 0.0f;
  store(g.out, g.ldo, g.out_type, m, n, sum * scale + bias);
}

// store_sum for rows [n, n + count) at once, the tests for a scale and a bias made once. Within
// a loop GCC vectorizes `g.bias ? g.bias[n] : 0` as a load masked by the test, and with no bias
// that load from a null pointer takes the CPU's fault-suppression path: on Zen 4 it cost sliced
// W8A8 2.4 us of a 576-row call (M = 1, one thread, a 6.5 us call with the weights all zero).
inline void store_sums(const SparseGemmArgs& g, int64_t m, int64_t n, int64_t count,
                       const float* sums) {
  const auto each = [&](const auto& scale, const auto& bias) {
    for (int64_t j = 0; j < count; ++j) {
      store(g.out, g.ldo, g.out_type, m, n + j, sums[j] * scale(n + j) + bias(n + j));
    }
  };
  const auto one = [](int64_t) { return 1.0f; };
  const auto none = [](int64_t) { return 0.0f; };
  const auto scale = [&](int64_t k) { return g.scales[k]; };
  const auto bias = [&](int64_t k) { return g.bias[k]; };
  if (g.scales != nullptr) {
    g.bias != nullptr ? each(scale, bias) : each(scale, none);
  } else {
    g.bias != nullptr ? each(one, bias) : each(one, none);
  }
}

// ------------------------------------------------------------------------------ block
// Weight row n is row n % R of block row n / R: in each of that block row's blocks, C
// contiguous values against C contiguous columns of x, so a block costs C / 8 plain loads of x
// and C / 8 FMAs per row of x, with no index per value. A block whose column of blocks is
// outside [0, ceil(K / C)) is skipped and its row reported; an edge block reads only its
// columns below K.
struct BlockRow {
  int64_t first, last;  // the block row's blocks
  int64_t offset;       // the row's values within a block: (n % R) * C
};

inline BlockRow block_row(const SparseGemmArgs& g, int64_t n) {
  const int64_t r = n / g.block_rows;
  return {g.row_offsets[r], g.row_offsets[r + 1], (n % g.block_rows) * g.block_cols};
}

// The first column of block b, or -1 when its column of blocks is outside [0, ceil(K / C)).
inline int64_t block_first_column(const SparseGemmArgs& g, int64_t b) {
  const int64_t first = g.block_cols * int64_t{g.col_blocks[b]};
  return first >= 0 && first < g.K ? first : -1;
}

template <typename T, int R>
inline void block_tile(const SparseGemmArgs& g, const float* x, int64_t ldx, int64_t n,
                       float (&sums)[kSpMR]) {
  const BlockRow row = block_row(g, n);
  const T* v = typed<T>(g.values) + row.offset;
  const int64_t C = g.block_cols, block_size = g.block_rows * C;
  float tail[kSpMR] = {};  // a block's last columns, past its steps of 8 and 4
  bool fits = true;
  const auto scalar = [&](const T* w, const float* xb, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float wj = load_f32(w + j);
      for (int i = 0; i < R; ++i) tail[i] += wj * xb[i * ldx + j];
    }
  };
#if defined(TORCHSLIM_SPARSE_VECTOR)
  constexpr int A = kChains<R>;  // blocks A at a time, block a's FMAs on chain a
  __m256 acc[R][A];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
    for (int a = 0; a < A; ++a) acc[i][a] = _mm256_setzero_ps();
  }
  over_chains<A>(row.last - row.first, [&](int64_t k, int a) TORCHSLIM_INLINE {
    const int64_t b = row.first + k, first = block_first_column(g, b);
    if (first < 0) {
      fits = false;
      return;
    }
    const int64_t width = min_i64(C, g.K - first);
    const T* w = v + b * block_size;
    const float* xb = x + first;
    int64_t j = 0;
    for (; j + 8 <= width; j += 8) {
      const __m256 wj = load8(w + j);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        acc[i][a] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(xb + i * ldx + j), acc[i][a]);
      }
    }
    if (j + 4 <= width) {
      const __m256 wj = load4(w + j);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        acc[i][a] = _mm256_fmadd_ps(wj, load4(xb + i * ldx + j), acc[i][a]);
      }
      j += 4;
    }
    scalar(w, xb, j, width);
  });
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
    for (int a = 1; a < A; ++a) acc[i][0] = _mm256_add_ps(acc[i][0], acc[i][a]);
    sums[i] = hsum_ps(acc[i][0]) + tail[i];
  }
#else
  for (int64_t b = row.first; b < row.last; ++b) {
    const int64_t first = block_first_column(g, b);
    if (first < 0) {
      fits = false;
      continue;
    }
    scalar(v + b * block_size, x + first, 0, min_i64(C, g.K - first));
  }
  for (int i = 0; i < R; ++i) sums[i] = tail[i];
#endif
  if (!fits) report_bad_row(g, n);
}

#if defined(TORCHSLIM_SPARSE_VECTOR)
// Tall blocks (R >= kBlockRowsTogether): I rows of a block row at a time against RM rows of x.
// Each block's I x C values are read in order (contiguous), and each 8 columns of x are loaded
// once per block for all I rows: I * RM independent sums. One row at a time would read a block
// in R strided slices (C values each, R * C apart), which the prefetchers follow poorly (16 x 16
// blocks, bf16: 7.7 GB/s against 21 for the same bytes read in order).
constexpr int64_t kBlockRowsTogether = 4;

template <typename T, int RM, int I>
inline void block_rows_tile(const SparseGemmArgs& g, const float* x, int64_t ldx, int64_t n,
                            float (&sums)[I][RM]) {
  const BlockRow row = block_row(g, n);
  const int64_t C = g.block_cols, block_size = g.block_rows * C;
  const T* v = typed<T>(g.values) + row.offset;
  __m256 acc[I][RM];
  float tail[I][RM] = {};
#pragma GCC unroll 8
  for (int i = 0; i < I; ++i) {
#pragma GCC unroll 4
    for (int m = 0; m < RM; ++m) acc[i][m] = _mm256_setzero_ps();
  }
  bool fits = true;
  for (int64_t b = row.first; b < row.last; ++b) {
    const int64_t first = block_first_column(g, b);
    if (first < 0) {
      fits = false;
      continue;
    }
    const int64_t width = min_i64(C, g.K - first);
    const T* w = v + b * block_size;
    const float* xb = x + first;
    // 8 columns at a time, then 4 (the upper lanes zero), then one by one
    const auto step = [&](int64_t j, auto load_x, auto load_w) {
      __m256 xj[RM];
#pragma GCC unroll 4
      for (int m = 0; m < RM; ++m) xj[m] = load_x(xb + m * ldx + j);
#pragma GCC unroll 8
      for (int i = 0; i < I; ++i) {
        const __m256 wj = load_w(w + i * C + j);
#pragma GCC unroll 4
        for (int m = 0; m < RM; ++m) acc[i][m] = _mm256_fmadd_ps(wj, xj[m], acc[i][m]);
      }
    };
    int64_t j = 0;
    for (; j + 8 <= width; j += 8) {
      step(
          j, [](const float* p) { return _mm256_loadu_ps(p); },
          [](const T* p) { return load8(p); });
    }
    if (j + 4 <= width) {
      step(j, [](const float* p) { return load4(p); }, [](const T* p) { return load4(p); });
      j += 4;
    }
    for (; j < width; ++j) {
      for (int i = 0; i < I; ++i) {
        const float wj = load_f32(w + i * C + j);
        for (int m = 0; m < RM; ++m) tail[i][m] += wj * xb[m * ldx + j];
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < I; ++i) {
#pragma GCC unroll 4
    for (int m = 0; m < RM; ++m) sums[i][m] = hsum_ps(acc[i][m]) + tail[i][m];
  }
  if (!fits) report_bad_row(g, n);
}

// Row n and the next rows of its block row, below n1, against rows [m, m + RM) of x: I of them
// if there are I, else fewer (I halved); returns how many it took.
template <typename T, int RM, int I>
inline int64_t block_rows_step(const SparseGemmArgs& g, int64_t m, int64_t n, int64_t n1) {
  if constexpr (I > 1) {
    if (n + I > min_i64(n1, (n / g.block_rows + 1) * g.block_rows)) {
      return block_rows_step<T, RM, I / 2>(g, m, n, n1);
    }
  }
  float sums[I][RM];
  block_rows_tile<T, RM, I>(g, g.x + m * g.ldx, g.ldx, n, sums);
  for (int i = 0; i < I; ++i) {
    for (int r = 0; r < RM; ++r) store_sum(g, m + r, n + i, sums[i][r]);
  }
  return I;
}

// Rows [n0, n1) against rows [m, m + RM) of x, up to I = 8 / RM rows of a block row at a time
// (I * RM sums: 8, 8, 6, 8).
template <typename T, int RM>
inline void block_rows_sweep(const SparseGemmArgs& g, int64_t m, int64_t n0, int64_t n1) {
  constexpr int I = 8 / (RM == 3 ? 4 : RM);
  for (int64_t n = n0; n < n1;) n += block_rows_step<T, RM, I>(g, m, n, n1);
}

template <typename T>
void block_rows_dot(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; m += kSpMR) {
    with_tile_rows(m1 - m, [&](auto tile_rows) {
      block_rows_sweep<T, decltype(tile_rows)::value>(g, m, n0, n1);
    });
  }
}
#endif

// ------------------------------------------------------------------------------ SpMM
// x packed in panels (ceil(M / kSpPanel), K, kSpPanel) fp32: panel p holds rows
// [p * kSpPanel, (p + 1) * kSpPanel) of x transposed (zeros past M). A nonzero's value,
// broadcast, times the panel row of its column gives its kSpPanel products at once.
//
// K is walked in slices of kSpSlice columns, and within a slice the block's panels in pairs:
// the pair's slice of x (16 KB) stays in L1 while every weight row of the block passes it.
// Each row's nonzeros in the slice are summed in registers (a broadcast, four loads from L1 and
// four FMAs per nonzero: FMA-bound) and added to the row's sums in memory. Unsliced, a panel
// (256 KB at K = 4096) sat in L2, and each nonzero waited on 64 bytes from it.
constexpr int64_t kSpSlice = 128;
constexpr int64_t kSpWideSlice = 2048;  // csr where slicing does not pay (see CsrRows)

// One weight row's sums over a slice against P panels (1 or 2; the second `stride` floats
// past the first). Slot t of a group feeds chain t % C: 8 accumulators, 4 / P chains. A group
// names each slot's panel row (row(t), from at(column)); its 8 values are broadcast from one
// register (lane copies and in-lane shuffles) rather than stored and reloaded: the reloads
// cost a quarter more loads and waited on the store.
template <typename T, int P>
struct PanelSums {
  const float* x;  // panel row c at x + c * kSpPanel
  int64_t stride;
  const float* at(int64_t col) const { return x + col * kSpPanel; }
#if defined(TORCHSLIM_SPARSE_VECTOR)
  static constexpr int C = 4 / P;
  __m256 acc[C][2 * P];
  PanelSums(const float* x_, int64_t stride_) : x(x_), stride(stride_) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
#pragma GCC unroll 4
      for (int j = 0; j < 2 * P; ++j) acc[c][j] = _mm256_setzero_ps();
    }
  }
  void fma(__m256 w, int c, const float* row) {
#pragma GCC unroll 2
    for (int q = 0; q < P; ++q) {
      acc[c][2 * q] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + q * stride), acc[c][2 * q]);
      acc[c][2 * q + 1] =
          _mm256_fmadd_ps(w, _mm256_loadu_ps(row + q * stride + 8), acc[c][2 * q + 1]);
    }
  }
  // 8 values, slot t against panel row row(t).
  template <class Row>
  TORCHSLIM_INLINE void group(const T* v, const Row& row) {
    const __m256 w = load8(v);
    const __m256 lo = _mm256_permute2f128_ps(w, w, 0x00), hi = _mm256_permute2f128_ps(w, w, 0x11);
    fma(_mm256_shuffle_ps(lo, lo, 0x00), 0, row(0));
    fma(_mm256_shuffle_ps(lo, lo, 0x55), 1 % C, row(1));
    fma(_mm256_shuffle_ps(lo, lo, 0xaa), 2 % C, row(2));
    fma(_mm256_shuffle_ps(lo, lo, 0xff), 3 % C, row(3));
    fma(_mm256_shuffle_ps(hi, hi, 0x00), 4 % C, row(4));
    fma(_mm256_shuffle_ps(hi, hi, 0x55), 5 % C, row(5));
    fma(_mm256_shuffle_ps(hi, hi, 0xaa), 6 % C, row(6));
    fma(_mm256_shuffle_ps(hi, hi, 0xff), 7 % C, row(7));
  }
  void one(float w, int64_t col) { fma(_mm256_set1_ps(w), 0, at(col)); }
  void add_to(float* out) const {  // out[0, P * kSpPanel) += the sums
#pragma GCC unroll 4
    for (int j = 0; j < 2 * P; ++j) {
      __m256 s = acc[0][j];
#pragma GCC unroll 4
      for (int c = 1; c < C; ++c) s = _mm256_add_ps(s, acc[c][j]);
      _mm256_storeu_ps(out + 8 * j, _mm256_add_ps(_mm256_loadu_ps(out + 8 * j), s));
    }
  }
#else
  float acc[4][P * kSpPanel] = {};  // by slot % 4, as the vector chains
  PanelSums(const float* x_, int64_t stride_) : x(x_), stride(stride_) {}
  void fma(float w, int c, const float* row) {
    for (int q = 0; q < P; ++q) {
      for (int j = 0; j < kSpPanel; ++j) acc[c][q * kSpPanel + j] += w * row[q * stride + j];
    }
  }
  template <class Row>
  void group(const T* v, const Row& row) {
    for (int t = 0; t < kCsrGroup; ++t) fma(load_f32(v + t), t % 4, row(t));
  }
  void one(float w, int64_t col) { fma(w, 0, at(col)); }
  void add_to(float* out) const {
    for (int j = 0; j < P * kSpPanel; ++j) {
      out[j] += (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
    }
  }
#endif
};

// Each format's rows as slices: Rows(g, n0, n1) for the block's weight rows, slice(k0, k1)
// before a slice's passes (locate each row's nonzeros in it), row(n, k0, k1, sums) for one
// pass of row n. A bad row is reported and its bad part not read.

// 2:4: a slice's steps of 16 columns (one 16-bit meta word, 8 values each); the last slice
// also takes the short tail one value at a time. Each slice's steps are first copied out of
// every row of the block into one tile: rows ldv apart (4 KB at K = 4096, bf16) fall in the
// same few L1 sets, so the rows themselves would not stay in L1 from one pass to the next.
template <typename T>
struct Sp24Rows {
  static constexpr int64_t kSteps = kSpSlice / 16;
  const SparseGemmArgs& g;
  int64_t n0;
  std::vector<T> values;       // per row: the slice's 8 * kSteps values
  std::vector<uint16_t> meta;  // per row: its kSteps meta words
  Sp24Rows(const SparseGemmArgs& args, int64_t n0_, int64_t n1)
      : g(args), n0(n0_), values((n1 - n0_) * 8 * kSteps), meta((n1 - n0_) * kSteps) {}
  int64_t slice_width(int64_t) const { return kSpSlice; }
  void slice(int64_t k0, int64_t k1) {
    const int64_t s0 = k0 / 16, steps = k1 / 16 - s0;  // k0 is a multiple of 16
    for (size_t r = 0; r < meta.size() / kSteps; ++r) {
      const int64_t n = n0 + static_cast<int64_t>(r);
      __builtin_memcpy(values.data() + r * 8 * kSteps, typed<T>(g.values) + n * g.ldv + 8 * s0,
                       8 * steps * sizeof(T));
      __builtin_memcpy(meta.data() + r * kSteps, g.meta + n * g.ldm + 2 * s0, 2 * steps);
    }
  }
  template <class Sums>
  void row(int64_t n, int64_t k0, int64_t k1, Sums& sums) const {
    const int64_t r = n - n0, s0 = k0 / 16, steps = k1 / 16 - s0;
    const T* v = values.data() + r * 8 * kSteps;
    for (int64_t s = 0; s < steps; ++s) {
      // slot t: column 16 s + 4 (t / 2) + its 2 meta bits, the bits as a byte offset
      static_assert(kSpPanel * sizeof(float) == 64, "a panel row is 2^6 bytes");
      const uint32_t bytes = uint32_t{meta[r * kSteps + s]} << 6;
      const float* step = sums.at(16 * (s0 + s));
      sums.group(v + 8 * s, [&](int t) {
        return step + 4 * kSpPanel * (t >> 1) + ((bytes >> (2 * t)) & 0xC0) / sizeof(float);
      });
    }
    if (k1 < g.K) return;
    const T* row_v = typed<T>(g.values) + n * g.ldv;
    const uint8_t* row_m = g.meta + n * g.ldm;
    for (int64_t grp = 4 * (s0 + steps); grp < (g.K + 3) / 4; ++grp) {
      for (int t = 0; t < 2; ++t) {
        const int64_t col = 4 * grp + (row_m[grp / 2] >> (4 * (grp & 1) + 2 * t) & 3);
        if (col < g.K) sums.one(load_f32(row_v + 2 * grp + t), col);
      }
    }
  }
};

// csr: a slice takes the groups whose first column is below its end (the last slice all the
// rest), so each group is summed once whatever its bases' order; a group may reach past the
// slice into x that is not in L1.
template <typename T>
struct CsrRows {
  const SparseGemmArgs& g;
  int64_t n0;
  std::vector<int64_t> begin, end;  // per row: the slice's groups
  CsrRows(const SparseGemmArgs& args, int64_t n0_, int64_t n1)
      : g(args),
        n0(n0_),
        begin(g.row_offsets + n0_, g.row_offsets + n1),
        end(g.row_offsets + n0_, g.row_offsets + n1) {}
  // Sliced only for half-dense rows and 4 panels or more; else in slices of kSpWideSlice,
  // panels one at a time, each read from L2: wide enough that locating each slice's groups
  // costs little, and a row's sums are still added up in blocks (as kCsrBlock does for the dot
  // kernel). A sliced csr row pays for every slice's pass: its groups located (a scan of the
  // bases) and a group count that branches cannot predict. Measured at 2048 x 4096, that beat
  // one pass over K only at 50% density and M >= 64.
  int64_t slice_width(int64_t panels) const {
    const int64_t rows = static_cast<int64_t>(end.size());
    const int64_t nnz = kCsrGroup * (g.row_offsets[n0 + rows] - g.row_offsets[n0]);
    return panels >= 4 && 2 * nnz >= rows * g.K ? kSpSlice : kSpWideSlice;
  }
  void slice(int64_t, int64_t k1) {
    for (size_t r = 0; r < end.size(); ++r) {
      begin[r] = end[r];
      const int64_t stop = g.row_offsets[n0 + static_cast<int64_t>(r) + 1];
      int64_t e = k1 == g.K ? stop : begin[r];
      while (e < stop && kCsrGroup * int64_t{g.bases[e]} < k1) ++e;
      end[r] = e;
    }
  }
  template <class Sums>
  void row(int64_t n, int64_t, int64_t, Sums& sums) const {
    const T* v = typed<T>(g.values);
    const bool fits = for_csr_range<1, true>(
        g, begin[n - n0], end[n - n0],
        [&](int64_t grp, int64_t first, const uint8_t* columns, int) TORCHSLIM_INLINE {
          const float* base = sums.at(first);
          sums.group(v + kCsrGroup * grp, [&](int t) { return base + columns[t] * kSpPanel; });
        });
    if (!fits) report_bad_row(g, n);
  }
};

// Entry m: the positions of m's set bits, lowest first.
struct BitPositions {
  uint8_t at[256][8];
  constexpr BitPositions() : at() {
    for (int m = 0; m < 256; ++m) {
      for (int j = 0, next = 0; j < 8; ++j) {
        if (m >> j & 1) at[m][next++] = static_cast<uint8_t>(j);
      }
    }
  }
};
constexpr BitPositions kBitPositions{};

// Bitmask: each slice's set bits decoded once into column offsets from the slice's start (8
// per mask byte through a table), then groups of 8 as csr. A row whose mask holds another count
// than its offsets give is bad and not read at all.
template <typename T>
struct BitmaskRows {
  static constexpr int64_t kStride = kSpSlice + 8;  // a row's offsets, room for 8 past the last
  const SparseGemmArgs& g;
  int64_t n0;
  std::vector<int64_t> next;  // per row: its first value in the slice, -1 for a bad row
  std::vector<int64_t> count;
  std::vector<uint8_t> cols;
  BitmaskRows(const SparseGemmArgs& args, int64_t n0_, int64_t n1)
      : g(args), n0(n0_), next(n1 - n0_), count(n1 - n0_, 0), cols((n1 - n0_) * kStride) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* mask = g.meta + n * g.ldm;
      int64_t set = 0;
      for (int64_t b = 0; b < (g.K + 7) / 8; ++b) set += __builtin_popcount(byte(mask, b, g.K));
      const bool ok = set == g.row_offsets[n + 1] - g.row_offsets[n];
      next[n - n0] = ok ? g.row_offsets[n] : -1;
      if (!ok) report_bad_row(g, n);
    }
  }
  static unsigned byte(const uint8_t* mask, int64_t b, int64_t K) {  // bits past K cleared
    return mask[b] & (K - 8 * b >= 8 ? 255u : (1u << (K - 8 * b)) - 1);
  }
  int64_t slice_width(int64_t) const { return kSpSlice; }
  void slice(int64_t k0, int64_t k1) {
    for (size_t r = 0; r < next.size(); ++r) {
      if (next[r] < 0) continue;
      next[r] += count[r];
      const uint8_t* mask = g.meta + (n0 + static_cast<int64_t>(r)) * g.ldm;
      uint8_t* out = cols.data() + r * kStride;
      int64_t c = 0;
      for (int64_t b = k0 / 8; b < (k1 + 7) / 8; ++b) {
        const unsigned bits = byte(mask, b, g.K);
        uint64_t at;  // positions 0..7 plus 8 * (b - k0 / 8) < 128 in every byte: no carries
        __builtin_memcpy(&at, kBitPositions.at[bits], sizeof at);
        at += 0x0101010101010101ull * static_cast<uint64_t>(b * 8 - k0);
        __builtin_memcpy(out + c, &at, sizeof at);
        c += __builtin_popcount(bits);
      }
      count[r] = c;
    }
  }
  template <class Sums>
  void row(int64_t n, int64_t k0, int64_t, Sums& sums) const {
    const int64_t r = n - n0;
    if (next[r] < 0) return;
    const T* v = typed<T>(g.values) + next[r];
    const uint8_t* c = cols.data() + r * kStride;
    const float* base = sums.at(k0);
    int64_t i = 0;
    for (; i + kCsrGroup <= count[r]; i += kCsrGroup) {
      sums.group(v + i, [&](int t) { return base + c[i + t] * kSpPanel; });
    }
    for (; i < count[r]; ++i) sums.one(load_f32(v + i), k0 + c[i]);
  }
};

// Block: a slice takes the blocks whose first column is below its end (the last slice all the
// rest), per block row, as csr takes its groups; a row's blocks then go 8 columns at a time
// against 8 panel rows in a row.
template <typename T>
struct BlockRows {
  const SparseGemmArgs& g;
  int64_t r0;
  std::vector<int64_t> begin, end;  // per block row: the slice's blocks
  BlockRows(const SparseGemmArgs& args, int64_t n0, int64_t n1)
      : g(args),
        r0(n0 / args.block_rows),
        begin(g.row_offsets + r0, g.row_offsets + (n1 - 1) / args.block_rows + 1),
        end(begin) {}
  int64_t slice_width(int64_t) const { return kSpWideSlice; }
  void slice(int64_t, int64_t k1) {
    for (size_t r = 0; r < end.size(); ++r) {
      begin[r] = end[r];
      const int64_t stop = g.row_offsets[r0 + static_cast<int64_t>(r) + 1];
      int64_t e = k1 == g.K ? stop : begin[r];
      while (e < stop && g.block_cols * int64_t{g.col_blocks[e]} < k1) ++e;
      end[r] = e;
    }
  }
  template <class Sums>
  void row(int64_t n, int64_t, int64_t, Sums& sums) const {
    const int64_t r = n / g.block_rows - r0, C = g.block_cols;
    const T* v = typed<T>(g.values) + (n % g.block_rows) * C;
    bool fits = true;
    for (int64_t b = begin[r]; b < end[r]; ++b) {
      const int64_t first = block_first_column(g, b);
      if (first < 0) {
        fits = false;
        continue;
      }
      const int64_t width = min_i64(C, g.K - first);
      const T* w = v + b * g.block_rows * C;
      const float* base = sums.at(first);
      int64_t j = 0;
      for (; j + 8 <= width; j += 8) {
        sums.group(w + j, [&](int t) { return base + (j + t) * kSpPanel; });
      }
      for (; j < width; ++j) sums.one(load_f32(w + j), first + j);
    }
    if (!fits) report_bad_row(g, n);
  }
};

// Rows [m0, m1) of x (m0 a multiple of kSpPanel) against weight rows [n0, n1): slice by
// slice, panel pair by pair, every weight row (see the top of this section).
template <typename T, template <typename> class Rows>
void spmm(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t p0 = m0 / kSpPanel, panels = (m1 - m0 + kSpPanel - 1) / kSpPanel;
  const int64_t stride = g.K * kSpPanel;                         // floats per panel
  std::vector<float> sums((n1 - n0) * panels * kSpPanel, 0.0f);  // [weight row][panel][16]
  Rows<T> rows(g, n0, n1);
  const auto pass = [&](auto panel_count, int64_t p, int64_t k0, int64_t k1) {
    constexpr int P = decltype(panel_count)::value;
    for (int64_t n = n0; n < n1; ++n) {
      PanelSums<T, P> acc(g.panels + (p0 + p) * stride, stride);
      rows.row(n, k0, k1, acc);
      acc.add_to(sums.data() + ((n - n0) * panels + p) * kSpPanel);
    }
  };
  const int64_t width = rows.slice_width(panels);
  const bool pairs = width <= 2 * kSpSlice;  // a pair's slice of x fits in L1
  for (int64_t k0 = 0; k0 < g.K; k0 += width) {
    const int64_t k1 = min_i64(k0 + width, g.K);
    rows.slice(k0, k1);
    for (int64_t p = 0; p < panels; p += pairs ? 2 : 1) {
      if (pairs && p + 1 < panels) {
        pass(std::integral_constant<int, 2>{}, p, k0, k1);
      } else {
        pass(std::integral_constant<int, 1>{}, p, k0, k1);
      }
    }
  }
  for (int64_t n = n0; n < n1; ++n) {
    const float* s = sums.data() + (n - n0) * panels * kSpPanel;
    for (int64_t m = m0; m < m1; ++m) store_sum(g, m, n, s[m - m0]);
  }
}

// ------------------------------------------------------------------------------ driver
template <typename T, template <typename, int> class Tile>
void sparse_block(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = m0; m < m1; m += kSpMR) {
      float sums[kSpMR];
      with_tile_rows(
          m1 - m, [&](auto tile_rows) { Tile<T, decltype(tile_rows)::value>::run(g, m, n, sums); });
      for (int64_t i = 0; i < min_i64(kSpMR, m1 - m); ++i) store_sum(g, m + i, n, sums[i]);
    }
  }
}

template <typename T, int R>
struct Sp24Tile {
  static void run(const SparseGemmArgs& g, int64_t m, int64_t n, float (&sums)[kSpMR]) {
    sp24_tile<T, R>(g, g.x + m * g.ldx, g.ldx, n, sums);
  }
};

template <typename T, int R>
struct BitmaskTile {
  static void run(const SparseGemmArgs& g, int64_t m, int64_t n, float (&sums)[kSpMR]) {
    bitmask_tile<T, R>(g, m, n, sums);
  }
};

template <typename T, int R>
struct CsrTile {
  static void run(const SparseGemmArgs& g, int64_t m, int64_t n, float (&sums)[kSpMR]) {
    csr_tile_padded<T, R>(g, g.x + m * g.ldx, g.ldx, n, sums);
  }
};

template <typename T, int R>
struct BlockTile {
  static void run(const SparseGemmArgs& g, int64_t m, int64_t n, float (&sums)[kSpMR]) {
    block_tile<T, R>(g, g.x + m * g.ldx, g.ldx, n, sums);
  }
};

// f(T{}) for the values' element type T.
template <class F>
void with_value_type(ScalarType v_type, const F& f) {
  switch (v_type) {
    case ScalarType::kBFloat16:
      return f(uint16_t{});
    case ScalarType::kFloat16:
      return f(Half{});
    case ScalarType::kInt8:
      return f(int8_t{});
    default:
      return f(float{});
  }
}

template <template <typename, int> class Tile, template <typename> class SpmmRow>
void sparse_dispatch(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  with_value_type(g.v_type, [&](auto value) {
    using T = decltype(value);
    g.panels ? SpmmRow<T>::run(g, m0, m1, n0, n1) : sparse_block<T, Tile>(g, m0, m1, n0, n1);
  });
}

template <typename T>
struct Sp24Spmm {
  static void run(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    spmm<T, Sp24Rows>(g, m0, m1, n0, n1);
  }
};

template <typename T>
struct BitmaskSpmm {
  static void run(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    spmm<T, BitmaskRows>(g, m0, m1, n0, n1);
  }
};

template <typename T>
struct CsrSpmm {
  static void run(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    spmm<T, CsrRows>(g, m0, m1, n0, n1);
  }
};

// ------------------------------------------------------------------------------ 2:4 W8A8
// x_q8's rows are padded with zero codes to a whole number of 128 columns (sp24_q8_padded_k), so
// a kept value whose column lies past K (a short last group's) meets a zero, as the reference
// drops it.
//
// sums[i] += the row's groups [g0, ceil(K / 4)) against x_q8 row i, one value at a time,
// modulo 2^32 (exact while K * 127 * 128 < 2^31). Every level; the AVX-512 level's vector steps
// come first where the CPU has VBMI.
template <int R>
inline void sp24_q8_scalar(const int8_t* v, const uint8_t* meta, const int8_t* x, int64_t ldx,
                           int64_t K, int64_t g0, uint32_t (&sums)[kSpMR]) {
  const int64_t groups = (K + 3) / 4;
  for (int64_t grp = g0; grp < groups; ++grp) {
    const int nibble = meta[grp / 2] >> (4 * (grp & 1));
    for (int t = 0; t < 2; ++t) {
      const int64_t col = 4 * grp + (nibble >> (2 * t) & 3);
      const int32_t w = v[2 * grp + t];
      for (int i = 0; i < R; ++i) sums[i] += static_cast<uint32_t>(w * x[i * ldx + col]);
    }
  }
}

#if defined(TORCHSLIM_ISA_AVX512) || defined(TORCHSLIM_ISA_AVX2)
// The row's groups in steps of 8 (32 columns, 16 values, 4 meta bytes) against rows [0, R) of
// x, in 256-bit vectors: the AVX2 level's, and the AVX-512 level's on CPUs without VBMI. Each
// 128-bit lane takes 8 values and the 16 columns of their groups: the values' 2-bit columns,
// shifted out of the step's meta word by two vpsrlvd and packed to bytes, plus their group's
// first column, pick the x codes they meet by vpshufb (an index with its top bit set, the
// lane's upper 8 bytes, gives a zero); vpmaddubsw multiplies them with the values under the
// sign trick (I8Dot: |w| times x * sign(w), exact) and vpmaddwd widens the pairs. Returns the
// groups done.
template <int R>
inline int64_t sp24_q8_steps32(const int8_t* v, const uint8_t* meta, const int8_t* x, int64_t ldx,
                               int64_t K, uint32_t (&sums)[kSpMR]) {
  const int64_t steps = (K + 3) / 4 / 8;
  // Value t of the step sits in lane t / 8, byte t % 8: the shifts that bring its two bits down
  // in the dword that packs to that byte (the packs interleave their two sources by 64 bits).
  const __m256i shift_a = _mm256_setr_epi32(0, 2, 4, 6, 16, 18, 20, 22);
  const __m256i shift_b = _mm256_setr_epi32(8, 10, 12, 14, 24, 26, 28, 30);
  const __m256i low2 = _mm256_set1_epi32(3), ones = _mm256_set1_epi16(1);
  const __m256i first =
      _mm256_setr_epi8(0, 0, 4, 4, 8, 8, 12, 12, -128, -128, -128, -128, -128, -128, -128, -128, 0,
                       0, 4, 4, 8, 8, 12, 12, -128, -128, -128, -128, -128, -128, -128, -128);
  __m256i acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_si256();
  for (int64_t s = 0; s < steps; ++s) {
    int32_t word;
    __builtin_memcpy(&word, meta + 4 * s, sizeof word);
    const __m256i bits = _mm256_set1_epi32(word);
    const __m256i a = _mm256_and_si256(_mm256_srlv_epi32(bits, shift_a), low2);
    const __m256i b = _mm256_and_si256(_mm256_srlv_epi32(bits, shift_b), low2);
    const __m256i words = _mm256_packus_epi32(a, b);
    const __m256i columns = _mm256_or_si256(_mm256_packus_epi16(words, words), first);
    // Lane 0: values 0-7 (and again), lane 1: values 8-15.
    const __m256i w = _mm256_permute4x64_epi64(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 16 * s))),
        0x50);
    const __m256i w_abs = _mm256_abs_epi8(w);
    for (int i = 0; i < R; ++i) {
      const __m256i xs = _mm256_shuffle_epi8(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * ldx + 32 * s)), columns);
      const __m256i pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(xs, w));
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(pairs, ones));
    }
  }
  for (int i = 0; i < R; ++i) sums[i] += static_cast<uint32_t>(hsum_epi32(acc[i]));
  return 8 * steps;
}
#endif

#if defined(TORCHSLIM_ISA_AVX512)
#define TORCHSLIM_VBMI                                                             \
  __attribute__((                                                                  \
      target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,popcnt," \
             "bmi,bmi2,avx512vbmi")))

// A step's 64 values (128 columns, 16 meta bytes): value j's 2 bits lie at bit 2 j of the step's
// meta, i.e. at bit `shift[j]` of meta qword j / 32, and its group's first column is `first[j]`.
struct Sp24Q8Lanes {
  alignas(64) uint8_t shift[64];
  alignas(64) uint8_t first[64];
  constexpr Sp24Q8Lanes() : shift(), first() {
    for (int j = 0; j < 64; ++j) {
      shift[j] = static_cast<uint8_t>(2 * (j % 32));
      first[j] = static_cast<uint8_t>(4 * (j / 2));
    }
  }
};
inline constexpr Sp24Q8Lanes kSp24Q8Lanes{};

// The row's steps of 128 columns against rows [0, R) of x: vpermq puts each meta qword under
// the four output qwords whose values it holds, vpmultishiftqb brings each value's 2 bits to the
// bottom of its byte, and vpternlogd keeps them and adds its group's first column: the column of
// each of the 64 values within the step. One vpermi2b gathers the x codes they meet from the
// step's 128, and one vpdpbusd per row of x multiplies and sums them by fours (x offset by 128:
// vpdpbusd takes it unsigned); one more per step, shared by the rows, sums -128 times the values
// (as in bitmask_q8_expand). Consecutive steps alternate between two sets of accumulators, so
// that no step waits on the last one's vpdpbusd. The last step, when the row's groups end inside
// it, loads only their values and meta bytes (zeros after them: a zero value at its group's
// first column, whose x code is there or padding). Returns the groups done: all of them.
template <int R>
TORCHSLIM_VBMI int64_t sp24_q8_steps(const int8_t* v, const uint8_t* meta, const int8_t* x,
                                     int64_t ldx, int64_t K, uint32_t (&sums)[kSpMR]) {
  const int64_t groups = (K + 3) / 4, steps = groups / 32, rest = groups % 32;
  const __m512i flip = _mm512_set1_epi8(-128), low2 = _mm512_set1_epi8(3);
  const __m512i shift = _mm512_load_si512(kSp24Q8Lanes.shift);
  const __m512i first = _mm512_load_si512(kSp24Q8Lanes.first);
  const __m512i halves = _mm512_set_epi64(1, 1, 1, 1, 0, 0, 0, 0);
  Q8Sums<R> q;
  auto& acc = q.acc;
  auto& offset = q.offset;
  // Step s's values w and meta bytes m into accumulator set j.
  const auto step = [&](int64_t s, int j, __m512i w, __m128i m) TORCHSLIM_VBMI {
    const __m512i bits = _mm512_permutexvar_epi64(halves, _mm512_zextsi128_si512(m));
    const __m512i columns =
        _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(shift, bits), low2, first, 0xea);
    offset[j] = _mm512_dpbusd_epi32(offset[j], flip, w);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const int8_t* xs = x + i * ldx + 128 * s;
      const __m512i xi = _mm512_xor_si512(
          _mm512_permutex2var_epi8(_mm512_loadu_si512(xs), columns, _mm512_loadu_si512(xs + 64)),
          flip);
      acc[j][i] = _mm512_dpbusd_epi32(acc[j][i], xi, w);
    }
  };
  const auto whole = [&](int64_t s, int j) TORCHSLIM_VBMI {
    prefetch_values(v + 64 * s);
    prefetch_mask(meta + 16 * s);
    step(s, j, _mm512_loadu_si512(v + 64 * s),
         _mm_loadu_si128(reinterpret_cast<const __m128i*>(meta + 16 * s)));
  };
  int64_t s = 0;
  for (; s + 2 <= steps; s += 2) {
    whole(s, 0);
    whole(s + 1, 1);
  }
  if (s < steps) whole(s++, 0);
  if (rest > 0) {
    const auto values = _bzhi_u64(~uint64_t{0}, static_cast<uint32_t>(2 * rest));
    const auto bytes =
        static_cast<__mmask16>(_bzhi_u32(0xffff, static_cast<uint32_t>((rest + 1) / 2)));
    step(s, 1, _mm512_maskz_loadu_epi8(values, v + 64 * s),
         _mm_maskz_loadu_epi8(bytes, meta + 16 * s));
  }
  q.add_to(sums);
  return groups;
}
#undef TORCHSLIM_VBMI
#endif

// W8A8: row n of W against rows [m, m + R) of x_q8.
template <int R>
void sp24_q8_tile(const SparseGemmArgs& g, int64_t m, int64_t n, uint32_t (&sums)[kSpMR]) {
  const int8_t* v = typed<int8_t>(g.values) + n * g.ldv;
  const uint8_t* meta = g.meta + n * g.ldm;
  const int8_t* x = g.x_q8 + m * g.ldx_q8;
  for (int i = 0; i < kSpMR; ++i) sums[i] = 0;
  int64_t g0 = 0;
#if defined(TORCHSLIM_ISA_AVX512)
  static const bool vbmi = cpu_features().avx512vbmi;
  g0 = vbmi ? sp24_q8_steps<R>(v, meta, x, g.ldx_q8, g.K, sums)
            : sp24_q8_steps32<R>(v, meta, x, g.ldx_q8, g.K, sums);
#elif defined(TORCHSLIM_ISA_AVX2)
  g0 = sp24_q8_steps32<R>(v, meta, x, g.ldx_q8, g.K, sums);
#endif
  sp24_q8_scalar<R>(v, meta, x, g.ldx_q8, g.K, g0, sums);
}

// The W8A8 kernels' loop: rows [n0, n1) of W against rows [m0, m1) of x_q8, in tiles of up to
// kSpMR rows of x; Tile<R>::run(g, m, n, sums) sums a row's codes against R rows of x's.
template <template <int> class Tile>
inline void q8_dot(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = m0; m < m1; m += kSpMR) {
      uint32_t sums[kSpMR];
      with_tile_rows(m1 - m, [&](auto tile_rows) {
        constexpr int R = decltype(tile_rows)::value;
        Tile<R>::run(g, m, n, sums);
        for (int i = 0; i < R; ++i) {
          const auto total = static_cast<int32_t>(sums[i]);
          store_sum(g, m + i, n, static_cast<float>(total) * g.x_scales[m + i]);
        }
      });
    }
  }
}

template <int R>
struct Sp24Q8 {
  static void run(const SparseGemmArgs& g, int64_t m, int64_t n, uint32_t (&sums)[kSpMR]) {
    sp24_q8_tile<R>(g, m, n, sums);
  }
};

template <int R>
struct BitmaskQ8 {
  static void run(const SparseGemmArgs& g, int64_t m, int64_t n, uint32_t (&sums)[kSpMR]) {
    bitmask_q8_tile<R>(g, m, n, sums);
  }
};

#if defined(TORCHSLIM_ISA_AVX512)
// ------------------------------------------------------------------------------ 2:4 W8A8 strips
// Many rows of x (SparseGemmArgs::q8_strips): as int8_gemm_strips does for a dense weight, each
// block of x's rows meets the weights as strips of kSp24StripCols weight rows over the whole of
// K, laid out once per block, in a register tile of kSp24StripRows rows of x by kSp24StripVecs
// vectors of 16 weight rows. Only the kept values are multiplied. A meta byte covers 8 columns
// (two groups) and their 4 kept values, so for each 8 columns ("a pair") the strip holds each
// weight row's 4 values (a dword, as the values lie in the row) and the positions (0-7) of the 4
// x codes they meet (a dword of indices, from the meta byte). A row of x's 8 codes broadcast to
// every qword goes through vpshufb by those indices, and one vpdpbusd multiplies and sums the 4
// pairs of each weight row: per 8 columns of K, one vpdpbusd and one vpshufb per (row of x, 16
// weight rows), where the dense strips take two vpdpbusd. x is vpdpbusd's unsigned side (its
// codes + 128: its kept columns differ by weight row, so the dense strips' correction per row of
// x does not apply) and the values the signed side: each sum loses 128 x (its weight row's sum
// of values), a constant of the strip. Sums wrap modulo 2^32 as the dot kernels' do: exact where
// the result fits in int32 (K <= kMaxQ8K in the binding).
constexpr int kSp24StripVecs = 2;
constexpr int kSp24StripCols = 16 * kSp24StripVecs;
constexpr int kSp24StripRows = 8;

struct Sp24Strip {
  // Pair p, vector v: the values at ((p * kSp24StripVecs + v) * 2) * 64, their indices 64 bytes
  // on; 64-byte aligned (aligned_data).
  std::vector<uint8_t> buffer;
  alignas(64) int32_t offset[kSp24StripCols];  // 128 x each weight row's sum of values
  const uint8_t* pairs() const { return aligned_data(buffer); }
};

// The vpshufb indices of a pair's 4 values from its meta byte m (a dword's low byte, the rest
// zero): bytes m & 3, (m >> 2) & 3 (the first group's columns), 4 + (m >> 4 & 3) and
// 4 + (m >> 6) (the second's). Shifted copies of m put each 2-bit field at the bottom of its
// byte, with zeros or bits of other fields above them, which the mask drops.
inline __m512i sp24_pair_indices(__m512i m) {
  const __m512i spread =
      _mm512_or_si512(_mm512_or_si512(m, _mm512_slli_epi32(m, 6)),
                      _mm512_or_si512(_mm512_slli_epi32(m, 12), _mm512_slli_epi32(m, 18)));
  return _mm512_or_si512(_mm512_and_si512(spread, _mm512_set1_epi32(0x03030303)),
                         _mm512_set1_epi32(0x04040000));
}

// How far ahead of its loads the unpacking prefetches each weight row's values into L2 (its meta
// a quarter as far).
constexpr int64_t kSp24UnpackAhead = 512;

// r[i] <- column i of the 16 x 16 byte matrix whose rows are r[0..15].
inline void transpose_16x16_epi8(__m128i (&r)[16]) {
  __m128i a[16], b[16];
  // a[i]: rows 2i and 2i + 1 as words, columns 0-7; a[8 + i]: columns 8-15.
  for (int i = 0; i < 8; ++i) {
    a[i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
    a[8 + i] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  }
  // b[4c + i]: rows 4i .. 4i + 3 as dwords, columns 4c .. 4c + 3.
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 4; ++i) {
      b[8 * h + i] = _mm_unpacklo_epi16(a[8 * h + 2 * i], a[8 * h + 2 * i + 1]);
      b[8 * h + 4 + i] = _mm_unpackhi_epi16(a[8 * h + 2 * i], a[8 * h + 2 * i + 1]);
    }
  }
  // a[4c + 2j]: rows 8j .. 8j + 7 as qwords, columns 4c and 4c + 1; a[4c + 2j + 1]: columns
  // 4c + 2 and 4c + 3.
  for (int c = 0; c < 4; ++c) {
    for (int j = 0; j < 2; ++j) {
      a[4 * c + 2 * j] = _mm_unpacklo_epi32(b[4 * c + 2 * j], b[4 * c + 2 * j + 1]);
      a[4 * c + 2 * j + 1] = _mm_unpackhi_epi32(b[4 * c + 2 * j], b[4 * c + 2 * j + 1]);
    }
  }
  for (int c = 0; c < 4; ++c) {
    r[4 * c] = _mm_unpacklo_epi64(a[4 * c], a[4 * c + 2]);
    r[4 * c + 1] = _mm_unpackhi_epi64(a[4 * c], a[4 * c + 2]);
    r[4 * c + 2] = _mm_unpacklo_epi64(a[4 * c + 1], a[4 * c + 3]);
    r[4 * c + 3] = _mm_unpackhi_epi64(a[4 * c + 1], a[4 * c + 3]);
  }
}

// Weight rows [n, n + cols) (cols <= kSp24StripCols; zero values past them) into `strip`, 16
// rows by 16 pairs at a time: the values as dwords and the meta as bytes transposed to one
// register per pair. A row holds 2 ceil(K / 4) values and ceil(K / 8) meta bytes; the loads are
// masked at its end, so the last pair of a row whose groups are odd in number has zero values
// where its second group would be (meeting x's zero padding).
inline void unpack_sp24_strip(const SparseGemmArgs& g, int64_t n, int cols, Sp24Strip& strip) {
  const int64_t pairs = (g.K + 7) / 8, row_values = 2 * ((g.K + 3) / 4);
  strip.buffer.resize(pairs * kSp24StripVecs * 128 + 64);
  uint8_t* out = aligned_data(strip.buffer);
  const int8_t* values = typed<int8_t>(g.values);
  const __m512i ones = _mm512_set1_epi8(1);
  for (int v = 0; v < kSp24StripVecs; ++v) {
    const int rows = static_cast<int>(min_i64(16, cols - 16 * v));
    if (rows <= 0) {  // no weight rows: zero values (the indices do not matter)
      for (int64_t p = 0; p < pairs; ++p) {
        _mm512_store_si512(out + (p * kSp24StripVecs + v) * 128, _mm512_setzero_si512());
      }
      _mm512_store_si512(strip.offset + 16 * v, _mm512_setzero_si512());
      continue;
    }
    const int8_t* value_rows = values + (n + 16 * v) * g.ldv;
    const uint8_t* meta_rows = g.meta + (n + 16 * v) * g.ldm;
    __m512i total = _mm512_setzero_si512();
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      const int count = static_cast<int>(min_i64(16, pairs - p0));
      const auto value_mask =
          static_cast<__mmask64>(_bzhi_u64(~uint64_t{0}, min_i64(64, row_values - 4 * p0)));
      __m512i w[16];
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) {
        const int8_t* at = value_rows + c * g.ldv + 4 * p0;
        if (c < rows) __builtin_prefetch(at + kSp24UnpackAhead, 0, 2);
        w[c] = c < rows ? _mm512_maskz_loadu_epi8(value_mask, at) : _mm512_setzero_si512();
      }
      transpose_16x16(w);  // w[q]: pair p0 + q's values of the 16 rows
      for (int q = 0; q < count; ++q) {
        _mm512_store_si512(out + ((p0 + q) * kSp24StripVecs + v) * 128, w[q]);
        total = dpbusd_in_place(total, ones, w[q]);
      }
      const auto meta_mask =
          static_cast<__mmask16>(_bzhi_u32(0xffff, static_cast<uint32_t>(count)));
      __m128i m[16];
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) {
        const uint8_t* at = meta_rows + c * g.ldm + p0;
        if (c < rows) __builtin_prefetch(at + kSp24UnpackAhead / 4, 0, 2);
        m[c] = c < rows ? _mm_maskz_loadu_epi8(meta_mask, at) : _mm_setzero_si128();
      }
      transpose_16x16_epi8(m);  // m[q]: pair p0 + q's meta bytes of the 16 rows
      for (int q = 0; q < count; ++q) {
        _mm512_store_si512(out + ((p0 + q) * kSp24StripVecs + v) * 128 + 64,
                           sp24_pair_indices(_mm512_cvtepu8_epi32(m[q])));
      }
    }
    _mm512_store_si512(strip.offset + 16 * v, _mm512_slli_epi32(total, 7));
  }
}

// Rows [0, R) of x's codes + 128 (row stride ldx, at least 8 ceil(K / 8) columns) against the
// strip: the tile's int32 sums, before the strip's offset comes off.
template <int R>
inline void sp24_strip_sums(const uint8_t* x, int64_t ldx, int64_t pairs, const Sp24Strip& strip,
                            __m512i (&sum)[R][kSp24StripVecs]) {
  const uint8_t* s = strip.pairs();
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 16
    for (int v = 0; v < kSp24StripVecs; ++v) sum[i][v] = _mm512_setzero_si512();
  }
  for (int64_t p = 0; p < pairs; ++p, s += kSp24StripVecs * 128) {
    __m512i w[kSp24StripVecs], index[kSp24StripVecs];
#pragma GCC unroll 16
    for (int v = 0; v < kSp24StripVecs; ++v) {
      w[v] = _mm512_load_si512(s + v * 128);
      index[v] = _mm512_load_si512(s + v * 128 + 64);
    }
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      int64_t eight;
      __builtin_memcpy(&eight, x + i * ldx + 8 * p, sizeof eight);
      const __m512i xv = _mm512_set1_epi64(eight);
#pragma GCC unroll 16
      for (int v = 0; v < kSp24StripVecs; ++v) {
        sum[i][v] = dpbusd_in_place(sum[i][v], _mm512_shuffle_epi8(xv, index[v]), w[v]);
      }
    }
  }
}

// Rows [m, m + R) x weight rows [n, n + cols) of the output; x: row m's codes + 128.
template <int R>
void sp24_strip_tile(const SparseGemmArgs& g, const uint8_t* x, int64_t ldx, int64_t m, int64_t n,
                     int cols, const Sp24Strip& strip) {
  __m512i sum[R][kSp24StripVecs];
  sp24_strip_sums<R>(x, ldx, (g.K + 7) / 8, strip, sum);
#pragma GCC unroll 16
  for (int v = 0; v < kSp24StripVecs; ++v) {
    if (16 * v >= cols) break;  // no pointer past the columns, even under a zero mask
    const __mmask16 mask = first_lanes(cols - 16 * v);
    const int64_t n0 = n + 16 * v;
    const __m512 ws = _mm512_maskz_loadu_ps(mask, g.scales + n0);
    const __m512 bias = g.bias ? _mm512_maskz_loadu_ps(mask, g.bias + n0) : _mm512_setzero_ps();
    const __m512i offset = _mm512_load_si512(strip.offset + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      store_scaled(g.out, g.out_type, (m + i) * g.ldo + n0, mask,
                   _mm512_sub_epi32(sum[i][v], offset), g.x_scales[m + i], ws, bias);
    }
  }
}

// sp24_strip_tile for the last rows < kSp24StripRows of a block.
template <int R = kSp24StripRows - 1>
void sp24_strip_tile_edge(int rows, const SparseGemmArgs& g, const uint8_t* x, int64_t ldx,
                          int64_t m, int64_t n, int cols, const Sp24Strip& strip) {
  if constexpr (R > 1) {
    if (rows < R) return sp24_strip_tile_edge<R - 1>(rows, g, x, ldx, m, n, cols, strip);
  }
  sp24_strip_tile<R>(g, x, ldx, m, n, cols, strip);
}

void sp24_q8_strips(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  // The block's rows of x's codes, + 128 (a flip of the top bit), 8 ceil(K / 8) columns each.
  thread_local std::vector<uint8_t> flipped;
  thread_local Sp24Strip strip;
  const int64_t ldx = (g.K + 7) / 8 * 8;
  flipped.resize((m1 - m0) * ldx);
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* src = g.x_q8 + m * g.ldx_q8;
    uint8_t* dst = flipped.data() + (m - m0) * ldx;
    for (int64_t k = 0; k < ldx; ++k) dst[k] = static_cast<uint8_t>(src[k] ^ 0x80);
  }
  for (int64_t n = n0; n < n1; n += kSp24StripCols) {
    const int cols = static_cast<int>(min_i64(kSp24StripCols, n1 - n));
    unpack_sp24_strip(g, n, cols, strip);
    int64_t m = m0;
    for (; m + kSp24StripRows <= m1; m += kSp24StripRows) {
      sp24_strip_tile<kSp24StripRows>(g, flipped.data() + (m - m0) * ldx, ldx, m, n, cols, strip);
    }
    if (m < m1) {
      sp24_strip_tile_edge(static_cast<int>(m1 - m), g, flipped.data() + (m - m0) * ldx, ldx, m, n,
                           cols, strip);
    }
  }
}

// The least M at which 2:4 W8A8 takes the strips (KernelTable::sparse24_q8_strip_min_m): past
// one tile of the dot kernels (kSpMaxTileM rows), where those read the weights a second time.
// Zen 4, 2 threads, the op, one process alternating the two, 7 rounds, median; dot time / strip
// time at M = 4, 5, 8: 576x1536 1.38, 1.85, 2.03; 1536x576 1.03, 1.32, 1.54; 2048^2 0.81, 1.13,
// 1.29; 4096^2 0.75, 1.01, 1.23; 4096x11008 0.67, 0.86, 1.04; 11008x4096 1.06, 1.20, 1.31.
constexpr int64_t kSp24StripMinM = kSpMaxTileM + 1;
#else
constexpr int64_t kSp24StripMinM = INT64_MAX;
#endif

#if defined(TORCHSLIM_ISA_AVX512)
// ------------------------------------------------------------------------- bitmask W8A8 strips
// Many rows of x (SparseGemmArgs::q8_strips) on a CPU with VBMI2. An unstructured row has no
// fixed count of values per group of columns to pair x's codes with, so its strips are the dense
// W8A8 strips (int8_gemm.h, i8_strips): each weight row's values go back to their columns
// (vpexpandb under its mask, 64 columns a step, zeros where the mask has none) and into the VNNI
// order, once per block of x's rows, and the block's rows meet them as they meet a dense weight.
// Every product is made, as in the dense op; the dot kernels make only the kept ones, but read
// the weights once per tile of kSpMaxTileM rows of x. x's codes are padded to a whole number of
// 64 columns (zeros past K), K at most kI8StripMaxK.
#define TORCHSLIM_VBMI2_STRIPS                                                     \
  __attribute__((                                                                  \
      target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,popcnt," \
             "bmi,bmi2,avx512vbmi2")))

// Row n's mask word at mask byte b < ceil(K / 8) (its bits past K cleared).
inline uint64_t mask_word(const SparseGemmArgs& g, int64_t n, int64_t b) {
  const uint8_t* at = g.meta + n * g.ldm + b;
  uint64_t word = 0;
  if (g.K - 8 * b >= 64) {
    __builtin_memcpy(&word, at, sizeof word);
    return word;
  }
  for (int64_t i = 0; 8 * (b + i) < g.K; ++i) word |= uint64_t{at[i]} << (8 * i);
  return word & ((uint64_t{1} << (g.K - 8 * b)) - 1);
}

// Weight rows [n, n + cols) into `strip` as unpack_i8_strip lays out dense rows (w + 128, zero
// weights past cols). A row whose mask holds another count than its offsets give is reported in
// bad_row and taken as zeros: no value of it is read.
TORCHSLIM_VBMI2_STRIPS void unpack_bitmask_strip(const SparseGemmArgs& g, int64_t n, int cols,
                                                 int64_t K64, I8Strip& strip) {
  strip.buffer.resize(K64 / 4 * kI8StripVecs * 64 + 64);
  uint8_t* codes = aligned_data(strip.buffer);
  const int8_t* values = typed<int8_t>(g.values);
  const __m512i top = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int v = 0; v < kI8StripVecs; ++v) {
    const int8_t* at[16];
    for (int c = 0; c < 16; ++c) {
      const int64_t row = n + 16 * v + c;
      at[c] = nullptr;
      if (16 * v + c >= cols) continue;
      int64_t count = 0;
      for (int64_t b = 0; 8 * b < g.K; b += 8) count += __builtin_popcountll(mask_word(g, row, b));
      if (count == g.row_offsets[row + 1] - g.row_offsets[row]) {
        at[c] = values + g.row_offsets[row];
      } else {
        report_bad_row(g, row);
      }
    }
    for (int64_t k = 0; k < K64; k += 64) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) {
        if (at[c] == nullptr) {
          r[c] = _mm512_setzero_si512();
          continue;
        }
        const uint64_t bits = k < g.K ? mask_word(g, n + 16 * v + c, k / 8) : 0;
        // The values into a register (a load of just them), then to their lanes: 0.8-0.9x the
        // time of vpexpandb from memory at M = 4-8 (4096^2, Zen 4).
        const int count = __builtin_popcountll(bits);
        const __m512i packed = _mm512_maskz_loadu_epi8(_bzhi_u64(~uint64_t{0}, count), at[c]);
        r[c] = _mm512_maskz_expand_epi8(bits, packed);
        at[c] += count;
      }
      transpose_16x16(r);  // r[q]: bytes 4 q .. 4 q + 3 of each row, step k / 4 + q
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) {
        _mm512_store_si512(codes + ((k / 4 + q) * kI8StripVecs + v) * 64,
                           _mm512_xor_si512(r[q], top));
      }
    }
  }
}

// The dense W8A8 strips' arguments for a sparse W8A8 op's: x's codes and scales, the weights'
// scales, the bias and the output, K rounded up to a whole step of 64 (x_q8 padded with zeros).
inline Int8GemmArgs q8_strip_args(const SparseGemmArgs& g) {
  Int8GemmArgs d{};
  d.a = g.x_q8;
  d.lda = g.ldx_q8;
  d.a_scale = g.x_scales;
  d.b_scale = g.scales;
  d.bias = g.bias;
  d.out = g.out;
  d.ldo = g.ldo;
  d.out_type = g.out_type;
  d.M = g.M;
  d.N = g.N;
  d.K = (g.K + 63) / 64 * 64;
  return d;
}

TORCHSLIM_VBMI2_STRIPS void bitmask_q8_strips(const SparseGemmArgs& g, int64_t m0, int64_t m1,
                                              int64_t n0, int64_t n1) {
  const Int8GemmArgs d = q8_strip_args(g);
  const int64_t K64 = d.K;
  i8_strips(d, m0, m1, n0, n1, [&](int64_t n, int cols, I8Strip& strip) {
    unpack_bitmask_strip(g, n, cols, K64, strip);
    return true;
  });
}
#undef TORCHSLIM_VBMI2_STRIPS

// The least M at which bitmask W8A8 takes the strips (KernelTable::bitmask_q8_strip_min_m), by
// K, on CPUs with VBMI2 and K up to kI8StripMaxK: the strips lay out every weight, the dot
// kernels walk only the kept ones, so a long K takes more rows of x to pay for the layout. Zen
// 4, 2 threads, the op, 50% unstructured, one process alternating the two, 5 rounds, median;
// dot time / strip time at M = 5, 8, 12, 16: 576x1536 1.10, 1.15, -, 1.64; 1536x576 0.98,
// 0.95, 1.15, 1.28; 2048^2 0.92, 1.05, 1.33, 1.36; 4096^2 -, 0.74, -, 1.20 (90%: 1.21 at 16);
// 11008x4096 0.68, 0.87, 1.02, 1.22; 4096x11008 0.52, 0.85, 0.78, 0.97 (1.16 at 24).
int64_t bitmask_q8_strip_min_m(int64_t K) {
  static const bool vbmi2 = cpu_features().avx512vbmi2;
  if (!vbmi2 || K > kI8StripMaxK) return INT64_MAX;
  return K <= 1024 ? kSpMaxTileM + 1 : 16;
}
#else
int64_t bitmask_q8_strip_min_m(int64_t) { return INT64_MAX; }
#endif

void sparse24_gemm(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
#if defined(TORCHSLIM_ISA_AVX512)
  if (g.x_q8 != nullptr && g.q8_strips) return sp24_q8_strips(g, m0, m1, n0, n1);
#endif
  if (g.x_q8 != nullptr) return q8_dot<Sp24Q8>(g, m0, m1, n0, n1);
  sparse_dispatch<Sp24Tile, Sp24Spmm>(g, m0, m1, n0, n1);
}

void bitmask_gemm(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
#if defined(TORCHSLIM_ISA_AVX512)
  if (g.x_q8 != nullptr && g.q8_strips) return bitmask_q8_strips(g, m0, m1, n0, n1);
#endif
  if (g.x_q8 != nullptr) return q8_dot<BitmaskQ8>(g, m0, m1, n0, n1);
  sparse_dispatch<BitmaskTile, BitmaskSpmm>(g, m0, m1, n0, n1);
}

// Block rows of R >= kBlockRowsTogether: rows of a block row together; shorter ones: one row at
// a time, its blocks on independent chains; M > kSpMaxTileM: the SpMM.
template <typename T>
struct BlockGemm {
  static void run(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
#if defined(TORCHSLIM_SPARSE_VECTOR)
    if (!g.panels && g.block_rows >= kBlockRowsTogether) {
      return block_rows_dot<T>(g, m0, m1, n0, n1);
    }
#endif
    if (!g.panels) return sparse_block<T, BlockTile>(g, m0, m1, n0, n1);
    spmm<T, BlockRows>(g, m0, m1, n0, n1);
  }
};

void csr_gemm(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  sparse_dispatch<CsrTile, CsrSpmm>(g, m0, m1, n0, n1);
}

// ------------------------------------------------------------------------------ block, W8A8
// int8 codes against x quantized per token (SparseGemmArgs::x_q8, rows a whole number of C
// columns wide, zero codes past K: block_q8_padded_k): a weight row's sums over its blocks are
// exact in int32 (kept modulo 2^32, as every W8A8 path keeps them), so the output is the
// reference's to the bit. A block's R rows of C codes lie contiguous, R * C bytes.
//
// The vector levels load a block kBytes at a time (64 on AVX-512, 32 on AVX2). Where C divides
// kBytes a load holds kBytes / C whole rows, and one multiply-add meets them with x's C codes
// at the block's columns repeated kBytes / C times (a broadcast), summing by fours into the
// rows' 32-bit lanes: no index per value, each byte of the weight read once. Where C is a
// multiple of kBytes each load is part of one row, against x's codes there. AVX-512 (VNNI):
// one vpdpbusd, x offset by 128 (its unsigned side) and a second vpdpbusd per load, shared by
// the rows of x, summing 128 times the codes for the end to take off. AVX2: the dense dot
// kernels' sign trick (|w| against x * sign(w), vpmaddubsw, vpmaddwd). A block row's loads are
// walked up to kBlockQ8Vectors at a time, each with an accumulator per row of x across the
// block row's blocks; their lanes are added up per row once per block row. Other C (and the
// portable level): one code at a time.
constexpr int kBlockQ8Vectors = 4;

// f(b, first) for each block b of block row r whose column of blocks lies inside K (first: its
// first column); false when one does not (it is skipped).
template <class F>
TORCHSLIM_INLINE bool for_each_block(const SparseGemmArgs& g, int64_t r, const F& f) {
  bool fits = true;
  for (int64_t b = g.row_offsets[r]; b < g.row_offsets[r + 1]; ++b) {
    const int64_t first = block_first_column(g, b);
    if (first < 0) {
      fits = false;
      continue;
    }
    f(b, first);
  }
  return fits;
}

// Block row r's rows [0, R) against rows [m, m + RM) of x_q8, one code at a time: totals[i][mm]
// += the row's sums (modulo 2^32). False when a block's column of blocks lies outside K.
template <int RM>
bool block_q8_row_scalar(const SparseGemmArgs& g, int64_t m, int64_t r, uint32_t* totals) {
  const int64_t R = g.block_rows, C = g.block_cols;
  const int8_t* values = typed<int8_t>(g.values);
  return for_each_block(g, r, [&](int64_t b, int64_t first) {
    const int64_t width = min_i64(C, g.K - first);
    const int8_t* w = values + b * R * C;
    for (int64_t i = 0; i < R; ++i) {
      for (int64_t j = 0; j < width; ++j) {
        const int32_t wij = w[i * C + j];
        for (int mm = 0; mm < RM; ++mm) {
          totals[i * RM + mm] +=
              static_cast<uint32_t>(wij * g.x_q8[(m + mm) * g.ldx_q8 + first + j]);
        }
      }
    }
  });
}

#if defined(TORCHSLIM_ISA_AVX512) || defined(TORCHSLIM_ISA_AVX2)
#if defined(TORCHSLIM_ISA_AVX512)
struct BlockQ8Vec {
  using V = __m512i;
  struct W {
    __m512i codes;
  };
  static constexpr int kBytes = 64;
  using Part = __mmask64;  // which of a load's bytes lie inside the block
  static V zero() { return _mm512_setzero_si512(); }
  static Part part(int64_t left) {
    return left >= 64 ? ~__mmask64{0} : _bzhi_u64(~uint64_t{0}, left > 0 ? left : 0);
  }
  static W load(const int8_t* p, Part part) { return {_mm512_maskz_loadu_epi8(part, p)}; }
  static V offset_codes(V v) { return _mm512_xor_si512(v, _mm512_set1_epi8(-128)); }
  static V x4(int32_t word) { return offset_codes(_mm512_set1_epi32(word)); }
  static V x8(int64_t word) { return offset_codes(_mm512_set1_epi64(word)); }
  static V x16(const int8_t* p) {
    return offset_codes(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static V x32(const int8_t* p) {
    return offset_codes(
        _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
  static V x_all(const int8_t* p) { return offset_codes(_mm512_loadu_si512(p)); }
  // acc + each four of x (+ 128) times w; offset + 128 times each four of w
  static V dot(V acc, V x, const W& w) { return _mm512_dpbusd_epi32(acc, x, w.codes); }
  static V offset(V off, const W& w) {
    return _mm512_dpbusd_epi32(off, _mm512_set1_epi8(-128), w.codes);
  }
  static V sums(V acc, V off) { return _mm512_sub_epi32(acc, off); }
  static void store(uint32_t* p, V v) { _mm512_storeu_si512(p, v); }
};
#else
struct BlockQ8Vec {
  using V = __m256i;
  struct W {
    __m256i abs, codes;
  };
  static constexpr int kBytes = 32;
  using Part = int64_t;  // how many of a load's bytes lie inside the block
  static V zero() { return _mm256_setzero_si256(); }
  static Part part(int64_t left) { return left; }
  static W load(const int8_t* p, Part left) {
    __m256i codes;
    if (left >= 32) {
      codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    } else {  // a block's last bytes: nothing past them is read
      alignas(32) int8_t part[32] = {};
      __builtin_memcpy(part, p, static_cast<std::size_t>(left > 0 ? left : 0));
      codes = _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
    }
    return {_mm256_abs_epi8(codes), codes};
  }
  static V x4(int32_t word) { return _mm256_set1_epi32(word); }
  static V x8(int64_t word) { return _mm256_set1_epi64x(word); }
  static V x16(const int8_t* p) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static V x32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static V x_all(const int8_t* p) { return x32(p); }
  // |w| against x * sign(w): x's codes are at most 127 in magnitude, so the pairs fit int16
  static V dot(V acc, V x, const W& w) {
    const __m256i pairs = _mm256_maddubs_epi16(w.abs, _mm256_sign_epi8(x, w.codes));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  static V offset(V off, const W&) { return off; }  // no offset
  static V sums(V acc, V) { return acc; }
  static void store(uint32_t* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
};
#endif

// x's codes for the block at x + first as a load of C < kBytes columns needs them (a whole
// row's, repeated), or for load t of a row of C (a multiple of kBytes; C = 0 in the template,
// the width given by wide_c).
template <int C>
TORCHSLIM_INLINE BlockQ8Vec::V block_q8_x(const int8_t* p, int64_t t, int64_t wide_c) {
  if constexpr (C == 4) {
    int32_t word;
    __builtin_memcpy(&word, p, sizeof word);
    return BlockQ8Vec::x4(word);
  } else if constexpr (C == 8) {
    int64_t word;
    __builtin_memcpy(&word, p, sizeof word);
    return BlockQ8Vec::x8(word);
  } else if constexpr (C == 16) {
    return BlockQ8Vec::x16(p);
  } else if constexpr (C == 32 && BlockQ8Vec::kBytes > 32) {
    return BlockQ8Vec::x32(p);
  } else {  // C == kBytes, or a multiple of it: the load's part of its row
    const int64_t parts = C == 0 ? wide_c / BlockQ8Vec::kBytes : 1;
    return BlockQ8Vec::x_all(p + BlockQ8Vec::kBytes * (t % parts));
  }
}

// Loads [t0, t0 + T) of each block of block row r against rows [m, m + RM) of x_q8; adds each
// load's rows' sums into totals (C: one that divides kBytes, or 0 for a multiple of it,
// g.block_cols). False when a block's column of blocks lies outside K.
template <int C, int RM>
bool block_q8_row_loads(const SparseGemmArgs& g, int64_t m, int64_t r, int64_t t0, int T,
                        uint32_t* totals) {
  using Vec = BlockQ8Vec;
  constexpr int kBytes = Vec::kBytes, kLanes = kBytes / 4;
  const int64_t R = g.block_rows, wide_c = g.block_cols, block_bytes = R * wide_c;
  const int8_t* values = typed<int8_t>(g.values);
  typename Vec::V acc[kBlockQ8Vectors][RM], offset[kBlockQ8Vectors];
  typename Vec::Part part[kBlockQ8Vectors];
#pragma GCC unroll 4
  for (int t = 0; t < kBlockQ8Vectors; ++t) {
    part[t] = Vec::part(block_bytes - kBytes * (t0 + t));
    offset[t] = Vec::zero();
#pragma GCC unroll 4
    for (int mm = 0; mm < RM; ++mm) acc[t][mm] = Vec::zero();
  }
  // (the blocks' loop as for_each_block's, written out: through its lambda the AVX2 build took
  // 2.9x the time at 4096^2, 16x16@50%, M = 1, one thread)
  bool fits = true;
  for (int64_t b = g.row_offsets[r]; b < g.row_offsets[r + 1]; ++b) {
    const int64_t first = block_first_column(g, b);
    if (first < 0) {
      fits = false;
      continue;
    }
    const int8_t* w = values + b * block_bytes;
    typename Vec::V xv[RM];
    if constexpr (C != 0) {
#pragma GCC unroll 4
      for (int mm = 0; mm < RM; ++mm)
        xv[mm] = block_q8_x<C>(g.x_q8 + (m + mm) * g.ldx_q8 + first, 0, 0);
    }
#pragma GCC unroll 4
    for (int t = 0; t < kBlockQ8Vectors; ++t) {
      if (t >= T) break;
      const typename Vec::W wt = Vec::load(w + kBytes * (t0 + t), part[t]);
      offset[t] = Vec::offset(offset[t], wt);
#pragma GCC unroll 4
      for (int mm = 0; mm < RM; ++mm) {
        if constexpr (C == 0) {
          xv[mm] = block_q8_x<0>(g.x_q8 + (m + mm) * g.ldx_q8 + first, t0 + t, wide_c);
        }
        acc[t][mm] = Vec::dot(acc[t][mm], xv[mm], wt);
      }
    }
  }
  // Load t's lanes: C / 4 for each of its kBytes / C rows, from row (t0 + t) kBytes / C (C
  // dividing kBytes); or all of them for row (t0 + t) / (C / kBytes).
#pragma GCC unroll 4
  for (int t = 0; t < kBlockQ8Vectors; ++t) {
    if (t >= T) break;
#pragma GCC unroll 4
    for (int mm = 0; mm < RM; ++mm) {
      alignas(64) uint32_t lanes[kLanes];
      Vec::store(lanes, Vec::sums(acc[t][mm], offset[t]));
      constexpr int kRows = C == 0 ? 1 : kBytes / C, kRowLanes = C == 0 ? kLanes : C / 4;
      const int64_t row0 = C == 0 ? (t0 + t) / (wide_c / kBytes) : (t0 + t) * kRows;
      for (int p = 0; p < kRows && row0 + p < R; ++p) {
        uint32_t total = 0;
        for (int l = 0; l < kRowLanes; ++l) total += lanes[p * kRowLanes + l];
        totals[(row0 + p) * RM + mm] += total;
      }
    }
  }
  return fits;
}

// Block row r against rows [m, m + RM) of x_q8, its loads kBlockQ8Vectors at a time.
template <int C, int RM>
bool block_q8_row_vector(const SparseGemmArgs& g, int64_t m, int64_t r, uint32_t* totals) {
  const int64_t loads = (g.block_rows * g.block_cols + BlockQ8Vec::kBytes - 1) / BlockQ8Vec::kBytes;
  bool fits = true;
  for (int64_t t0 = 0; t0 < loads; t0 += kBlockQ8Vectors) {
    const int T = static_cast<int>(min_i64(kBlockQ8Vectors, loads - t0));
    fits &= block_q8_row_loads<C, RM>(g, m, r, t0, T, totals);
  }
  return fits;
}

// The block row's sums by the vector loads where C divides kBytes or is a multiple of it, else
// one code at a time.
template <int RM>
bool block_q8_row(const SparseGemmArgs& g, int64_t m, int64_t r, uint32_t* totals) {
  const auto vector = [&](auto c) {
    return block_q8_row_vector<decltype(c)::value, RM>(g, m, r, totals);
  };
  const int64_t C = g.block_cols;
  if (C == 4) return vector(std::integral_constant<int, 4>{});
  if (C == 8) return vector(std::integral_constant<int, 8>{});
  if (C == 16) return vector(std::integral_constant<int, 16>{});
  if (C == 32) return vector(std::integral_constant<int, 32>{});
  if (C == BlockQ8Vec::kBytes) return vector(std::integral_constant<int, BlockQ8Vec::kBytes>{});
  if (C % BlockQ8Vec::kBytes == 0) return vector(std::integral_constant<int, 0>{});
  return block_q8_row_scalar<RM>(g, m, r, totals);
}
#else
template <int RM>
bool block_q8_row(const SparseGemmArgs& g, int64_t m, int64_t r, uint32_t* totals) {
  return block_q8_row_scalar<RM>(g, m, r, totals);
}
#endif

// Rows [m0, m1) of x_q8 against weight rows [n0, n1), block row by block row, in tiles of up to
// kSpMR rows of x (at large M each tile walks the block row's blocks again).
void block_q8(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t R = g.block_rows;
  thread_local std::vector<uint32_t> totals;
  thread_local std::vector<float> sums;  // a row of x's, for store_sums
  totals.resize(static_cast<std::size_t>(R * kSpMR));
  sums.resize(static_cast<std::size_t>(R));
  for (int64_t r = n0 / R; r * R < n1; ++r) {
    const int64_t first = r * R, last = min_i64(n1, first + R);
    for (int64_t m = m0; m < m1; m += kSpMR) {
      with_tile_rows(m1 - m, [&](auto tile_rows) {
        constexpr int RM = decltype(tile_rows)::value;
        std::fill(totals.begin(), totals.end(), 0u);
        const bool fits = block_q8_row<RM>(g, m, r, totals.data());
        if (!fits) report_bad_row(g, first);
        const int64_t from = std::max(first, n0);
        for (int mm = 0; mm < RM; ++mm) {
          for (int64_t n = from; n < last; ++n) {
            const int32_t sum = static_cast<int32_t>(totals[(n - first) * RM + mm]);
            sums[n - from] = static_cast<float>(sum) * g.x_scales[m + mm];
          }
          store_sums(g, m + mm, from, last - from, sums.data());
        }
      });
    }
  }
}

void block_gemm(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (g.x_q8 != nullptr) return block_q8(g, m0, m1, n0, n1);
  with_value_type(g.v_type, [&](auto value) {  // every M: BlockGemm picks the kernel
    BlockGemm<decltype(value)>::run(g, m0, m1, n0, n1);
  });
}

}  // namespace
}  // namespace torchslim::cpu::TORCHSLIM_ISA_NS
