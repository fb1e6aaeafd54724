// Sparse GEMM for pruned weights in the sliced format (torchslim.reference.sparse), written
// once and compiled per ISA level after sparse_gemm.h, whose pieces it shares:
//
//   sliced_gemm  out = x . W^T + bias, W cut into blocks of kSlicedRows weight rows and slices
//                of kSlicedCols columns; a block's slice holds groups of up to kSlicedGroup
//                nonzeros of one row, each a row byte and a count byte, the values and one
//                byte per value, its column within the slice.
//
// The csr dot kernel gathers x one value at a time from memory, and at K = 11008 x no longer
// stays in L1. Here a block's rows are summed slice by slice instead: a row of x's slice is
// held in registers for every group of the block's slice, and each row's partial sums stay in
// a vector in L1 (one load, one FMA and one store per group and row of x).
//
// AVX-512 gathers a group's x with permutes: the 16 column bytes, widened, pick from the 8
// registers of the slice through four two-table vpermt2ps and three blends (on the slice's
// column bits 5 and 6), and one masked FMA takes the count's lanes. bf16 values against bf16 x
// (AVX512_BF16 and VBMI2) take two groups a step in 32 word lanes and one vdpbf16ps (see
// sliced_bf16_block_dot). Other levels gather as the csr kernel does (vinsertps from L1), masking
// the lanes past the count: there the layout only adds work, and the AVX2 build ran slower than
// csr's (benchmarks/NOTES.md).
//
// In a slice, a block's groups go by round: every row's first group, then the second groups of
// the rows that have them, and so on. Two groups in a row then update different rows (unless one
// row has more groups than all the others), so a group rarely waits for the previous one's
// store. With one row's groups one after another, a standalone harness ran 2.5x slower at 50%
// density on Zen 4.
//
// Every read stays inside the arrays as the binding checked them: group_offsets (B * S + 1) and
// value_offsets (B + 1) non-decreasing, values and columns with kSlicedGroup slots past the last
// group. A group whose row byte is not a row of its block, whose count is not in
// [1, kSlicedGroup] or whose column bytes reach past the slice, or a block whose counts do not
// add up to its values, stops the block: its first row is reported in bad_row. A slice's groups
// are checked before its loop and its column bytes after it, so the group loops carry no check
// (a column byte up to 255 still reads inside x's padded row). The dot kernels read x padded
// with NaN up to a whole slice plus one (see sliced_padded_k), so a column past K turns its
// row's sum into NaN; only such rows are checked again (the last slice's columns), which tells a
// NaN of x from a bad column.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "sparse_gemm.h"

namespace torchslim::cpu::TORCHSLIM_ISA_NS {
namespace {

struct SlicedGroup {
  int64_t row, count;
};

// Whether row `row` of block b has a column past K in its last slice (groups [g0, g1) from value
// index vi): a NaN sum is then a bad column, not a NaN of x.
inline bool sliced_row_past_k(const SparseGemmArgs& g, int64_t row, int64_t g0, int64_t g1,
                              int64_t vi, int64_t width) {
  for (int64_t grp = g0; grp < g1; ++grp) {
    const int64_t count = g.groups[2 * grp + 1];
    if (g.groups[2 * grp] == row) {
      for (int64_t t = 0; t < count; ++t) {
        if (g.meta[vi + t] >= width) return true;
      }
    }
    vi += count;
  }
  return false;
}

// The block's arrays, read once into registers: the hot loop's stores (to the partial sums)
// would otherwise make the compiler read them again for every group.
template <typename T>
struct SlicedArrays {
  const T* values;
  const uint8_t* columns;
  const uint8_t* groups;
  int64_t values_total;
  explicit SlicedArrays(const SparseGemmArgs& g)
      : values(typed<T>(g.values)),
        columns(g.meta),
        groups(g.groups),
        values_total(g.values_total) {}
  // The group's row and count, and whether it is well formed: its row one of the block's
  // `rows`, its count in [1, kSlicedGroup], and its values inside the array.
  TORCHSLIM_INLINE bool group(int64_t grp, int64_t vi, int64_t rows, SlicedGroup& out) const {
    out.row = groups[2 * grp];
    out.count = groups[2 * grp + 1];
    return (out.row < rows) & (static_cast<uint64_t>(out.count - 1) < kSlicedGroup) &
           (vi + kSlicedGroup <= values_total);
  }
};

// At the start of a slice of g groups (from value index vi), the dot kernel prefetches the values
// and columns of about the next slice: [vi + 16 g, vi + 32 g), 16 g bounding the slice's values.
// Per line rather than per group: a group takes about 11 values, and two prefetches per group
// cost more than they hide once the weight is in cache.
template <typename T>
TORCHSLIM_INLINE inline void sliced_prefetch(const T* values, const uint8_t* columns, int64_t vi,
                                             int64_t groups) {
  const int64_t span = groups * kSlicedGroup;  // values
  // [base + bytes, base + 2 bytes), by integer addresses: the lines may lie past the arrays,
  // which a prefetch may touch.
  const auto ahead = [](const void* base, int64_t bytes) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(bytes);
    for (int64_t off = 0; off < bytes; off += 64) {
      __builtin_prefetch(reinterpret_cast<const void*>(first + static_cast<uintptr_t>(off)));
    }
  };
  ahead(values + vi, span * static_cast<int64_t>(sizeof(T)));
  ahead(columns + vi, span);
}

#if defined(TORCHSLIM_ISA_AVX512)
// 16 values as fp32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
inline __m512 load16(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// A group's 16 column bytes as permute indices (the low 5 bits pick from a pair of x's vectors)
// and bits 5 and 6 as masks (which pair), taken from the bytes: 128-bit shifts and vpmovb2m
// cost half what two 512-bit vptestmd do on Zen 4.
struct SlicedColumns {
  __m512i idx;
  __mmask16 bit5, bit6;
  explicit SlicedColumns(const uint8_t* columns) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(columns));
    idx = _mm512_cvtepu8_epi32(bytes);
    bit5 = _mm_movepi8_mask(_mm_slli_epi16(bytes, 2));
    bit6 = _mm_movepi8_mask(_mm_add_epi8(bytes, bytes));
  }
};

// R rows of x's slice, 8 vectors each (in registers for R <= 2).
template <int R>
struct SlicedX {
  __m512 t[R][8];
  SlicedX(const float* x, int64_t ldx) {
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) t[i][j] = _mm512_loadu_ps(x + i * ldx + 16 * j);
    }
  }
  // Row i's x[column j] for each lane j of a group's columns.
  TORCHSLIM_INLINE __m512 gather(int i, const SlicedColumns& c) const {
    const __m512 p0 = _mm512_permutex2var_ps(t[i][0], c.idx, t[i][1]);
    const __m512 p1 = _mm512_permutex2var_ps(t[i][2], c.idx, t[i][3]);
    const __m512 p2 = _mm512_permutex2var_ps(t[i][4], c.idx, t[i][5]);
    const __m512 p3 = _mm512_permutex2var_ps(t[i][6], c.idx, t[i][7]);
    return _mm512_mask_blend_ps(c.bit6, _mm512_mask_blend_ps(c.bit5, p0, p1),
                                _mm512_mask_blend_ps(c.bit5, p2, p3));
  }
};
#else
template <int R>
struct SlicedX {
  const float* x;  // row i of the slice at x + i * ldx
  int64_t ldx;
  SlicedX(const float* x_, int64_t ldx_) : x(x_), ldx(ldx_) {}
};
#endif

// Partial sums of a block's rows against R rows of x: 16 floats per row and row of x (one
// AVX-512 vector, two AVX2 ones, or 16 scalar slots summed as the lanes are).
template <int R>
struct alignas(64) SlicedSums {
  float acc[kSlicedRows][R][kSlicedGroup];
  void zero(int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int i = 0; i < R; ++i) {
        for (int t = 0; t < kSlicedGroup; ++t) acc[r][i][t] = 0.0f;
      }
    }
  }
};

// The group's values (from value index vi) against the R rows of x's slice, added to its row's
// partial sums.
template <typename T, int R>
TORCHSLIM_INLINE inline void sliced_fma(const SlicedArrays<T>& a, const SlicedX<R>& xs, int64_t vi,
                                        const SlicedGroup& grp, SlicedSums<R>& sums) {
  const T* v = a.values + vi;
  const uint8_t* columns = a.columns + vi;
#if defined(TORCHSLIM_ISA_AVX512)
  const auto lanes = static_cast<__mmask16>(_bzhi_u32(0xffff, static_cast<uint32_t>(grp.count)));
  const SlicedColumns idx(columns);
  const __m512 w = load16(v);
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    float* acc = sums.acc[grp.row][i];
    __m512 sum = _mm512_mask3_fmadd_ps(w, xs.gather(i, idx), _mm512_load_ps(acc), lanes);
    // A whole-vector store: GCC would otherwise turn the masked FMA and the store into an
    // FMA and a masked store, which Zen 4 cannot forward to the next load of the row's sums.
    asm("" : "+v"(sum));
    _mm512_store_ps(acc, sum);
  }
#elif defined(TORCHSLIM_SPARSE_VECTOR)
  const __m256i count = _mm256_set1_epi32(static_cast<int>(grp.count));
  const __m256 lo =
      _mm256_castsi256_ps(_mm256_cmpgt_epi32(count, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  const __m256 hi = _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(count, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)));
  const __m256 w_lo = _mm256_and_ps(load8(v), lo), w_hi = _mm256_and_ps(load8(v + 8), hi);
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    float* acc = sums.acc[grp.row][i];
    const float* x = xs.x + i * xs.ldx;
    const __m256 x_lo = _mm256_and_ps(csr_gather(x, columns), lo);
    const __m256 x_hi = _mm256_and_ps(csr_gather(x, columns + 8), hi);
    _mm256_store_ps(acc, _mm256_fmadd_ps(w_lo, x_lo, _mm256_load_ps(acc)));
    _mm256_store_ps(acc + 8, _mm256_fmadd_ps(w_hi, x_hi, _mm256_load_ps(acc + 8)));
  }
#else
  for (int64_t t = 0; t < grp.count; ++t) {
    const float w = load_f32(v + t);
    for (int i = 0; i < R; ++i) sums.acc[grp.row][i][t] += w * xs.x[i * xs.ldx + columns[t]];
  }
#endif
}

// The sum of a row's 16 partial sums (vector adds, then one horizontal reduction).
TORCHSLIM_INLINE inline float sliced_total(const float* acc) {
  FVec::R v = FVec::load(acc);
#pragma GCC unroll 16
  for (int t = FVec::kWidth; t < kSlicedGroup; t += FVec::kWidth) {
    v = FVec::add(v, FVec::load(acc + t));
  }
  return FVec::reduce_add(v);
}

// Whether a slice's groups [g0, g1), from value index vi, are well formed: each row byte one of
// the block's `rows`, each count in [1, kSlicedGroup], and their values ending by `limit` (the
// block's end, kSlicedGroup slots inside the arrays, so that every group's 16-lane loads stay
// inside). Checked once a slice, so that the group loops carry no check: per group, the checks
// cost the bf16 dot below a quarter of its time.
inline bool sliced_slice_ok(const uint8_t* groups, int64_t g0, int64_t g1, int64_t rows, int64_t vi,
                            int64_t limit) {
  int64_t grp = g0;
  bool bad = false;
#if defined(TORCHSLIM_ISA_AVX512)
  // 32 groups a vector, as 16-bit words: the row in the low byte, the count in the high one.
  const __m512i row_limit = _mm512_set1_epi16(static_cast<int16_t>(rows));
  const __m512i one = _mm512_set1_epi16(1), most = _mm512_set1_epi16(kSlicedGroup - 1);
  __m512i counts = _mm512_setzero_si512();
  for (; grp < g1; grp += 32) {
    const auto lanes =
        static_cast<__mmask32>(_bzhi_u32(~0u, static_cast<uint32_t>(min_i64(32, g1 - grp))));
    const __m512i words = _mm512_maskz_loadu_epi16(lanes, groups + 2 * grp);
    const __m512i count = _mm512_srli_epi16(words, 8);
    const __m512i row = _mm512_and_si512(words, _mm512_set1_epi16(0xff));
    bad |= (_mm512_mask_cmpge_epu16_mask(lanes, row, row_limit) |
            _mm512_mask_cmpgt_epu16_mask(lanes, _mm512_sub_epi16(count, one), most)) != 0;
    counts = _mm512_add_epi64(counts, _mm512_sad_epu8(count, _mm512_setzero_si512()));
  }
  vi += _mm512_reduce_add_epi64(counts);
#else
  for (; grp < g1; ++grp) {
    const int64_t row = groups[2 * grp], count = groups[2 * grp + 1];
    bad |= (row >= rows) | (static_cast<uint64_t>(count - 1) >= kSlicedGroup);
    vi += count;
  }
#endif
  return !bad && vi <= limit;
}

// Whether the column bytes [0, n) all lie inside a slice (below kSlicedCols: no top bit).
inline bool sliced_columns_ok(const uint8_t* columns, int64_t n) {
  int64_t t = 0;
#if defined(TORCHSLIM_ISA_AVX512)
  __m512i any = _mm512_setzero_si512();
  for (; t < n; t += 64) {
    const __mmask64 lanes = _bzhi_u64(~uint64_t{0}, static_cast<uint64_t>(min_i64(64, n - t)));
    any = _mm512_or_si512(any, _mm512_maskz_loadu_epi8(lanes, columns + t));
  }
  return _mm512_movepi8_mask(any) == 0;
#else
  uint64_t any = 0;
  for (; t + 8 <= n; t += 8) {
    uint64_t word;
    __builtin_memcpy(&word, columns + t, sizeof word);
    any |= word;
  }
  for (; t < n; ++t) any |= columns[t];
  return (any & 0x8080808080808080ull) == 0;
#endif
}

// Block b's sums against rows [m, m + R) of x (padded: see sliced_padded_k); false when the
// block is malformed (see the top).
template <typename T, int R>
bool sliced_block_dot(const SparseGemmArgs& g, int64_t m, int64_t b, int64_t rows,
                      SlicedSums<R>& sums) {
  const int64_t S = (g.K + kSlicedCols - 1) / kSlicedCols;
  sums.zero(rows);
  const SlicedArrays<T> a(g);
  const int64_t* off = g.row_offsets + b * S;
  const float* x = g.x + m * g.ldx;
  const int64_t ldx = g.ldx;
  int64_t vi = g.value_offsets[b];
  for (int64_t s = 0; s < S; ++s) {
    const SlicedX<R> xs(x + s * kSlicedCols, ldx);
    const int64_t g0 = off[s], g1 = off[s + 1], start = vi;
    if (!sliced_slice_ok(a.groups, g0, g1, rows, vi, g.value_offsets[b + 1])) return false;
    sliced_prefetch(a.values, a.columns, vi, g1 - g0);
    for (int64_t grp = g0; grp < g1; ++grp) {
      const SlicedGroup group{a.groups[2 * grp], a.groups[2 * grp + 1]};
      sliced_fma<T, R>(a, xs, vi, group, sums);
      vi += group.count;
    }
    if (!sliced_columns_ok(a.columns + start, vi - start)) return false;
  }
  return vi == g.value_offsets[b + 1];
}

#if defined(TORCHSLIM_ISA_AVX512)
// bf16 values against bf16 x (KernelTable::bf16_dot: AVX512_BF16 and VBMI2). x's slice takes 4
// vectors of 32 bf16 per row, and one step takes two groups at once in the 32 word lanes: the
// first's in lanes [0, 16), the second's in [16, 32), placed by expanding loads of the values
// and the column bytes. Two zero-masked vpermt2w and a blend (on column bit 6) gather x; one
// vdpbf16ps does the multiply-adds (products exact in fp32, summed in fp32), its fp32 lanes
// [0, 8) the first group's pairs and [8, 16) the second's, each added to its row's partial sums
// (the first 8 of their 16). Per nonzero this is half the fp32 path's vector work: the fp32 gather
// takes four permutes and three blends for a group of 16 lanes. The groups go by round (see the
// top), so the two of a step almost always update different rows.
template <int R>
struct SlicedXBf16 {
  __m512i t[R][4];
  TORCHSLIM_BF16_DOT SlicedXBf16(const uint16_t* x, int64_t ldx) {
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) t[i][j] = _mm512_loadu_si512(x + i * ldx + 32 * j);
    }
  }
};

// Block b's sums against rows [m, m + R) of x_bf16 (padded as x is: see sliced_padded_k); false
// when the block is malformed. As sliced_block_dot, only two groups a step.
template <int R>
TORCHSLIM_BF16_DOT bool sliced_bf16_block_dot(const SparseGemmArgs& g, int64_t m, int64_t b,
                                              int64_t rows, SlicedSums<R>& sums) {
  const int64_t S = (g.K + kSlicedCols - 1) / kSlicedCols;
  sums.zero(rows);
  const SlicedArrays<uint16_t> a(g);
  const int64_t* off = g.row_offsets + b * S;
  const uint16_t* x = g.x_bf16 + m * g.ldx_bf16;
  const int64_t ldx = g.ldx_bf16;
  const __m256i bit6 = _mm256_set1_epi8(64);
  int64_t vi = g.value_offsets[b];
  for (int64_t s = 0; s < S; ++s) {
    const SlicedXBf16<R> xs(x + s * kSlicedCols, ldx);
    const int64_t g0 = off[s], g1 = off[s + 1], start = vi;
    if (!sliced_slice_ok(a.groups, g0, g1, rows, vi, g.value_offsets[b + 1])) return false;
    sliced_prefetch(a.values, a.columns, vi, g1 - g0);
    for (int64_t grp = g0; grp < g1; grp += 2) {
      const SlicedGroup first{a.groups[2 * grp], a.groups[2 * grp + 1]};
      SlicedGroup second{first.row, 0};  // none: its lanes stay zero
      int64_t vj = vi;                   // the second group's values (any group's when none)
      if (grp + 1 < g1) {
        second = {a.groups[2 * grp + 2], a.groups[2 * grp + 3]};
        vj += first.count;
      }
      const __mmask16 one = _bzhi_u32(0xffff, static_cast<uint32_t>(first.count));
      const __mmask16 two = _bzhi_u32(0xffff, static_cast<uint32_t>(second.count));
      const __mmask32 lanes = static_cast<__mmask32>(one) | static_cast<__mmask32>(two) << 16;
      const __m256i bytes = _mm256_inserti128_si256(
          _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.columns + vi))),
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.columns + vj)), 1);
      const __m512i idx = _mm512_cvtepu8_epi16(bytes);
      const __mmask32 upper = _mm256_test_epi8_mask(bytes, bit6);
      const __m512bh w = (__m512bh)_mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(one, a.values + vi)),
          _mm256_maskz_loadu_epi16(two, a.values + vj), 1);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        const __m512i lo = _mm512_maskz_permutex2var_epi16(lanes, xs.t[i][0], idx, xs.t[i][1]);
        const __m512i hi = _mm512_maskz_permutex2var_epi16(lanes, xs.t[i][2], idx, xs.t[i][3]);
        const __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), w,
                                            (__m512bh)_mm512_mask_blend_epi16(upper, lo, hi));
        float* acc = sums.acc[first.row][i];
        _mm256_store_ps(acc, _mm256_add_ps(_mm256_load_ps(acc), _mm512_castps512_ps256(dot)));
        acc = sums.acc[second.row][i];
        _mm256_store_ps(acc, _mm256_add_ps(_mm256_load_ps(acc), _mm512_extractf32x8_ps(dot, 1)));
      }
      vi += first.count + second.count;
    }
    if (!sliced_columns_ok(a.columns + start, vi - start)) return false;
  }
  return vi == g.value_offsets[b + 1];
}
#endif

// ------------------------------------------------------------------ W8A8: x in int8 codes
// int8 values against x quantized per token (SparseGemmArgs::x_q8): every product and sum is
// exact in int32, so the gather need not move floats. With AVX512_VBMI one vpermt2b picks a
// byte of x for each of 64 lanes from the whole slice of 128 columns (two registers), where the
// fp32 path takes four permutes and three blends for 16 lanes: one step takes four groups, their
// values and column bytes placed in 16-lane quarters by two expanding loads (AVX512_VBMI2), and
// one vpdpbusd per row of x multiplies and sums each quarter's lanes by fours. vpdpbusd takes an
// unsigned operand, so x's codes go in offset by 128 (code ^ 0x80) and the step's accumulator
// starts at -128 times the sum of each four values (one more vpdpbusd, shared by the rows of
// x). Each quarter's four sums are added to its group's row as 16 bytes (vextracti32x4): a row
// keeps four partial sums, not sixteen. A 64-byte masked add per quarter cost more: Zen 4
// stores 32 bytes a cycle, so four 64-byte stores took eight cycles of a step (4096^2 at 90%,
// one thread, weights in cache: 255 -> 237 us with the 16-byte adds). A slice's first round,
// where no row of the block is empty in the slice (nearly always, up to 90% sparsity and
// beyond), is its rows in order, and so is each next round while every row has values for it:
// there step j is rows 4j to 4j + 3, whose sums lie side by side and take the step as one
// 64-byte add, with no row byte read (sliced_q8_in_order). Most of a
// slice's groups are in that round (at 90%, ~12.8 values a row a slice: 7680 of 8480 groups of
// 576x1536); on Zen 4, M = 1, two threads, weights in cache, 4096^2 took 111 -> 80 us and
// 576x1536 11.0 -> 9.2 us, and M = 4 (the sums of x's rows no longer interleaved) 258 -> 143 us.
// Sums stay exact while K * 127 * 128 < 2^31 (a code may be -128; the binding checks K); past
// that (a weight with repeated entries) they wrap, as two's complement, on every path.
template <int R>
struct alignas(64) SlicedIntSums {
  static constexpr int kLanes = 4;       // a row's partial sums
  uint32_t acc[R][kSlicedRows][kLanes];  // int32 sums modulo 2^32; a row of x's, row by row
  void zero(int64_t rows) {
    for (int i = 0; i < R; ++i) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int t = 0; t < kLanes; ++t) acc[i][r][t] = 0;
      }
    }
  }
  int32_t total(int64_t r, int i) const {
    uint32_t sum = 0;
    for (int t = 0; t < kLanes; ++t) sum += acc[i][r][t];
    return sum;
  }
};

// Whether the column bytes [0, n) all lie below `width` (a slice's columns below K).
inline bool sliced_columns_below(const uint8_t* columns, int64_t n, int64_t width) {
  uint8_t most = 0;
  for (int64_t t = 0; t < n; ++t) most = columns[t] > most ? columns[t] : most;
  return n == 0 || most < width;
}

// Block b's integer sums against rows [m, m + R) of x_q8, one value at a time (every level;
// the AVX-512 level takes sliced_q8_block_dot where the CPU has VBMI and VBMI2). False when the
// block is malformed or a column lies past K.
template <int R>
bool sliced_q8_block_scalar(const SparseGemmArgs& g, int64_t m, int64_t b, int64_t rows,
                            SlicedIntSums<R>& sums) {
  const int64_t S = (g.K + kSlicedCols - 1) / kSlicedCols;
  sums.zero(rows);
  const SlicedArrays<int8_t> a(g);
  const int64_t* off = g.row_offsets + b * S;
  const int8_t* x = g.x_q8 + m * g.ldx_q8;
  int64_t vi = g.value_offsets[b];
  for (int64_t s = 0; s < S; ++s) {
    const int64_t g0 = off[s], g1 = off[s + 1], start = vi;
    if (!sliced_slice_ok(a.groups, g0, g1, rows, vi, g.value_offsets[b + 1])) return false;
    const int8_t* xs = x + s * kSlicedCols;
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t row = a.groups[2 * grp], count = a.groups[2 * grp + 1];
      for (int64_t t = 0; t < count; ++t) {
        const int32_t w = a.values[vi + t];
        for (int i = 0; i < R; ++i) {
          sums.acc[i][row][t % SlicedIntSums<R>::kLanes] +=
              static_cast<uint32_t>(w * xs[i * g.ldx_q8 + a.columns[vi + t]]);
        }
      }
      vi += count;
    }
    if (!sliced_columns_below(a.columns + start, vi - start,
                              min_i64(kSlicedCols, g.K - s * kSlicedCols))) {
      return false;
    }
  }
  return vi == g.value_offsets[b + 1];
}

#if defined(TORCHSLIM_ISA_AVX512)
#define TORCHSLIM_Q8_DOT                                                    \
  __attribute__((                                                           \
      target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c," \
             "popcnt,bmi,bmi2,avx512vbmi,avx512vbmi2")))

inline bool sliced_q8_supported() {
  static const bool supported = cpu_features().avx512vbmi && cpu_features().avx512vbmi2;
  return supported;
}

// A step's lanes: lane j belongs to group j / 16 and is slot j % 16 of it; its count is byte
// 2 (j / 16) + 1 of the four groups' (row, count) pairs.
struct SlicedQ8Lanes {
  alignas(64) uint8_t count_byte[64];
  alignas(64) uint8_t slot[64];
  constexpr SlicedQ8Lanes() : count_byte(), slot() {
    for (int j = 0; j < 64; ++j) {
      count_byte[j] = static_cast<uint8_t>(2 * (j / 16) + 1);
      slot[j] = static_cast<uint8_t>(j % 16);
    }
  }
};
inline constexpr SlicedQ8Lanes kSlicedQ8Lanes{};

// How many of the groups [g0, g1) are, from the first, the block's rows 0, 1, 2, ... in order,
// rounded down to whole steps of four: a slice's first round where no row of the block is
// empty in the slice (at 90% sparsity, a row of 128 columns is empty once in ~10^6), and the
// next round where every row has more than 16 values there. Those steps need no row bytes:
// step j adds into rows 4j to 4j + 3.
TORCHSLIM_Q8_DOT inline int64_t sliced_q8_in_order(const uint8_t* groups, int64_t g0, int64_t g1,
                                                   int64_t rows) {
  const int64_t n = min_i64(g1 - g0, rows);  // rows <= 64: two vectors of 32 (row, count) words
  const __m512i row_bytes = _mm512_set1_epi16(0xff);
  const __m512i first = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17,
                                         16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  uint64_t in_order = 0;
  for (int half = 0; half < 2; ++half) {
    const int64_t from = 32 * half;
    const auto lanes = static_cast<__mmask32>(
        _bzhi_u32(~0u, static_cast<uint32_t>(min_i64(32, n - min_i64(n, from)))));
    const __m512i words = _mm512_maskz_loadu_epi16(lanes, groups + 2 * (g0 + from));
    const __mmask32 same = _mm512_mask_cmpeq_epi16_mask(
        lanes, _mm512_and_si512(words, row_bytes),
        _mm512_add_epi16(first, _mm512_set1_epi16(static_cast<int16_t>(from))));
    in_order |= static_cast<uint64_t>(same) << from;
  }
  return static_cast<int64_t>(_tzcnt_u64(~in_order)) & ~int64_t{3};
}

// The state of sliced_q8_block_dot across its steps.
template <int R>
struct SlicedQ8Step {
  const SlicedArrays<int8_t>& a;
  SlicedIntSums<R>& sums;
  __m512i lo[R], hi[R];  // x's slice, codes + 128
  __m512i columns_seen;  // the OR of every column byte read: none past the slice
  int64_t vi;            // the next value
};

// Groups [grp, grp + present) (present <= 4), in the 16-lane quarters of one step. kInOrder: they
// are rows r0 to r0 + 3 (sliced_q8_in_order), whose sums take the step as one 64-byte add;
// otherwise each quarter is added to its group's row as 16 bytes (vextracti32x4).
template <int R, bool kInOrder>
TORCHSLIM_Q8_DOT TORCHSLIM_INLINE inline void sliced_q8_step(SlicedQ8Step<R>& st, int64_t grp,
                                                             int64_t present, int64_t r0) {
  const __m512i flip = _mm512_set1_epi8(-128), zero = _mm512_setzero_si512();
  const __m512i count_byte = _mm512_load_si512(kSlicedQ8Lanes.count_byte);
  const __m512i slot = _mm512_load_si512(kSlicedQ8Lanes.slot);
  const __m128i pairs =
      kInOrder ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(st.a.groups + 2 * grp))
               : _mm_maskz_loadu_epi16(
                     static_cast<__mmask8>(_bzhi_u32(0xf, static_cast<uint32_t>(present))),
                     st.a.groups + 2 * grp);
  const __mmask64 lanes = _mm512_cmplt_epu8_mask(
      slot, _mm512_permutexvar_epi8(count_byte, _mm512_castsi128_si512(pairs)));
  const uint64_t bytes = static_cast<uint64_t>(_mm_cvtsi128_si64(pairs));
  // Into a fresh zero: see fresh_zero (sparse_gemm.h).
  const __m512i idx = _mm512_mask_expandloadu_epi8(fresh_zero(), lanes, st.a.columns + st.vi);
  const __m512i w = _mm512_mask_expandloadu_epi8(fresh_zero(), lanes, st.a.values + st.vi);
  st.columns_seen = _mm512_or_si512(st.columns_seen, idx);
  const __m512i start_sum = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, flip, w));
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    const __m512i sum =
        _mm512_dpbusd_epi32(start_sum, _mm512_permutex2var_epi8(st.lo[i], idx, st.hi[i]), w);
    if constexpr (kInOrder) {
      auto* acc = reinterpret_cast<__m512i*>(st.sums.acc[i][r0]);
      _mm512_store_si512(acc, _mm512_add_epi32(_mm512_load_si512(acc), sum));
    } else {
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        auto* acc = reinterpret_cast<__m128i*>(st.sums.acc[i][(bytes >> (16 * k)) & 0xff]);
        const __m128i quarter = k == 0   ? _mm512_castsi512_si128(sum)
                                : k == 1 ? _mm512_extracti32x4_epi32(sum, 1)
                                : k == 2 ? _mm512_extracti32x4_epi32(sum, 2)
                                         : _mm512_extracti32x4_epi32(sum, 3);
        _mm_store_si128(acc, _mm_add_epi32(_mm_load_si128(acc), quarter));
      }
    }
  }
  // The counts' sum: bytes 1, 3, 5, 7, added into the top 16 bits by one multiply.
  st.vi +=
      static_cast<int64_t>(((bytes >> 8) & 0x00ff00ff00ff00ffull) * 0x0001000100010001ull >> 48);
}

// As sliced_q8_block_scalar, four groups a step (see above). The column bytes are checked in the
// steps: each step's column vector is ORed into one register, whose top bits are tested once a
// block (until then a byte past the slice picks a byte inside it: vpermt2b reads 7 bits), in
// place of a pass over each slice's bytes after its loop.
template <int R>
TORCHSLIM_Q8_DOT bool sliced_q8_block_dot(const SparseGemmArgs& g, int64_t m, int64_t b,
                                          int64_t rows, SlicedIntSums<R>& sums) {
  const int64_t S = (g.K + kSlicedCols - 1) / kSlicedCols;
  sums.zero(rows);
  const SlicedArrays<int8_t> a(g);
  const int64_t* off = g.row_offsets + b * S;
  const int8_t* x = g.x_q8 + m * g.ldx_q8;
  const __m512i flip = _mm512_set1_epi8(-128);
  SlicedQ8Step<R> st{a, sums, {}, {}, _mm512_setzero_si512(), g.value_offsets[b]};
  for (int64_t s = 0; s < S; ++s) {
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const int8_t* xs = x + i * g.ldx_q8 + s * kSlicedCols;
      st.lo[i] = _mm512_xor_si512(_mm512_loadu_si512(xs), flip);
      st.hi[i] = _mm512_xor_si512(_mm512_loadu_si512(xs + 64), flip);
    }
    const int64_t g0 = off[s], g1 = off[s + 1], start = st.vi;
    if (!sliced_slice_ok(a.groups, g0, g1, rows, st.vi, g.value_offsets[b + 1])) return false;
    sliced_prefetch(a.values, a.columns, st.vi, g1 - g0);
    // Rounds of the block's rows in order, while a whole round is (at 75% sparsity most rows
    // fill two groups a slice), then the rest.
    int64_t grp = g0;
    for (int64_t round = g0, run = rows; run == rows; round = grp) {
      run = sliced_q8_in_order(a.groups, round, g1, rows);
      for (; grp < round + run; grp += 4) sliced_q8_step<R, true>(st, grp, 4, grp - round);
    }
    for (; grp < g1; grp += 4) sliced_q8_step<R, false>(st, grp, min_i64(4, g1 - grp), 0);
    if (s == S - 1 &&
        !sliced_columns_below(a.columns + start, st.vi - start, g.K - s * kSlicedCols)) {
      return false;
    }
  }
  return _mm512_movepi8_mask(st.columns_seen) == 0 && st.vi == g.value_offsets[b + 1];
}
#endif

// Rows [m0, m1) of x_q8, in tiles of up to kSpMR rows, against blocks [n0 / kSlicedRows, ...):
// no SpMM, so at large M each tile walks the block's weights again.
void sliced_q8_dot(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const auto run = [&](auto tile_rows, int64_t m, int64_t b) {
    constexpr int R = decltype(tile_rows)::value;
    const int64_t first = b * kSlicedRows, rows = min_i64(kSlicedRows, g.N - first);
    SlicedIntSums<R> sums;
#if defined(TORCHSLIM_ISA_AVX512)
    const bool ok = sliced_q8_supported() ? sliced_q8_block_dot<R>(g, m, b, rows, sums)
                                          : sliced_q8_block_scalar<R>(g, m, b, rows, sums);
#else
    const bool ok = sliced_q8_block_scalar<R>(g, m, b, rows, sums);
#endif
    if (!ok) return report_bad_row(g, first);
    for (int i = 0; i < R; ++i) {
      float totals[kSlicedRows];
      for (int64_t r = 0; r < rows; ++r) {
        totals[r] = static_cast<float>(sums.total(r, i)) * g.x_scales[m + i];
      }
      store_sums(g, m + i, first, rows, totals);
    }
  };
  for (int64_t b = n0 / kSlicedRows; b * kSlicedRows < n1; ++b) {
    for (int64_t m = m0; m < m1; m += kSpMR) with_tile_rows(m1 - m, [&](auto r) { run(r, m, b); });
  }
}

// Rows [m0, m1) of x (at most kSpMaxTileM) against blocks [n0 / kSlicedRows, ...) of W.
template <typename T>
void sliced_dot(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t S = (g.K + kSlicedCols - 1) / kSlicedCols;
  const auto run = [&](auto tile_rows, int64_t m, int64_t b) {
    constexpr int R = decltype(tile_rows)::value;
    const int64_t first = b * kSlicedRows, rows = min_i64(kSlicedRows, g.N - first);
    SlicedSums<R> sums;
    bool ok;
#if defined(TORCHSLIM_ISA_AVX512)
    if constexpr (std::is_same_v<T, uint16_t>) {
      ok = g.x_bf16 != nullptr ? sliced_bf16_block_dot<R>(g, m, b, rows, sums)
                               : sliced_block_dot<T, R>(g, m, b, rows, sums);
    } else {
      ok = sliced_block_dot<T, R>(g, m, b, rows, sums);
    }
#else
    ok = sliced_block_dot<T, R>(g, m, b, rows, sums);
#endif
    if (!ok) return report_bad_row(g, first);
    // For a NaN row only: whether its last slice holds a column past K (else x holds a NaN).
    // (K = 0: no slice, no group.)
    const auto past_k = [&](int64_t r) {
      const int64_t last_g0 = S ? g.row_offsets[b * S + S - 1] : 0;
      const int64_t last_g1 = g.row_offsets[b * S + S];
      int64_t last_vi = g.value_offsets[b + 1];
      for (int64_t grp = last_g0; grp < last_g1; ++grp) last_vi -= g.groups[2 * grp + 1];
      return sliced_row_past_k(g, r, last_g0, last_g1, last_vi, g.K - (S - 1) * kSlicedCols);
    };
    for (int64_t r = 0; r < rows; ++r) {
      bool nan = false;
      float total[R];
      for (int i = 0; i < R; ++i) {
        total[i] = sliced_total(sums.acc[r][i]);
        nan |= std::isnan(total[i]);
      }
      if (nan && past_k(r)) {
        report_bad_row(g, first + r);
        continue;
      }
      for (int i = 0; i < R; ++i) store_sum(g, m + i, first + r, total[i]);
    }
  };
  for (int64_t b = n0 / kSlicedRows; b * kSlicedRows < n1; ++b) {
    for (int64_t m = m0; m < m1; m += kSpMR) with_tile_rows(m1 - m, [&](auto r) { run(r, m, b); });
  }
}

// The SpMM (M > kSpMaxTileM, x in panels: see sparse_gemm.h): per slice and panel, each group's
// nonzeros broadcast against the panel rows of their columns (PanelSums), added to its row's
// sums in memory. Every column is checked against K before x is read.
template <typename T>
void sliced_spmm(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t S = (g.K + kSlicedCols - 1) / kSlicedCols;
  const int64_t p0 = m0 / kSpPanel, panels = (m1 - m0 + kSpPanel - 1) / kSpPanel;
  const int64_t stride = g.K * kSpPanel;  // floats per panel
  const SlicedArrays<T> arrays(g);
  std::vector<float> sums;
  for (int64_t b = n0 / kSlicedRows; b * kSlicedRows < n1; ++b) {
    const int64_t first = b * kSlicedRows, rows = min_i64(kSlicedRows, g.N - first);
    sums.assign(rows * panels * kSpPanel, 0.0f);  // [row][panel][16]
    const auto block = [&] {
      int64_t vi = g.value_offsets[b];
      for (int64_t s = 0; s < S; ++s) {
        const int64_t width = min_i64(kSlicedCols, g.K - s * kSlicedCols);
        const int64_t g0 = g.row_offsets[b * S + s], g1 = g.row_offsets[b * S + s + 1];
        const int64_t start = vi;
        for (int64_t grp = g0; grp < g1; ++grp) {  // the slice's groups, checked once
          SlicedGroup group;
          if (!arrays.group(grp, vi, rows, group)) return false;
          for (int64_t t = 0; t < group.count; ++t) {
            if (g.meta[vi + t] >= width) return false;
          }
          vi += group.count;
        }
        for (int64_t p = 0; p < panels; ++p) {
          vi = start;
          const float* x = g.panels + (p0 + p) * stride + s * kSlicedCols * kSpPanel;
          for (int64_t grp = g0; grp < g1; ++grp) {
            const int64_t row = g.groups[2 * grp], count = g.groups[2 * grp + 1];
            const T* v = typed<T>(g.values) + vi;
            const uint8_t* columns = g.meta + vi;
            PanelSums<T, 1> acc(x, stride);
            int64_t t = 0;
            for (; t + kCsrGroup <= count; t += kCsrGroup) {
              acc.group(v + t, [&](int j) { return acc.at(columns[t + j]); });
            }
            for (; t < count; ++t) acc.one(load_f32(v + t), columns[t]);
            acc.add_to(sums.data() + (row * panels + p) * kSpPanel);
            vi += count;
          }
        }
      }
      return vi == g.value_offsets[b + 1];
    };
    if (!block()) {
      report_bad_row(g, first);
      continue;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* s = sums.data() + r * panels * kSpPanel;
      for (int64_t m = m0; m < m1; ++m) store_sum(g, m, first + r, s[m - m0]);
    }
  }
}

#if defined(TORCHSLIM_ISA_AVX512)
// ----------------------------------------------------------------------------- W8A8 strips
// Many rows of x (SparseGemmArgs::q8_strips): as bitmask's W8A8 strips (sparse_gemm.h), the
// dense W8A8 strips. Each block of kSlicedRows weight rows is written out as dense codes once
// per block of x's rows, checked as the dot kernels check it (sliced_slice_ok, the columns
// below K), and met by the dense strips' tiles. Two values at one (row, column) add, as
// everywhere; where their sum leaves int8 (the dense codes' type), or the block is malformed,
// the block takes the dot kernels instead (which report a malformed one).

// Block b's `rows` weight rows as dense codes (rows x ld, ld >= K rounded up to 64, zeros past
// K); false where the dot kernels must take the block (see above).
inline bool sliced_dense_block(const SparseGemmArgs& g, int64_t b, int64_t rows, int8_t* dense,
                               int64_t ld) {
  const int64_t S = (g.K + kSlicedCols - 1) / kSlicedCols;
  const SlicedArrays<int8_t> a(g);
  const int64_t* off = g.row_offsets + b * S;
  std::fill(dense, dense + rows * ld, int8_t{0});
  int64_t vi = g.value_offsets[b];
  for (int64_t s = 0; s < S; ++s) {
    const int64_t g0 = off[s], g1 = off[s + 1];
    if (!sliced_slice_ok(a.groups, g0, g1, rows, vi, g.value_offsets[b + 1])) return false;
    const int64_t width = min_i64(kSlicedCols, g.K - s * kSlicedCols);
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t count = a.groups[2 * grp + 1];
      int8_t* row = dense + a.groups[2 * grp] * ld + s * kSlicedCols;
      for (int64_t t = 0; t < count; ++t) {
        const int64_t column = a.columns[vi + t];
        if (column >= width) return false;
        const int sum = row[column] + a.values[vi + t];
        if (sum < -128 || sum > 127) return false;
        row[column] = static_cast<int8_t>(sum);
      }
      vi += count;
    }
  }
  return vi == g.value_offsets[b + 1];
}

void sliced_q8_strips(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const Int8GemmArgs d = q8_strip_args(g);
  const int64_t K64 = d.K;
  thread_local std::vector<int8_t> dense;
  dense.resize(kSlicedRows * K64);
  Int8GemmArgs block = d;  // the dense block's rows as the weights unpack_i8_strip reads
  block.b = dense.data();
  block.ldb = K64;
  for (int64_t b = n0 / kSlicedRows; b * kSlicedRows < n1; ++b) {
    const int64_t first = b * kSlicedRows, rows = min_i64(kSlicedRows, g.N - first);
    if (!sliced_dense_block(g, b, rows, dense.data(), K64)) {
      sliced_q8_dot(g, m0, m1, first, first + rows);
      continue;
    }
    i8_strips(d, m0, m1, first, first + rows, [&](int64_t n, int cols, I8Strip& strip) {
      return unpack_i8_strip(block, n - first, cols, strip);  // always true on AVX-512
    });
  }
}

// The least M at which sliced W8A8 takes the strips (KernelTable::sliced_q8_strip_min_m), by K
// (up to kI8StripMaxK). Writing a block out costs a scalar step per value, once per block of x's
// rows, where the dot kernels are fastest at the format's own sparsity (90%). Zen 4, 2 threads,
// the op, one process alternating the two, 5 rounds, median; dot time / strip time at M = 24,
// 32, 64: 90%: 576x1536 1.89, -, 2.94; 2048^2 1.01, -, 1.65; 4096^2 0.81, 0.93, 1.32-1.36;
// 11008x4096 -, 0.84, 1.28; 4096x11008 -, 0.96, 1.38; 50%: 576x1536 1.61, -, 3.13; 2048^2
// 1.10, -, 2.44; 4096^2 1.08, -, 2.23.
int64_t sliced_q8_strip_min_m(int64_t K) { return K <= kI8StripMaxK ? 48 : INT64_MAX; }
#else
int64_t sliced_q8_strip_min_m(int64_t) { return INT64_MAX; }
#endif

void sliced_gemm(const SparseGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
#if defined(TORCHSLIM_ISA_AVX512)
  if (g.x_q8 != nullptr && g.q8_strips) return sliced_q8_strips(g, m0, m1, n0, n1);
#endif
  if (g.x_q8 != nullptr) return sliced_q8_dot(g, m0, m1, n0, n1);
  with_value_type(g.v_type, [&](auto value) {
    using T = decltype(value);
    g.panels ? sliced_spmm<T>(g, m0, m1, n0, n1) : sliced_dot<T>(g, m0, m1, n0, n1);
  });
}

}  // namespace
}  // namespace torchslim::cpu::TORCHSLIM_ISA_NS

#if defined(TORCHSLIM_BF16_DOT)
#undef TORCHSLIM_BF16_DOT
#endif
#if defined(TORCHSLIM_Q8_DOT)
#undef TORCHSLIM_Q8_DOT
#endif
