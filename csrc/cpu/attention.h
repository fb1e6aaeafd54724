// Fused attention for the CPU (torchslim.reference.attention), written once and compiled per
// ISA level (see int8_gemm.h).
//
// One call computes a block of up to kAttnBlockQ query rows: queries [i0, i1) of the heads
// [h0, h0 + nh), which share one key/value head (GQA: a decode step reads each key and value
// once for all of them, not once per query head). The rows' reference point, running sum and
// output accumulate in fp32 in `work` while the visible keys stream past in tiles of
// kAttnBlockK (online softmax, as FlashAttention does), so the (Sq, Sk) score matrix never
// exists. Per tile:
//   S = (scale q) k^T   kAttnRows rows x 2 vectors of keys at a time against a transposed fp32
//                       copy of the key tile (q broadcast along d); a block of fewer than 4
//                       rows takes each key's dot product along d instead, unpacked
//   S += mask, and -inf outside the causal / sliding window / kv_lens range of each row
//   m' = max S where m is unset or max S passes m by more than a slack (else m' = m),
//   P = e^(S - m'), l = l e^(m - m') + sum P, O = O e^(m - m') + P V
// and at the end out = O / l (0 for a row that saw no key). Only the key tiles a block can
// see are visited: a causal block stops at its last row's position, a sliding window starts
// at its first row's. For decode the caller may split the keys among threads (split-KV) and
// merge the rows' partial (reference point, sum, output) itself.
//
// While a tile is read, the next tile's keys and values are prefetched (prefetch_stream: into L2
// on AVX-512; past the last tile too, as a prefetch never faults), each line as the same line of
// this tile is loaded: a decode step reads every key and value once, and the hardware's own
// prefetchers did not keep up with a tile read as 64 interleaved rows (measured above
// copy_key_tile).
#pragma once

#include "int8_gemm.h"  // simd.h, min_i64 (and <limits>: isa_prelude.h)

#if defined(TORCHSLIM_ISA_AVX512)
// bf16 on VDPBF16PS (pair_attention.h) where the CPU has AVX512_BF16, checked at run time
// (attention_pairs_supported): those functions alone are compiled for it.
#define TORCHSLIM_PAIRS                                                            \
  __attribute__((                                                                  \
      target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,popcnt," \
             "bmi,bmi2,avx512bf16")))
#include "pair_attention.h"
#include "pair_gemm.h"  // W8A16 on VDPBF16PS, under the same check
#endif

namespace torchslim::cpu::TORCHSLIM_ISA_NS {
namespace {

#if defined(TORCHSLIM_ISA_AVX512)
#include "avx512_helpers.h"
#endif

constexpr float kMinusInf = -__builtin_inff();

// Head dims per partial sum of the scores: each chunk's dot products start from zero and are
// then added to the scores, so the rounding error grows with D / kScoreChunk + kScoreChunk
// terms, not D (one chain over D = 256 erred 3x PyTorch's matmul in fp32).
constexpr int64_t kScoreChunk = 64;

// simd.h's kMaxSlack in the scores' own units.
constexpr float kSlack = kMaxSlack / kLog2e;

// Query rows per register tile in S = q k^T and O += P V: R x 2 vectors of accumulators, each
// step's R broadcasts and 2 loads feeding 2 R FMAs. AVX2 takes 6 (12 of its 16 registers): 4
// rows' 8 sums barely cover the FMA latency (4 cycles) on two pipes. The other levels keep 4
// (not measured with 6 yet).
#if defined(TORCHSLIM_ISA_AVX2)
constexpr int kAttnRows = 6;
#else
constexpr int kAttnRows = 4;
#endif

// f(std::integral_constant<int, R>{}, r) over rows [0, rows): tiles of kAttnRows rows, then
// one tile of the R < kAttnRows rows left.
template <int R = kAttnRows, class F>
void for_row_tiles(int64_t rows, F&& f, int64_t r = 0) {
  if constexpr (R == kAttnRows) {
    for (; r + R <= rows; r += R) f(std::integral_constant<int, R>{}, r);
  } else if (rows - r == R) {
    return f(std::integral_constant<int, R>{}, r);
  }
  if constexpr (R > 1) for_row_tiles<R - 1>(rows, f, r);
}

// One tile's scores for R rows: s[r][c] = sum_d q[r][d] kt[d][c], c < kAttnBlockK. Two vectors
// of keys per step: each broadcast q value feeds two FMAs.
template <int R>
void scores_packed(const float* q, int64_t D, const float* kt, float* s) {
  using V = FVec;
  for (int64_t d0 = 0; d0 < D; d0 += kScoreChunk) {
    const int64_t d1 = min_i64(d0 + kScoreChunk, D);
    for (int64_t c = 0; c < kAttnBlockK; c += 2 * V::kWidth) {
      typename V::R acc[R][2];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = V::zero();
      for (int64_t d = d0; d < d1; ++d) {
        const typename V::R k0 = V::load(kt + d * kAttnBlockK + c);
        const typename V::R k1 = V::load(kt + d * kAttnBlockK + c + V::kWidth);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const typename V::R qv = V::set1(q[r * D + d]);
          acc[r][0] = V::fma(qv, k0, acc[r][0]);
          acc[r][1] = V::fma(qv, k1, acc[r][1]);
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
        for (int j = 0; j < 2; ++j) {
          float* out = s + r * kAttnBlockK + c + j * V::kWidth;
          V::store(out, d0 == 0 ? acc[r][j] : V::add(V::load(out), acc[r][j]));
        }
      }
    }
  }
}

// The vector levels transpose the key tile a square of kSquare keys x kSquare dims at a time,
// in registers.
#if defined(TORCHSLIM_ISA_AVX512)
constexpr int kSquare = 16;
inline void transpose_square(__m512 (&r)[kSquare]) {
  __m512i t[kSquare];
  for (int i = 0; i < kSquare; ++i) t[i] = _mm512_castps_si512(r[i]);
  transpose_16x16(t);
  for (int i = 0; i < kSquare; ++i) r[i] = _mm512_castsi512_ps(t[i]);
}
#elif defined(TORCHSLIM_ISA_AVX2)
constexpr int kSquare = 8;
inline void transpose_square(__m256 (&r)[kSquare]) {
  __m256i t[kSquare];
  for (int i = 0; i < kSquare; ++i) t[i] = _mm256_castps_si256(r[i]);
  transpose_8x8(t);
  for (int i = 0; i < kSquare; ++i) r[i] = _mm256_castsi256_ps(t[i]);
}
#endif

// Decode on Zen 4 (AVX-512, 2 threads; B 1, H 32, D 128, cache 16k; one process per build,
// alternating, 2 rounds): with 8 key/value heads 15.2-15.4 GB/s of keys and values without the
// prefetches and 22.1-24.5 with them in fp32, 11.0 and 22.2-23.1 in bf16; with 32 (one row per
// head: the dot_row path) 22.7-24.4 and 25.9-27.5 in fp32, 19.3-26.7 and 30.0-39.9 in bf16 (a
// plain read of 128 MB: 26 GB/s). The keys' prefetches alone gave 17.2-17.8 in fp32 at 8 heads,
// the values' alone 16.7-17.1. Taking the key tile in the order of its rows (16 keys at a time,
// all their dims) rather than of its dims was slower alone and no faster with the prefetches.

// kt[d][c] = k[c][d] in fp32 for the tile's keys c < nk (row stride ldk), 0 for the others;
// the same lines of the next tile's keys prefetched.
template <class T>
void copy_key_tile(const T* k, int64_t ldk, int64_t nk, int64_t D, float* kt) {
  int64_t d0 = 0;
#if defined(TORCHSLIM_ISA_AVX512) || defined(TORCHSLIM_ISA_AVX2)
  static_assert(FVec::kWidth == kSquare && kAttnBlockK % kSquare == 0);
  for (; d0 + kSquare <= D; d0 += kSquare) {
    for (int64_t c0 = 0; c0 < kAttnBlockK; c0 += kSquare) {
      FVec::R r[kSquare];
#pragma GCC unroll 16
      for (int i = 0; i < kSquare; ++i) {
        prefetch_stream(k + (kAttnBlockK + c0 + i) * ldk + d0);
        r[i] = c0 + i < nk ? FVec::load(k + (c0 + i) * ldk + d0) : FVec::zero();
      }
      transpose_square(r);
#pragma GCC unroll 16
      for (int i = 0; i < kSquare; ++i) FVec::store(kt + (d0 + i) * kAttnBlockK + c0, r[i]);
    }
  }
#endif
  for (int64_t c = 0; c < kAttnBlockK; ++c) {
    for (int64_t d = d0; d < D; ++d)
      kt[d * kAttnBlockK + c] = c < nk ? load_f32(k + c * ldk + d) : 0.0f;
  }
}

// Prefetches the cache lines of row p[0 : n).
template <class T>
void prefetch_row(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) prefetch_stream(bytes + b);
}

// sum_d q[d] k[d] with k in storage type T.
template <class T>
float dot_row(const float* q, const T* k, int64_t D) {
  using V = FVec;
  typename V::R acc = V::zero();
  int64_t d = 0;
  for (; d + V::kWidth <= D; d += V::kWidth) acc = V::fma(V::load(q + d), V::load(k + d), acc);
  float sum = V::reduce_add(acc);
  for (; d < D; ++d) sum += q[d] * load_f32(k + d);
  return sum;
}

// o[r][d0 : d0 + NV * width] += sum_c p[r][c] v[c][same], c < nk. The tile's sum starts from
// zero and is added to o at the end: the rounding error grows with the tile plus the number of
// tiles, not with every key seen. With `ahead`, the same columns of the next tile's values are
// prefetched.
template <int R, int NV, class T>
void accumulate_pv_cols(const float* p, const T* v, int64_t ldv, int64_t nk, int64_t Dv, int64_t d0,
                        bool ahead, float* o) {
  using V = FVec;
  typename V::R acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) acc[r][j] = V::zero();
  }
  for (int64_t c = 0; c < nk; ++c) {
    typename V::R vv[NV];
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) {
      if (ahead) prefetch_stream(v + (kAttnBlockK + c) * ldv + d0 + j * V::kWidth);
      vv[j] = V::load(v + c * ldv + d0 + j * V::kWidth);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const typename V::R pv = V::set1(p[r * kAttnBlockK + c]);
#pragma GCC unroll 2
      for (int j = 0; j < NV; ++j) acc[r][j] = V::fma(pv, vv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) {
      float* out = o + r * Dv + d0 + j * V::kWidth;
      V::store(out, V::add(V::load(out), acc[r][j]));
    }
  }
}

// o[r][:] += sum_c p[r][c] v[c][:] for R rows, c < nk; v in storage type T, row stride ldv. With
// `ahead`, the next tile's values are prefetched.
template <int R, class T>
void accumulate_pv(const float* p, const T* v, int64_t ldv, int64_t nk, int64_t Dv, bool ahead,
                   float* o) {
  using V = FVec;
  int64_t d = 0;
  for (; d + 2 * V::kWidth <= Dv; d += 2 * V::kWidth)
    accumulate_pv_cols<R, 2>(p, v, ldv, nk, Dv, d, ahead, o);
  for (; d + V::kWidth <= Dv; d += V::kWidth)
    accumulate_pv_cols<R, 1>(p, v, ldv, nk, Dv, d, ahead, o);
  for (; d < Dv; ++d) {
    for (int r = 0; r < R; ++r) {
      float sum = 0.0f;
      for (int64_t c = 0; c < nk; ++c) sum += p[r * kAttnBlockK + c] * load_f32(v + c * ldv + d);
      o[r * Dv + d] += sum;
    }
  }
}

template <class T>
void attention_block(const AttentionArgs& a, int64_t b, int64_t h0, int64_t nh, int64_t i0,
                     int64_t i1, int64_t j_begin, int64_t j_end, float* work, float* partial) {
  using V = FVec;
  // Row r of the block is query i0 + r % nq of head h0 + r / nq: the heads share one k/v head.
  const int64_t D = a.D, Dv = a.Dv, nq = i1 - i0, rows = nh * nq;
  const int64_t hk = h0 / (a.H / a.Hkv);
  auto head = [&](int64_t r) { return h0 + r / nq; };
  auto query = [&](int64_t r) { return i0 + r % nq; };
  const T* q = static_cast<const T*>(a.q) + b * a.q_sb;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh;
  const T* v = static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh;
  float* qs = work;                          // [rows][D], scaled
  float* o = qs + kAttnBlockQ * D;           // [rows][Dv]
  float* s = o + kAttnBlockQ * Dv;           // [rows][kAttnBlockK]: scores, then P
  float* m = s + kAttnBlockQ * kAttnBlockK;  // [rows] running max
  float* l = m + kAttnBlockQ;                // [rows] running sum
  float* kt = l + kAttnBlockQ;               // [D][kAttnBlockK] transposed key tile

  for (int64_t r = 0; r < rows; ++r) {
    const T* qr = q + head(r) * a.q_sh + query(r) * a.q_ss;
    for (int64_t d = 0; d < D; ++d) qs[r * D + d] = a.scale * load_f32(qr + d);
    for (int64_t d = 0; d < Dv; ++d) o[r * Dv + d] = 0.0f;
    m[r] = kMinusInf;
    l[r] = 0.0f;
  }
  // The keys this block can see: j < len; with causal, row i sits at position i + len - Sq.
  const int64_t len = a.kv_lens ? a.kv_lens[b] : a.Sk;
  const int64_t shift = len - a.Sq;
  int64_t j_lo = 0, j_hi = len;
  if (a.causal) {
    j_hi = min_i64(len, i1 + shift);  // the last row's position + 1
    if (a.window > 0) j_lo = i0 + shift - a.window + 1 > 0 ? i0 + shift - a.window + 1 : 0;
  }
  j_lo = j_lo > j_begin ? j_lo : j_begin;
  j_hi = min_i64(j_hi, j_end);
  const bool packed = rows >= 4;
  for (int64_t j0 = j_lo; j0 < j_hi; j0 += kAttnBlockK) {
    const int64_t nk = min_i64(kAttnBlockK, j_hi - j0);
    if (packed) {
      copy_key_tile(k + j0 * a.k_ss, a.k_ss, nk, D, kt);
      for_row_tiles(rows, [&](auto R, int64_t r) {
        scores_packed<R>(qs + r * D, D, kt, s + r * kAttnBlockK);
      });
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < nk; ++c) {
          if (r == 0) prefetch_row(k + (j0 + kAttnBlockK + c) * a.k_ss, D);
          s[r * kAttnBlockK + c] = dot_row(qs + r * D, k + (j0 + c) * a.k_ss, D);
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s + r * kAttnBlockK;
      for (int64_t c = nk; c < kAttnBlockK; ++c) sr[c] = kMinusInf;
      if (a.mask) {
        const float* mr = a.mask + b * a.m_sb + head(r) * a.m_sh + query(r) * a.m_sq + j0 * a.m_sk;
        for (int64_t c = 0; c < nk; ++c) sr[c] += mr[c * a.m_sk];
      }
      const int64_t pos = query(r) + shift;
      const bool crossed = j0 + nk - 1 > pos || (a.window > 0 && j0 <= pos - a.window);
      if (a.causal && crossed) {  // hide what lies after the row's position or before its window
        for (int64_t c = 0; c < nk; ++c) {
          const int64_t j = j0 + c;
          if (j > pos || (a.window > 0 && j <= pos - a.window)) sr[c] = kMinusInf;
        }
      }
      // Online softmax against the row's reference point m (kMaxSlack): a tile takes its max
      // across the row only for a fresh row or one of its scores passing m by more than the
      // slack, and only then is what the row has so far rescaled. P = 2^((S - m) log2(e)): the
      // difference first, exact for the scores near m, so that large scores (a long ALiBi
      // bias, say) lose no more than in exp(S - m).
      typename V::R vmax = V::set1(kMinusInf);
      for (int64_t c = 0; c < kAttnBlockK; c += V::kWidth) vmax = V::max(vmax, V::load(sr + c));
      const bool fresh = m[r] == kMinusInf;
      if (fresh || V::any_greater(vmax, V::set1(m[r] + kSlack))) {
        const float tile_max = V::reduce_max(vmax);
        if (fresh && !(tile_max > kMinusInf)) {  // nothing visible yet: P = 0
          for (int64_t c = 0; c < kAttnBlockK; ++c) sr[c] = 0.0f;
          continue;
        }
        if (!fresh) {
          const float alpha = __builtin_expf(m[r] - tile_max);
          l[r] *= alpha;
          for (int64_t d = 0; d < Dv; ++d) o[r * Dv + d] *= alpha;
        }
        m[r] = tile_max;
      }
      const typename V::R vm = V::set1(m[r]), log2e = V::set1(kLog2e);
      typename V::R vsum = V::zero();
      for (int64_t c = 0; c < kAttnBlockK; c += V::kWidth) {
        const typename V::R p = V::exp2(V::mul(V::sub(V::load(sr + c), vm), log2e));
        V::store(sr + c, p);
        vsum = V::add(vsum, p);
      }
      l[r] += V::reduce_add(vsum);
    }
    const T* vt = v + j0 * a.v_ss;
    for_row_tiles(rows, [&](auto R, int64_t r) {
      accumulate_pv<R>(s + r * kAttnBlockK, vt, a.v_ss, nk, Dv, r == 0, o + r * Dv);
    });
  }
  if (partial) {
    for (int64_t r = 0; r < rows; ++r) {
      float* pr = partial + r * (Dv + 2);
      pr[0] = m[r];
      pr[1] = l[r];
      for (int64_t d = 0; d < Dv; ++d) pr[2 + d] = o[r * Dv + d];
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    const int64_t base = b * a.o_sb + head(r) * a.o_sh + query(r) * a.o_ss;
    for (int64_t d = 0; d < Dv; ++d) store(a.out, 0, a.type, 0, base + d, o[r * Dv + d] * inv);
  }
}

void attention(const AttentionArgs& a, int64_t b, int64_t h0, int64_t nh, int64_t i0, int64_t i1,
               int64_t j_begin, int64_t j_end, float* work, float* partial) {
#if defined(TORCHSLIM_ISA_AVX512)
  if (a.k_tiles != nullptr && nh * (i1 - i0) >= kAttnTileMinRows) {
    return attention_on_tiles<DotPipe>(a, b, h0, nh, i0, i1, j_begin, j_end, partial);
  }
#endif
  if (a.type == ScalarType::kBFloat16) {
    attention_block<uint16_t>(a, b, h0, nh, i0, i1, j_begin, j_end, work, partial);
  } else {
    attention_block<float>(a, b, h0, nh, i0, i1, j_begin, j_end, work, partial);
  }
}

// KernelTable::attention_pack and the work items it serves: bf16 on VDPBF16PS (the AVX-512
// level on a CPU with AVX512_BF16), never fp32, whose three bf16 parts a product would take
// there 1.5x the time of its fp32 FMA.
#if defined(TORCHSLIM_ISA_AVX512)
inline bool attention_pairs_supported() { return cpu_features().avx512bf16; }
inline decltype(KernelTable::attention_pack) attention_pack_kernel() {
  return attention_pairs_supported() ? &attention_pack : nullptr;
}
constexpr int64_t kAttnPackMinRows = kAttnTileMinRows;
#else
inline decltype(KernelTable::attention_pack) attention_pack_kernel() { return nullptr; }
constexpr int64_t kAttnPackMinRows = 0;
#endif
constexpr int64_t kAttnPackFp32MinRows = std::numeric_limits<int64_t>::max();

}  // namespace
}  // namespace torchslim::cpu::TORCHSLIM_ISA_NS
