// W8A16 on bf16 activations at many rows, on AVX512_BF16's VDPBF16PS without a tile unit (Zen
// 4): the AVX-512 level's KernelTable::w8a16_pair_gemm, chosen at run time where the CPU has
// AVX512_BF16 (TORCHSLIM_PAIRS, bf16_pairs.h). The dot kernels (int8_gemm.h, F32Dot) widen
// the codes and x to fp32 and take one FMA per product; VDPBF16PS adds to each fp32 lane the
// two products of a bf16 pair, 32 products an instruction where an FMA takes 16. A code is exact
// in bf16 and a product of two bf16 exact in fp32, so each output is the same fp32 dot product,
// its terms added in another order (VDPBF16PS treats subnormal inputs and results as zero, as
// the bf16 attention kernel's products do). fp32 x would need three bf16 parts (three
// instructions where FMAs take two): it keeps the dot kernels.
//
// As the W8A8 strips (int8_gemm.h), a block of rows meets the weights as strips of
// kPairStripCols columns over the whole of K: step s, vector v, lane c holds the pair
// (w[n + 16 v + c][2 s], w[n + 16 v + c][2 s + 1]) as bf16, and a register tile of
// kPairStripRows rows x 2 vectors meets each step with each row's pair of x broadcast.
#pragma once

#include "int8_gemm.h"  // store_lanes; kernels.h and, from isa_prelude.h, <algorithm>, <vector>

namespace torchslim::cpu::TORCHSLIM_ISA_NS {
namespace {

#include "avx512_helpers.h"  // first_lanes, aligned_data, transpose_16x16
#include "bf16_pairs.h"      // int8_to_bf16

constexpr int kPairStripCols = 32;
constexpr int kPairStripRows = 8;

// Weight rows [n, n + cols) (cols <= kPairStripCols; zero past them and past K) as a strip in
// `buffer`: (ceil(K / 32) * 16 steps, 2 vectors, 16 pairs) bf16, 64-byte aligned.
TORCHSLIM_PAIRS inline const uint16_t* unpack_pair_strip(const W8A16Args& g, int64_t n, int cols,
                                                         std::vector<uint16_t>& buffer) {
  const int64_t padded_k = (g.K + 31) / 32 * 32;
  buffer.resize(padded_k * kPairStripCols + 32);
  uint16_t* pairs = aligned_data(buffer);
  for (int v = 0; v < kPairStripCols / 16; ++v) {
    for (int64_t k = 0; k < padded_k; k += 32) {
      __m512i r[16];  // r[c]: the 16 pairs of column 16 v + c at k .. k + 32
      for (int c = 0; c < 16; ++c) {
        const int col = 16 * v + c;
        r[c] = col < cols ? int8_to_bf16(g.w + (n + col) * g.ldw + k, g.K - k)
                          : _mm512_setzero_si512();
      }
      transpose_16x16(r);  // r[j]: pair j of the 16 columns, step k / 2 + j
      for (int j = 0; j < 16; ++j) {
        _mm512_store_si512(pairs + ((k / 2 + j) * 2 + v) * 32, r[j]);
      }
    }
  }
  return pairs;
}

// One step of pair_strip_tile: sum[i][v] += the pair two[i] of row i against vector v of the
// step's weight pairs `w`.
template <int R>
TORCHSLIM_PAIRS TORCHSLIM_INLINE inline void pair_step(__m512 (&sum)[R][2], const uint16_t* w,
                                                       const int32_t (&two)[R]) {
  const __m512bh w0 = (__m512bh)_mm512_load_si512(w);
  const __m512bh w1 = (__m512bh)_mm512_load_si512(w + 32);
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(two[i]);
    sum[i][0] = _mm512_dpbf16_ps(sum[i][0], xv, w0);
    sum[i][1] = _mm512_dpbf16_ps(sum[i][1], xv, w1);
  }
}

// Rows [m, m + R) x columns [n, n + cols) of the output against the strip at column n.
template <int R>
TORCHSLIM_PAIRS void pair_strip_tile(const W8A16Args& g, int64_t m, int64_t n, int cols,
                                     const uint16_t* pairs) {
  __m512 sum[R][2];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) sum[i][0] = sum[i][1] = _mm512_setzero_ps();
  const uint16_t* x = g.x_bf16 + m * g.ldx;
  const int64_t steps = g.K / 2;
  for (int64_t s = 0; s < steps; ++s) {
    int32_t two[R];
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) __builtin_memcpy(&two[i], x + i * g.ldx + 2 * s, sizeof(int32_t));
    pair_step<R>(sum, pairs + s * 64, two);
  }
  if (g.K % 2 != 0) {  // the last pair's second value is zero, not read
    int32_t two[R];
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) two[i] = x[i * g.ldx + g.K - 1];
    pair_step<R>(sum, pairs + steps * 64, two);
  }
  // The dot kernels' epilogue (W8A16Epilogue), rounding for rounding: sum * scale, then + bias.
  for (int v = 0; v < 2; ++v) {
    if (16 * v >= cols) break;  // no pointer past the columns, even under a zero mask
    const __mmask16 mask = first_lanes(cols - 16 * v);
    const int64_t nv = n + 16 * v;
    const __m512 scale = _mm512_maskz_loadu_ps(mask, g.w_scale + nv);
    const __m512 bias = g.bias ? _mm512_maskz_loadu_ps(mask, g.bias + nv) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      __m512 out = _mm512_mul_ps(sum[i][v], scale);
      if (g.bias) out = _mm512_add_ps(out, bias);
      store_lanes(g.out, g.out_type, (m + i) * g.ldo + nv, mask, out);
    }
  }
}

// pair_strip_tile for the last rows < kPairStripRows of a block.
template <int R = kPairStripRows - 1>
TORCHSLIM_PAIRS void pair_strip_tile_edge(int rows, const W8A16Args& g, int64_t m, int64_t n,
                                          int cols, const uint16_t* pairs) {
  if constexpr (R > 1) {
    if (rows < R) return pair_strip_tile_edge<R - 1>(rows, g, m, n, cols, pairs);
  }
  pair_strip_tile<R>(g, m, n, cols, pairs);
}

// out[m0 .. m1)[n0 .. n1) for x in g.x_bf16 (g.x unused).
TORCHSLIM_PAIRS void w8a16_pair_gemm(const W8A16Args& g, int64_t m0, int64_t m1, int64_t n0,
                                     int64_t n1) {
  thread_local std::vector<uint16_t> buffer;
  for (int64_t n = n0; n < n1; n += kPairStripCols) {
    const int cols = static_cast<int>(std::min<int64_t>(kPairStripCols, n1 - n));
    const uint16_t* pairs = unpack_pair_strip(g, n, cols, buffer);
    int64_t m = m0;
    for (; m + kPairStripRows <= m1; m += kPairStripRows)
      pair_strip_tile<kPairStripRows>(g, m, n, cols, pairs);
    if (m < m1) pair_strip_tile_edge(static_cast<int>(m1 - m), g, m, n, cols, pairs);
  }
}

// The least M at which bf16 x takes the strips rather than the dot kernels (x widened to fp32):
// each strip's conversion, a cost per weight and block of rows, must pay for itself. Zen 4, 2
// threads, the op, weights hot, alternating builds, 2-3 rounds; dot time / strip time, layers K
// x N: at M = 2-4 0.4-0.9 (the dots stream the weights; the strips take 0.97 ms to convert
// 4096^2); at M = 8 4096^2 0.94-0.98, 4096x11008 and 11008x4096 0.73-0.91, 1536x576 1.06-1.36;
// at M = 12 1.14-1.17, 1.08-1.11 (4096x11008), 0.95-1.02 (11008x4096) and 1.27-1.65; at M = 16
// 0.89-1.35; from M = 32 1.2 or more (M = 512: 2.1-2.4, as fast as bf16 F.linear).
constexpr int64_t kW8A16PairMinM = 12;
constexpr int64_t kW8A16PairCols = kPairStripCols;
inline decltype(KernelTable::w8a16_pair_gemm) w8a16_pair_kernel() {
  return cpu_features().avx512bf16 ? &w8a16_pair_gemm : nullptr;
}

}  // namespace
}  // namespace torchslim::cpu::TORCHSLIM_ISA_NS
