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

#include "kernels.h"

namespace torchslim::cpu::TORCHSLIM_ISA_NS {
namespace {

#include "simd.h"

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// c[i][j] = sum_k a[i, k] * b[j, k] for i < R, j < C (R <= MR, C <= NR).
//
// The tile prefetches b_ahead + j * ldb + (the offset it reads): each weight row's stream some
// way ahead of its loads (gemm_block).
template <class D, int R, int C, int MR, int NR>
inline void dot_tile(const typename D::AT* a, int64_t lda, const typename D::BT* b, int64_t ldb,
                     int64_t K, typename D::Sum (&c)[MR][NR], const typename D::BT* b_ahead) {
  typename D::Acc acc[R][C];
  typename D::Acc bsum[C];
#pragma GCC unroll 16
  for (int j = 0; j < C; ++j) {
    bsum[j] = D::zero();
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) acc[i][j] = D::zero();
  }
  const int64_t kv = K - K % D::kStep;
  for (int64_t k = 0; k < kv; k += D::kStep) {
    typename D::BV bv[C];
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      if (k % 64 < D::kStep) __builtin_prefetch(b_ahead + j * ldb + k);  // once per line
      bv[j] = D::load_b(b + j * ldb + k);
      if constexpr (D::kOffset) bsum[j] = D::sum_b(bsum[j], bv[j]);
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
    typename D::Sum correction{};
    if constexpr (D::kOffset) correction = 128 * D::reduce(bsum[j]);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) c[i][j] = D::reduce(acc[i][j]) - correction;
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
                          typename D::Sum (&c)[MR][NR], const typename D::BT* b_ahead) {
  if constexpr (R > 1) {
    if (rows < R) {
      return dot_tile_edge<D, MR, NR, R - 1, C>(rows, cols, a, lda, b, ldb, K, c, b_ahead);
    }
  }
  if constexpr (C > 1) {
    if (cols < C) {
      return dot_tile_edge<D, MR, NR, R, C - 1>(rows, cols, a, lda, b, ldb, K, c, b_ahead);
    }
  }
  dot_tile<D, R, C, MR, NR>(a, lda, b, ldb, K, c, b_ahead);
}

// How far ahead of its loads each of a tile's weight streams prefetches.
constexpr int64_t kPrefetchBytes = 1024;

// Walks the block n-outer, m-inner; `epilogue(m, n, stride, rows, cols, c)` stores each
// finished tile, whose column j is column n + j * stride. The block's columns are taken in NR
// parts of `part` (then the few left over, side by side): the tile at column n reads columns
// n, n + part, ..., so each of its NR weight streams walks consecutive rows, one after the
// other, and meets the prefetcher as one run (int4_gemm.h's w4_block, measured there).
template <class D, int MR, int NR, class Epilogue>
void gemm_block(const typename D::AT* a, int64_t lda, const typename D::BT* b, int64_t ldb,
                int64_t K, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                const Epilogue& epilogue) {
  const int64_t part = (n1 - n0) / NR;
  const auto column_tiles = [&](int64_t n, int cols, int64_t stride) {
    const typename D::BT* bt = b + n * ldb;
    const typename D::BT* b_ahead = bt + kPrefetchBytes / sizeof(typename D::BT);
    for (int64_t m = m0; m < m1; m += MR) {
      const int rows = static_cast<int>(min_i64(MR, m1 - m));
      typename D::Sum c[MR][NR];
      if (rows == MR && cols == NR) {
        dot_tile<D, MR, NR, MR, NR>(a + m * lda, lda, bt, stride * ldb, K, c, b_ahead);
      } else {
        dot_tile_edge<D, MR, NR>(rows, cols, a + m * lda, lda, bt, stride * ldb, K, c, b_ahead);
      }
      epilogue(m, n, stride, rows, cols, c);
    }
  };
  for (int64_t n = n0; n < n0 + part; ++n) column_tiles(n, NR, part);
  if (n0 + NR * part < n1) column_tiles(n0 + NR * part, static_cast<int>(n1 - n0 - NR * part), 1);
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
  for (; k + V::kWidth <= K; k += V::kWidth) vmax = V::max(vmax, V::abs(V::load(x + k)));
  float amax = V::reduce_max(vmax);
  for (; k < K; ++k) {
    const float v = __builtin_fabsf(load_f32(x + k));
    amax = v > amax ? v : amax;
  }
  float scale = amax / 127.0f;
  if (scale == 0.0f) scale = 1.0f;
  *scale_out = scale;
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

void int8_gemm(const Int8GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  gemm_block<I8Dot, kI8MR, kI8NR>(g.a, g.lda, g.b, g.ldb, g.K, m0, m1, n0, n1,
                                  Int8Epilogue<kI8MR, kI8NR>{g});
}

void w8a16_gemm(const W8A16Args& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  gemm_block<F32Dot, kF32MR, kF32NR>(g.x, g.ldx, g.w, g.ldw, g.K, m0, m1, n0, n1,
                                     W8A16Epilogue<kF32MR, kF32NR>{g});
}

}  // namespace
}  // namespace torchslim::cpu::TORCHSLIM_ISA_NS
