// Fused attention on bf16 pairs, for work items of at least kAttnTileMinRows query rows
// (smaller ones, decode, take attention.h's kernel), with its two products run by a pipe:
//   TilePipe (amx_attention.h)  the AMX tile unit, bf16 and fp32; fp32 operands go to the bf16
//                               tiles in three bf16 parts each, for fp32 accuracy (kMaxParts)
//   DotPipe (below)             AVX512_BF16's VDPBF16PS, bf16 only (three parts would cost
//                               more than fp32 FMAs), for the avx512 level on CPUs that have it
//
// The same online softmax as attention.h, with both products in bf16 pairs (TDPBF16PS: a
// 16 x 32 bf16 tile A times a 32 x 16 tile B in the VNNI layout, row p holding the pairs
// (2p, 2p + 1) of 16 columns, summed into a 16 x 16 fp32 tile in 16 cycles, 16x a core's
// AVX-512 FMA rate; VDPBF16PS: the same sum for one row of A and one row of B, twice the
// products of an FMA per instruction). Per block of kAttnTileBlockK keys, for a unit of 32 of
// the item's rows (queries of the heads that share one key/value head):
//   S = q k^T      A: the rows of q (copied once per item),
//                  B: the key tiles, packed once per call (attention_pack)
//   softmax        AVX-512 on the fp32 scores: t = S scale log2(e) (+ mask log2(e)), -inf outside
//                  each row's visible keys, P = 2^(t - m) in bf16 (parts), l += sum P (in fp32,
//                  before the rounding), m the row's reference point (see kMaxSlack)
//   O += P v       A: P, B: the value tiles (packed once per call); O lives in memory in fp32
//                  and is loaded into the accumulators and stored back once per block
// and at the end out = O / l. P is rounded to bf16 as the tile unit needs, as PyTorch's own
// CPU flash kernel does for bf16; every sum is fp32.
//
// On the tile unit the two units overlap: the tile unit and the AVX-512 units run side by side
// when their instructions are close together in the instruction stream, so the softmax of unit
// u issues, a step after each of its rows, the multiplies of S for unit u + 1 and of O += P v
// for unit u - 1 (TilePipe). Alone, each of the three phases takes about as long as the others.
//
// TORCHSLIM_PAIRS (bf16_pairs.h) is the target attribute of everything here where the level's
// own target lacks AVX512_BF16.
//
// Tile layouts of one key/value head, keys padded to a multiple of kAttnTileBlockK with zeros:
//   keys   tile (g, s) = keys 16 g .. 16 g + 15, head dims 32 s .. 32 s + 31, at element
//          (g D / 32 + s) 512: row p = the 16 keys' dims (32 s + 2 p, 32 s + 2 p + 1)
//   values tile (t, c) = keys 32 t .. 32 t + 31, value dims 16 c .. 16 c + 15, at element
//          (t Dv / 16 + c) 512: row p = the 16 dims of keys (32 t + 2 p, 32 t + 2 p + 1)
// Values of keys at or past kv_lens[b] are packed as zeros, so a key no row sees adds 0 x 0.
#pragma once

#include "kernels.h"  // and, from isa_prelude.h, <algorithm> and <vector>

namespace torchslim::cpu::TORCHSLIM_ISA_NS {
namespace {

#include "avx512_helpers.h"  // first_lanes, aligned_data, transpose_16x16
#include "bf16_pairs.h"      // split_parts, store_pairs
#include "simd.h"            // kLog2e, kExp2P, kExp2Lowest, kMaxSlack

// Rows of a work item from which the tiles take over (below, the rows of a 16-row tile would
// be mostly padding).
constexpr int64_t kAttnTileMinRows = 16;

// fp32 packs three bf16 parts of every key and value per call, which a few queries do not pay
// back (32:8 GQA, causal, 2 threads, tile time / AVX-512 time: Sq 4-16 against a 16k cache
// 1.63-2.42, Sq 16 against 2k 0.87, Sq 32: 0.83-0.86, Sq 64: 0.69-0.73): the tiles take fp32 from
// 128 query rows per key/value head.
constexpr int64_t kAttnTileFp32MinRows = 128;

constexpr float kLn2 = 0.693147180559945309f;  // kLog2e: simd.h

// 2^x as simd.h's FVec::exp2 computes it (kExp2P; this level's FVec may be scalar): degree 5,
// relative error 2.7e-7, for fp32's P; degree 3, 1e-4, for bf16's, which rounding to bf16
// takes to 2^-9 anyway. A row's reference point m moves as simd.h's kMaxSlack says.
template <int kDegree>
TORCHSLIM_PAIRS inline __m512 exp2_ps(__m512 x) {
  static_assert(kDegree == 3 || kDegree == 5);
  const __m512 lowest = _mm512_set1_ps(kExp2Lowest);
  const __mmask16 kept = _mm512_cmp_ps_mask(x, lowest, _CMP_NLT_UQ);  // x >= lowest or NaN
  x = _mm512_max_ps(lowest, x);  // max returns its second operand for a NaN
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p;
  if constexpr (kDegree == 5) {
    p = _mm512_set1_ps(kExp2P[0]);
    for (int i = 1; i < 5; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2P[i]));
  } else {
    p = _mm512_set1_ps(5.5008895695e-02f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4221101403e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9328296185e-01f));
  }
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(kept, p, n);
}

// An operand's bf16 parts: bf16 is one part; fp32 x = x0 + x1 + x2, each bf16 (x1 and x2 the
// rounding residues, 2^-8 and 2^-16 of x), and a product of two fp32 operands is the six
// a_i b_j with i + j <= 2 (the dropped ones are below 2^-24 of it): fp32 accuracy on the bf16
// tiles, at 6 multiplies for one (W8A16 does the same with 3 for x against exact int8 weights).
constexpr int kMaxParts = 3;

// 32 consecutive values of p (16 of p and 16 of p2 when p2 is given) as bf16 parts (amx_gemm.h's
// split_parts, as W8A16 splits x); null pointers read as zeros.
TORCHSLIM_PAIRS inline void load_parts(const uint16_t* p, const uint16_t* p2, int,
                                       __m512i (&out)[kMaxParts]) {
  if (p2 == nullptr) {
    out[0] = p ? _mm512_loadu_si512(p) : _mm512_setzero_si512();
    return;
  }
  const __m256i lo =
      p ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_setzero_si256();
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p2));
  out[0] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
TORCHSLIM_PAIRS inline void load_parts(const float* p, const float* p2, int parts,
                                       __m512i (&out)[kMaxParts]) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 lo = p ? _mm512_loadu_ps(p) : zero;
  const __m512 hi = p2 ? _mm512_loadu_ps(p2) : p ? _mm512_loadu_ps(p + 16) : zero;
  split_parts(lo, hi, parts, out);
}

// Keys [j0, j1) (multiples of 16, j1 <= attention_tile_keys(Sk)) of key/value head hk of batch
// b into the head's tiles k_tiles and v_tiles, part after part (see the layouts above).
template <class T>
TORCHSLIM_PAIRS void attention_pack_type(const AttentionArgs& a, int64_t b, int64_t hk, int64_t j0,
                                         int64_t j1, uint16_t* k_tiles, uint16_t* v_tiles) {
  const int64_t D = a.D, Dv = a.Dv, Sk = a.Sk, keys = attention_tile_keys(Sk);
  const int parts = static_cast<int>(attention_tile_parts(a.type));
  const int64_t len = a.kv_lens ? a.kv_lens[b] : Sk;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh;
  const T* v = static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh;
  for (int64_t g = j0 / 16; g < j1 / 16; ++g) {
    for (int64_t s = 0; s < D / 32; ++s) {
      __m512i r[kMaxParts][16];
      for (int i = 0; i < 16; ++i) {
        const int64_t j = 16 * g + i;
        __m512i part[kMaxParts];
        load_parts(j < Sk ? k + j * a.k_ss + 32 * s : nullptr, nullptr, parts, part);
        for (int e = 0; e < parts; ++e) r[e][i] = part[e];
      }
      for (int e = 0; e < parts; ++e) {  // row p of the tile: dim pair p of the 16 keys
        store_pairs(r[e], k_tiles + e * keys * D + (g * (D / 32) + s) * 512, 0);
      }
    }
  }
  // Interleaves 16 values of key 2p (low half) and 16 of key 2p + 1 (high half).
  alignas(64) static constexpr uint16_t kPairs[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                      21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                      11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i pairs = _mm512_load_si512(kPairs);
  alignas(64) static constexpr T kZeros[16] = {};
  for (int64_t j = j0; j < j1; j += 2) {
    const T* v0 = j < len ? v + j * a.v_ss : nullptr;
    const T* v1 = j + 1 < len ? v + (j + 1) * a.v_ss : nullptr;
    uint16_t* row = v_tiles + (j / 32) * (Dv / 16) * 512 + (j % 32) / 2 * 32;
    for (int64_t c = 0; c < Dv / 16; ++c) {
      __m512i part[kMaxParts];
      load_parts(v0 ? v0 + 16 * c : nullptr, v1 ? v1 + 16 * c : kZeros, parts, part);
      for (int e = 0; e < parts; ++e) {
        _mm512_store_si512(row + e * keys * Dv + c * 512, _mm512_permutexvar_epi16(pairs, part[e]));
      }
    }
  }
}

TORCHSLIM_PAIRS void attention_pack(const AttentionArgs& a, int64_t b, int64_t hk, int64_t j0,
                                    int64_t j1, uint16_t* k_tiles, uint16_t* v_tiles) {
  if (a.type == ScalarType::kFloat32) {
    return attention_pack_type<float>(a, b, hk, j0, j1, k_tiles, v_tiles);
  }
  attention_pack_type<uint16_t>(a, b, hk, j0, j1, k_tiles, v_tiles);
}

// The multiplies of a unit, queued as jobs of blocks of steps for a pipe (TilePipe issues them a
// step at a time). A block is a 16 or 32 (row groups) x 32 block of C = A B: A is row groups of
// `a` at 32 elements per step, B the pair of 32 x 16 tiles at b and b + b_pair, b_step per step;
// blocks follow one another b_block elements apart in B and 32 columns apart in C; fp32 operands
// add the products of their parts (planes a_plane and b_plane apart). A block starts from zero (S)
// or from C in memory (O) and ends stored to C.
struct TileJob {
  const uint16_t* a;
  int64_t lda;  // bytes
  const uint16_t* b;
  int64_t b_step, b_pair, b_block;
  int parts;  // of each operand, planes a_plane and b_plane elements apart
  int64_t a_plane, b_plane;
  float* c;
  int64_t ldc;  // bytes
  int groups;   // 1 or 2 row groups of 16
  bool accumulate;
  int blocks, steps;
};

// The jobs on VDPBF16PS. A pipe's jobs touch other buffers and rows than the softmax running
// beside them, so they run whole at drain(): without a tile unit there is nothing to overlap.
// C's rows go through the registers kDotRows at a time, their 32 columns as two vectors, each
// broadcast pair of A meeting the pair's two B rows.
constexpr int kDotRows = 8;

TORCHSLIM_PAIRS inline void dot_job(const TileJob& j) {
  const int64_t ldc = j.ldc / static_cast<int64_t>(sizeof(float));
  const int64_t lda = j.lda / static_cast<int64_t>(sizeof(uint16_t));
  for (int block = 0; block < j.blocks; ++block) {
    float* c = j.c + 32 * block;
    const uint16_t* b = j.b + block * j.b_block;
    for (int r0 = 0; r0 < 16 * j.groups; r0 += kDotRows) {
      __m512 acc[kDotRows][2];
#pragma GCC unroll 8
      for (int r = 0; r < kDotRows; ++r) {
        const float* cr = c + (r0 + r) * ldc;
        acc[r][0] = j.accumulate ? _mm512_loadu_ps(cr) : _mm512_setzero_ps();
        acc[r][1] = j.accumulate ? _mm512_loadu_ps(cr + 16) : _mm512_setzero_ps();
      }
      for (int step = 0; step < j.steps; ++step) {
        for (int i = 0; i < j.parts; ++i) {  // the products a_i b_e, i + e < parts
          const uint16_t* ai = j.a + i * j.a_plane + r0 * lda + 32 * step;
          for (int e = 0; i + e < j.parts; ++e) {
            const uint16_t* be = b + step * j.b_step + e * j.b_plane;
#pragma GCC unroll 2
            for (int p = 0; p < 16; ++p) {
              const __m512bh b0 = (__m512bh)_mm512_loadu_si512(be + 32 * p);
              const __m512bh b1 = (__m512bh)_mm512_loadu_si512(be + j.b_pair + 32 * p);
#pragma GCC unroll 8
              for (int r = 0; r < kDotRows; ++r) {
                int32_t pair;
                __builtin_memcpy(&pair, ai + r * lda + 2 * p, sizeof pair);
                const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
              }
            }
          }
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < kDotRows; ++r) {
        float* cr = c + (r0 + r) * ldc;
        _mm512_storeu_ps(cr, acc[r][0]);
        _mm512_storeu_ps(cr + 16, acc[r][1]);
      }
    }
  }
}

class DotPipe {
 public:
  void add(const TileJob& job) {
    if (job.blocks > 0 && job.steps > 0) jobs_[count_++] = job;
  }
  int64_t steps_left() const { return 0; }
  void issue(int64_t) {}
  TORCHSLIM_PAIRS void drain() {
    for (int j = 0; j < count_; ++j) dot_job(jobs_[j]);
    count_ = 0;
  }

 private:
  TileJob jobs_[2];
  int count_ = 0;
};

// One query row of a work item.
struct AttentionRow {
  const float* mask;  // its additive mask at key 0, or null
  int64_t lo, hi;     // its visible keys [lo, hi)
  float m;            // reference point of the exponents (log2 units)
};

// Per-thread buffers of one work item, 64-byte aligned (a tile row that straddles two cache
// lines costs 3x). S and P are double-buffered: unit u's softmax reads one while unit u + 1's
// scores and unit u - 1's products use the other.
constexpr int64_t kUnitRows = 32;
struct AttentionTileWork {
  std::vector<uint16_t> q;  // [parts][rows16][D] bf16
  std::vector<float> s;     // [2][kUnitRows][kAttnTileBlockK] scores
  std::vector<uint16_t> p;  // [2][parts][kUnitRows][kAttnTileBlockK] bf16 P
  std::vector<float> o;     // [rows16][Dv]
  std::vector<float> l;     // [rows][16] running sums, by lane
  std::vector<AttentionRow> rows;
};

// One work item on bf16 pairs, its products run by Pipe (attention.h's contract; a.k_tiles /
// a.v_tiles set).
template <class Pipe>
TORCHSLIM_PAIRS void attention_on_tiles(const AttentionArgs& a, int64_t b, int64_t h0, int64_t nh,
                                        int64_t i0, int64_t i1, int64_t j_begin, int64_t j_end,
                                        float* partial) {
  constexpr int64_t BK = kAttnTileBlockK;
  const int64_t D = a.D, Dv = a.Dv, nq = i1 - i0, rows = nh * nq, groups = (rows + 15) / 16;
  const int64_t hk = h0 / (a.H / a.Hkv), head_keys = attention_tile_keys(a.Sk);
  const auto head = [&](int64_t r) { return h0 + r / nq; };
  const auto query = [&](int64_t r) { return i0 + r % nq; };
  const bool fp32 = a.type == ScalarType::kFloat32;
  const int parts = static_cast<int>(attention_tile_parts(a.type));
  const int64_t tile_head = b * a.Hkv + hk - a.tile_head0;
  const uint16_t* k_tiles = a.k_tiles + tile_head * parts * head_keys * D;
  const uint16_t* v_tiles = a.v_tiles + tile_head * parts * head_keys * Dv;
  const int64_t q_plane = 16 * groups * D, p_plane = kUnitRows * BK;

  thread_local AttentionTileWork w;
  // Not cleared: a tile's row i of C reads only row i of A, so the rows past the item's last
  // (the rest of its last 16) may hold anything, and O starts in the accumulators of each row
  // group's first block (tile_zero), not from memory.
  w.q.resize(parts * q_plane + 32);
  w.s.resize(2 * kUnitRows * BK + 16);
  w.p.resize(2 * parts * p_plane + 32);
  w.o.resize(16 * groups * Dv + 16);
  w.l.assign(16 * rows + 16, 0.0f);
  w.rows.resize(rows);
  AttentionRow* row = w.rows.data();
  uint16_t* q = aligned_data(w.q);
  float* s = aligned_data(w.s);
  uint16_t* p = aligned_data(w.p);
  float* o = aligned_data(w.o);
  float* l = aligned_data(w.l);

  // Each row's visible keys: j < len and the split's [j_begin, j_end); with causal, at most its
  // position i + len - Sq, and past position - window.
  const int64_t len = a.kv_lens ? a.kv_lens[b] : a.Sk, shift = len - a.Sq;
  int64_t j_lo = len, j_hi = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t qr = b * a.q_sb + head(r) * a.q_sh + query(r) * a.q_ss;
    for (int64_t d = 0; d < D; d += 32) {  // D is a multiple of 32
      __m512i part[kMaxParts];
      if (fp32) {
        load_parts(static_cast<const float*>(a.q) + qr + d, nullptr, parts, part);
      } else {
        load_parts(static_cast<const uint16_t*>(a.q) + qr + d, nullptr, parts, part);
      }
      for (int e = 0; e < parts; ++e) _mm512_store_si512(q + e * q_plane + r * D + d, part[e]);
    }
    int64_t lo = j_begin, hi = std::min(j_end, len);
    if (a.causal) {
      const int64_t pos = query(r) + shift;
      hi = std::min(hi, pos + 1);
      if (a.window > 0) lo = std::max(lo, pos - a.window + 1);
    }
    const float* mask =
        a.mask ? a.mask + b * a.m_sb + head(r) * a.m_sh + query(r) * a.m_sq : nullptr;
    row[r] = {mask, lo, hi, -__builtin_inff()};
    if (lo < hi) {
      j_lo = std::min(j_lo, lo);
      j_hi = std::max(j_hi, hi);
    }
  }

  // Units: (key block, 32 rows), the rows inside. Unit u uses the buffers u % 2.
  const int64_t unit_groups = kUnitRows / 16, pairs = (groups + unit_groups - 1) / unit_groups;
  const int64_t first_block = j_lo / BK,
                units = j_lo < j_hi ? ((j_hi + BK - 1) / BK - first_block) * pairs : 0;
  const auto unit_j0 = [&](int64_t u) { return (first_block + u / pairs) * BK; };
  const auto unit_r0 = [&](int64_t u) { return u % pairs * kUnitRows; };
  const auto unit_groups_of = [&](int64_t u) {
    return static_cast<int>(std::min<int64_t>(unit_groups, groups - u % pairs * unit_groups));
  };
  // The unit's 32-key steps up to the last key one of its rows sees in the block (a causal
  // block's diagonal: the steps past it are not multiplied; the softmax hides their columns).
  const auto unit_steps = [&](int64_t u) {
    const int64_t j0 = unit_j0(u), r0 = unit_r0(u);
    int64_t seen = 0;
    for (int64_t r = r0; r < std::min(rows, r0 + kUnitRows); ++r) {
      if (row[r].lo < row[r].hi) seen = std::max(seen, std::min(row[r].hi - j0, BK));
    }
    return static_cast<int>((seen + 31) / 32);
  };
  const auto scores = [&](int64_t u) {
    const int64_t r0 = unit_r0(u);
    return TileJob{q + r0 * D,
                   2 * D,
                   k_tiles + unit_j0(u) / 16 * (D / 32) * 512,
                   512,
                   D / 32 * 512,
                   2 * (D / 32) * 512,
                   parts,
                   q_plane,
                   head_keys * D,
                   s + (u & 1) * kUnitRows * BK,
                   BK * static_cast<int64_t>(sizeof(float)),
                   unit_groups_of(u),
                   false,
                   unit_steps(u),
                   static_cast<int>(D / 32)};
  };
  const auto values = [&](int64_t u) {
    const int64_t r0 = unit_r0(u);
    return TileJob{p + (u & 1) * parts * p_plane,
                   2 * BK,
                   v_tiles + unit_j0(u) / 32 * (Dv / 16) * 512,
                   Dv / 16 * 512,
                   512,
                   1024,
                   parts,
                   p_plane,
                   head_keys * Dv,
                   o + r0 * Dv,
                   Dv * static_cast<int64_t>(sizeof(float)),
                   unit_groups_of(u),
                   u >= pairs,  // the row group's first block starts O
                   static_cast<int>(Dv / 32),
                   unit_steps(u)};
  };

  const float c = a.scale * kLog2e;
  const __m512 vc = _mm512_set1_ps(c), v_log2e = _mm512_set1_ps(kLog2e);
  const __m512 minus_inf = _mm512_set1_ps(-__builtin_inff());
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 slack = _mm512_set1_ps(kMaxSlack);
  alignas(64) float mask_row[BK];
  Pipe pipe;
  if (units > 0) {
    pipe.add(scores(0));
    pipe.drain();
  }
  for (int64_t u = 0; u < units; ++u) {
    const int64_t j0 = unit_j0(u), r0 = unit_r0(u);
    const int64_t r1 = std::min(rows, r0 + kUnitRows);
    // With one unit of rows, unit u - 1's products write the rows this softmax may rescale:
    // they go first.
    if (u > 0 && pairs == 1) {
      pipe.add(values(u - 1));
      pipe.drain();
    }
    if (u + 1 < units) pipe.add(scores(u + 1));
    if (u > 0 && pairs > 1) pipe.add(values(u - 1));
    const int64_t per_row = (pipe.steps_left() + (r1 - r0) - 1) / (r1 - r0);
    const float* su = s + (u & 1) * kUnitRows * BK;
    uint16_t* pu = p + (u & 1) * parts * p_plane;
    for (int64_t r = r0; r < r1; ++r) {
      pipe.issue(per_row);
      AttentionRow& rw = row[r];
      const float* mr = rw.mask ? rw.mask + j0 * a.m_sk : nullptr;
      if (mr && a.m_sk != 1) {
        for (int64_t cc = 0; cc < BK; ++cc) mask_row[cc] = j0 + cc < a.Sk ? mr[cc * a.m_sk] : 0;
        mr = mask_row;
      }
      // t = the scores in log2 units less the row's reference point (0 before it has one);
      // -inf outside [lo, hi), as offsets from j0 clamped to the block.
      const bool fresh = rw.m == -__builtin_inff();
      const __m512 base = _mm512_set1_ps(fresh ? 0.0f : -rw.m);
      const int64_t lo = rw.lo - j0, hi = rw.hi - j0;
      const bool edge = lo > 0 || hi < BK;
      const __m512i vlo = _mm512_set1_epi32(static_cast<int>(std::clamp<int64_t>(lo, 0, BK)));
      const __m512i vhi = _mm512_set1_epi32(static_cast<int>(std::clamp<int64_t>(hi, 0, BK)));
      const float* sr = su + (r - r0) * BK;
      __m512 t[BK / 16];
      __mmask16 above = 0;
#pragma GCC unroll 8
      for (int64_t v = 0; v < BK / 16; ++v) {
        const __m512 sv = _mm512_load_ps(sr + 16 * v);
        if (mr) {
          const __m512 mv = _mm512_maskz_loadu_ps(first_lanes(a.Sk - j0 - 16 * v), mr + 16 * v);
          // A finite mask stays finite in log2 units (Hugging Face masks with finfo.min, which
          // times log2(e) would overflow to -inf and hide the key); -inf and NaN stay as they are.
          __m512 ml = _mm512_mul_ps(mv, v_log2e);
          ml = _mm512_mask_max_ps(ml, _mm512_cmp_ps_mask(mv, minus_inf, _CMP_GT_OQ), ml,
                                  _mm512_set1_ps(-3.4028235e38f));
          t[v] = _mm512_fmadd_ps(sv, vc, _mm512_add_ps(ml, base));
        } else {
          t[v] = _mm512_fmadd_ps(sv, vc, base);
        }
        if (edge) {
          const __m512i col = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(16 * v)));
          const __mmask16 seen =
              _mm512_cmpge_epi32_mask(col, vlo) & _mm512_cmplt_epi32_mask(col, vhi);
          t[v] = _mm512_mask_blend_ps(seen, minus_inf, t[v]);
        }
        above |= _mm512_cmp_ps_mask(t[v], slack, _CMP_GT_OQ);
      }
      uint16_t* pr = pu + (r - r0) * BK;
      float* lr = l + 16 * r;
      if (fresh || above) {  // a new reference point: the block's max
        __m512 vmax = t[0];
        for (int64_t v = 1; v < BK / 16; ++v) vmax = _mm512_max_ps(vmax, t[v]);
        const float up = _mm512_reduce_max_ps(vmax);
        if (up == -__builtin_inff()) {  // nothing visible yet: P = 0
          for (int e = 0; e < parts; ++e) std::fill(pr + e * p_plane, pr + e * p_plane + BK, 0);
          continue;
        }
        for (int64_t v = 0; v < BK / 16; ++v) t[v] = _mm512_sub_ps(t[v], _mm512_set1_ps(up));
        // What the row has so far is rescaled by 2^(m - m') = 2^-up; a fresh row has only
        // zeros so far (sum and output; or an output row its first block will start).
        if (!fresh) {
          const __m512 alpha = exp2_ps<5>(_mm512_set1_ps(-up));
          _mm512_store_ps(lr, _mm512_mul_ps(_mm512_load_ps(lr), alpha));
          float* orow = o + r * Dv;
          for (int64_t d = 0; d < Dv; d += 16)
            _mm512_store_ps(orow + d, _mm512_mul_ps(_mm512_load_ps(orow + d), alpha));
        }
        rw.m = fresh ? up : rw.m + up;
      }
      __m512 vsum = _mm512_load_ps(lr);
#pragma GCC unroll 4
      for (int64_t v = 0; v < BK / 16; v += 2) {
        const __m512 p0 = parts == 1 ? exp2_ps<3>(t[v]) : exp2_ps<5>(t[v]);
        const __m512 p1 = parts == 1 ? exp2_ps<3>(t[v + 1]) : exp2_ps<5>(t[v + 1]);
        vsum = _mm512_add_ps(vsum, _mm512_add_ps(p0, p1));
        __m512i part[kMaxParts];
        split_parts(p0, p1, parts, part);
        for (int e = 0; e < parts; ++e) _mm512_store_si512(pr + e * p_plane + 16 * v, part[e]);
      }
      _mm512_store_ps(lr, vsum);
    }
    pipe.drain();
  }
  if (units > 0) {
    pipe.add(values(units - 1));
    pipe.drain();
  }

  for (int64_t r = 0; r < rows; ++r) {
    float* orow = o + r * Dv;
    // A row that saw no key has no output row either (its row group may have had no block).
    if (row[r].m == -__builtin_inff()) std::fill(orow, orow + Dv, 0.0f);
    const float sum = _mm512_reduce_add_ps(_mm512_load_ps(l + 16 * r));
    if (partial) {  // the max back in the scores' own units, as attention.h leaves it
      float* pr = partial + r * (Dv + 2);
      pr[0] = row[r].m * kLn2;
      pr[1] = sum;
      std::copy(orow, orow + Dv, pr + 2);
      continue;
    }
    const __m512 inv = _mm512_set1_ps(sum > 0.0f ? 1.0f / sum : 0.0f);
    const int64_t out = b * a.o_sb + head(r) * a.o_sh + query(r) * a.o_ss;
    for (int64_t d = 0; d < Dv; d += 16) {
      const __m512 y = _mm512_mul_ps(_mm512_load_ps(orow + d), inv);
      if (fp32) {
        _mm512_storeu_ps(static_cast<float*>(a.out) + out + d, y);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(a.out) + out + d),
                            (__m256i)_mm512_cvtneps_pbh(y));
      }
    }
  }
}

}  // namespace
}  // namespace torchslim::cpu::TORCHSLIM_ISA_NS
