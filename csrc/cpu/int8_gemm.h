// int8 GEMM kernels for the CPU, written once and compiled per ISA level.
//
// Included by isa_<level>.cpp with TORCHSLIM_ISA_NS naming the level's namespace and the
// level's target enabled; simd.h supplies the vector primitives. Kernels:
//
//   quantize_rows  x (M, K) fp32/bf16 -> q (M, K) int8, scale (M,) fp32   (per-token, symmetric)
//   int8_gemm      acc = a (M, K) int8 . b (N, K) int8 -> exact int32, or the fp32 epilogue
//                  acc * a_scale[m] * b_scale[n] + bias[n] stored as fp32/bf16
//   w8a16_gemm     x (M, K) fp32 . w (N, K) int8 converted to fp32 in registers,
//                  times w_scale[n] (it factors out of the K sum), + bias[n]
//
// Both GEMMs are dot-product kernels on row-major operands (K contiguous in A and in B): an
// MR x NR register tile of vector accumulators runs along K, then each accumulator is reduced.
// This needs no packed weight layout, so the weights stay in the one (N, K) layout that every
// backend shares, and M = 1 (decode) streams each weight row exactly once. Blocks of
// [m0, m1) x [n0, n1) are walked n-outer / m-inner so the NR weight rows of a tile stay in L1
// while the activation block (sized by the caller to fit L2) streams past them.
#pragma once

#include <algorithm>
#include <type_traits>

#include "kernels.h"

namespace torchslim::cpu::TORCHSLIM_ISA_NS {
namespace {

#include "simd.h"

#if defined(TORCHSLIM_ISA_AVX512)
#include "avx512_helpers.h"  // transpose_16x16, first_lanes, dpbusd_in_place, aligned_data
#endif

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// The weight streams' prefetches at few rows: each stream `kPrefetchBytes<D>` bytes ahead of its
// loads (past the weights' end at the last rows: a prefetch never faults). On AVX-512 into L2
// (prefetcht1), not L1. Measured at M = 1 on Zen 4 (2 threads, weights cold, one process per
// variant, alternating, 8-10 rounds, median; benchmarks/NOTES.md): into L1, 1 KB ahead, took
// 1.08-1.23x the time of into L2 for W8A8, 1.02-1.09x for W8A16 and 1.01-1.07x for int4 on the
// benchmark's layers. Most likely (the machine has no counters to show it) each L1 prefetch
// holds one of the L1's few miss buffers until its line comes from memory, and the tile's own
// loads queue behind them; from L2 the L1's own prefetcher brings each line in time. 2 KB ahead
// rather than 1 took W8A16 0.90-1.00x the time and int4 0.92-0.95x, W8A8 1.02-1.06x on the
// large layers: its loop, the lightest per byte, keeps more of its own loads in flight. At the
// AVX2 level (the same machine) neither moved the times beyond the noise, so the AVX2 and
// portable levels keep prefetcht0, 1 KB ahead.
#if defined(TORCHSLIM_ISA_AVX512)
inline void prefetch_stream(const void* p) { __builtin_prefetch(p, 0, 2); }

template <class D>
constexpr int64_t kPrefetchBytes = 2048;  // W8A16 (F32Dot) and int4 (Q4Dot)
template <>
constexpr int64_t kPrefetchBytes<I8Dot> = 1024;  // W8A8
#else
inline void prefetch_stream(const void* p) { __builtin_prefetch(p); }

template <class D>
constexpr int64_t kPrefetchBytes = 1024;
#endif

// c[i][j] = sum_k a[i, k] * b[j, k] for i < R, j < C (R <= MR, C <= NR). offset[i]: row i's
// D::offset() where D::kOffset (else unused).
//
// The tile prefetches b_ahead + j * ldb + (the offset it reads): each weight row's stream some
// way ahead of its loads (gemm_block).
template <class D, int R, int C, int MR, int NR>
inline void dot_tile(const typename D::AT* a, int64_t lda, const typename D::BT* b, int64_t ldb,
                     int64_t K, typename D::Sum (&c)[MR][NR], const typename D::BT* b_ahead,
                     const typename D::Sum* offset) {
  typename D::Acc acc[R][C];
#pragma GCC unroll 16
  for (int j = 0; j < C; ++j) {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) acc[i][j] = D::zero();
  }
  const int64_t kv = K - K % D::kStep;
  for (int64_t k = 0; k < kv; k += D::kStep) {
    typename D::BV bv[C];
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      if (k % 64 < D::kStep) prefetch_stream(b_ahead + j * ldb + k);  // once per line
      bv[j] = D::load_b(b + j * ldb + k);
    }
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const typename D::AV av = D::load_a(a + i * lda + k);
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j) acc[i][j] = D::dot(acc[i][j], av, bv[j]);
    }
  }
  // Every index into acc must be a compile-time constant (hence the unrolls): an array indexed
  // at run time anywhere lives in memory, and the K loop would store it on every step.
#pragma GCC unroll 16
  for (int j = 0; j < C; ++j) {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      c[i][j] = D::reduce(acc[i][j]);
      if constexpr (D::kOffset) c[i][j] -= offset[i];
    }
  }
  for (int64_t k = kv; k < K; ++k) {
    for (int j = 0; j < C; ++j) {
      for (int i = 0; i < R; ++i) c[i][j] += D::mul(a[i * lda + k], b[j * ldb + k]);
    }
  }
}

// Runs dot_tile with the compile-time tile that matches the run-time (rows, cols) at an edge.
template <class D, int MR, int NR, int R = MR, int C = NR>
inline void dot_tile_edge(int rows, int cols, const typename D::AT* a, int64_t lda,
                          const typename D::BT* b, int64_t ldb, int64_t K,
                          typename D::Sum (&c)[MR][NR], const typename D::BT* b_ahead,
                          const typename D::Sum* offset) {
  if constexpr (R > 1) {
    if (rows < R) {
      return dot_tile_edge<D, MR, NR, R - 1, C>(rows, cols, a, lda, b, ldb, K, c, b_ahead, offset);
    }
  }
  if constexpr (C > 1) {
    if (cols < C) {
      return dot_tile_edge<D, MR, NR, R, C - 1>(rows, cols, a, lda, b, ldb, K, c, b_ahead, offset);
    }
  }
  dot_tile<D, R, C, MR, NR>(a, lda, b, ldb, K, c, b_ahead, offset);
}

// A block's columns [n0, n1) as tiles of NR columns: `tile(n, cols, stride)` for each, whose
// column j is column n + j * stride. The columns are taken in NR parts of `part` (then the few
// left over, side by side): the tile at column n reads columns n, n + part, n + 2 part, ..., so
// each of its NR weight streams walks consecutive rows, one after the other, and meets the
// prefetcher as one run. Side-by-side columns, NR rows interleaved 64 bytes at a time (three
// int4 rows 2 KB apart within a 4 KB page at K = 4096), left the hardware prefetcher behind: at
// M = 1 on Zen 4, 2 threads, weights cold, int4 took 1.2-1.4x the time on the benchmark's
// layers, W8A8 1.1-1.4x (benchmarks/NOTES.md). NR parts rather than one stream (a column per
// tile): the tile's columns share each load of the activation, whose int4 codes at K = 11008
// (18 KB with their lane biases) no longer stay in L1 beside the stream between columns.
template <int NR, class Tile>
void strided_column_tiles(int64_t n0, int64_t n1, const Tile& tile) {
  const int64_t part = (n1 - n0) / NR;
  for (int64_t n = n0; n < n0 + part; ++n) tile(n, NR, part);
  if (n0 + NR * part < n1) tile(n0 + NR * part, static_cast<int>(n1 - n0 - NR * part), 1);
}

// Walks the block n-outer (strided_column_tiles), m-inner; `epilogue(m, n, stride, rows, cols,
// c)` stores each finished tile, whose column j is column n + j * stride.
template <class D, int MR, int NR, class Epilogue>
void gemm_block(const typename D::AT* a, int64_t lda, const typename D::BT* b, int64_t ldb,
                int64_t K, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                const Epilogue& epilogue) {
  const typename D::Sum* offsets = nullptr;  // D::kOffset: the block's rows' D::offset()
  if constexpr (D::kOffset) {
    thread_local std::vector<typename D::Sum> held;
    held.resize(m1 - m0);
    for (int64_t m = m0; m < m1; ++m) held[m - m0] = D::offset(a + m * lda, K);
    offsets = held.data();
  }
  // A block of more rows than one tile walks each column tile's weights once per row tile, from
  // cache after the first pass. There W8A8's AVX-512 tiles prefetch a weight row ahead (at least
  // kPrefetchBytes): the next column tile's rows, which then arrive while the later row tiles
  // compute. At M = 8 and 16 on Zen 4 (2 threads, weights cold, three alternating rounds) that
  // took W8A8 0.73-0.87x the time on the large layers; W8A16's tiles (bound by their FMAs) did
  // not move, nor did one row tile's (M <= 4) beyond the noise: they keep kPrefetchBytes.
#if defined(TORCHSLIM_ISA_AVX512)
  const bool next_tile = std::is_same_v<D, I8Dot> && m1 - m0 > MR;
#else
  const bool next_tile = false;  // not measured on an AVX2-only CPU
#endif
  const int64_t ahead =
      next_tile
          ? std::max<int64_t>(ldb * static_cast<int64_t>(sizeof(typename D::BT)), kPrefetchBytes<D>)
          : kPrefetchBytes<D>;
  strided_column_tiles<NR>(n0, n1, [&](int64_t n, int cols, int64_t stride) {
    const typename D::BT* bt = b + n * ldb;
    const typename D::BT* b_ahead = bt + ahead / static_cast<int64_t>(sizeof(typename D::BT));
    for (int64_t m = m0; m < m1; m += MR) {
      const int rows = static_cast<int>(min_i64(MR, m1 - m));
      const typename D::Sum* row_offset = D::kOffset ? offsets + (m - m0) : nullptr;
      typename D::Sum c[MR][NR];
      if (rows == MR && cols == NR) {
        dot_tile<D, MR, NR, MR, NR>(a + m * lda, lda, bt, stride * ldb, K, c, b_ahead, row_offset);
      } else {
        dot_tile_edge<D, MR, NR>(rows, cols, a + m * lda, lda, bt, stride * ldb, K, c, b_ahead,
                                 row_offset);
      }
      epilogue(m, n, stride, rows, cols, c);
    }
  });
}

inline void store(void* out, int64_t ldo, ScalarType type, int64_t m, int64_t n, float v) {
  if (type == ScalarType::kBFloat16) {
    static_cast<uint16_t*>(out)[m * ldo + n] = f32_to_bf16_bits(v);
  } else {
    static_cast<float*>(out)[m * ldo + n] = v;
  }
}

template <int MR, int NR>
struct Int8Epilogue {
  const Int8GemmArgs& g;
  void operator()(int64_t m, int64_t n, int64_t stride, int rows, int cols,
                  const int32_t (&c)[MR][NR]) const {
    for (int i = 0; i < rows; ++i) {
      for (int j = 0; j < cols; ++j) {
        const int64_t nj = n + j * stride;
        if (g.out_type == ScalarType::kInt32) {
          static_cast<int32_t*>(g.out)[(m + i) * g.ldo + nj] = c[i][j];
          continue;
        }
        float v = static_cast<float>(c[i][j]) * g.a_scale[m + i] * g.b_scale[nj];
        if (g.bias) v += g.bias[nj];
        store(g.out, g.ldo, g.out_type, m + i, nj, v);
      }
    }
  }
};

template <int MR, int NR>
struct W8A16Epilogue {
  const W8A16Args& g;
  void operator()(int64_t m, int64_t n, int64_t stride, int rows, int cols,
                  const float (&c)[MR][NR]) const {
    for (int i = 0; i < rows; ++i) {
      for (int j = 0; j < cols; ++j) {
        const int64_t nj = n + j * stride;
        float v = c[i][j] * g.w_scale[nj];
        if (g.bias) v += g.bias[nj];
        store(g.out, g.ldo, g.out_type, m + i, nj, v);
      }
    }
  }
};

template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* q, float* scale_out) {
  using V = FVec;
  int64_t k = 0;
  typename V::R vmax = V::zero();
  for (; k + V::kWidth <= K; k += V::kWidth) vmax = V::max_abs(vmax, V::load(x + k));
  float amax = V::reduce_max_abs(vmax);
  for (; k < K; ++k) amax = max_abs_bits(amax, load_f32(x + k));
  const float scale = scale_from_amax(amax);
  *scale_out = scale;
  if (scale != scale) {  // an inf or a NaN in the row: codes 0, every output of the row NaN
    for (k = 0; k < K; ++k) q[k] = 0;
    return;
  }
  const typename V::R vscale = V::set1(scale), inv = V::set1(1.0f / scale);
  for (k = 0; k + V::kWidth <= K; k += V::kWidth) {
    V::quantize_store(q + k, V::load(x + k), vscale, inv);
  }
  for (; k < K; ++k) q[k] = quantize_scalar(load_f32(x + k) / scale);
}

void quantize_rows(const QuantizeArgs& args, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    if (args.x_type == ScalarType::kBFloat16) {
      quantize_row(static_cast<const uint16_t*>(args.x) + m * args.ldx, args.K,
                   args.q + m * args.ldq, args.scale + m);
    } else {
      quantize_row(static_cast<const float*>(args.x) + m * args.ldx, args.K, args.q + m * args.ldq,
                   args.scale + m);
    }
  }
}

#if defined(TORCHSLIM_ISA_AVX512) || defined(TORCHSLIM_ISA_AVX2)
// Many rows (Int8GemmArgs::strips): as FBGEMM's and oneDNN's kernels do, each block of rows meets
// the weights as strips of kI8StripCols columns over the whole of K, 4 values of K to a 32-bit
// lane (byte 4 c + b of vector v at step t is weight row n + kI8StripLanes v + c at column
// 4 t + b), and a register tile of kI8StripRows rows x kI8StripVecs vectors meets each step
// with each row's 4 codes broadcast. The dot kernels above take a horizontal sum per output
// and, at 2-4 columns a tile, load each activation vector once per 2-4 columns; the strip tile
// loads each weight vector once per kI8StripRows rows and each activation word once per
// kI8StripCols columns.
//
// AVX-512 (VNNI): one vpdpbusd per (row, 16 columns) per step. vpdpbusd multiplies unsigned by
// signed bytes, so the strip holds w + 128 (unpacking flips each byte's top bit) and each row's
// sums lose 128 x (the row's sum of codes) at the end: sum x (w + 128) - 128 sum x = sum x w,
// exact in int32 while K x 127 x 255 fits (K <= kI8StripMaxK).
//
// AVX2: the sign trick of the dot kernels (simd.h, I8Dot) the other way round: |x| (at most 127)
// is the unsigned side, once per row and step, and w * sign(x) the signed one, one vpsignb per
// (row, 8 columns); vpmaddubsw, vpmaddwd against ones and vpaddd sum the 32 products. A weight
// of -128 has no negation in int8, so a strip that holds one (never a quantized weight, only a
// raw int8_mm operand) takes the dot kernels instead (unpack_i8_strip says so).
#if defined(TORCHSLIM_ISA_AVX512)
using I8StripVec = __m512i;
constexpr int kI8StripLanes = 16;
constexpr int kI8StripVecs = 2;
constexpr int kI8StripRows = 6;
#else
using I8StripVec = __m256i;
constexpr int kI8StripLanes = 8;
constexpr int kI8StripVecs = 3;
constexpr int kI8StripRows = 3;
#endif
constexpr int kI8StripCols = kI8StripLanes * kI8StripVecs;
constexpr int kI8StripBytes = 4 * kI8StripLanes;  // one vector: 4 values of K x the lanes
constexpr int64_t kI8StripMaxK = 65536;

struct I8Strip {
  std::vector<uint8_t> buffer;  // (K / 4, kI8StripVecs, kI8StripBytes), 64-byte aligned
  const uint8_t* codes() const { return aligned_data(buffer); }
};

bool takes_i8_strips(int64_t K) { return K % kI8StripBytes == 0 && K <= kI8StripMaxK; }

// The next strip's weight rows, brought toward L2 while this strip's row tiles run, so that its
// unpacking reads them from there: a tile prefetches lines [first, first + K / 4) of the next
// strip's kI8StripCols x K / 64 (line l: row l % kI8StripCols, bytes 64 (l / kI8StripCols)), one a
// step, so a block's first two tiles cover them all.
struct I8StripAhead {
  const int8_t* b = nullptr;  // the next strip's first weight row; null: none (or not a dense
                              // weight's strips)
  int64_t ldb = 0;
  int rows = 0;       // its weight rows
  int64_t first = 0;  // this tile's first line
  TORCHSLIM_INLINE void step(int64_t K, int64_t t) const {
    const int64_t l = first + t;
    const int64_t row = l % kI8StripCols;
    if (b != nullptr && row < rows && l < kI8StripCols * (K / 64)) {
      prefetch_stream(b + row * ldb + 64 * (l / kI8StripCols));
    }
  }
};

#if defined(TORCHSLIM_ISA_AVX512)
// Weight rows [n, n + cols) (cols <= kI8StripCols; zero past them) into `strip`, K % 64 == 0.
// Always true: every weight has its strip.
inline bool unpack_i8_strip(const Int8GemmArgs& g, int64_t n, int cols, I8Strip& strip) {
  const int64_t steps = g.K / 4;
  strip.buffer.resize(steps * kI8StripVecs * 64 + 64);
  uint8_t* codes = aligned_data(strip.buffer);
  const __m512i top = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int v = 0; v < kI8StripVecs; ++v) {
    for (int64_t k = 0; k < g.K; k += 64) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) {
        const int col = 16 * v + c;
        r[c] = col < cols ? _mm512_loadu_si512(g.b + (n + col) * g.ldb + k) : top;
      }
      transpose_16x16(r);  // r[q]: bytes 4 q .. 4 q + 3 of each row, step k / 4 + q
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) {
        _mm512_store_si512(codes + ((k / 4 + q) * kI8StripVecs + v) * 64,
                           _mm512_xor_si512(r[q], top));
      }
    }
  }
  return true;
}

// Rows [m, m + R) against the strip at column n: the tile's int32 sums (sum x (w + 128)).
template <int R>
inline void i8_strip_sums(const Int8GemmArgs& g, int64_t m, const I8Strip& strip,
                          __m512i (&sum)[R][kI8StripVecs], const I8StripAhead& ahead) {
  const int8_t* a = g.a + m * g.lda;
  const uint8_t* w = strip.codes();
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 16
    for (int v = 0; v < kI8StripVecs; ++v) sum[i][v] = _mm512_setzero_si512();
  }
  for (int64_t t = 0; t < g.K / 4; ++t) {
    ahead.step(g.K, t);
    __m512i wv[kI8StripVecs];
#pragma GCC unroll 16
    for (int v = 0; v < kI8StripVecs; ++v) {
      wv[v] = _mm512_load_si512(w + (t * kI8StripVecs + v) * 64);
    }
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      int32_t four;
      __builtin_memcpy(&four, a + i * g.lda + 4 * t, sizeof four);
      const __m512i xv = _mm512_set1_epi32(four);
#pragma GCC unroll 16
      for (int v = 0; v < kI8StripVecs; ++v) sum[i][v] = dpbusd_in_place(sum[i][v], wv[v], xv);
    }
  }
}

// Out[at + j] = v[j] for the lanes j of `mask`, as fp32 or bf16 (rounded to nearest even).
// Also the int4 strips' and the W8A16 pair strips' (int4_gemm.h, pair_gemm.h).
inline void store_lanes(void* out, ScalarType type, int64_t at, __mmask16 mask, __m512 v) {
  if (type == ScalarType::kBFloat16) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + at, mask, f32_to_bf16_bits(v));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(out) + at, mask, v);
  }
}

// Out[at + j] for the lanes j of `mask`: the dot kernels' epilogue, rounding for rounding,
// c * a_scale * b_scale, then + bias (a bias added after the op rounds the same; the graph
// passes rely on it), as fp32 or bf16. Also the 2:4 W8A8 strips' (sparse_gemm.h).
inline void store_scaled(void* out, ScalarType type, int64_t at, __mmask16 mask, __m512i c,
                         float a_scale, __m512 b_scale, __m512 bias) {
  const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(c), _mm512_set1_ps(a_scale));
  store_lanes(out, type, at, mask, _mm512_add_ps(_mm512_mul_ps(scaled, b_scale), bias));
}

// Rows [m, m + R) x columns [n, n + cols) of the output; offset[i] = 128 x (row m + i's sum).
template <int R>
void i8_strip_tile(const Int8GemmArgs& g, int64_t m, int64_t n, int cols, const I8Strip& strip,
                   const int32_t* offset, const I8StripAhead& ahead) {
  __m512i sum[R][kI8StripVecs];
  i8_strip_sums<R>(g, m, strip, sum, ahead);
#pragma GCC unroll 16
  for (int v = 0; v < kI8StripVecs; ++v) {
    if (16 * v >= cols) break;  // no pointer past the columns, even under a zero mask
    const __mmask16 mask = first_lanes(cols - 16 * v);
    const int64_t n0 = n + 16 * v;
    __m512 ws = _mm512_setzero_ps(), bias = _mm512_setzero_ps();
    if (g.out_type != ScalarType::kInt32) {
      ws = _mm512_maskz_loadu_ps(mask, g.b_scale + n0);
      if (g.bias) bias = _mm512_maskz_loadu_ps(mask, g.bias + n0);
    }
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m512i c = _mm512_sub_epi32(sum[i][v], _mm512_set1_epi32(offset[i]));
      const int64_t at = (m + i) * g.ldo + n0;
      if (g.out_type == ScalarType::kInt32) {
        _mm512_mask_storeu_epi32(static_cast<int32_t*>(g.out) + at, mask, c);
        continue;
      }
      store_scaled(g.out, g.out_type, at, mask, c, g.a_scale[m + i], ws, bias);
    }
  }
}
#else
// r[i] <- column i of the 8 x 8 matrix of 32-bit elements whose rows are r[0..7].
inline void transpose_8x8(__m256i (&r)[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {  // t[i]: r[i], r[i + 1] elements 0 1 | 4 5; t[i + 1]: 2 3 | 6 7
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // u[i + e]: rows i .. i + 3, elements e | e + 4
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    r[e] = _mm256_permute2x128_si256(u[e], u[e + 4], 0x20);
    r[e + 4] = _mm256_permute2x128_si256(u[e], u[e + 4], 0x31);
  }
}

// Weight rows [n, n + cols) (cols <= kI8StripCols; zero past them) into `strip`, K % 32 == 0.
// False where one of them holds -128 (the sign trick cannot negate it; the strip is not used).
inline bool unpack_i8_strip(const Int8GemmArgs& g, int64_t n, int cols, I8Strip& strip) {
  const int64_t steps = g.K / 4;
  strip.buffer.resize(steps * kI8StripVecs * kI8StripBytes + 64);
  uint8_t* codes = aligned_data(strip.buffer);
  const __m256i low = _mm256_set1_epi8(-128);
  __m256i seen = _mm256_setzero_si256();
  for (int v = 0; v < kI8StripVecs; ++v) {
    for (int64_t k = 0; k < g.K; k += 32) {
      __m256i r[8];
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        const int col = 8 * v + c;
        const int8_t* row = g.b + (n + col) * g.ldb + k;
        r[c] = col < cols ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row))
                          : _mm256_setzero_si256();
        seen = _mm256_or_si256(seen, _mm256_cmpeq_epi8(r[c], low));
      }
      transpose_8x8(r);  // r[q]: bytes 4 q .. 4 q + 3 of each row, step k / 4 + q
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) {
        _mm256_store_si256(
            reinterpret_cast<__m256i*>(codes + ((k / 4 + q) * kI8StripVecs + v) * kI8StripBytes),
            r[q]);
      }
    }
  }
  return _mm256_testz_si256(seen, seen) != 0;
}

// Rows [m, m + R) against the strip at column n: the tile's int32 sums (sum x w).
template <int R>
inline void i8_strip_sums(const Int8GemmArgs& g, int64_t m, const I8Strip& strip,
                          __m256i (&sum)[R][kI8StripVecs], const I8StripAhead& ahead) {
  const int8_t* a = g.a + m * g.lda;
  const uint8_t* w = strip.codes();
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < kI8StripVecs; ++v) sum[i][v] = _mm256_setzero_si256();
  }
  for (int64_t t = 0; t < g.K / 4; ++t) {
    ahead.step(g.K, t);
    __m256i wv[kI8StripVecs];
#pragma GCC unroll 8
    for (int v = 0; v < kI8StripVecs; ++v) {
      wv[v] = _mm256_load_si256(
          reinterpret_cast<const __m256i*>(w + (t * kI8StripVecs + v) * kI8StripBytes));
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      int32_t four;
      __builtin_memcpy(&four, a + i * g.lda + 4 * t, sizeof four);
      const __m256i xv = _mm256_set1_epi32(four), magnitude = _mm256_abs_epi8(xv);
#pragma GCC unroll 8
      for (int v = 0; v < kI8StripVecs; ++v) {
        const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(wv[v], xv));
        sum[i][v] = _mm256_add_epi32(sum[i][v], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
}

// 8 fp32 lanes to bf16 bits, rounded as f32_to_bf16_bits does (to nearest even; a NaN stays a
// quiet NaN).
inline __m128i f32_to_bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v), high = _mm256_srli_epi32(u, 16);
  const __m256i odd = _mm256_and_si256(high, _mm256_set1_epi32(1));
  __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(high, _mm256_set1_epi32(0x40)), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// The first n of 8 int32 lanes as a vpmaskmov mask (none for n <= 0).
inline __m256i first_lanes8(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// out[at + j] = v[j] for the first `lanes` of 8 lanes (mask: first_lanes8(lanes)), as fp32 or
// bf16. Also the int4 strips' (int4_gemm.h).
inline void store_lanes(void* out, ScalarType type, int64_t at, __m256i mask, int lanes, __m256 v) {
  if (type != ScalarType::kBFloat16) {
    _mm256_maskstore_ps(static_cast<float*>(out) + at, mask, v);
    return;
  }
  alignas(16) uint16_t held[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(held), f32_to_bf16_bits(v));
  __builtin_memcpy(static_cast<uint16_t*>(out) + at, held, (lanes < 8 ? lanes : 8) * 2);
}

// Rows [m, m + R) x columns [n, n + cols) of the output, as the dot kernels' epilogue rounds it:
// c * a_scale * b_scale, then + bias, as fp32 or bf16 (or c as int32).
template <int R>
void i8_strip_tile(const Int8GemmArgs& g, int64_t m, int64_t n, int cols, const I8Strip& strip,
                   const int32_t* /*offset: none, the sums are sum x w*/,
                   const I8StripAhead& ahead) {
  __m256i sum[R][kI8StripVecs];
  i8_strip_sums<R>(g, m, strip, sum, ahead);
#pragma GCC unroll 8
  for (int v = 0; v < kI8StripVecs; ++v) {
    const int lanes = cols - 8 * v;
    if (lanes <= 0) break;  // no pointer past the columns, even under a zero mask
    const __m256i mask = first_lanes8(lanes);
    const int64_t n0 = n + 8 * v;
    __m256 ws = _mm256_setzero_ps(), bias = _mm256_setzero_ps();
    if (g.out_type != ScalarType::kInt32) {
      ws = _mm256_maskload_ps(g.b_scale + n0, mask);
      if (g.bias) bias = _mm256_maskload_ps(g.bias + n0, mask);
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const int64_t at = (m + i) * g.ldo + n0;
      if (g.out_type == ScalarType::kInt32) {
        _mm256_maskstore_epi32(static_cast<int*>(g.out) + at, mask, sum[i][v]);
        continue;
      }
      const __m256 scaled =
          _mm256_mul_ps(_mm256_cvtepi32_ps(sum[i][v]), _mm256_set1_ps(g.a_scale[m + i]));
      store_lanes(g.out, g.out_type, at, mask, lanes,
                  _mm256_add_ps(_mm256_mul_ps(scaled, ws), bias));
    }
  }
}
#endif

// i8_strip_tile for the last rows < kI8StripRows of a block.
template <int R = kI8StripRows - 1>
void i8_strip_tile_edge(int rows, const Int8GemmArgs& g, int64_t m, int64_t n, int cols,
                        const I8Strip& strip, const int32_t* offset, const I8StripAhead& ahead) {
  if constexpr (R > 1) {
    if (rows < R) return i8_strip_tile_edge<R - 1>(rows, g, m, n, cols, strip, offset, ahead);
  }
  i8_strip_tile<R>(g, m, n, cols, strip, offset, ahead);
}

// The strips' loop over a block: `unpack(n, cols, strip)` lays out weight rows [n, n + cols) as
// unpack_i8_strip does (g.b unused but by it: the sparse W8A8 strips bring their own) and says
// whether the strip may be used; where not (only a dense weight's unpack_i8_strip says so), those
// columns take the dot kernels on g.b.
template <class Unpack>
void i8_strips(const Int8GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
               const Unpack& unpack, bool prefetch_next = false) {
  thread_local I8Strip strip;
  thread_local std::vector<int32_t> offset;
  offset.resize(m1 - m0);
#if defined(TORCHSLIM_ISA_AVX512)
  for (int64_t m = m0; m < m1; ++m) offset[m - m0] = I8Dot::offset(g.a + m * g.lda, g.K);
#endif
  for (int64_t n = n0; n < n1; n += kI8StripCols) {
    const int cols = static_cast<int>(min_i64(kI8StripCols, n1 - n));
    if (!unpack(n, cols, strip)) {
      gemm_block<I8Dot, kI8MR, kI8NR>(g.a, g.lda, g.b, g.ldb, g.K, m0, m1, n, n + cols,
                                      Int8Epilogue<kI8MR, kI8NR>{g});
      continue;
    }
    I8StripAhead ahead;
    if (prefetch_next && n + kI8StripCols < n1) {
      ahead.b = g.b + (n + kI8StripCols) * g.ldb;
      ahead.ldb = g.ldb;
      ahead.rows = static_cast<int>(min_i64(kI8StripCols, n1 - n - kI8StripCols));
    }
    int64_t m = m0;
    for (; m + kI8StripRows <= m1; m += kI8StripRows, ahead.first += g.K / 4) {
      i8_strip_tile<kI8StripRows>(g, m, n, cols, strip, offset.data() + (m - m0), ahead);
    }
    if (m < m1) {
      i8_strip_tile_edge(static_cast<int>(m1 - m), g, m, n, cols, strip, offset.data() + (m - m0),
                         ahead);
    }
  }
}

void int8_gemm_strips(const Int8GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
#if defined(TORCHSLIM_ISA_AVX512)
  constexpr bool kPrefetchNext = true;
#else
  constexpr bool kPrefetchNext = false;  // not measured on an AVX2-only CPU
#endif
  i8_strips(
      g, m0, m1, n0, n1,
      [&](int64_t n, int cols, I8Strip& strip) { return unpack_i8_strip(g, n, cols, strip); },
      kPrefetchNext);
}

// The least M at which the strips take over from the dot kernels, by K: the dot kernels' cost per
// output beside its K steps (a horizontal sum, the epilogue) weighs less the longer K is, the
// strips' (each weight laid out once per block of rows) does not.
// AVX-512 (Zen 4), the dot kernels prefetching the next column tile (gemm_block), weights cold
// (rotated past the cache), two runs of the op alternating both paths, one process each, median
// of 5; dot time / strip time: K = 576 at M = 16 0.94-0.99, 24 1.09-1.14, 32 1.12-1.22; 1536 at
// 24 0.88-0.96, 32 0.93-1.02; 2048 at 32 0.95; 4096 at 32 0.84-0.85, 48 0.95-1.15, 64
// 0.95-1.16, 96 1.05-1.15; 11008 at 48 0.96-0.97, 64 1.12, 96 1.05. (Before that prefetch,
// weights in cache: K = 2048 from 12, 4096 from 24 and 11008 from 32 came out.)
// AVX2 (Zen 3, 2 threads, the op, weights in cache, five rounds, median): K = 576 at M = 8 0.99,
// 12 1.38, 16 1.26; 2048 at 12 1.06, 16 0.88, 24 1.31; 4096 at 12 1.00, 16 1.06, 24 1.15; 11008 at
// 16 0.98, 24 1.17, 32 1.20. K not a multiple of a strip vector's bytes, or past kI8StripMaxK:
// never (the dot kernels at any M, in their blocks).
int64_t int8_strip_min_m(int64_t K) {
  if (!takes_i8_strips(K)) return INT64_MAX;
#if defined(TORCHSLIM_ISA_AVX512)
  return K <= 1024 ? 24 : K <= 2048 ? 32 : K <= 4096 ? 48 : 64;
#else
  return K <= 1024 ? 12 : 24;
#endif
}
constexpr auto kInt8StripMinM = &int8_strip_min_m;
constexpr int64_t kInt8StripCols = kI8StripCols;
#else
constexpr int64_t (*kInt8StripMinM)(int64_t) = nullptr;
constexpr int64_t kInt8StripCols = 0;
#endif

void int8_gemm(const Int8GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
#if defined(TORCHSLIM_ISA_AVX512) || defined(TORCHSLIM_ISA_AVX2)
  if (g.strips && takes_i8_strips(g.K)) return int8_gemm_strips(g, m0, m1, n0, n1);
#endif
  gemm_block<I8Dot, kI8MR, kI8NR>(g.a, g.lda, g.b, g.ldb, g.K, m0, m1, n0, n1,
                                  Int8Epilogue<kI8MR, kI8NR>{g});
}

void w8a16_gemm(const W8A16Args& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  gemm_block<F32Dot, kF32MR, kF32NR>(g.x, g.ldx, g.w, g.ldw, g.K, m0, m1, n0, n1,
                                     W8A16Epilogue<kF32MR, kF32NR>{g});
}

#if !defined(TORCHSLIM_ISA_AVX512)
// W8A16 on VDPBF16PS (KernelTable::w8a16_pair_gemm): the avx512 level's alone (pair_gemm.h).
inline decltype(KernelTable::w8a16_pair_gemm) w8a16_pair_kernel() { return nullptr; }
constexpr int64_t kW8A16PairMinM = INT64_MAX;
constexpr int64_t kW8A16PairCols = 0;
#endif

}  // namespace
}  // namespace torchslim::cpu::TORCHSLIM_ISA_NS
