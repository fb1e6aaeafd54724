// int4 weight GEMM for the CPU, written once and compiled per ISA level (see int8_gemm.h).
//
//   quantize_q8_blocks  x (M, K) fp32/bf16 -> int8 codes with one scale per run of 32, 64 or
//                       128 values along K (q8_run), repeated for each block of 32,
//                       stored in the order the kernel unpacks weights (kernels.h, Q8BlockArgs)
//   w4_gemm             out = x . dequant(w).T: u8 codes times s8 activation codes, chunks of
//                       64 weights (32 packed bytes) per step, eight int32 partial sums per
//                       chunk (vpmaddubsw + vpmaddwd on AVX2, vpdpbusd on AVX-512 VNNI),
//                       centred exactly to sums of (code - 8) * x by a per-activation lane
//                       bias, scaled by x_scale * w_scale per block of 32 into fp32
//                       accumulators; the zero point enters once per group as
//                       -scale * (zero - 8) * (sum of the group's rounded activations).
//                       On AVX-512 with K a multiple of 128 and groups of 32, 64 or whole
//                       runs of 128: steps of 128 weights in zmm registers (w4_tile_zmm).
//                       On AVX-512 and AVX2 for many rows (W4GemmArgs::int8_strips): strips of
//                       weight columns unpacked to bytes once per block, one vpdpbusd per (row,
//                       16 columns) against broadcast activation codes (w4_gemm_strips); on
//                       AVX2 vpmaddubsw, vpmaddwd and vpaddd per (row, 8 columns).
//
// Decode (M = 1) streams the packed weight once at 4.5 to 5 bits per weight. Per 32 packed
// bytes and output column the AVX2 loop issues about a dozen instructions (one load, two ANDs
// and a shift to unpack, two vpmaddubsw, an add, vpmaddwd, the bias add, a conversion, the
// scale multiply and an FMA); a float dequantize-and-FMA loop would need about four times as
// many. The weights stay in the plain packed layout that every backend's op takes: the
// activation codes are permuted instead, once per call.
#pragma once

#include <type_traits>

#include "int8_gemm.h"  // simd.h, min_i64, store

namespace torchslim::cpu::TORCHSLIM_ISA_NS {
namespace {

#if defined(TORCHSLIM_ISA_AVX512)
#include "avx512_helpers.h"  // transpose_16x16, first_lanes, dpbusd_in_place
#endif

// max |x[0 .. n)|, NaN if one is NaN (max_abs_bits).
template <typename T>
float max_abs(const T* x, int64_t n) {
  using V = FVec;
  float amax = 0.0f;
  int64_t k = 0;
  if (n >= V::kWidth) {
    typename V::R vmax = V::zero();
    for (; k + V::kWidth <= n; k += V::kWidth) vmax = V::max_abs(vmax, V::load(x + k));
    amax = V::reduce_max_abs(vmax);
  }
  for (; k < n; ++k) amax = max_abs_bits(amax, load_f32(x + k));
  return amax;
}

#if defined(TORCHSLIM_ISA_AVX512) || defined(TORCHSLIM_ISA_AVX2)
// A whole chunk of 64 activations, its first block of 32 at scale s0 and its second at s1, in
// the order the weights unpack (its 32 even codes, then its 32 odd ones: Q8BlockArgs), with its
// kQ4Lanes lane biases (lane l meets codes 8 l .. 8 l + 7) and each block's sum of codes. The
// codes are quantize_store's; the scalar loop of quantize_row_q8_blocks gives the same bytes.
template <typename T>
inline void quantize_chunk_q8(const T* x, float s0, float s1, int8_t* q, int32_t* lane_bias,
                              int32_t (&block_sum)[2]) {
  using V = FVec;
  alignas(16) int8_t codes[kQ4Chunk];
  const typename V::R scale[2] = {V::set1(s0), V::set1(s1)};
  const typename V::R inv[2] = {V::set1(1.0f / s0), V::set1(1.0f / s1)};
  for (int64_t k = 0; k < kQ4Chunk; k += V::kWidth) {
    const int half = k < kQ8Block ? 0 : 1;
    V::quantize_store(codes + k, V::load(x + k), scale[half], inv[half]);
  }
  // Each 16 codes as their 8 even then 8 odd ones; then the chunk's evens ahead of its odds.
  const __m128i evens_first = _mm_set_epi8(15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m128i flip = _mm_set1_epi8(-128);
  __m128i part[4];
  int32_t lane[kQ4Lanes];
  for (int i = 0; i < 4; ++i) {
    const __m128i c = _mm_load_si128(reinterpret_cast<const __m128i*>(codes + 16 * i));
    part[i] = _mm_shuffle_epi8(c, evens_first);
    // Sums of 8 codes: psadbw of the codes + 128 (as unsigned bytes) against zero, less 8 x 128.
    const __m128i sums = _mm_sad_epu8(_mm_xor_si128(c, flip), _mm_setzero_si128());
    lane[2 * i] = _mm_cvtsi128_si32(sums) - 8 * 128;
    lane[2 * i + 1] = _mm_extract_epi32(sums, 2) - 8 * 128;
  }
  auto* out = reinterpret_cast<__m128i*>(q);
  _mm_storeu_si128(out, _mm_unpacklo_epi64(part[0], part[1]));
  _mm_storeu_si128(out + 1, _mm_unpacklo_epi64(part[2], part[3]));
  _mm_storeu_si128(out + 2, _mm_unpackhi_epi64(part[0], part[1]));
  _mm_storeu_si128(out + 3, _mm_unpackhi_epi64(part[2], part[3]));
  for (int l = 0; l < kQ4Lanes; ++l) lane_bias[l] = -kQ4Center * lane[l];
  block_sum[0] = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  block_sum[1] = (lane[4] + lane[5]) + (lane[6] + lane[7]);
}
#endif

template <typename T>
void quantize_row_q8_blocks(const T* x, int64_t K, int64_t group_size, int8_t* q, float* scale,
                            float* group_sum, int32_t* lane_bias) {
  using V = FVec;
  const int64_t groups = K / group_size, run = q8_run(K, group_size);
  for (int64_t g = 0; g < groups; ++g) group_sum[g] = 0.0f;
  float s = 1.0f;
  int64_t run_end = 0;
  const auto block_scale = [&](int64_t k0) {  // at a run's first block, the run's scale
    if (k0 != run_end) return s;
    s = scale_from_amax(max_abs(x + k0, min_i64(run, K - k0)));  // NaN for an inf or a NaN
    run_end += run;
    return s;
  };
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += kQ8Block, ++b) {
    const int64_t len = min_i64(kQ8Block, K - k0);
    const T* xb = x + k0;
#if defined(TORCHSLIM_ISA_AVX512) || defined(TORCHSLIM_ISA_AVX2)
    if (k0 % kQ4Chunk == 0 && k0 + kQ4Chunk <= K) {  // a whole chunk: both blocks at once
      const float s0 = block_scale(k0), s1 = block_scale(k0 + kQ8Block);
      int32_t sums[2];
      quantize_chunk_q8(xb, s0, s1, q + k0, lane_bias + k0 / kQ4Chunk * kQ4Lanes, sums);
      scale[b] = s0;
      scale[b + 1] = s1;
      group_sum[k0 / group_size] += static_cast<float>(sums[0]) * s0;
      group_sum[(k0 + kQ8Block) / group_size] += static_cast<float>(sums[1]) * s1;
      k0 += kQ8Block;
      ++b;
      continue;
    }
#endif
    scale[b] = block_scale(k0);
    int8_t codes[kQ8Block];
    int64_t k = 0;
    if (len == kQ8Block) {
      const typename V::R vs = V::set1(s), inv = V::set1(1.0f / s);
      for (; k + V::kWidth <= len; k += V::kWidth)
        V::quantize_store(codes + k, V::load(xb + k), vs, inv);
    }
    for (; k < len; ++k) codes[k] = quantize_scalar(load_f32(xb + k) / s);
    int32_t sum = 0;
    for (k = 0; k < len; ++k) sum += codes[k];
    group_sum[k0 / group_size] += static_cast<float>(sum) * s;
    // Activation codes in the order the weights unpack (Q8BlockArgs): a chunk of 64 as its 32
    // even then its 32 odd codes, a last lone block of 32 as 16 even then 16 odd, a partial
    // block in natural order.
    int8_t* qb = q + k0;
    if (len < kQ8Block) {
      for (k = 0; k < len; ++k) qb[k] = codes[k];
    } else if (k0 % kQ4Chunk != 0) {  // the second block of a chunk of 64
      for (int t = 0; t < kQ8Block / 2; ++t) {
        qb[t - kQ8Block / 2] = codes[2 * t];
        qb[kQ8Block + t - kQ8Block / 2] = codes[2 * t + 1];
      }
      // Lane l of a chunk's dot product meets codes 4l..4l+3 of both halves.
      const int8_t* qc = q + (k0 - kQ8Block);
      for (int l = 0; l < kQ4Lanes; ++l) {
        int32_t sum = 0;
        for (int t = 4 * l; t < 4 * l + 4; ++t) sum += qc[t] + qc[kQ8Block + t];
        lane_bias[(k0 / kQ4Chunk) * kQ4Lanes + l] = -kQ4Center * sum;
      }
    } else if (k0 + kQ4Chunk <= K) {  // the first block of a chunk of 64
      for (int t = 0; t < kQ8Block / 2; ++t) {
        qb[t] = codes[2 * t];
        qb[kQ8Block + t] = codes[2 * t + 1];
      }
    } else {  // a lone block of 32 at the end of the row; lane l meets codes 4l..4l+3
      for (int t = 0; t < kQ8Block / 2; ++t) {
        qb[t] = codes[2 * t];
        qb[kQ8Block / 2 + t] = codes[2 * t + 1];
      }
      for (int l = 0; l < kQ4Lanes; ++l) {
        const int32_t sum = qb[4 * l] + qb[4 * l + 1] + qb[4 * l + 2] + qb[4 * l + 3];
        lane_bias[(k0 / kQ4Chunk) * kQ4Lanes + l] = -kQ4Center * sum;
      }
    }
  }
}

void quantize_q8_blocks(const Q8BlockArgs& a, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    if (a.x_type == ScalarType::kBFloat16) {
      quantize_row_q8_blocks(static_cast<const uint16_t*>(a.x) + m * a.ldx, a.K, a.group_size,
                             a.q + m * a.ldq, a.scale + m * a.lds, a.group_sum + m * a.ldg,
                             a.lane_bias + m * a.ldb);
    } else {
      quantize_row_q8_blocks(static_cast<const float*>(a.x) + m * a.ldx, a.K, a.group_size,
                             a.q + m * a.ldq, a.scale + m * a.lds, a.group_sum + m * a.ldg,
                             a.lane_bias + m * a.ldb);
    }
  }
}

// n group parameters of storage type S as fp32.
template <class S>
void to_f32(const S* s, int64_t n, float* out) {
  using V = FVec;
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) V::store(out + i, V::load(s + i));
  for (; i < n; ++i) out[i] = load_f32(s + i);
}

// The zero points, relative to the centre the sums used:
// c[i][j] -= scale * (zero - 8) * (sum of the group's activations), a dot product along the
// groups. scales and zeros point at the tile's first column.
template <class S, int R, int C, int MR, int NR>
void subtract_zero_points(const W4GemmArgs& g, int64_t m, const S* scales, const S* zeros,
                          float (&c)[MR][NR]) {
  using V = FVec;
  const int64_t groups = g.K / g.group_size;
  for (int j = 0; j < C; ++j) {
    const S* s = scales + j * g.lds;
    const S* z = zeros + j * g.lds;
    typename V::R acc_z[R];
    for (int i = 0; i < R; ++i) acc_z[i] = V::zero();
    int64_t gi = 0;
    const typename V::R center = V::set1(static_cast<float>(kQ4Center));
    for (; gi + V::kWidth <= groups; gi += V::kWidth) {
      const typename V::R sz = V::mul(V::load(s + gi), V::sub(V::load(z + gi), center));
      for (int i = 0; i < R; ++i)
        acc_z[i] = V::fma(sz, V::load(g.x_group_sum + (m + i) * g.ldxg + gi), acc_z[i]);
    }
    for (int i = 0; i < R; ++i) {
      float sum = V::reduce_add(acc_z[i]);
      for (int64_t t = gi; t < groups; ++t)
        sum +=
            load_f32(s + t) * (load_f32(z + t) - kQ4Center) * g.x_group_sum[(m + i) * g.ldxg + t];
      c[i][j] -= sum;
    }
  }
}

// A tile's operands: its first activation row's Q8 codes, block scales, lane biases and group
// sums, and its first column's packed codes, scales and zero points.
template <class S>
struct W4TileOperands {
  const int8_t* xq;
  const float* xs;
  const int32_t* xb;
  const float* xg;
  const uint8_t* w;
  const S* scales;
  const S* zeros;
  W4TileOperands(const W4GemmArgs& g, int64_t m, int64_t n)
      : xq(g.xq + m * g.ldxq),
        xs(g.x_scale + m * g.ldxs),
        xb(g.x_lane_bias + m * g.ldxb),
        xg(g.x_group_sum + m * g.ldxg),
        w(g.w + n * g.ldw),
        scales(static_cast<const S*>(g.scales) + n * g.lds),
        zeros(static_cast<const S*>(g.zeros) + n * g.lds) {}
};

// Groups per row up to which a tile converts its scales to fp32 once, on the stack.
constexpr int64_t kQ4MaxScaleGroups = 512;

#if defined(TORCHSLIM_ISA_AVX512)
// K in steps of 128 weights, a zmm of 64 packed bytes per column and step, met by two vpdpbusd;
// each step's int32 sums take one conversion and one FMA per column, against a vector of
// activation scale x weight scale per block of 32 (w4_tile converts per chunk of 64, with a
// scale product per chunk). The zero points enter through the accumulators, 16 groups per masked
// step, not a scalar loop per column. Groups of 32 or 64, or whole runs of 128 (g128, g256, ...,
// one group per row when K is whole runs: one scale per step, broadcast). At M = 1 on 1536x576,
// g128, weights in cache, 2 threads, the op took 0.8x the time of w4_tile's (measured together
// with the balanced column blocks of cpu_ops.cpp). Groups of 32 or 64 take K a multiple of 64 as
// well (K = 576, 960: the widths of small models): the row's last 64 weights are a half step.
bool takes_zmm_steps(const W4GemmArgs& g) {
  const int64_t G = g.group_size;
  const bool whole_steps = g.K % 128 == 0 && G % 128 == 0;
  return g.K % kQ4Chunk == 0 && (G == 32 || G == 64 || whole_steps) && g.K / G <= kQ4MaxScaleGroups;
}

// kGroupBlocks: blocks of 32 per group (1 or 2), or 0 for groups of whole steps.
template <class S, int R, int C, int MR, int NR, int kGroupBlocks>
void w4_tile_zmm(const W4GemmArgs& g, int64_t m, int64_t n, float (&c)[MR][NR],
                 const uint8_t* w_ahead) {
  using D = Q4Step128;
  using V = FVec;
  constexpr int64_t kStep = 128, kStepBytes = kStep / 2, kStepBlocks = kStep / kQ8Block;
  const auto [xq, xs, xb, xg, w, scales, zeros] = W4TileOperands<S>(g, m, n);
  const int64_t groups = g.K / g.group_size, steps = g.K / kStep;
  const int64_t steps_per_group = kGroupBlocks == 0 ? g.group_size / kStep : 1;

  // The tile's scales, and scale * (zero - 8) (the zero point relative to the sums' centre),
  // in fp32, 16 groups at a time.
  float sc[C][kQ4MaxScaleGroups], sz[C][kQ4MaxScaleGroups];
  const V::R center = V::set1(static_cast<float>(kQ4Center));
  for (int64_t gi = 0; gi < groups; gi += V::kWidth) {
    const int64_t len = min_i64(V::kWidth, groups - gi);
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      const V::R s = V::load_first(scales + j * g.lds + gi, len);
      V::store_first(sc[j] + gi, s, len);
      V::store_first(sz[j] + gi,
                     V::mul(s, V::sub(V::load_first(zeros + j * g.lds + gi, len), center)), len);
    }
  }
  V::R acc[R][C];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) acc[i][j] = V::zero();
  }
  // Step r, or with `half` the low half of step r (the row's last 64 weights): one group of 64,
  // or two of 32, whose scales stand where a whole step's first ones would.
  const auto step = [&](int64_t r, int64_t gi, auto half) {
    constexpr bool kHalf = decltype(half)::value;
    const int64_t kb = r * kStepBytes;  // byte offset in a packed row
    D::WV wv[C];
    V::R ws[C];
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      prefetch_stream(w_ahead + j * g.ldw + kb);
      wv[j] = kHalf ? D::load_w_low(w + j * g.ldw + kb) : D::load_w(w + j * g.ldw + kb);
      if constexpr (kGroupBlocks == 1) {
        const float* s = sc[j] + r * kStepBlocks;
        ws[j] = kHalf ? D::per_block_low(s) : D::per_block(s);
      } else if constexpr (kGroupBlocks == 2) {
        const float* s = sc[j] + r * (kStepBlocks / 2);
        ws[j] = kHalf ? V::set1(*s) : D::per_half(s);
      } else {
        ws[j] = V::set1(sc[j][gi]);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const int8_t* xqr = xq + i * g.ldxq + r * kStep;
      const int32_t* xbr = xb + i * g.ldxb + r * (kStep / kQ4Chunk) * kQ4Lanes;
      const D::XV xv = kHalf ? D::load_x_low(xqr, xbr) : D::load_x(xqr, xbr);
      const float* xsr = xs + i * g.ldxs + r * kStepBlocks;  // the step's block scales
      // Groups of whole steps have runs of 128: one activation scale per step.
      const V::R xsv =
          kGroupBlocks == 0 ? V::set1(*xsr) : (kHalf ? D::per_block_low(xsr) : D::per_block(xsr));
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j) {
        acc[i][j] = V::fma(_mm512_cvtepi32_ps(D::dot(wv[j], xv)), V::mul(xsv, ws[j]), acc[i][j]);
      }
    }
  };
  for (int64_t r = 0, gi = 0, group_end = steps_per_group; r < steps; ++r) {
    if (kGroupBlocks == 0 && r == group_end) ++gi, group_end += steps_per_group;
    step(r, gi, std::false_type{});
  }
  if constexpr (kGroupBlocks != 0) {
    if (steps * kStep < g.K) step(steps, 0, std::true_type{});
  }
  // The zero points: acc -= scale * (zero - 8) * (the group's activation sum), group by group.
  for (int64_t gi = 0; gi < groups; gi += V::kWidth) {
    const int64_t len = min_i64(V::kWidth, groups - gi);
    V::R sums[R];
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) sums[i] = V::load_first(xg + i * g.ldxg + gi, len);
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      const V::R szv = V::load_first(sz[j] + gi, len);
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) acc[i][j] = _mm512_fnmadd_ps(szv, sums[i], acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) c[i][j] = V::reduce_add(acc[i][j]);
  }
}

#endif

#if defined(TORCHSLIM_ISA_AVX512) || defined(TORCHSLIM_ISA_AVX2)
// Many rows (W4GemmArgs::int8_strips): the weights unpacked to bytes once per strip of columns
// and met by broadcast activation codes, as an int8 GEMM does (FBGEMM's and oneDNN's AVX-512
// kernels), where the dot kernels above take a conversion and an FMA per 128 weights per
// (row, column) and a horizontal sum per output (370 GOP/s against the W8A8 kernel's 600 on a
// Zen 4 core pair at M = 512).
//
// A strip is kStripVecs vectors of 16 columns over the whole of K: byte 4 c + b of its vector v at
// 4-code step t holds the code (0-15) of column 16 v + c at position 4 t + b of the activation's
// Q8 order (kernels.h: each chunk of 64 as its 32 even, then its 32 odd columns), so a step is
// one vpdpbusd per (row, vector) against the row's 4 codes broadcast:
//   I[i][n] = sum over a run of (code[n, k] - c) * xq[i, k]          (int32, exact)
//   acc[i][n] += I * w_scale[n, g] * x_scale[i, run]                  (per run of q8_run columns)
//   acc[i][n] -= w_scale[n, g] * (zero[n, g] - c) * x_group_sum[i, g] (per group)
// The centre c: where a group is one run (groups of 32, 64, 128, per channel up to K = 128),
// the zero point's term meets each run's sum at once and c = 0 (the sums start at zero). Where a
// group holds several runs (96, 192, 256, per channel over longer K), the sums start at -8 x (the
// run's sum of codes), from the lane biases, and c = 8, as in the dot kernels: uncentred, the fp32
// accumulators of a per-channel row of 4160 met terms 8x the result's size and erred 1.2x the
// rule's bound. (Centring every run cost runs of 32 a quarter more time: each run's start is a
// broadcast per row, copied to its sums.) A tile is kStripRows rows x kStripVecs vectors: 12 int32
// and 12 fp32 accumulators, two weight vectors and a broadcast in 32 registers. Unpacking is a 16 x
// 16 transpose of packed 32-bit words per 128 values of K of 16 weight rows (each word's low
// nibbles are one step, its high nibbles the step 8 later), paid once per strip for a block's rows.
//
// AVX2 has no vpdpbusd: vpmaddubsw multiplies the codes (unsigned, at most 15) by the activation
// codes (a pair sums to at most 2 x 15 x 127, no saturation) and vpmaddwd against ones widens the
// pairs, one vpaddd adds them: three ops per (row, 8 columns, step) where the W8A8 strips' sign
// trick takes four. Strips of kStripVecs = 3 vectors of 8 columns, tiles of 3 rows: 9 int32
// sums, 3 weight vectors and a broadcast in 16 registers; the fp32 accumulators, met once per
// run, stay in memory.
//
// The strips and tiles have the W8A8 strips' shape (int8_gemm.h): the binding cuts the blocks of
// both by one width, KernelTable::int8_strip_cols.
using StripVec = I8StripVec;
constexpr int kStripLanes = kI8StripLanes, kStripVecs = kI8StripVecs, kStripRows = kI8StripRows;
constexpr int kStripCols = kI8StripCols;
constexpr int kStripBytes = kI8StripBytes;  // one vector: a step of 4 codes x the lanes

bool takes_int8_strips(const W4GemmArgs& g) { return g.K % kQ4Chunk == 0; }

struct Int8Strip {
  // 64-byte aligned (aligned_data): a strip step's loads split no cache line.
  std::vector<uint8_t> code_buffer;              // (K / 4, kStripVecs, kStripBytes)
  std::vector<float> scale_buffer, zero_buffer;  // (groups, kStripCols): scale, scale * (zero - c)
  const uint8_t* codes() const { return aligned_data(code_buffer); }
  const float* scale() const { return aligned_data(scale_buffer); }
  const float* scaled_zero() const { return aligned_data(zero_buffer); }
};

// Columns [n, n + cols) (cols <= kStripCols; zero codes and scales past them) into `strip`, the
// zero points relative to `centre`.
template <class S>
void unpack_strip(const W4GemmArgs& g, int64_t n, int cols, float centre, Int8Strip& strip) {
  const int64_t steps = g.K / 4, groups = g.K / g.group_size;
  strip.code_buffer.resize(steps * kStripVecs * kStripBytes + 64);
  strip.scale_buffer.assign(groups * kStripCols + 16, 0.0f);
  strip.zero_buffer.assign(groups * kStripCols + 16, 0.0f);
  uint8_t* codes = aligned_data(strip.code_buffer);
  float* scale = aligned_data(strip.scale_buffer);
  float* scaled_zero = aligned_data(strip.zero_buffer);
#if defined(TORCHSLIM_ISA_AVX512)
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int v = 0; v < kStripVecs; ++v) {
    for (int64_t k = 0; k < g.K; k += 2 * kQ4Chunk) {  // 64 packed bytes a column
      const __mmask16 words = first_lanes((g.K - k) / 8);
      __m512i r[16];
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) {
        const int col = 16 * v + c;
        r[c] = col < cols ? _mm512_maskz_loadu_epi32(words, g.w + (n + col) * g.ldw + k / 2)
                          : _mm512_setzero_si512();
      }
      transpose_16x16(r);  // r[q]: word q of each column
      // Word q < 8 is chunk k / 64's bytes 4q .. 4q + 3: low nibbles step q of the chunk, high
      // nibbles step 8 + q; word q >= 8 the next chunk's, 16 steps on. Steps past K (a last
      // chunk of 64) are zero words, not stored.
      const int64_t first = k / 4, end = steps - first < 32 ? steps - first : 32;
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) {
        const int t = q < 8 ? q : q + 8;
        if (t >= end) continue;
        _mm512_store_si512(codes + ((first + t) * kStripVecs + v) * 64,
                           _mm512_and_si512(r[q], low));
        _mm512_store_si512(codes + ((first + t + 8) * kStripVecs + v) * 64,
                           _mm512_and_si512(_mm512_srli_epi16(r[q], 4), low));
      }
    }
  }
#else
  const __m256i low = _mm256_set1_epi8(0x0f);
  for (int v = 0; v < kStripVecs; ++v) {
    for (int64_t k = 0; k < g.K; k += kQ4Chunk) {  // 32 packed bytes a column
      __m256i r[8];
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        const int col = 8 * v + c;
        const uint8_t* packed = g.w + (n + col) * g.ldw + k / 2;
        r[c] = col < cols ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed))
                          : _mm256_setzero_si256();
      }
      transpose_8x8(r);  // r[q]: word q of each column, its low nibbles step q, high step q + 8
      const auto store = [&](int64_t t, __m256i four) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes + (t * kStripVecs + v) * kStripBytes),
                           four);
      };
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) {
        store(k / 4 + q, _mm256_and_si256(r[q], low));
        store(k / 4 + q + 8, _mm256_and_si256(_mm256_srli_epi16(r[q], 4), low));
      }
    }
  }
#endif
  for (int c = 0; c < cols; ++c) {
    const S* sc = static_cast<const S*>(g.scales) + (n + c) * g.lds;
    const S* z = static_cast<const S*>(g.zeros) + (n + c) * g.lds;
    for (int64_t gi = 0; gi < groups; ++gi) {
      const float s = load_f32(sc + gi);
      scale[gi * kStripCols + c] = s;
      scaled_zero[gi * kStripCols + c] = s * (load_f32(z + gi) - centre);
    }
  }
}

// sum[i][v] += the products of the strip's 4-code steps [t0, t1) and row i's codes.
template <int R>
inline TORCHSLIM_INLINE void strip_steps(StripVec (&sum)[R][kStripVecs], const uint8_t* w,
                                         const int8_t* xq, int64_t ldxq, int64_t t0, int64_t t1) {
#if defined(TORCHSLIM_ISA_AVX2)
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  for (int64_t t = t0; t < t1; ++t) {
    StripVec wv[kStripVecs];
#pragma GCC unroll 16
    for (int v = 0; v < kStripVecs; ++v) {
      wv[v] = *reinterpret_cast<const StripVec*>(w + (t * kStripVecs + v) * kStripBytes);
    }
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      int32_t four;
      __builtin_memcpy(&four, xq + i * ldxq + 4 * t, sizeof four);
#if defined(TORCHSLIM_ISA_AVX512)
      const __m512i xv = _mm512_set1_epi32(four);
#pragma GCC unroll 16
      for (int v = 0; v < kStripVecs; ++v) sum[i][v] = dpbusd_in_place(sum[i][v], wv[v], xv);
#else
      const __m256i xv = _mm256_set1_epi32(four);
#pragma GCC unroll 16
      for (int v = 0; v < kStripVecs; ++v) {
        const __m256i pairs = _mm256_maddubs_epi16(wv[v], xv);
        sum[i][v] = _mm256_add_epi32(sum[i][v], _mm256_madd_epi16(pairs, ones));
      }
#endif
    }
  }
}

// sum[i][v] <- row i's int32 sums over the run [k0, k1): from its run bias (bias[i * runs])
// where kCentred, else from zero.
template <int R, bool kCentred>
inline TORCHSLIM_INLINE void run_sums(StripVec (&sum)[R][kStripVecs], const uint8_t* w,
                                      const int8_t* xq, int64_t ldxq, const int32_t* bias,
                                      int64_t runs, int64_t k0, int64_t k1, int64_t run) {
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    const int32_t b = kCentred ? bias[i * runs] : 0;
#if defined(TORCHSLIM_ISA_AVX512)
    const StripVec start = _mm512_set1_epi32(b);
#else
    const StripVec start = _mm256_set1_epi32(b);
#endif
#pragma GCC unroll 16
    for (int v = 0; v < kStripVecs; ++v) sum[i][v] = start;
  }
  if (run == kQ8Block) {  // a block of 32 is a quarter of each half of its chunk's 16 steps
    const int64_t t = k0 / kQ4Chunk * 16 + (k0 % kQ4Chunk) / 8;
    strip_steps(sum, w, xq, ldxq, t, t + 4);
    strip_steps(sum, w, xq, ldxq, t + 8, t + 12);
  } else {  // whole chunks
    strip_steps(sum, w, xq, ldxq, k0 / 4, k1 / 4);
  }
}

// Rows [m, m + R) against the strip: out[m + i, n + c] for c < cols. kCentred: the sums start
// at run_bias (row m's -8 x (sum of codes) per run, row stride `runs`), else at zero.
#if defined(TORCHSLIM_ISA_AVX512)
template <int R, bool kCentred>
void strip_tile(const W4GemmArgs& g, int64_t m, int64_t n, int cols, const Int8Strip& strip,
                const int32_t* run_bias, int64_t runs) {
  constexpr int NV = kStripVecs;
  const int64_t run = q8_run(g.K, g.group_size), G = g.group_size;
  const int8_t* xq = g.xq + m * g.ldxq;
  const uint8_t* w = strip.codes();
  __m512 acc[R][NV];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  for (int64_t k0 = 0, r = 0; k0 < g.K; k0 += run, ++r) {
    const int64_t k1 = g.K - k0 < run ? g.K : k0 + run, gi = k0 / G;
    StripVec sum[R][NV];
    run_sums<R, kCentred>(sum, w, xq, g.ldxq, kCentred ? run_bias + r : nullptr, runs, k0, k1, run);
    __m512 ws[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) ws[v] = _mm512_load_ps(strip.scale() + gi * kStripCols + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m512 xs = _mm512_set1_ps(g.x_scale[(m + i) * g.ldxs + k0 / kQ8Block]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        acc[i][v] =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[i][v]), _mm512_mul_ps(ws[v], xs), acc[i][v]);
      }
    }
    if (k1 % G == 0 || k1 == g.K) {  // the group's last run: its zero points
      __m512 sz[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        sz[v] = _mm512_load_ps(strip.scaled_zero() + gi * kStripCols + 16 * v);
      }
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        const __m512 gs = _mm512_set1_ps(g.x_group_sum[(m + i) * g.ldxg + gi]);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fnmadd_ps(sz[v], gs, acc[i][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    if (16 * v >= cols) break;  // no pointer past the columns, even under a zero mask
    const __mmask16 mask = first_lanes(cols - 16 * v);
    const __m512 b =
        g.bias ? _mm512_maskz_loadu_ps(mask, g.bias + n + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      store_lanes(g.out, g.out_type, (m + i) * g.ldo + n + 16 * v, mask,
                  _mm512_add_ps(acc[i][v], b));
    }
  }
}

#else
template <int R, bool kCentred>
void strip_tile(const W4GemmArgs& g, int64_t m, int64_t n, int cols, const Int8Strip& strip,
                const int32_t* run_bias, int64_t runs) {
  constexpr int NV = kStripVecs;
  const int64_t run = q8_run(g.K, g.group_size), G = g.group_size;
  const int8_t* xq = g.xq + m * g.ldxq;
  const uint8_t* w = strip.codes();
  alignas(32) float acc[R][NV][8] = {};  // in memory: the registers hold the run's sums
  for (int64_t k0 = 0, r = 0; k0 < g.K; k0 += run, ++r) {
    const int64_t k1 = g.K - k0 < run ? g.K : k0 + run, gi = k0 / G;
    StripVec sum[R][NV];
    run_sums<R, kCentred>(sum, w, xq, g.ldxq, kCentred ? run_bias + r : nullptr, runs, k0, k1, run);
    const float* ws = strip.scale() + gi * kStripCols;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m256 xs = _mm256_set1_ps(g.x_scale[(m + i) * g.ldxs + k0 / kQ8Block]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(ws + 8 * v), xs);
        _mm256_store_ps(acc[i][v], _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[i][v]), scale,
                                                   _mm256_load_ps(acc[i][v])));
      }
    }
    if (k1 % G == 0 || k1 == g.K) {  // the group's last run: its zero points
      const float* sz = strip.scaled_zero() + gi * kStripCols;
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const __m256 gs = _mm256_set1_ps(g.x_group_sum[(m + i) * g.ldxg + gi]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          _mm256_store_ps(acc[i][v], _mm256_fnmadd_ps(_mm256_loadu_ps(sz + 8 * v), gs,
                                                      _mm256_load_ps(acc[i][v])));
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int lanes = cols - 8 * v;
    if (lanes <= 0) break;  // no pointer past the columns, even under a zero mask
    const __m256i mask = first_lanes8(lanes);
    const __m256 b = g.bias ? _mm256_maskload_ps(g.bias + n + 8 * v, mask) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      store_lanes(g.out, g.out_type, (m + i) * g.ldo + n + 8 * v, mask, lanes,
                  _mm256_add_ps(_mm256_load_ps(acc[i][v]), b));
    }
  }
}
#endif

// strip_tile for the last rows < kStripRows of a block.
template <bool kCentred, int R = kStripRows - 1>
void strip_tile_edge(int rows, const W4GemmArgs& g, int64_t m, int64_t n, int cols,
                     const Int8Strip& strip, const int32_t* run_bias, int64_t runs) {
  if constexpr (R > 1) {
    if (rows < R) {
      return strip_tile_edge<kCentred, R - 1>(rows, g, m, n, cols, strip, run_bias, runs);
    }
  }
  strip_tile<R, kCentred>(g, m, n, cols, strip, run_bias, runs);
}

// The least M at which the strips take over from the dot kernels, by the activation's run.
// AVX-512 (Zen 4, 2 threads, the op alternating both paths in one process, weights hot, seven
// rounds, median; strip time / dot time, two runs; the dot kernels with the half step, so K = 576
// and 960 on zmm steps). Runs of 128: at M = 6 0.84-1.07 (1.07 on 4096x11008), at 8 0.79-1.00.
// Runs of 64: at 6 0.65-1.06, at 8 0.58-1.01 (4096x11008), at 12 0.53-0.88. Runs of 32, a fold
// every 8 steps: at 8 0.72-0.95 on K <= 1536 but 1.06-1.41 on K = 4096 and 11008, at 12
// 0.60-0.91 with 11008x4096 at 1.01-1.13. (One thread, before the half step: runs of 64 and 128
// at M = 8 1.02-1.41, runs of 32 at 12 0.91-1.27; thresholds 12 and 16 then.)
// AVX2 (Zen 3, 2 threads, the op alternating both paths in one process, five rounds, median; dot
// time / strip time): runs of 64 and 128 at M = 6 1.00-1.45, at 8 1.15-1.24 (1536x576 and 4096^2
// g128, 11008x4096 g64); runs of 32 at 8 0.88-1.19, 12 0.95-1.43, 16 1.04-1.22.
int64_t w4_strip_min_m(int64_t run) {
#if defined(TORCHSLIM_ISA_AVX512)
  return run <= 32 ? 12 : 8;
#else
  return run <= 32 ? 16 : 8;
#endif
}
constexpr auto kW4StripMinM = &w4_strip_min_m;

template <class S, bool kCentred>
void w4_gemm_strips(const W4GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  thread_local Int8Strip strip;
  thread_local std::vector<int32_t> bias;
  // Each row's run biases: the sum of its lane biases (lane l of chunk c meets codes 8 l ..
  // 8 l + 7 of the chunk in K's order), run / 8 lanes a run.
  const int64_t run = q8_run(g.K, g.group_size), runs = (g.K + run - 1) / run;
  bias.resize(kCentred ? (m1 - m0) * runs : 0);
  for (int64_t m = m0; kCentred && m < m1; ++m) {
    const int32_t* lanes = g.x_lane_bias + m * g.ldxb;
    for (int64_t r = 0; r < runs; ++r) {
      int32_t sum = 0;
      for (int64_t l = r * run / 8; l < min_i64((r + 1) * run, g.K) / 8; ++l) sum += lanes[l];
      bias[(m - m0) * runs + r] = sum;
    }
  }
  const auto run_bias = [&](int64_t m) {
    return kCentred ? bias.data() + (m - m0) * runs : nullptr;
  };
  for (int64_t n = n0; n < n1; n += kStripCols) {
    const int cols = static_cast<int>(min_i64(kStripCols, n1 - n));
    unpack_strip<S>(g, n, cols, kCentred ? kQ4Center : 0.0f, strip);
    int64_t m = m0;
    for (; m + kStripRows <= m1; m += kStripRows) {
      strip_tile<kStripRows, kCentred>(g, m, n, cols, strip, run_bias(m), runs);
    }
    if (m < m1) {
      strip_tile_edge<kCentred>(static_cast<int>(m1 - m), g, m, n, cols, strip, run_bias(m), runs);
    }
  }
}
#endif

#if !defined(TORCHSLIM_ISA_AVX512) && !defined(TORCHSLIM_ISA_AVX2)
constexpr int64_t (*kW4StripMinM)(int64_t) = nullptr;
#endif

// c[i][j] = out[m + i, n + j] before bias, for i < R, j < C. S is the scale/zero storage type.
// The tile prefetches w_ahead + j * ldw + (the offset it reads): each column's stream some way
// ahead (w4_block).
template <class S, int R, int C, int MR, int NR>
void w4_tile(const W4GemmArgs& g, int64_t m, int64_t n, float (&c)[MR][NR],
             const uint8_t* w_ahead) {
#if defined(TORCHSLIM_ISA_AVX512)
  if (takes_zmm_steps(g)) {
    if (g.group_size == 32) return w4_tile_zmm<S, R, C, MR, NR, 1>(g, m, n, c, w_ahead);
    if (g.group_size == 64) return w4_tile_zmm<S, R, C, MR, NR, 2>(g, m, n, c, w_ahead);
    return w4_tile_zmm<S, R, C, MR, NR, 0>(g, m, n, c, w_ahead);
  }
#endif
  using D = Q4Dot;
  const auto [xq, xs, xb, xg, w, scales, zeros] = W4TileOperands<S>(g, m, n);
  const int64_t G = g.group_size, groups = g.K / G;
  const int64_t k_chunks = g.K - g.K % kQ4Chunk;  // whole chunks of 64
  const int64_t k_full = g.K - g.K % kQ8Block;    // a partial block only when G == K

  typename D::Acc acc[R][C];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) acc[i][j] = D::zero();
  }
  // acc += (w . x) * x_scale * w_scale over chunk c (weights 64c .. 64c + 63). Offsets are
  // products of the chunk index: no divisions in the loop.
  auto chunk = [&](int64_t c, const typename D::SV(&ws)[C]) {
    const int64_t kb = c * (kQ4Chunk / 2);  // byte offset in a packed row
    typename D::WV wv[C];
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      if ((c & 1) == 0) prefetch_stream(w_ahead + j * g.ldw + kb);  // once per 64-byte line
      wv[j] = D::load_w(w + j * g.ldw + kb);
    }
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const typename D::XV xv =
          D::load_x(xq + i * g.ldxq + c * kQ4Chunk, xb + i * g.ldxb + c * kQ4Lanes);
      const typename D::SV xsv = D::scales(xs + i * g.ldxs + c * (kQ4Chunk / kQ8Block));
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j) acc[i][j] = D::fma(acc[i][j], wv[j], xv, D::mul(xsv, ws[j]));
    }
  };
  typename D::SV ws[C];
  if (G % kQ4Chunk == 0) {  // whole chunks per group: one weight scale per group
    const int64_t chunks_per_group = G / kQ4Chunk;
    for (int64_t gi = 0; gi < groups; ++gi) {
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j) {
        const float s = load_f32(scales + j * g.lds + gi);
        ws[j] = D::scales(s, s);
      }
      for (int64_t c = gi * chunks_per_group; c < (gi + 1) * chunks_per_group; ++c) chunk(c, ws);
    }
  } else if (G == kQ8Block && groups <= kQ4MaxScaleGroups) {
    // One group per block of 32 (llama.cpp's Q4_0 / Q4_1 grouping), two per chunk: the tile's
    // scales go to fp32 once, and each chunk loads its pair in two instructions.
    float sc[C][kQ4MaxScaleGroups];
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) to_f32(scales + j * g.lds, groups, sc[j]);
    for (int64_t c = 0; c * kQ4Chunk < k_chunks; ++c) {
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j) ws[j] = D::scales(sc[j] + 2 * c);
      chunk(c, ws);
    }
  } else {  // a chunk may straddle two groups (G = 96, 160, ...): the group of each block of 32
    int64_t g0 = 0, g1 = 0, end0 = G, end1 = G;  // groups of weights k and k + 32, their ends
    for (int64_t c = 0, k = 0; k < k_chunks; ++c, k += kQ4Chunk) {
      while (k >= end0) ++g0, end0 += G;
      while (k + kQ8Block >= end1) ++g1, end1 += G;
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j)
        ws[j] = D::scales(load_f32(scales + j * g.lds + g0), load_f32(scales + j * g.lds + g1));
      chunk(c, ws);
    }
  }
  // A lone block of 32 after the last chunk.
  if (k_chunks < k_full) {
    const int64_t gi = k_chunks / G;
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      const float s = load_f32(scales + j * g.lds + gi);
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        acc[i][j] =
            D::fma_block(acc[i][j], w + j * g.ldw + k_chunks / 2, xq + i * g.ldxq + k_chunks,
                         xb + i * g.ldxb + k_chunks / kQ4Chunk * kQ4Lanes,
                         xs[i * g.ldxs + k_chunks / kQ8Block] * s);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) c[i][j] = D::reduce(acc[i][j]);
  }
  // The partial last block (K % 32 values, natural order) of a per-channel row.
  if (k_full < g.K) {
    for (int j = 0; j < C; ++j) {
      const float s = load_f32(scales + j * g.lds);
      const uint8_t* wr = w + j * g.ldw;
      for (int i = 0; i < R; ++i) {
        int32_t dot = 0;
        for (int64_t k = k_full; k < g.K; ++k) {
          const int code = (wr[k / 2] >> (4 * (k & 1))) & 0x0f;
          dot += (code - kQ4Center) * xq[i * g.ldxq + k];
        }
        c[i][j] += static_cast<float>(dot) * xs[i * g.ldxs + k_full / kQ8Block] * s;
      }
    }
  }
  subtract_zero_points<S, R, C>(g, m, scales, zeros, c);
}

// Calls w4_tile with the compile-time tile matching the run-time (rows, cols) at an edge.
template <class S, int MR, int NR, int R = MR, int C = NR>
void w4_tile_edge(int rows, int cols, const W4GemmArgs& g, int64_t m, int64_t n, float (&c)[MR][NR],
                  const uint8_t* w_ahead) {
  if constexpr (R > 1) {
    if (rows < R) return w4_tile_edge<S, MR, NR, R - 1, C>(rows, cols, g, m, n, c, w_ahead);
  }
  if constexpr (C > 1) {
    if (cols < C) return w4_tile_edge<S, MR, NR, R, C - 1>(rows, cols, g, m, n, c, w_ahead);
  }
  w4_tile<S, R, C, MR, NR>(g, m, n, c, w_ahead);
}

// g as a tile at column n sees it when the tile's columns are `stride` apart: its column j is
// g's column n + j * stride.
template <class S>
W4GemmArgs strided_columns(const W4GemmArgs& g, int64_t n, int64_t stride) {
  W4GemmArgs t = g;
  t.w = g.w + n * g.ldw;
  t.scales = static_cast<const S*>(g.scales) + n * g.lds;
  t.zeros = static_cast<const S*>(g.zeros) + n * g.lds;
  t.ldw = stride * g.ldw;
  t.lds = stride * g.lds;
  return t;
}

// The block n-outer, in tiles whose columns are a part of the block apart (int8_gemm.h's
// strided_column_tiles), m-inner.
template <class S>
void w4_block(const W4GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int MR = kQ4MR, NR = kQ4NR;
  strided_column_tiles<NR>(n0, n1, [&](int64_t n, int cols, int64_t stride) {
    const W4GemmArgs t = strided_columns<S>(g, n, stride);
    const uint8_t* w_ahead = t.w + kPrefetchBytes<Q4Dot>;  // int8_gemm.h
    for (int64_t m = m0; m < m1; m += MR) {
      const int rows = static_cast<int>(min_i64(MR, m1 - m));
      float c[MR][NR];
      if (rows == MR && cols == NR) {
        w4_tile<S, MR, NR, MR, NR>(t, m, 0, c, w_ahead);
      } else {
        w4_tile_edge<S, MR, NR>(rows, cols, t, m, 0, c, w_ahead);
      }
      for (int i = 0; i < rows; ++i) {
        for (int j = 0; j < cols; ++j) {
          const int64_t nj = n + j * stride;
          store(g.out, g.ldo, g.out_type, m + i, nj, g.bias ? c[i][j] + g.bias[nj] : c[i][j]);
        }
      }
    }
  });
}

void w4_gemm(const W4GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
#if defined(TORCHSLIM_ISA_AVX512) || defined(TORCHSLIM_ISA_AVX2)
  if (g.int8_strips && takes_int8_strips(g)) {
    const bool centred = q8_run(g.K, g.group_size) < g.group_size;
    switch (g.s_type) {
      case ScalarType::kBFloat16:
        return centred ? w4_gemm_strips<uint16_t, true>(g, m0, m1, n0, n1)
                       : w4_gemm_strips<uint16_t, false>(g, m0, m1, n0, n1);
      case ScalarType::kFloat16:
        return centred ? w4_gemm_strips<Half, true>(g, m0, m1, n0, n1)
                       : w4_gemm_strips<Half, false>(g, m0, m1, n0, n1);
      default:
        return centred ? w4_gemm_strips<float, true>(g, m0, m1, n0, n1)
                       : w4_gemm_strips<float, false>(g, m0, m1, n0, n1);
    }
  }
#endif
  switch (g.s_type) {
    case ScalarType::kBFloat16:
      return w4_block<uint16_t>(g, m0, m1, n0, n1);
    case ScalarType::kFloat16:
      return w4_block<Half>(g, m0, m1, n0, n1);
    default:
      return w4_block<float>(g, m0, m1, n0, n1);
  }
}

}  // namespace
}  // namespace torchslim::cpu::TORCHSLIM_ISA_NS
