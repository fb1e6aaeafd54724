// int4 weight GEMM for the CPU, written once and compiled per ISA level (see int8_gemm.h).
//
//   quantize_q8_blocks  x (M, K) fp32/bf16 -> int8 codes with one scale per 32 values along K,
//                       stored in the order the kernel unpacks weights (kernels.h, Q8BlockArgs)
//   w4_gemm             out = x . dequant(w).T: (code - zero point) times the s8 activation
//                       codes, exact, eight int32 partial sums per 32 values (vpmaddubsw +
//                       vpmaddwd on AVX2, vpdpbusd on AVX-512 VNNI), scaled by
//                       x_scale * w_scale per block into fp32 accumulators. A zero point that is
//                       not an integer leaves its fraction to a per-group term
//                       -scale * fraction * (sum of the group's activations).
//
// Decode (M = 1) streams the packed weight once at 4.5 to 5 bits per weight; the integer dot
// products keep the arithmetic per byte low enough that AVX2 stays memory bound, which a
// float dequantize-and-FMA inner loop (four conversions and FMAs per 8 weights) would not.
// The weights stay in the plain packed layout that every backend's op takes: the activation
// codes are permuted instead, once per call.
#pragma once

#include "int8_gemm.h"  // simd.h, min_i64, store

namespace torchslim::cpu::TORCHSLIM_ISA_NS {
namespace {

template <typename T>
void quantize_row_q8_blocks(const T* x, int64_t K, int64_t group_size, int8_t* q, float* scale,
                            float* group_sum) {
  using V = FVec;
  const int64_t groups = K / group_size;
  for (int64_t g = 0; g < groups; ++g) group_sum[g] = 0.0f;
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += kQ8Block, ++b) {
    const int64_t len = min_i64(kQ8Block, K - k0);
    const T* xb = x + k0;
    float amax = 0.0f;
    int64_t k = 0;
    if (len == kQ8Block) {
      typename V::R vmax = V::zero();
      for (; k + V::kWidth <= len; k += V::kWidth) vmax = V::max(vmax, V::abs(V::load(xb + k)));
      amax = V::reduce_max(vmax);
    }
    for (; k < len; ++k) {
      const float v = __builtin_fabsf(load_f32(xb + k));
      amax = v > amax ? v : amax;
    }
    float s = amax / 127.0f;
    if (s == 0.0f) s = 1.0f;
    scale[b] = s;
    int8_t codes[kQ8Block];
    k = 0;
    if (len == kQ8Block) {
      const typename V::R vs = V::set1(s);
      for (; k + V::kWidth <= len; k += V::kWidth)
        V::quantize_store(codes + k, V::load(xb + k), vs);
    }
    for (; k < len; ++k) codes[k] = quantize_scalar(load_f32(xb + k) / s);
    int32_t sum = 0;
    for (k = 0; k < len; ++k) sum += codes[k];
    group_sum[k0 / group_size] += static_cast<float>(sum) * s;
    int8_t* qb = q + k0;
    if (len == kQ8Block) {
      for (int t = 0; t < kQ8Block / 2; ++t) {
        qb[t] = codes[2 * t];
        qb[kQ8Block / 2 + t] = codes[2 * t + 1];
      }
    } else {
      for (k = 0; k < len; ++k) qb[k] = codes[k];
    }
  }
}

void quantize_q8_blocks(const Q8BlockArgs& a, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    if (a.x_type == ScalarType::kBFloat16) {
      quantize_row_q8_blocks(static_cast<const uint16_t*>(a.x) + m * a.ldx, a.K, a.group_size,
                             a.q + m * a.ldq, a.scale + m * a.lds, a.group_sum + m * a.ldg);
    } else {
      quantize_row_q8_blocks(static_cast<const float*>(a.x) + m * a.ldx, a.K, a.group_size,
                             a.q + m * a.ldq, a.scale + m * a.lds, a.group_sum + m * a.ldg);
    }
  }
}

// The integer part of a zero point, in the code range: codes minus it stay in [-15, 15].
inline int int_zero(float z) {
  const float r = __builtin_rintf(z);
  return r < 0.0f ? 0 : (r > 15.0f ? 15 : static_cast<int>(r));
}

// c[i][j] = out[m + i, n + j] before bias, for i < R, j < C. S is the scale/zero storage type.
// `w_next` points at the weight rows the next tile reads, prefetched one tile ahead.
template <class S, int R, int C, int MR, int NR>
void w4_tile(const W4GemmArgs& g, int64_t m, int64_t n, float (&c)[MR][NR], const uint8_t* w_next) {
  const int8_t* xq = g.xq + m * g.ldxq;
  const float* xs = g.x_scale + m * g.ldxs;
  const uint8_t* w = g.w + n * g.ldw;
  const S* scales = static_cast<const S*>(g.scales) + n * g.lds;
  const S* zeros = static_cast<const S*>(g.zeros) + n * g.lds;
  const int64_t groups = g.K / g.group_size;
  const int64_t k_full = g.K - g.K % kQ8Block;  // a partial block only when group_size == K

  typename Q4Dot::Acc acc[R][C];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) acc[i][j] = Q4Dot::zero();
  }
  for (int64_t gi = 0; gi < groups; ++gi) {
    float ws[C];
    typename Q4Dot::ZV zv[C];
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      ws[j] = load_f32(scales + j * g.lds + gi);
      zv[j] = Q4Dot::zero_point(int_zero(load_f32(zeros + j * g.lds + gi)));
    }
    const int64_t k_end = min_i64((gi + 1) * g.group_size, k_full);
    for (int64_t k = gi * g.group_size; k < k_end; k += kQ8Block) {
      const int64_t kb = k / 2;  // byte offset in a packed row
      typename Q4Dot::WV wv[C];
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j) {
        if (kb % 64 == 0) __builtin_prefetch(w_next + j * g.ldw + kb);  // once per line
        wv[j] = Q4Dot::load_w(w + j * g.ldw + kb, zv[j]);
      }
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        const typename Q4Dot::XV xv = Q4Dot::load_x(xq + i * g.ldxq + k);
        const float x_scale = xs[i * g.ldxs + k / kQ8Block];
#pragma GCC unroll 16
        for (int j = 0; j < C; ++j) acc[i][j] = Q4Dot::fma(acc[i][j], wv[j], xv, x_scale * ws[j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) c[i][j] = Q4Dot::reduce(acc[i][j]);
  }
  // The partial last block (K % 32 values, natural order) of a per-channel row.
  if (k_full < g.K) {
    for (int j = 0; j < C; ++j) {
      const float s = load_f32(scales + j * g.lds);
      const int z = int_zero(load_f32(zeros + j * g.lds));
      const uint8_t* wr = w + j * g.ldw;
      for (int i = 0; i < R; ++i) {
        int32_t dot = 0;
        for (int64_t k = k_full; k < g.K; ++k) {
          const int code = (wr[k / 2] >> (4 * (k & 1))) & 0x0f;
          dot += (code - z) * xq[i * g.ldxq + k];
        }
        c[i][j] += static_cast<float>(dot) * xs[i * g.ldxs + k_full / kQ8Block] * s;
      }
    }
  }
  // A zero point off the integers: -scale * (zero - round(zero)) * sum(x) per group.
  for (int j = 0; j < C; ++j) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      const float z = load_f32(zeros + j * g.lds + gi);
      const float frac = z - static_cast<float>(int_zero(z));
      if (frac == 0.0f) continue;
      const float sz = load_f32(scales + j * g.lds + gi) * frac;
      for (int i = 0; i < R; ++i) c[i][j] -= sz * g.x_group_sum[(m + i) * g.ldxg + gi];
    }
  }
}

// Calls w4_tile with the compile-time tile matching the run-time (rows, cols) at an edge.
template <class S, int MR, int NR, int R = MR, int C = NR>
void w4_tile_edge(int rows, int cols, const W4GemmArgs& g, int64_t m, int64_t n, float (&c)[MR][NR],
                  const uint8_t* w_next) {
  if constexpr (R > 1) {
    if (rows < R) return w4_tile_edge<S, MR, NR, R - 1, C>(rows, cols, g, m, n, c, w_next);
  }
  if constexpr (C > 1) {
    if (cols < C) return w4_tile_edge<S, MR, NR, R, C - 1>(rows, cols, g, m, n, c, w_next);
  }
  w4_tile<S, R, C, MR, NR>(g, m, n, c, w_next);
}

template <class S>
void w4_block(const W4GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int MR = kQ4MR, NR = kQ4NR;
  for (int64_t n = n0; n < n1; n += NR) {
    const int cols = static_cast<int>(min_i64(NR, n1 - n));
    const uint8_t* w_next = g.w + (n + NR + cols <= n1 ? n + NR : n) * g.ldw;
    for (int64_t m = m0; m < m1; m += MR) {
      const int rows = static_cast<int>(min_i64(MR, m1 - m));
      float c[MR][NR];
      if (rows == MR && cols == NR) {
        w4_tile<S, MR, NR, MR, NR>(g, m, n, c, w_next);
      } else {
        w4_tile_edge<S, MR, NR>(rows, cols, g, m, n, c, w_next);
      }
      for (int i = 0; i < rows; ++i) {
        for (int j = 0; j < cols; ++j) {
          const float v = g.bias ? c[i][j] + g.bias[n + j] : c[i][j];
          store(g.out, g.ldo, g.out_type, m + i, n + j, v);
        }
      }
    }
  }
}

void w4_gemm(const W4GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
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
