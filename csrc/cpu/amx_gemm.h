// The GEMMs of the amx level (Sapphire Rapids and later) on the AMX tile unit: W8A8 and int4
// (with Q8 activations) on int8 tiles, W8A16 on bf16 tiles (its section below).
//
// One tile multiply (TDPBSSD) takes a 16 x 64 int8 tile A and a 16 x 64 tile B in the "VNNI"
// layout (row q holds four consecutive k of each of 16 columns) and adds
//   C[i][j] += sum_{k < 64} A[i][k] * B[k / 4][4 j + k % 4]      (16 x 16 int32, exact)
// in 16 cycles: 1024 multiply-adds a cycle, 16x a core's AVX-512 VNNI rate.
//
// The weights (N, K) are row-major, which is exactly the A layout: a tile is 16 weight rows x 64
// columns, loaded in place with the row stride. So the kernel computes the transposed product
// C = W . X^T, and the activations are the operand that needs the VNNI layout: they are
// quantized inside the op anyway, and int8_pack_panels rewrites them once per call into panels
// of 16 rows (kernels.h), a cost of M x K bytes against the GEMM's M x N x K multiply-adds.
// The weights keep the one layout every backend shares, and no weight byte is copied.
//
// Register blocking: tmm0-3 accumulate a 32 x 32 block of C (two weight tiles x two panels),
// tmm4-5 hold the weight tiles and tmm6-7 the activation tiles of one 64-column step, so each
// step issues four loads for four multiplies. The epilogue stores each 16 x 16 accumulator,
// transposes it in AVX-512 registers (a C row is then 16 output columns of one activation row)
// and applies the scales and bias as int8_gemm.h's epilogue does, operation for operation.
#pragma once

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace torchslim::cpu::TORCHSLIM_ISA_NS {
namespace {

#include "avx512_helpers.h"  // transpose_16x16, first_lanes
#include "bf16_pairs.h"      // split_parts, store_pairs, to_bf16
#include "simd.h"            // load_f32, Half, kQuotientSlack
#include "simd_quotient.h"   // round_quotient_ps (after simd.h)

// A tile configuration (palette 1): rows and bytes per row of each tile used.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads a configuration on the calling thread and releases the tiles on exit.
struct TileScope {
  explicit TileScope(const TileConfig& config) { _tile_loadconfig(&config); }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// Tile loads are asm statements that do not tell the compiler they read memory: called
// between stores to a buffer and the tile loads of it, this keeps the stores before them.
inline void tile_reads_memory() { asm volatile("" ::: "memory"); }

// Output rows m + j (j < rows) from the transposed block r (r[j]: fp32 bits of 16 output
// columns n .. n + 16 of row m + j, those in mask stored), each plus bias[n ..] if given.
inline void store_rows(void* out, int64_t ldo, ScalarType out_type, const __m512i (&r)[16],
                       int64_t m, int64_t rows, int64_t n, __mmask16 mask, const float* bias) {
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
  for (int64_t j = 0; j < rows; ++j) {
    __m512 v = _mm512_castsi512_ps(r[j]);
    if (bias) v = _mm512_add_ps(v, b);
    if (out_type == ScalarType::kBFloat16) {
      uint16_t* row = static_cast<uint16_t*>(out) + (m + j) * ldo + n;
      _mm256_mask_storeu_epi16(row, mask, (__m256i)_mm512_cvtneps_pbh(v));
    } else {
      _mm512_mask_storeu_ps(static_cast<float*>(out) + (m + j) * ldo + n, mask, v);
    }
  }
}

void int8_pack_panels(const int8_t* a, int64_t lda, int64_t M, int64_t K, int8_t* panels,
                      int64_t p0, int64_t p1) {
  const int64_t Kp = amx_padded_k(K);
  for (int64_t p = p0; p < p1; ++p) {
    int8_t* panel = panels + p * amx_panel_bytes(K);
    for (int64_t k = 0; k < Kp; k += 64) {
      // Row j's 64 columns are 16 groups of four: after the transpose, vector q holds group q
      // of every row, i.e. row k / 4 + q of the panel.
      const __mmask64 cols = K - k >= 64 ? ~__mmask64{0} : (__mmask64{1} << (K - k)) - 1;
      __m512i r[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        const int64_t m = p * kAmxPanel + j;
        r[j] = m < M ? _mm512_maskz_loadu_epi8(cols, a + m * lda + k) : _mm512_setzero_si512();
      }
      transpose_16x16(r);
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) _mm512_storeu_si512(panel + (k / 4 + q) * 64, r[q]);
    }
  }
}

// The 16 x 16 int32 block c[i][j] = C[n + i][m + j] (weight row n + i, activation row m + j)
// stored to out: rows m + j < m1, columns n + i < n1.
inline void store_block(const Int8GemmArgs& g, const int32_t* c, int64_t m, int64_t m1, int64_t n,
                        int64_t n1) {
  __m512i r[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(c + 16 * i);
  transpose_16x16(r);
  const int64_t cols = n1 - n < 16 ? n1 - n : 16;
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
  const int64_t rows = m1 - m < 16 ? m1 - m : 16;
  if (g.out_type == ScalarType::kInt32) {
    int32_t* out = static_cast<int32_t*>(g.out) + m * g.ldo + n;
    for (int64_t j = 0; j < rows; ++j) _mm512_mask_storeu_epi32(out + j * g.ldo, mask, r[j]);
    return;
  }
  const __m512 b_scale = _mm512_maskz_loadu_ps(mask, g.b_scale + n);
  const __m512 bias = g.bias ? _mm512_maskz_loadu_ps(mask, g.bias + n) : _mm512_setzero_ps();
  for (int64_t j = 0; j < rows; ++j) {
    // (acc * a_scale) * b_scale + bias, rounded step by step as the scalar epilogue does.
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(r[j]), _mm512_set1_ps(g.a_scale[m + j]));
    v = _mm512_mul_ps(v, b_scale);
    if (g.bias) v = _mm512_add_ps(v, bias);
    if (g.out_type == ScalarType::kBFloat16) {
      uint16_t* out = static_cast<uint16_t*>(g.out) + (m + j) * g.ldo + n;
      _mm256_mask_storeu_epi16(out, mask, (__m256i)_mm512_cvtneps_pbh(v));
    } else {
      _mm512_mask_storeu_ps(static_cast<float*>(g.out) + (m + j) * g.ldo + n, mask, v);
    }
  }
}

// Weight tile (rows [n, n + 16), columns [k, k + 64)) as a pointer and row stride: the weights
// themselves where the tile lies inside them, else a zero-padded copy in `stage`.
inline const int8_t* weight_tile(const Int8GemmArgs& g, int64_t n, int64_t k, int8_t* stage,
                                 int64_t* stride) {
  if (n + 16 <= g.N && k + 64 <= g.K) {
    *stride = g.ldb;
    return g.b + n * g.ldb + k;
  }
  const int64_t rows = g.N - n < 16 ? g.N - n : 16;
  const __mmask64 cols = g.K - k >= 64 ? ~__mmask64{0} : (__mmask64{1} << (g.K - k)) - 1;
  for (int64_t i = 0; i < 16; ++i) {
    const __m512i row = i < rows ? _mm512_maskz_loadu_epi8(cols, g.b + (n + i) * g.ldb + k)
                                 : _mm512_setzero_si512();
    _mm512_store_si512(stage + 64 * i, row);
  }
  tile_reads_memory();
  *stride = 64;
  return stage;
}

// C[n .. n + 16 NT)[m .. m + 16 MT) over all K, then stored. Panels are zero past K, so the
// weight columns past K (staged as zeros) multiply zeros.
template <int NT, int MT>
void amx_block(const Int8GemmArgs& g, int64_t n, int64_t m, int64_t m1, int64_t n1) {
  alignas(64) int8_t stage[NT][16 * 64];
  alignas(64) int32_t c[16 * 16];
  const int64_t Kp = amx_padded_k(g.K);
  const int8_t* panel = g.a_panels + (m / kAmxPanel) * amx_panel_bytes(g.K);
  const int64_t next_panel = amx_panel_bytes(g.K);
  // Whole tiles are loaded in place up to the last whole 64 columns; the rest are staged.
  const bool whole_rows = n + 16 * NT <= g.N;
  const int64_t k_direct = whole_rows ? g.K / 64 * 64 : 0;

  _tile_zero(0);
  if constexpr (MT > 1) _tile_zero(1);
  if constexpr (NT > 1) _tile_zero(2);
  if constexpr (NT > 1 && MT > 1) _tile_zero(3);
  const auto step = [&](const int8_t* w0, const int8_t* w1, int64_t ldw, int64_t k) {
    _tile_loadd(4, w0, ldw);
    if constexpr (NT > 1) _tile_loadd(5, w1, ldw);
    _tile_loadd(6, panel + k * 16, 64);
    if constexpr (MT > 1) _tile_loadd(7, panel + next_panel + k * 16, 64);
    _tile_dpbssd(0, 4, 6);
    if constexpr (MT > 1) _tile_dpbssd(1, 4, 7);
    if constexpr (NT > 1) _tile_dpbssd(2, 5, 6);
    if constexpr (NT > 1 && MT > 1) _tile_dpbssd(3, 5, 7);
  };
  const int8_t* w = g.b + n * g.ldb;
  for (int64_t k = 0; k < k_direct; k += 64) step(w + k, w + 16 * g.ldb + k, g.ldb, k);
  for (int64_t k = k_direct; k < Kp; k += 64) {
    int64_t ldw = 64;
    const int8_t* w0 = weight_tile(g, n, k, stage[0], &ldw);
    const int8_t* w1 = NT > 1 ? weight_tile(g, n + 16, k, stage[NT - 1], &ldw) : nullptr;
    step(w0, w1, ldw, k);
  }

  _tile_stored(0, c, 64);
  store_block(g, c, m, m1, n, n1);
  if constexpr (MT > 1) {
    _tile_stored(1, c, 64);
    store_block(g, c, m + 16, m1, n, n1);
  }
  if constexpr (NT > 1) {
    _tile_stored(2, c, 64);
    store_block(g, c, m, m1, n + 16, n1);
  }
  if constexpr (NT > 1 && MT > 1) {
    _tile_stored(3, c, 64);
    store_block(g, c, m + 16, m1, n + 16, n1);
  }
}

// All eight tiles 16 rows x 64 bytes (the int8 GEMM's, attention's).
constexpr TileConfig full_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  return config;
}

void amx_int8_gemm(const Int8GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (g.a_panels == nullptr) return avx512::kernel_table().int8_gemm(g, m0, m1, n0, n1);
  const TileScope tiles(full_tiles());
  for (int64_t n = n0; n < n1; n += 32) {
    const bool two_n = n + 32 <= n1;
    for (int64_t m = m0; m < m1; m += 32) {
      const bool two_m = m + 16 < m1;
      if (two_n && two_m) {
        amx_block<2, 2>(g, n, m, m1, n1);
      } else if (two_n) {
        amx_block<2, 1>(g, n, m, m1, n1);
      } else {
        // The last (N % 32) columns: one or two single tiles.
        for (int64_t nn = n; nn < n1; nn += 16) {
          if (two_m) {
            amx_block<1, 2>(g, nn, m, m1, n1);
          } else {
            amx_block<1, 1>(g, nn, m, m1, n1);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------- int4
// W4 with Q8 activations (int4_gemm.h's arithmetic): per run r of the activation's scales
// (32, 64 or 128 columns, q8_run) the exact sums
//   I_r[n, m] = sum_{k in r} (code[n, k] - 8) * xq[m, k]
// accumulate in the tiles (codes - 8 are signed int8): one multiply of 32 columns for runs of
// 32, one or two of 64 for runs of 64 or 128. Then the fp32 sums
//   F_g = sum_{r in g} x_scale[m, r] * I_r,   out = sum_g scale * F_g - scale * (zero - 8) * gsum
// are folded in AVX-512 registers: a run's scale is why its sums leave the tiles, and the fold
// (a conversion and two or three FMAs per 16 sums) is the loop's cost besides the multiplies;
// where a group is one run, the two steps are one. Each thread unpacks its 32-row weight strips
// once per block of output (the nibbles of a block's 16 bytes: low ones, then high ones,
// minus 8) and reuses them for every panel; the activation panels are packed once per call
// (w4_pack_panels).

// Column (within a chunk of 64) of block-order position t: block t / 32, its 16 even columns,
// then its 16 odd ones.
constexpr int block_order_column(int t) {
  const int u = t % 32;
  return 32 * (t / 32) + (u < 16 ? 2 * u : 2 * (u - 16) + 1);
}

// vpermb indices from a chunk of 64 codes in K's order to block order.
struct ChunkToBlockOrder {
  alignas(64) uint8_t index[64];
  constexpr ChunkToBlockOrder() : index{} {
    for (int t = 0; t < 64; ++t) index[t] = static_cast<uint8_t>(block_order_column(t));
  }
};
constexpr ChunkToBlockOrder kChunkToBlockOrder{};

// x[0 .. n) (n <= 16, zero past n) as fp32.
template <class T>
inline __m512 load16(const T* x, int64_t n) {
  const __mmask16 mask = first_lanes(n);
  if constexpr (std::is_same_v<T, uint16_t>) {  // bf16 bits
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x)), 16));
  } else if constexpr (std::is_same_v<T, Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, x));
  } else {
    return _mm512_maskz_loadu_ps(mask, x);
  }
}

// Row m of x quantized as quantize_q8_blocks does (kernels.h: scale per run, codes rounding
// x / scale half to even), the codes in K's order into `codes` (zero up to amx_padded_k(K)), the
// block scales and group sums into the panel's column j.
template <class T>
void quantize_panel_row(const T* x, int64_t K, int64_t group_size, int8_t* codes, float* ps,
                        float* pg, int j) {
  const int64_t run = q8_run(K, group_size), groups = K / group_size;
  for (int64_t gi = 0; gi < groups; ++gi) pg[gi * kAmxPanel + j] = 0.0f;
  for (int64_t k0 = 0; k0 < K; k0 += run) {
    const int64_t len = K - k0 < run ? K - k0 : run;
    __m512i amax = _mm512_setzero_si512();  // |x| as bits (max_abs_bits)
    for (int64_t k = 0; k < len; k += 16) {
      amax =
          _mm512_max_epu32(amax, _mm512_castps_si512(_mm512_abs_ps(load16(x + k0 + k, len - k))));
    }
    // NaN for an inf or a NaN
    const float s = scale_from_amax(float_from_bits(_mm512_reduce_max_epu32(amax)));
    const __m512 vs = _mm512_set1_ps(s), inv = _mm512_set1_ps(1.0f / s);
    __m512i sum = _mm512_setzero_si512();  // the run's codes: a run lies in one group
    for (int64_t k = k0; k < k0 + len; k += 16) {
      __m512 v = round_quotient_ps(load16(x + k, K - k), vs, inv);
      v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
      const __m512i q = _mm512_cvtps_epi32(v);
      sum = _mm512_add_epi32(sum, q);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm512_cvtsepi32_epi8(q));
    }
    for (int64_t b0 = k0; b0 < k0 + len; b0 += kQ8Block) ps[b0 / kQ8Block * kAmxPanel + j] = s;
    pg[k0 / group_size * kAmxPanel + j] += static_cast<float>(_mm512_reduce_add_epi32(sum)) * s;
  }
  for (int64_t k = K; k < amx_padded_k(K); ++k) codes[k] = 0;
}

void w4_pack_panels(const Q8BlockArgs& a, int64_t M, int8_t* codes, float* scales,
                    float* group_sums, int64_t p0, int64_t p1) {
  const int64_t K = a.K, Kp = amx_padded_k(K);
  const int64_t blocks = (K + kQ8Block - 1) / kQ8Block, groups = K / a.group_size;
  const __m512i order = _mm512_load_si512(kChunkToBlockOrder.index);
  thread_local std::vector<int8_t> rows_buffer;
  rows_buffer.resize(kAmxPanel * Kp + 64);
  int8_t* rows = aligned_data(rows_buffer);
  for (int64_t p = p0; p < p1; ++p) {
    float* ps = scales + p * blocks * kAmxPanel;
    float* pg = group_sums + p * groups * kAmxPanel;
    for (int j = 0; j < 16; ++j) {
      const int64_t m = p * kAmxPanel + j;
      int8_t* row = rows + j * Kp;
      if (m >= M) {  // past M: zero codes, scales and sums
        std::fill(row, row + Kp, int8_t{0});
        for (int64_t b = 0; b < blocks; ++b) ps[b * kAmxPanel + j] = 0.0f;
        for (int64_t gi = 0; gi < groups; ++gi) pg[gi * kAmxPanel + j] = 0.0f;
      } else if (a.x_type == ScalarType::kBFloat16) {
        quantize_panel_row(static_cast<const uint16_t*>(a.x) + m * a.ldx, K, a.group_size, row, ps,
                           pg, j);
      } else {
        quantize_panel_row(static_cast<const float*>(a.x) + m * a.ldx, K, a.group_size, row, ps, pg,
                           j);
      }
    }
    int8_t* panel = codes + p * amx_panel_bytes(K);
    for (int64_t k = 0; k < Kp; k += 64) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        r[j] = _mm512_permutexvar_epi8(order, _mm512_load_si512(rows + j * Kp + k));
      }
      transpose_16x16(r);
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) _mm512_storeu_si512(panel + (k / 4 + q) * 64, r[q]);
    }
  }
}

// A thread's weight strip: kW4StripRows rows of signed codes (code - 8) in block order,
// w4_strip_codes(K) of them a row (zero past K and past N), tile by tile: the kDepth columns of
// multiply t are rows 0-31 at kDepth bytes each, from t * kW4StripRows * kDepth. A weight tile
// load then reads 1 KB (or 512 bytes) in one piece, which the prefetchers follow, where rows a
// whole K apart took 16 streams (and 4 KB strides fell in one L1 set). Per group, the rows' scale
// and scale * (zero - 8) as fp32, (groups, kW4StripRows).
constexpr int kW4StripRows = 32;
constexpr int64_t w4_strip_codes(int64_t K) { return (K + 127) / 128 * 128; }

struct W4Strip {
  std::vector<int8_t> codes;
  std::vector<float> scale, scaled_zero;
};

// Columns [k0, k1) of the strip (k0 a multiple of 128 and of the group size, k1 too or K).
template <class S, int kDepth>
void unpack_strip(const W4GemmArgs& g, int64_t n, int64_t k0, int64_t k1, W4Strip& strip) {
  const int64_t codes = w4_strip_codes(k1 - k0);
  int8_t* base = aligned_data(strip.codes);
  // Code k of row i (in block order) lies at (k / kDepth * kW4StripRows + i) * kDepth + k % kDepth.
  const auto at = [=](int64_t i, int64_t k) TORCHSLIM_INLINE {
    return base + (k / kDepth * kW4StripRows + i) * kDepth + k % kDepth;
  };
  const auto store64 = [=](int64_t i, int64_t k, __m512i v) TORCHSLIM_INLINE {  // codes k .. k + 64
    if constexpr (kDepth == 64) {
      _mm512_store_si512(at(i, k), v);
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(at(i, k)), _mm512_castsi512_si256(v));
      _mm256_store_si256(reinterpret_cast<__m256i*>(at(i, k + 32)),
                         _mm512_extracti64x4_epi64(v, 1));
    }
  };
  const int64_t bytes = (k1 - k0) / 2, g0 = k0 / g.group_size, groups = k1 / g.group_size - g0;
  const __m512i low = _mm512_set1_epi8(0x0f), center = _mm512_set1_epi8(kQ4Center);
  // 128-bit lanes of the low and high nibbles, interleaved: [lo0 hi0 lo1 hi1], [lo2 hi2 ...]
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int i = 0; i < kW4StripRows; ++i) {
    if (n + i >= g.N) {
      for (int64_t k = 0; k < codes; k += 64) store64(i, k, _mm512_setzero_si512());
      continue;
    }
    const uint8_t* src = g.w + (n + i) * g.ldw + k0 / 2;
    // The next row's bytes are fetched while this row's are unpacked: a row is one short stream
    // (2 KB at K = 4096) that the hardware prefetchers barely start on.
    const uint8_t* next = n + i + 1 < g.N && i + 1 < kW4StripRows ? src + g.ldw : nullptr;
    for (int64_t j = 0; j < codes / 2; j += 64) {  // 64 packed bytes: four blocks of 32 codes
      if (next != nullptr && j < bytes) __builtin_prefetch(next + j);
      const int64_t left = bytes - j;
      const __mmask64 mask = left >= 64 ? ~__mmask64{0}
                             : left > 0 ? (__mmask64{1} << left) - 1
                                        : __mmask64{0};
      const __m512i v = _mm512_maskz_loadu_epi8(mask, src + j);
      const __m512i lo = _mm512_and_si512(v, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      store64(i, 2 * j, _mm512_sub_epi8(_mm512_permutex2var_epi64(lo, first, hi), center));
      store64(i, 2 * j + 64, _mm512_sub_epi8(_mm512_permutex2var_epi64(lo, second, hi), center));
    }
  }
  // The scales and scale * (zero - 8), group-major (kW4StripRows rows a group), 16 rows x 16
  // groups at a time through a register transpose: one scalar conversion and two scattered
  // stores a group cost more than the codes' unpacking at g32 (11008x4096, M = 16).
  const __m512 code_center = _mm512_set1_ps(kQ4Center);
  for (int i0 = 0; i0 < kW4StripRows; i0 += 16) {
    for (int64_t gi0 = 0; gi0 < groups; gi0 += 16) {
      const int64_t count = std::min<int64_t>(16, groups - gi0);
      __m512i s[16], sz[16];  // row i0 + r's groups gi0 .. gi0 + 16, then transposed
      for (int r = 0; r < 16; ++r) {
        __m512 scale = _mm512_setzero_ps(), scaled_zero = _mm512_setzero_ps();
        if (n + i0 + r < g.N) {
          const int64_t at = (n + i0 + r) * g.lds + g0 + gi0;
          scale = load16(static_cast<const S*>(g.scales) + at, count);
          const __m512 zero = load16(static_cast<const S*>(g.zeros) + at, count);
          scaled_zero = _mm512_mul_ps(scale, _mm512_sub_ps(zero, code_center));
        }
        s[r] = _mm512_castps_si512(scale);
        sz[r] = _mm512_castps_si512(scaled_zero);
      }
      transpose_16x16(s);
      transpose_16x16(sz);
      for (int64_t q = 0; q < count; ++q) {
        const int64_t at = (gi0 + q) * kW4StripRows + i0;
        _mm512_storeu_si512(strip.scale.data() + at, s[q]);
        _mm512_storeu_si512(strip.scaled_zero.data() + at, sz[q]);
      }
    }
  }
}

// The int4 GEMM's tiles for multiplies of kDepth columns (32 or 64): accumulators tmm0-3, the
// strip's two 16-row halves tmm4-5 (16 rows x kDepth codes) and two activation panels tmm6-7
// (kDepth / 4 rows of 16 x 4 codes). Accumulator 2 h + p is half h times panel p. (w4_runs32
// uses tmm0-1 and the pairs 4 and 6, 5 and 7.)
template <int kDepth>
constexpr TileConfig w4_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = t < 6 ? 16 : kDepth / 4;
    config.colsb[t] = t == 4 || t == 5 ? kDepth : 64;
  }
  return config;
}

// A w4_panels call's columns [k0, k1) (whole groups) and where its sums are kept until k1 = K.
struct W4Slice {
  int64_t k0, k1;
  float (*acc)[4][16][16];
};

// out[m .. m + 16 kPanels)[n .. n + 32) (cut at m1, n1) for one strip and kPanels (1 or 2)
// activation panels, in multiplies of kDepth columns (a run is a whole number of them), over the
// slice's columns (written out after the last slice). Each run's
// sums go from the tiles to memory, two runs' worth alternating, and are folded one run late:
// the fold of run r - 1 has no dependence on run r's multiplies, so the core overlaps the two.
template <int kDepth, int kPanels>
void w4_panels(const W4GemmArgs& g, const W4Strip& strip, int64_t n, int64_t m, int64_t m1,
               int64_t n1, const W4Slice& slice) {
  const int64_t blocks = (g.K + kQ8Block - 1) / kQ8Block, groups = g.K / g.group_size;
  const int64_t run = q8_run(g.K, g.group_size), steps_per_run = run / kDepth;
  const int64_t runs = (slice.k1 + run - 1) / run, steps = (slice.k1 + kDepth - 1) / kDepth;
  const int64_t r_begin = slice.k0 / run, t_begin = slice.k0 / kDepth;
  const int64_t g_begin = slice.k0 / g.group_size;
  const bool run_is_group = run == g.group_size;
  const int64_t p = m / kAmxPanel, panel_bytes = amx_panel_bytes(g.K);
  const int8_t* x = g.panel_codes + p * panel_bytes;
  const float* xs = g.panel_scales + p * blocks * kAmxPanel;
  const float* gs = g.panel_group_sums + p * groups * kAmxPanel;
  const int8_t* w = aligned_data(strip.codes);

  // Per accumulator q and its weight row i: f = F (this group's sums so far) and acc = the
  // finished groups, each for the panel's 16 activation rows; c = two runs' integer sums.
  // acc is written by group 0's fold, then added to; it lives in the slice's buffer between
  // slices.
  float (&acc)[4][16][16] = *slice.acc;
  alignas(64) float f[4][16][16];
  alignas(64) int32_t c[2][4][16][16];
  if (!run_is_group) std::fill(&f[0][0][0], &f[0][0][0] + sizeof(f) / sizeof(float), 0.0f);

  const auto zero = [&]() TORCHSLIM_INLINE {
    _tile_zero(0);
    _tile_zero(2);
    if constexpr (kPanels > 1) {
      _tile_zero(1);
      _tile_zero(3);
    }
  };
  const auto step = [&](int64_t t) TORCHSLIM_INLINE {  // the multiplies of columns t kDepth ..
    const int8_t* wt = w + kW4StripRows * kDepth * (t - t_begin);
    const int8_t* xt = x + kAmxPanel * kDepth * t;
    _tile_loadd(4, wt, kDepth);
    _tile_loadd(5, wt + 16 * kDepth, kDepth);
    _tile_loadd(6, xt, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(2, 5, 6);
    if constexpr (kPanels > 1) {
      _tile_loadd(7, xt + panel_bytes, 64);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(3, 5, 7);
    }
  };
  const auto store = [&](int32_t (&sums)[4][16][16]) TORCHSLIM_INLINE {
    _tile_stored(0, sums[0], 64);
    _tile_stored(2, sums[2], 64);
    if constexpr (kPanels > 1) {
      _tile_stored(1, sums[1], 64);
      _tile_stored(3, sums[3], 64);
    }
  };
  int64_t group = g_begin, group_end = (g_begin + 1) * g.group_size;
  const auto ends_group = [&](int64_t r) { return run * (r + 1) >= group_end || r + 1 == runs; };
  // Run r's sums of accumulators q0 .. q1 - 1 into f and acc.
  const auto fold = [&](int64_t r, const int32_t (&sums)[4][16][16], int q0,
                        int q1) TORCHSLIM_INLINE {
    const bool group_ends = ends_group(r);
    const auto finished = [&](int q, int i) TORCHSLIM_INLINE {  // acc[q][i] so far
      return group == 0 ? _mm512_setzero_ps() : _mm512_load_ps(acc[q][i]);
    };
    const float* s = strip.scale.data() + (group - g_begin) * kW4StripRows;
    const float* sz = strip.scaled_zero.data() + (group - g_begin) * kW4StripRows;
    for (int q = q0; q < q1; ++q) {
      const int half = q / 2, pp = q % 2;
      if (pp >= kPanels) continue;
      const __m512 scale = _mm512_load_ps(xs + (pp * blocks + r * (run / kQ8Block)) * kAmxPanel);
      const __m512 gsum =
          group_ends ? _mm512_load_ps(gs + (pp * groups + group) * kAmxPanel) : _mm512_setzero_ps();
      if (run_is_group) {  // F = x_scale * I: straight into the accumulators
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          const int row = 16 * half + i;
          const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[q][i])), scale);
          const __m512 a = _mm512_fmadd_ps(_mm512_set1_ps(s[row]), v, finished(q, i));
          _mm512_store_ps(acc[q][i], _mm512_fnmadd_ps(_mm512_set1_ps(sz[row]), gsum, a));
        }
        continue;
      }
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(sums[q][i]));
        _mm512_store_ps(f[q][i], _mm512_fmadd_ps(v, scale, _mm512_load_ps(f[q][i])));
      }
      if (!group_ends) continue;
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        const int row = 16 * half + i;
        const __m512 a =
            _mm512_fmadd_ps(_mm512_set1_ps(s[row]), _mm512_load_ps(f[q][i]), finished(q, i));
        _mm512_store_ps(acc[q][i], _mm512_fnmadd_ps(_mm512_set1_ps(sz[row]), gsum, a));
        _mm512_store_ps(f[q][i], _mm512_setzero_ps());
      }
    }
  };
  // Run r's multiplies, with run r - 1's fold spread between its steps (a quarter of it after
  // each of four steps, half after each of two): the core sees both at once and overlaps the
  // tile unit's work with the fold's. Then run r's sums go to memory.
  for (int64_t r = r_begin; r <= runs; ++r) {
    const int64_t t0 = r * steps_per_run;
    const int64_t t1 = r == runs ? t0 : (t0 + steps_per_run < steps ? t0 + steps_per_run : steps);
    if (r < runs) zero();
    int q = 0;
    for (int64_t t = t0; t < t1; ++t) {
      step(t);
      if (r == r_begin) continue;
      const int q1 = static_cast<int>(4 * (t - t0 + 1) / (t1 - t0));
      fold(r - 1, c[(r - 1) & 1], q, q1);
      q = q1;
    }
    if (r > r_begin) {
      if (q < 4) fold(r - 1, c[(r - 1) & 1], q, 4);
      if (ends_group(r - 1)) {
        ++group;
        group_end += g.group_size;
      }
    }
    if (r < runs) store(c[r & 1]);
  }

  // acc[q][i][j] is out[m + 16 pp + j, n + 16 half + i] before the bias: transposed per tile.
  if (slice.k1 < g.K) return;
  for (int q = 0; q < 4; ++q) {
    const int half = q / 2, pp = q % 2;
    const int64_t mq = m + kAmxPanel * pp, nq = n + 16 * half;
    if (pp >= kPanels || mq >= m1 || nq >= n1) continue;
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(acc[q][i]);
    transpose_16x16(r);
    const int64_t rows = m1 - mq < 16 ? m1 - mq : 16;
    store_rows(g.out, g.ldo, g.out_type, r, mq, rows, nq, first_lanes(n1 - nq), g.bias);
  }
}

// Runs of 32 (g32, g96, ...): out[m .. m + 16)[n + 16 h .. n + 16 h + 16) (cut at m1, n1) for one
// activation panel and one 16-row half of the strip, its fp32 sums in 16 AVX-512 registers for
// all of K. With a fold per 32 columns the fold is the largest part of the work, and w4_panels'
// sums in memory cost every run a load and a store of each row besides the tile store (g32:
// this kernel takes 0.75-0.92x its time at M = 16-512; with 64-column multiplies, where the
// products dominate, w4_panels' shared tile loads win by 5-15% and it keeps them). Each run's
// integer sums leave the tiles once (a tile store) and are folded in registers:
//   acc += s_group * (x_scale_run * sums_run)   per run,
//   acc -= s_group * (zero - 8) * x_group_sum   at the end of each group.
// Tile 0 takes the even runs and tile 1 the odd ones, each from its own operand tiles (4 and 6,
// 5 and 7: tiles are not renamed, so a load into a tile that the multiply before reads would
// wait for it). The iteration of run r multiplies run r, stores run r - 1 and folds run r - 2,
// so that the three may overlap and no fold loads what the store before it has just written.
// (They overlap little: benchmarks/NOTES.md has the parts' cycles.)
struct W4Runs32 {
  const int8_t* w;  // the strip's codes, from the half's first row
  const int8_t* x;  // the panel's codes
  const float* xs;  // the panel's block scales
  const float* gs;  // the panel's group sums
  const float* s;   // the half's weight scales and scale * (zero - 8), kW4StripRows a group
  const float* sz;
  int64_t runs, runs_per_group;
};

// Where the fold is: the run's group and the runs left in it.
struct W4FoldState {
  int64_t group = 0, left;
};

// One iteration on tile T (the tile intrinsics take literal tile numbers).
template <int T>
TORCHSLIM_INLINE void w4_runs32_step(const W4Runs32& a, int64_t r, int32_t (&c)[2][16][16],
                                     __m512 (&acc)[16], W4FoldState& fold) {
  if (r < a.runs) {
    const int8_t* w = a.w + kW4StripRows * 32 * r;
    const int8_t* x = a.x + kAmxPanel * 32 * r;
    if constexpr (T == 0) {
      _tile_zero(0);
      _tile_loadd(4, w, 32);
      _tile_loadd(6, x, 64);
      _tile_dpbssd(0, 4, 6);
    } else {
      _tile_zero(1);
      _tile_loadd(5, w, 32);
      _tile_loadd(7, x, 64);
      _tile_dpbssd(1, 5, 7);
    }
  }
  if (r >= 1 && r - 1 < a.runs) {  // run r - 1, on the other tile, into c[1 - T]
    if constexpr (T == 0) {
      _tile_stored(1, c[1], 64);
    } else {
      _tile_stored(0, c[0], 64);
    }
  }
  const int64_t f = r - 2;  // in c[T] since the last iteration
  if (f >= 0 && f < a.runs) {
    const __m512 scale = _mm512_load_ps(a.xs + f * kAmxPanel);
    const float* sg = a.s + fold.group * kW4StripRows;
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[T][i])), scale);
      acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(sg[i]), v, acc[i]);
    }
    if (--fold.left == 0) {
      const __m512 gsum = _mm512_load_ps(a.gs + fold.group * kAmxPanel);
      const float* szg = a.sz + fold.group * kW4StripRows;
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_fnmadd_ps(_mm512_set1_ps(szg[i]), gsum, acc[i]);
      ++fold.group;
      fold.left = a.runs_per_group;
    }
  }
  // The tile store is an asm statement that names no memory: this one says that c changes here,
  // so the fold's loads stay between the store before and the store after (a memory clobber
  // would also send acc through the stack).
  asm volatile("" : "+m"(c));
}

// Long K sums in two levels: the registers' sums over kW4FlushRuns runs, added to a total in
// memory. A single fp32 sum over the 512 runs of K = 16384 had 4x the error of PyTorch's fp32
// matmul (M = 128; 0.5x with two levels). The total costs 5-10% of the loop's time, so only K
// beyond kW4TwoLevelRuns runs takes it.
constexpr int64_t kW4FlushRuns = 64, kW4TwoLevelRuns = 256;

template <bool kTwoLevels>
void w4_runs32(const W4GemmArgs& g, const W4Strip& strip, int64_t n, int h, int64_t m, int64_t m1,
               int64_t n1) {
  const int64_t blocks = (g.K + kQ8Block - 1) / kQ8Block, groups = g.K / g.group_size;
  const int64_t p = m / kAmxPanel;
  const W4Runs32 a{aligned_data(strip.codes) + 16 * h * 32,
                   g.panel_codes + p * amx_panel_bytes(g.K),
                   g.panel_scales + p * blocks * kAmxPanel,
                   g.panel_group_sums + p * groups * kAmxPanel,
                   strip.scale.data() + 16 * h,
                   strip.scaled_zero.data() + 16 * h,
                   g.K / 32,
                   g.group_size / 32};
  alignas(64) int32_t c[2][16][16];
  __m512 acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  W4FoldState fold{0, a.runs_per_group};
  if constexpr (kTwoLevels) {
    alignas(64) float total[16][16] = {};
    for (int64_t r0 = 0; r0 < a.runs + 2; r0 += kW4FlushRuns) {
      const int64_t r1 = std::min(r0 + kW4FlushRuns, a.runs + 2);
      for (int64_t r = r0; r < r1; r += 2) {
        w4_runs32_step<0>(a, r, c, acc, fold);
        w4_runs32_step<1>(a, r + 1, c, acc, fold);
      }
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        _mm512_store_ps(total[i], _mm512_add_ps(_mm512_load_ps(total[i]), acc[i]));
        acc[i] = _mm512_setzero_ps();
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_load_ps(total[i]);
  } else {
    for (int64_t r = 0; r < a.runs + 2; r += 2) {
      w4_runs32_step<0>(a, r, c, acc, fold);
      w4_runs32_step<1>(a, r + 1, c, acc, fold);
    }
  }

  // acc[i][j] is out[m + j, n + 16 h + i] before the bias: transposed.
  const int64_t nq = n + 16 * h;
  if (nq >= n1) return;
  __m512i rows[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) rows[i] = _mm512_castps_si512(acc[i]);
  transpose_16x16(rows);
  store_rows(g.out, g.ldo, g.out_type, rows, m, m1 - m < 16 ? m1 - m : 16, nq, first_lanes(n1 - nq),
             g.bias);
}

// Columns of K per slice for the 64-column multiplies: the block's panels over a slice (512 KB
// for 256 rows) stay in L2 while its strips pass, where over all of K (2.8 MB at K = 11008)
// they came from L3 for every strip. Each strip is unpacked a slice at a time, once per block as
// before; the sums wait in memory between slices. 11008x4096, g128, M = 512: 0.72-0.79x the
// unsliced time; 4096^2 0.93-0.96x; slices of 1024 and 4096 within 5% of 2048.
constexpr int64_t kW4SliceK = 2048;

template <class S, int kDepth>
void w4_block(const W4GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  thread_local W4Strip strip;
  // Slices of whole groups and whole 128-column chunks of the strip; per channel, one.
  const int64_t unit = std::lcm(g.group_size, int64_t{128});
  const int64_t slice_k =
      kDepth == 32 || g.group_size == g.K ? g.K : std::max(unit, kW4SliceK / unit * unit);
  const int64_t groups = std::min(slice_k, g.K) / g.group_size;
  strip.codes.resize(kW4StripRows * w4_strip_codes(slice_k) + 64);
  strip.scale.resize(kW4StripRows * groups);
  strip.scaled_zero.resize(kW4StripRows * groups);
  // w4_panels: each 32 x 32 output's sums, kept between slices (256 KB for a 256 x 256 block).
  thread_local std::vector<float> sums;
  const int64_t pairs = (m1 - m0 + 2 * kAmxPanel - 1) / (2 * kAmxPanel);
  if (kDepth == 64) sums.resize((n1 - n0 + kW4StripRows - 1) / kW4StripRows * pairs * 1024 + 16);
  auto* acc = reinterpret_cast<float (*)[4][16][16]>(aligned_data(sums));
  const TileScope tiles(w4_tiles<kDepth>());
  for (int64_t k0 = 0; k0 < g.K; k0 += slice_k) {
    const int64_t k1 = std::min(g.K, k0 + slice_k);
    for (int64_t n = n0, strip_index = 0; n < n1; n += kW4StripRows, ++strip_index) {
      unpack_strip<S, kDepth>(g, n, k0, k1, strip);
      tile_reads_memory();
      for (int64_t m = m0; m < m1; m += kDepth == 32 ? kAmxPanel : 2 * kAmxPanel) {
        if constexpr (kDepth == 32) {  // runs of 32 (one slice)
          const auto runs32 = g.K / 32 > kW4TwoLevelRuns ? w4_runs32<true> : w4_runs32<false>;
          runs32(g, strip, n, 0, m, m1, n1);
          if (n + 16 < n1) runs32(g, strip, n, 1, m, m1, n1);
        } else {
          const W4Slice slice{k0, k1, acc + strip_index * pairs + (m - m0) / (2 * kAmxPanel)};
          if (m + kAmxPanel < m1) {
            w4_panels<kDepth, 2>(g, strip, n, m, m1, n1, slice);
          } else {
            w4_panels<kDepth, 1>(g, strip, n, m, m1, n1, slice);
          }
        }
      }
    }
  }
}

// Multiplies as deep as the activation's runs allow: 64 columns, or 32 for runs of 32.
template <class S>
void w4_block(const W4GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (q8_run(g.K, g.group_size) % 64 == 0) return w4_block<S, 64>(g, m0, m1, n0, n1);
  w4_block<S, 32>(g, m0, m1, n0, n1);
}

// ------------------------------------------------------------ W8A16 and W4 on bf16 tiles
// TDPBF16PS adds C[i][j] += sum over 32 k of A[i][k] * B[k / 2][2 j + k % 2] in fp32, 16 cycles
// for 8192 multiply-adds (16x the AVX-512 FMA rate):
//   A = 16 weight rows as bf16: int8 codes converted (exact), or int4 codes dequantized;
//   B = the activation panels (amx_bf16_panel_elems): x split into 1 bf16 part or 3. For W8A16,
//       1 for bf16 x and 3 for fp32 x: a part times an integer weight is exact, and the three
//       parts sum to the fp32 value, so the sums are fp32 dot products taken in another order.
//       For W4, 1: a dequantized weight is a rounding already (see W4GemmArgs::x_bf16_panels).
// The tiles accumulate all of K; the epilogue applies the column scale (W8A16's w_scale, as
// int8_gemm.h's W8A16 epilogue does) and the bias. Register blocking as in the int8 GEMM: two
// 16-row weight tiles x two panels (tmm0-3), weights tmm4-5, panels tmm6-7. Each thread converts
// its weights to bf16 once per block, kBf16SliceK columns of a 32-row strip at a time (18 KB),
// which then stay in L1 while every panel pair of the block passes, so that only the panels come
// from L2; between slices the tiles' sums wait in memory. A tile multiply reads two 1 KB tiles
// in its 16 cycles: with both from L2 (slices of 1024 columns, 66 KB) the loop waited on L2.
// Slices of 256 took 0.75-0.85x the time of 1024 (W4 g32, M = 512, 4096^2 and 11008x4096;
// 128 about the same as 256, 384 and 512 no better than 1024).
void w8a16_pack_panels(const W8A16Args& g, uint16_t* panels, int64_t p0, int64_t p1) {
  const int64_t Kb = amx_bf16_padded_k(g.K), elems = amx_bf16_panel_elems(g.K);
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t k = 0; k < Kb; k += 32) {
      __m512i rows[3][16];  // per part, per row of the panel: x[m, k .. k + 32) as bf16
      for (int j = 0; j < 16; ++j) {
        const int64_t m = p * kAmxPanel + j;
        __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
        const auto load = [&](const auto* row) TORCHSLIM_INLINE {
          lo = load16(row, g.K - k);
          hi = load16(row + 16, g.K - k - 16);
        };
        if (m < g.M && g.x_bf16 != nullptr) {
          load(g.x_bf16 + m * g.ldx + k);
        } else if (m < g.M) {
          load(g.x + m * g.ldx + k);
        }
        __m512i part[3];
        split_parts(lo, hi, g.x_parts, part);
        for (int64_t t = 0; t < g.x_parts; ++t) rows[t][j] = part[t];
      }
      for (int64_t t = 0; t < g.x_parts; ++t) {
        store_pairs(rows[t], panels + (p * g.x_parts + t) * elems, k / 2);
      }
    }
  }
}

constexpr int kBf16StripRows = 32;
constexpr int64_t kBf16SliceK = 256;
// Slices for a block of up to four panel pairs with x in three parts (W8A16 on fp32 x, M <= 128
// a block): there slices of 256 took 1.2-1.4x the time of 1024 at M = 16-32 (4096^2,
// 1536x576), 1.12-1.23x at M = 64 (the benchmark's layers) and 1.18x at M = 128 (11008x4096),
// against 0.86-0.9x at M = 512; with one part (int4 g32) 0.6-0.75x at K = 11008 from M = 16.
constexpr int64_t kBf16FewPairsSliceK = 1024;
// The order of a block's (strip, slice) steps. Slices outer: a slice of the panels serves every
// strip while it is hot, and the sums of every (strip, pair) wait in memory between slices.
// Strips outer: a strip's rows are read from start to end, as the prefetchers like, its sums
// wait per pair only (in L1), and with one pair stay in the tiles; the panels are read whole
// per strip, so they must stay in L2. Strips outer where the block's panels are under 1.5 MB
// (of the 2 MB L2 of this machine's cores, room left for the weights and sums): int4 g32 11008x4096
// at M = 64 took 0.77x the time of slices outer, 4096x11008 at M = 32 0.94x, 4096^2 g64 at M = 64
// 0.89x; W8A16 4096x11008 bf16 x at M = 64 and 128 0.64-0.67x, fp32 x (three parts) at M = 16-32
// 0.88-0.9x; the same (0.97-1.03x) at M = 128-512 on the rest; panels of 1.5 MB (fp32 x,
// 4096^2, M = 64) 1.03x, of 8.4 MB (11008x4096, M = 128) 1.46x.
constexpr int64_t kBf16StripOuterBytes = int64_t{3} << 19;

// A weight strip's source for bf16_tiles_block: convert(n, k0, k1, dst) writes w[n, k0 .. k1)
// as bf16, zero past K (k0, k1 multiples of 32), and scale(n) is what the sums of column n are
// multiplied by at the end.
//
// int8 rows: the codes as bf16 (exact), scaled per row in the epilogue.
struct Int8Rows {
  const W8A16Args& g;
  float scale(int64_t n) const { return g.w_scale[n]; }
  void convert(int64_t n, int64_t k0, int64_t k1, uint16_t* dst) const {
    const int8_t* src = g.w + n * g.ldw;
    for (int64_t k = k0; k < k1; k += 32, dst += 32) {
      _mm512_storeu_si512(dst, int8_to_bf16(src + k, g.K - k));
    }
  }
};

// int4 rows (two codes a byte, low nibble first), dequantized as the reference does, (code -
// zero) * scale in fp32, then rounded to bf16 (to nearest even): per group, the 16 values a code
// can take, as a vpermw table that the codes index. S is the scales' and zeros' storage type. A
// block of 32 lies in one group (groups are whole blocks, or one group per row).
//
// A block's 16 bytes become its 32 table indices in two instructions: vpermb spreads byte b / 2
// into the low byte of word b (the high bytes zeroed), and a shift of the odd words by 4 leaves
// each word's code in its low bits. vpermw reads five index bits, so the even words' high nibble
// lands in bit 4: the table holds its 16 values twice. The group's scale and zero point come
// from fp32 copies made 16 groups at a time, broadcast from memory, so that the port that
// permutes (vpermb, vpermw) does not also convert and broadcast them one group at a time.
template <class S>
struct Int4Rows {
  const W4GemmArgs& g;
  float scale(int64_t) const { return 1.0f; }
  // The group's 16 dequantized values as bf16, twice over in a zmm.
  static __m512i group_table(const float* scale, const float* zero) {
    const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 w =
        _mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(*zero)), _mm512_set1_ps(*scale));
    return (__m512i)_mm512_cvtne2ps_pbh(w, w);
  }
  void convert(int64_t n, int64_t k0, int64_t k1, uint16_t* dst) const {
    // vpermb indices (byte 2 j of word j: packed byte j / 2) and the odd words' shift.
    static constexpr struct Spread {
      alignas(64) uint8_t index[64];
      alignas(64) uint16_t shift[32];
      constexpr Spread() : index{}, shift{} {
        for (int j = 0; j < 32; ++j) {
          index[2 * j] = static_cast<uint8_t>(j / 2);
          shift[j] = static_cast<uint16_t>(4 * (j % 2));
        }
      }
    } kSpread{};
    const __m512i spread = _mm512_load_si512(kSpread.index);
    const __m512i shift = _mm512_load_si512(kSpread.shift);
    const uint8_t* src = g.w + n * g.ldw;
    const S* scales = static_cast<const S*>(g.scales) + n * g.lds;
    const S* zeros = static_cast<const S*>(g.zeros) + n * g.lds;
    const int64_t groups = g.K / g.group_size;
    alignas(64) float scale[16], zero[16];
    int64_t group = k0 / g.group_size, group_end = (group + 1) * g.group_size;
    int64_t copied = group;  // groups [copied - 16, copied) are in scale and zero
    const auto table = [&]() TORCHSLIM_INLINE {
      if (group >= copied) {
        const int64_t count = std::min<int64_t>(16, groups - group);
        _mm512_store_ps(scale, load16(scales + group, count));
        _mm512_store_ps(zero, load16(zeros + group, count));
        copied = group + 16;
      }
      return group_table(scale + (group + 16 - copied), zero + (group + 16 - copied));
    };
    __m512i values = table();
    for (int64_t k = k0; k < k1; k += 32, dst += 32) {
      if (k >= group_end) {
        ++group;
        group_end += g.group_size;
        values = table();
      }
      const bool whole = k + 32 <= g.K;
      const __m128i bytes = whole ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k / 2))
                                  : _mm_maskz_loadu_epi8(first_lanes((g.K - k) / 2), src + k / 2);
      const __m512i words = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, spread,
                                                          _mm512_castsi128_si512(bytes));
      __m512i v = _mm512_permutexvar_epi16(_mm512_srlv_epi16(words, shift), values);
      if (!whole) {
        const int64_t left = g.K - k;
        v = _mm512_maskz_mov_epi16(left >= 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1, v);
      }
      _mm512_storeu_si512(dst, v);
    }
  }
};

// out[m0 .. m1)[n0 .. n1) = x . w^T on bf16 tiles, x from g.x_panels and w from `weights` (a
// Rows above), each column's sums times weights.scale(n), plus the bias.
template <class Rows>
void bf16_tiles_block(const W8A16Args& g, const Rows& weights, int64_t m0, int64_t m1, int64_t n0,
                      int64_t n1) {
  const int64_t Kb = amx_bf16_padded_k(g.K), elems = amx_bf16_panel_elems(g.K);
  const int64_t strips = (n1 - n0 + kBf16StripRows - 1) / kBf16StripRows;
  const int64_t pairs = (m1 - m0 + 2 * kAmxPanel - 1) / (2 * kAmxPanel);
  // Per thread: the converted slice of one strip, and per panel pair (and strip, with slices
  // outer) the four tiles' sums between slices.
  thread_local std::vector<uint16_t> slice_buffer;
  thread_local std::vector<float> carry_buffer;
  const int64_t panel_bytes = pairs * 2 * g.x_parts * elems * int64_t{sizeof(uint16_t)};
  const bool strip_outer = panel_bytes < kBf16StripOuterBytes;
  const int64_t slice_k = pairs <= 4 && g.x_parts > 1 ? kBf16FewPairsSliceK : kBf16SliceK;
  // Row stride of a converted slice, in bf16: not a multiple of 4 KB apart (rows that far apart
  // fall in one L1 set, and a tile load takes 16 of them).
  const int64_t stride = slice_k + 32;
  slice_buffer.resize(kBf16StripRows * stride + 32);
  const int64_t held_strips = strip_outer ? 1 : strips;
  carry_buffer.resize(held_strips * pairs * 4 * 256 + 16);
  uint16_t* slice = aligned_data(slice_buffer);
  float* carry = aligned_data(carry_buffer);
  // With one panel pair and the slices of a strip in a row, its sums stay in the tiles.
  const bool keep_in_tiles = strip_outer && pairs == 1;

  const TileScope tiles(full_tiles());
  alignas(64) float c[4][256];
  const int64_t slices = (Kb + slice_k - 1) / slice_k;
  for (int64_t step = 0; step < strips * slices; ++step) {
    const int64_t st = strip_outer ? step / slices : step % strips;
    const int64_t k0 = (strip_outer ? step % slices : step / strips) * slice_k;
    const int64_t k1 = k0 + slice_k < Kb ? k0 + slice_k : Kb;
    const int64_t n = n0 + st * kBf16StripRows;
    for (int i = 0; i < kBf16StripRows; ++i) {
      uint16_t* row = slice + i * stride;
      if (n + i < g.N) {
        weights.convert(n + i, k0, k1, row);
      } else {
        for (int64_t k = k0; k < k1; k += 32) {
          _mm512_storeu_si512(row + (k - k0), _mm512_setzero_si512());
        }
      }
    }
    tile_reads_memory();
    for (int64_t pr = 0; pr < pairs; ++pr) {
      const int64_t m = m0 + 2 * kAmxPanel * pr;
      const uint16_t* x0 = g.x_panels + (m / kAmxPanel) * g.x_parts * elems;
      const uint16_t* x1 = x0 + g.x_parts * elems;
      float* held = carry + ((strip_outer ? 0 : st) * pairs + pr) * 4 * 256;
      if (k0 == 0) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      } else if (!keep_in_tiles) {
        _tile_loadd(0, held, 64);
        _tile_loadd(1, held + 256, 64);
        _tile_loadd(2, held + 512, 64);
        _tile_loadd(3, held + 768, 64);
      }
      for (int64_t k = k0; k < k1; k += 32) {
        const uint16_t* w = slice + (k - k0);
        _tile_loadd(4, w, stride * 2);
        _tile_loadd(5, w + 16 * stride, stride * 2);
        for (int64_t t = 0; t < g.x_parts; ++t) {
          _tile_loadd(6, x0 + t * elems + k * 16, 64);
          _tile_loadd(7, x1 + t * elems + k * 16, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      if (k1 < Kb && keep_in_tiles) continue;
      float* sums = k1 < Kb ? held : c[0];
      _tile_stored(0, sums, 64);
      _tile_stored(1, sums + 256, 64);
      _tile_stored(2, sums + 512, 64);
      _tile_stored(3, sums + 768, 64);
      if (k1 < Kb) continue;
      // c[q][i][j] is the sum for out[m + 16 (q % 2) + j, n + 16 (q / 2) + i].
      for (int q = 0; q < 4; ++q) {
        const int64_t mq = m + kAmxPanel * (q % 2), nq = n + 16 * (q / 2);
        if (mq >= m1 || nq >= n1) continue;
        const __mmask16 mask = first_lanes(n1 - nq);
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          const float scale = nq + i < n1 ? weights.scale(nq + i) : 0.0f;
          const __m512 v = _mm512_mul_ps(_mm512_load_ps(c[q] + 16 * i), _mm512_set1_ps(scale));
          r[i] = _mm512_castps_si512(v);
        }
        transpose_16x16(r);
        const int64_t rows = m1 - mq < 16 ? m1 - mq : 16;
        store_rows(g.out, g.ldo, g.out_type, r, mq, rows, nq, mask, g.bias);
      }
    }
  }
}

void amx_w8a16_gemm(const W8A16Args& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (g.x_panels == nullptr) return avx512::kernel_table().w8a16_gemm(g, m0, m1, n0, n1);
  bf16_tiles_block(g, Int8Rows{g}, m0, m1, n0, n1);
}

// W4 on the int8 tiles (Q8 activation panels, above), or on the bf16 tiles when the binding
// packed x as one bf16 part: the weights dequantized to bf16 a slice at a time, as W8A16
// converts its int8 codes (see W4GemmArgs::x_bf16_panels).
template <class S>
void w4_gemm_on_tiles(const W4GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (g.x_bf16_panels == nullptr) return w4_block<S>(g, m0, m1, n0, n1);
  const W8A16Args tiles{.bias = g.bias,
                        .out = g.out,
                        .ldo = g.ldo,
                        .out_type = g.out_type,
                        .M = g.M,
                        .N = g.N,
                        .K = g.K,
                        .x_panels = g.x_bf16_panels,
                        .x_parts = 1};
  bf16_tiles_block(tiles, Int4Rows<S>{g}, m0, m1, n0, n1);
}

void amx_w4_gemm(const W4GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (g.panel_codes == nullptr && g.x_bf16_panels == nullptr) {
    return avx512::kernel_table().w4_gemm(g, m0, m1, n0, n1);
  }
  switch (g.s_type) {
    case ScalarType::kBFloat16:
      return w4_gemm_on_tiles<uint16_t>(g, m0, m1, n0, n1);
    case ScalarType::kFloat16:
      return w4_gemm_on_tiles<Half>(g, m0, m1, n0, n1);
    default:
      return w4_gemm_on_tiles<float>(g, m0, m1, n0, n1);
  }
}

}  // namespace
}  // namespace torchslim::cpu::TORCHSLIM_ISA_NS
