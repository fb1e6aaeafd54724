// The CPU kernel interface: plain pointers and strides, no torch.
//
// Each ISA level (portable, avx2, avx512) compiles the same kernel templates into its own
// namespace and exposes them through a KernelTable; the binding layer picks the table of the
// active level and splits the work into (m, n) blocks across threads. A kernel call computes one
// block [m0, m1) x [n0, n1) of the output and touches nothing outside it.
#pragma once

#include <cstdint>

#include "torchslim/cpu_features.h"

namespace torchslim::cpu {

// Storage type of float activations and outputs; bf16 is carried as raw uint16 bits.
enum class ScalarType : int { kFloat32 = 0, kBFloat16 = 1, kInt32 = 2, kFloat16 = 3, kInt8 = 4 };

// Symmetric per-row int8 quantization (torchslim.reference.quantize_per_token):
//   scale[m] = max_k |x[m, k]| / 127  (1 if the row is all zeros)
//   q[m, k]  = clamp(round_half_even(x[m, k] / scale[m]), -127, 127)
struct QuantizeArgs {
  const void* x;  // (M, K) fp32 or bf16, row stride ldx, unit column stride
  int64_t ldx;
  ScalarType x_type;
  int8_t* q;  // (M, K) int8 codes, row stride ldq
  int64_t ldq;
  float* scale;  // (M,) fp32
  int64_t K;
};

// out[m, n] = acc[m, n] * a_scale[m] * b_scale[n] + bias[n],  acc = sum_k a[m, k] * b[n, k]
// or, with out_type kInt32 (scales and bias null), the exact int32 accumulator itself.
struct Int8GemmArgs {
  const int8_t* a;  // (M, K) int8 activation codes in [-127, 127], row stride lda
  int64_t lda;
  const int8_t* b;  // (N, K) int8 weight codes, row stride ldb (one row per output column)
  int64_t ldb;
  const float* a_scale;  // (M,) fp32, or null for int32 output
  const float* b_scale;  // (N,) fp32, or null for int32 output
  const float* bias;     // (N,) fp32 or null
  void* out;             // (M, N) of out_type, row stride ldo
  int64_t ldo;
  ScalarType out_type;
  int64_t M, N, K;
  // Null, or a's rows as KernelTable::int8_pack_panels wrote them (then the kernel reads a
  // from here, and m0 of a call is a multiple of kAmxPanel).
  const int8_t* a_panels = nullptr;
  // Whether the kernel meets strips of weight columns in the VNNI order with broadcast
  // activation codes (KernelTable::int8_strip_min_m) rather than in dot products.
  bool strips = false;
};

// AMX: activation rows in the layout of a tile multiply's second operand. Panel p holds rows
// [16p, 16p + 16) of a (M, K) int8 matrix, K padded with zeros to a multiple of 64, as
// (Kp / 4, 16, 4): panels[p][q][j][t] = a[16p + j, 4q + t], zero past M and past K. Panel p
// starts at panels + p * amx_panel_bytes(K).
constexpr int64_t kAmxPanel = 16;
constexpr int64_t amx_padded_k(int64_t K) { return (K + 63) / 64 * 64; }
constexpr int64_t amx_panel_bytes(int64_t K) { return amx_padded_k(K) * kAmxPanel; }

// out[m, n] = (sum_k x[m, k] * w[n, k]) * w_scale[n] + bias[n]   (int8 -> fp32 in registers)
struct W8A16Args {
  const float* x;  // (M, K) fp32, row stride ldx
  int64_t ldx;
  const int8_t* w;  // (N, K) int8, row stride ldw
  int64_t ldw;
  const float* w_scale;  // (N,) fp32
  const float* bias;     // (N,) fp32 or null
  void* out;             // (M, N) fp32 or bf16, row stride ldo
  int64_t ldo;
  ScalarType out_type;
  int64_t M, N, K;
  // Null, or x as KernelTable::w8a16_pack_panels wrote it (see amx_bf16_panel_elems), in
  // x_parts bf16 parts; then the kernel reads x from here, and m0 of a call is a multiple of
  // 2 * kAmxPanel.
  const uint16_t* x_panels = nullptr;
  int64_t x_parts = 0;
  // Null, or x as bf16 (then x is null), row stride ldx: what w8a16_pack_panels reads instead.
  const uint16_t* x_bf16 = nullptr;
};

// AMX bf16 tiles: an activation as panels of 16 rows in the layout of TDPBF16PS's second
// operand, each value split into `parts` bf16 numbers: 1 for bf16 activations (exact), 3 for
// fp32 ones (each part the bf16 rounding of what the parts before it leave: their sum is the
// fp32 value to within 2^-24 of it, so three multiplies reproduce an fp32 product). Part t of
// panel p is (Kb / 2, 16, 2) bf16, Kb = K rounded up to 32, at panels + (p * parts + t) *
// amx_bf16_panel_elems(K): element [q][j][u] is part t of x[16p + j, 2q + u], zero past M and
// K. The panel count is rounded up to even (pairs of panels share each weight tile).
constexpr int64_t amx_bf16_padded_k(int64_t K) { return (K + 31) / 32 * 32; }
constexpr int64_t amx_bf16_panel_elems(int64_t K) { return amx_bf16_padded_k(K) * kAmxPanel; }
constexpr int64_t amx_bf16_panels(int64_t M) {
  return (M + 2 * kAmxPanel - 1) / (2 * kAmxPanel) * 2;
}

// Activations for the int4 kernel: each run of q8_run(K, group_size) values along K is
// quantized to int8 with its own scale (llama.cpp's Q8 idea), so the weight codes meet them in
// integer dot products. The kernels work in blocks of kQ8Block = 32 values, and every block
// carries its run's scale:
//   scale[m, b] = max |x[m, run containing block b]| / 127  (1 if the run is all zeros)
//   q[m, k]     = clamp(round_half_even(x[m, k] / scale[m, k / 32]), -127, 127)
//   group_sum[m, g] = sum over the weight group g of q[m, k] * scale[m, k / 32]
//   lane_bias[m, 8c + l] = -8 * (sum of the codes that meet int32 lane l of chunk c's dot product)
// The codes are stored permuted into the order in which the int4 kernel unpacks packed bytes
// (all low nibbles, then all high ones): each chunk of 64 as its 32 even positions then its 32
// odd ones; a lone full block of 32 at the end of a row as 16 even then 16 odd; a last partial
// block (K % 32, per-channel groups only) in K's order.
constexpr int64_t kQ8Block = 32;
constexpr int64_t kQ4Chunk = 2 * kQ8Block;  // int4 weights per inner step (32 packed bytes)
constexpr int64_t kQ4Lanes = 8;             // int32 partial sums per chunk
constexpr int kQ4Center = 8;                // codes enter the sums as code - 8

// Values per activation scale: the longest of 128, 64 and 32 that divides the weight group
// (128 for one group per row, the last run then maybe shorter). A group is whole runs, so on the
// tile unit a run's integer sums take one conversion to fp32 instead of one per block of 32;
// llama.cpp's k-quants round activations per 256 (Q8_K). torchslim.reference.int4's
// cpu_activation_block is the same rule.
constexpr int64_t q8_run(int64_t K, int64_t group_size) {
  return group_size == K || group_size % 128 == 0 ? 128 : group_size % 64 == 0 ? 64 : kQ8Block;
}

struct Q8BlockArgs {
  const void* x;  // (M, K) fp32 or bf16, row stride ldx, unit column stride
  int64_t ldx;
  ScalarType x_type;
  int8_t* q;  // (M, K) int8, row stride ldq
  int64_t ldq;
  float* scale;  // (M, ceil(K / 32)): each block's run's scale, row stride lds
  int64_t lds;
  float* group_sum;  // (M, K / group_size), row stride ldg
  int64_t ldg;
  int32_t* lane_bias;  // (M, 8 * ceil(K / 64)), row stride ldb
  int64_t ldb;
  int64_t K, group_size;
};

// W4A16 with int4 codes packed two per byte, low nibble first (packed[n, j] = code[n, 2j] |
// code[n, 2j + 1] << 4), asymmetric groups of group_size along K:
//   out[m, n] = sum_g scales[n, g] * sum_{k in g} (code[n, k] - zeros[n, g]) * xq[m, k] * xs[m, b]
//             + bias[n]                                                      (b = k / 32)
// The code sums run as u8 x s8 integer dot products of the unsigned codes, plus lane_bias, which
// makes them exact sums of (code - 8) * xq: centred, so that the fp32 accumulators stay near the
// size of the result. The zero-point term -scales * (zeros - 8) * group_sum is added once per
// group. Zero points may be any float.
struct W4GemmArgs {
  const int8_t* xq;  // (M, K) Q8 block codes (Q8BlockArgs layout), row stride ldxq
  int64_t ldxq;
  const float* x_scale;  // (M, ceil(K / 32)), row stride ldxs
  int64_t ldxs;
  const float* x_group_sum;  // (M, K / group_size), row stride ldxg
  int64_t ldxg;
  const int32_t* x_lane_bias;  // (M, 8 * ceil(K / 64)), row stride ldxb
  int64_t ldxb;
  const uint8_t* w;  // (N, K / 2) packed codes, row stride ldw
  int64_t ldw;
  const void* scales;  // (N, K / group_size) of s_type, row stride lds
  const void* zeros;   // (N, K / group_size) of s_type, row stride lds
  int64_t lds;
  ScalarType s_type;  // kFloat32, kBFloat16 or kFloat16
  const float* bias;  // (N,) fp32 or null
  void* out;          // (M, N) fp32 or bf16, row stride ldo
  int64_t ldo;
  ScalarType out_type;
  int64_t M, N, K, group_size;  // group_size divides K and is a multiple of 32, or equals K
  // Null, or the activation as KernelTable::w4_pack_panels wrote it: then the kernel reads it
  // from here (and xq .. x_lane_bias may be null), and m0 of a call is a multiple of kAmxPanel.
  const int8_t* panel_codes = nullptr;
  const float* panel_scales = nullptr;
  const float* panel_group_sums = nullptr;
  // Null, or x as KernelTable::w8a16_pack_panels writes it in one bf16 part (the rounding of an
  // fp32 x): then the kernel multiplies on bf16 tiles, each weight dequantized to fp32 as the
  // reference does and rounded to bf16, and m0 of a call is a multiple of 2 * kAmxPanel.
  const uint16_t* x_bf16_panels = nullptr;
  // Whether the kernel unpacks each strip of weight columns to bytes once and meets them with
  // broadcast activation codes (KernelTable::w4_strip_min_m) rather than in dot products.
  bool int8_strips = false;
};

// AMX: a W4 GEMM's Q8 activation as tile panels of 16 rows (p: rows [16p, 16p + 16), zero past
// M). Codes as int8_pack_panels lays them out (amx_panel_bytes(K) per panel), except that each
// block of 32 columns is in block order, its 16 even columns then its 16 odd ones: the order in
// which its 16 packed weight bytes unpack (low nibbles, then high ones). Block scales as
// (ceil(K / 32), 16) floats per panel, group sums as (K / group_size, 16).
inline int64_t w4_panel_scale_floats(int64_t K) {
  return (K + kQ8Block - 1) / kQ8Block * kAmxPanel;
}

// Attention (torchslim.reference.attention) for batch b, query rows [i0, i1) of the heads
// [h0, h0 + nh) (one key/value head's, nh * (i1 - i0) <= kAttnBlockQ rows; up to 4 times that
// on bf16 pairs, which take every block of attention_tile_min_rows rows or more: the amx
// level's tiles, VDPBF16PS at the avx512 level on a CPU with AVX512_BF16, pair_attention.h):
//   out[i] = sum_j p[i, j] v[j] / sum_j p[i, j],  p[i, j] = exp(s[i, j] - max_j s[i, j]),
//   s[i, j] = scale * q[i] . k[j] + mask[i, j] over the visible keys j (zero rows: no key),
// with query head h reading key/value head h / (H / Hkv). Strides are in elements; the last
// dim of q, k, v and out is contiguous. The mask is additive fp32 (-inf hides a key), each of
// its strides possibly 0 (broadcast). Visible keys of row i: j < len, and with causal
// pos - window < j <= pos (window <= 0: unbounded) where pos = i + len - Sq, len = kv_lens[b]
// or Sk. Only keys in [j_begin, j_end) are visited (the whole range, or one split of it).
// Without `partial`, out[i] is written. With it (split keys, merged by the caller), row r's
// reference point m (its max, or up to 8 log2 units below it: kMaxSlack), sum and unnormalised
// output (the exponents taken against m) go to partial[r * (Dv + 2) + (0, 1, 2..)] instead, row r
// being query i0 + r % (i1 - i0) of head h0 + r / (i1 - i0).
// `work` holds attention_work_floats(D, Dv) floats for the calling thread.
struct AttentionArgs {
  const void* q;  // (B, H, Sq, D)
  int64_t q_sb, q_sh, q_ss;
  const void* k;  // (B, Hkv, Sk, D)
  int64_t k_sb, k_sh, k_ss;
  const void* v;  // (B, Hkv, Sk, Dv)
  int64_t v_sb, v_sh, v_ss;
  void* out;  // (B, H, Sq, Dv)
  int64_t o_sb, o_sh, o_ss;
  ScalarType type;    // of q, k, v and out: kFloat32 or kBFloat16
  const float* mask;  // broadcast to (B, H, Sq, Sk), or null
  int64_t m_sb, m_sh, m_sq, m_sk;
  const int64_t* kv_lens;  // (B,) or null
  int64_t B, H, Hkv, Sq, Sk, D, Dv;
  float scale;
  bool causal;
  int64_t window;
  // Null, or k and v of the key/value heads tile_head0, tile_head0 + 1, ... (head b Hkv + hk;
  // the heads packed for the items a call runs: a wave of heads, or the one its thread took) in
  // the tile unit's layouts (KernelTable::attention_pack): then items of enough rows run on
  // bf16 pairs (pair_attention.h).
  const uint16_t* k_tiles = nullptr;
  const uint16_t* v_tiles = nullptr;
  int64_t tile_head0 = 0;
};

// Query rows per work item, keys per tile.
constexpr int64_t kAttnBlockQ = 64;
constexpr int64_t kAttnBlockK = 64;

// Keys per block of the kernel on bf16 pairs (pair_attention.h), and per head in its layouts:
// Sk rounded up to whole blocks.
constexpr int64_t kAttnTileBlockK = 128;
inline int64_t attention_tile_keys(int64_t Sk) {
  return (Sk + kAttnTileBlockK - 1) / kAttnTileBlockK * kAttnTileBlockK;
}

// Whether the tile layouts hold these arguments: head dims multiples of 32.
inline bool attention_tiles_fit(const AttentionArgs& a) { return a.D % 32 == 0 && a.Dv % 32 == 0; }

// bf16 parts per element in the tile layouts: 1 for bf16, 3 for fp32 (pair_attention.h).
inline int64_t attention_tile_parts(ScalarType type) {
  return type == ScalarType::kFloat32 ? 3 : 1;
}

// Per block: scaled q rows, output rows, scores, max and sum per row, the transposed key tile.
inline int64_t attention_work_floats(int64_t D, int64_t Dv) {
  return kAttnBlockQ * (D + Dv + kAttnBlockK + 2) + D * kAttnBlockK;
}

// Sparse linear (torchslim.reference.sparse): out[m, n] = sum_k x[m, k] * W[n, k] + bias[n], W
// stored in one of three formats (see sparse_gemm.h):
//   2:4      values (N, 2 * ceil(K / 4)) of v_type, row stride ldv; meta (N, ceil(K / 8)) uint8,
//            row stride ldm: 2 bits per kept value, its column within its group of 4
//   bitmask  meta is the mask (N, ceil(K / 8)) uint8, row stride ldm (bit j of byte b: column
//            8b + j is stored); values (values_total,) of v_type, the nonzeros row by row;
//            row n's are [row_offsets[n], row_offsets[n + 1]), 0 <= those <= values_total.
//            The lowest row whose mask holds another count is written to *bad_row.
//   csr      values (G, 8) of v_type and meta (G, 8) uint8 (the column offsets), both
//            contiguous; bases (G,) int16; row n's groups are [row_offsets[n],
//            row_offsets[n + 1]). Group g's slot t is column 8 * bases[g] + meta[g, t]. The
//            lowest row with a column outside [0, K) is written to *bad_row (its group skipped).
//            Without panels (M <= kSpMaxTileM) each row of x holds csr_padded_k(K) columns, NaN
//            past K: see csr_padded_k.
//   block    values (B, R, C) of v_type, contiguous (R = block_rows, C = block_cols); block row
//            r's blocks are [row_offsets[r], row_offsets[r + 1]), block b covering columns
//            [C * col_blocks[b], + C) (cut off at K); weight row n is row n % R of block row
//            n / R. The lowest row with a block outside [0, ceil(K / C)) is written to *bad_row
//            (the block skipped).
//   sliced   values (values_total,) of v_type and meta (values_total,) uint8 (each value's
//            column within its slice); groups (G, 2) uint8; row_offsets (B * S + 1,): block b's
//            slice s's groups are [row_offsets[b * S + s], row_offsets[b * S + s + 1]), B =
//            ceil(N / kSlicedRows), S = ceil(K / kSlicedCols); value_offsets (B + 1,): block b's
//            values; values_total >= value_offsets[B] + kSlicedGroup. The first row of a
//            malformed block, or a row with a column past K, is written to *bad_row. Without
//            panels each row of x holds sliced_padded_k(K) columns, NaN past K.
// Values may be int8 codes with per-row scales (W = codes * scales[n], the W8A16 rule): scales
// (N,) fp32 or null multiplies row n's sums before the bias is added. Bitmask and sliced int8
// values may also meet x quantized per token (x_q8 below, the W8A8 rule of int8_gemm).
// With panels set (M > kSpMaxTileM), every format reads x from them instead (an SpMM): x as
// (ceil(M / kSpPanel), K, kSpPanel) fp32, panel p rows [p * kSpPanel, (p + 1) * kSpPanel) of x
// transposed, zeros past M; m0 of a call is then a multiple of kSpPanel.
struct SparseGemmArgs {
  const float* x;  // (M, K) fp32, row stride ldx, unit column stride
  int64_t ldx;
  const void* values;
  ScalarType v_type;  // kFloat32, kBFloat16, kFloat16 or kInt8
  int64_t ldv;
  const float* scales;  // (N,) fp32 or null
  const uint8_t* meta;
  int64_t ldm;
  const int64_t* row_offsets;  // bitmask: (N + 1,) into the values; csr: into the groups
  int64_t values_total;
  const int16_t* bases;  // csr: (G,)
  const float* panels;   // null, or x packed (see above)
  const float* bias;     // (N,) fp32 or null
  void* out;             // (M, N) fp32 or bf16, row stride ldo
  int64_t ldo;
  ScalarType out_type;
  int64_t M, N, K;
  int64_t* bad_row;  // bitmask, csr, block: -1 on entry; the lowest bad row (see above)
  // block: R x C blocks, values (B, R, C) contiguous, row_offsets (ceil(N / R) + 1,) into them
  const int32_t* col_blocks;  // (B,): each block's first column / C
  int64_t block_rows, block_cols;
  // sliced: (G, 2) uint8, each group's row within its block and its count
  const uint8_t* groups;
  const int64_t* value_offsets;  // sliced: (ceil(N / kSlicedRows) + 1,), each block's values
  // bf16 values, no panels, KernelTable::bf16_dot: null, or x (M, K) in bf16 (row stride
  // ldx_bf16, unit column stride), which the dot kernels then multiply with vdpbf16ps.
  // Bitmask: x above stays the same rows in fp32, for the columns past the last whole step.
  // Sliced: the rows padded as x's would be (sliced_padded_k), and x above is null.
  const uint16_t* x_bf16;
  int64_t ldx_bf16;
  // Bitmask and sliced with int8 values only (W8A8): null, or x quantized per token (the rule
  // of quantize_rows) as int8 codes, row stride ldx_q8 (bitmask: K columns; sliced:
  // sliced_padded_k(K), zeros past K), with their scales x_scales (M,): the kernel then sums
  // codes times codes exactly in int32, for any M (no panels), and row m's sums are multiplied
  // by x_scales[m], then by scales[n], and the bias is added. x and x_bf16 above are null.
  const int8_t* x_q8;
  int64_t ldx_q8;
  const float* x_scales;
  // x_q8 with M of at least KernelTable::sparse24_q8_strip_min_m (2:4),
  // bitmask_q8_strip_min_m(K) or sliced_q8_strip_min_m(K): the kernel lays out each strip of
  // weight rows once per block of x's rows and meets it with every row of the block
  // (sparse_gemm.h, "2:4 W8A8 strips" and "bitmask W8A8 strips"; sliced_gemm.h), rather than a
  // row of W at a time in dot products. Bitmask's x_q8 rows then hold a whole number of 64
  // columns (zeros past K); sliced's blocks of weight rows start at multiples of kSlicedRows.
  bool q8_strips;
};

// Sparse: rows of x per panel of the SpMM kernels, and the most rows of x the dot kernels take.
constexpr int64_t kSpPanel = 16;
constexpr int64_t kSpMaxTileM = 4;

// The columns of a row of x that the csr dot kernels read: K rounded up to a group's 8, then
// a whole window of 256 columns, NaN past K. A group's base, clamped to ceil(K / 8), then
// keeps every read inside the row without a check per group: a valid group reads below K, and
// one with a column past K reads a NaN, which makes its row's sum NaN. Only such rows are
// summed again with every group checked (which also tells a NaN of x from a bad column).
constexpr int64_t csr_padded_k(int64_t K) { return (K + 7) / 8 * 8 + 256; }

// The columns of a row of x's codes that the 2:4 W8A8 kernels read: K rounded up to a whole step
// of 128, zero codes past K (sparse_gemm.h, "2:4 W8A8").
constexpr int64_t sp24_q8_padded_k(int64_t K) { return (K + 127) / 128 * 128; }
// The width of x_q8's rows for block W8A8 with blocks of C columns: whole blocks, so that a
// block's loads of x stay inside its row.
constexpr int64_t block_q8_padded_k(int64_t K, int64_t C) { return (K + C - 1) / C * C; }

// The sliced format: blocks of kSlicedRows weight rows, slices of kSlicedCols columns, groups
// of up to kSlicedGroup nonzeros of one row (see sliced_gemm.h).
constexpr int64_t kSlicedRows = 64;
constexpr int64_t kSlicedCols = 128;
constexpr int64_t kSlicedGroup = 16;

// The columns of a row of x that the sliced dot kernels read: K rounded up to a whole slice,
// then one slice more (a column byte of 128 or more is read, then reported), NaN past K.
constexpr int64_t sliced_padded_k(int64_t K) {
  return (K + kSlicedCols - 1) / kSlicedCols * kSlicedCols + kSlicedCols;
}

struct KernelTable {
  Isa isa;
  void (*quantize_rows)(const QuantizeArgs& args, int64_t m0, int64_t m1);
  void (*int8_gemm)(const Int8GemmArgs& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  void (*w8a16_gemm)(const W8A16Args& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  void (*quantize_q8_blocks)(const Q8BlockArgs& args, int64_t m0, int64_t m1);
  void (*w4_gemm)(const W4GemmArgs& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  void (*attention)(const AttentionArgs& args, int64_t b, int64_t h0, int64_t nh, int64_t i0,
                    int64_t i1, int64_t j_begin, int64_t j_end, float* work, float* partial);
  void (*sparse24_gemm)(const SparseGemmArgs& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  void (*bitmask_gemm)(const SparseGemmArgs& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  void (*csr_gemm)(const SparseGemmArgs& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  void (*block_gemm)(const SparseGemmArgs& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  void (*sliced_gemm)(const SparseGemmArgs& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // Null, or x (M, K) (row stride ldx) written to out (M, K) in the column order that
  // sparse24_gemm's dot kernels (M <= kSpMaxTileM) read it: then they take that copy.
  void (*sparse24_order_x)(const float* x, int64_t ldx, float* out, int64_t M, int64_t K);
  // Whether bitmask_gemm and sliced_gemm take SparseGemmArgs::x_bf16 (the AVX-512 level on a
  // CPU with AVX512_BF16 and AVX512_VBMI2).
  bool bf16_dot;
  // Null, or the panels of rows [16 p0, 16 p1) of a (M, K) int8, row stride lda, written to
  // `panels` (see kAmxPanel); int8_gemm then takes them through Int8GemmArgs::a_panels for M
  // of at least int8_panel_min_m.
  void (*int8_pack_panels)(const int8_t* a, int64_t lda, int64_t M, int64_t K, int8_t* panels,
                           int64_t p0, int64_t p1);
  int64_t int8_panel_min_m;
  // Null, or the bf16 panels [p0, p1) of x (see amx_bf16_panel_elems); w8a16_gemm then takes
  // them through W8A16Args::x_panels for M of at least w8a16_panel_min_m.
  void (*w8a16_pack_panels)(const W8A16Args& g, uint16_t* panels, int64_t p0, int64_t p1);
  int64_t w8a16_panel_min_m;
  // Null, or the panels [p0, p1) of the activation x (M rows; quantized as quantize_q8_blocks
  // does, see w4_panel_scale_floats): w4_gemm then takes them through W4GemmArgs::panel_*, with
  // no other activation argument, for M of at least w4_panel_min_m(run), by the activation's
  // run (q8_run: 32, 64 or 128 columns).
  void (*w4_pack_panels)(const Q8BlockArgs& x, int64_t M, int8_t* codes, float* scales,
                         float* group_sums, int64_t p0, int64_t p1);
  int64_t (*w4_panel_min_m)(int64_t run);
  // Null, or the least M at which w4_gemm takes x as bf16 panels (w8a16_pack_panels, one part;
  // W4GemmArgs::x_bf16_panels) rather than Q8 ones, by the activation's run (q8_run: 32, 64 or
  // 128 columns) and the layer's N.
  int64_t (*w4_bf16_min_m)(int64_t run, int64_t N);
  // Null, or the least M at which w4_gemm takes the Q8 activation against weight strips
  // unpacked to bytes (W4GemmArgs::int8_strips), by the activation's run (q8_run), for K a
  // multiple of 64.
  int64_t (*w4_strip_min_m)(int64_t run);
  // Null, or keys [j0, j1) (multiples of 16, at most attention_tile_keys(Sk)) of key/value head
  // hk of batch b written in the tile layouts to that head's k_tiles (attention_tile_parts x
  // attention_tile_keys(Sk) x D elements) and v_tiles (x Dv), for arguments that
  // attention_tiles_fit: attention then takes them through AttentionArgs for work items of at
  // least attention_tile_min_rows rows.
  void (*attention_pack)(const AttentionArgs& a, int64_t b, int64_t hk, int64_t j0, int64_t j1,
                         uint16_t* k_tiles, uint16_t* v_tiles);
  int64_t attention_tile_min_rows;
  // In fp32, also at least this many query rows per key/value head (Sq x H / Hkv): the packing
  // of three parts must pay for itself (INT64_MAX: fp32 never takes them).
  int64_t attention_tile_fp32_min_rows;
  // Null, or the least M at which int8_gemm takes the weights as strips in the VNNI order
  // (Int8GemmArgs::strips), by K (INT64_MAX for a K they do not take).
  int64_t (*int8_strip_min_m)(int64_t K);
  // The width in weight columns of the W8A8 and int4 strips (0 without strips): a block of
  // columns is a whole number of them.
  int64_t int8_strip_cols;
  // The least M at which sparse24_gemm takes x_q8 against strips (SparseGemmArgs::q8_strips);
  // INT64_MAX where it never does.
  int64_t sparse24_q8_strip_min_m;
  // The least M at which bitmask_gemm and sliced_gemm take x_q8 against strips, by K
  // (INT64_MAX: never).
  int64_t (*bitmask_q8_strip_min_m)(int64_t K);
  int64_t (*sliced_q8_strip_min_m)(int64_t K);
  // Null, or W8A16 for bf16 x (W8A16Args::x_bf16; x null) against weight strips in the pair
  // layout of VDPBF16PS (pair_gemm.h: the avx512 level on a CPU with AVX512_BF16), for M of at
  // least w8a16_pair_min_m, in blocks of columns a whole number of w8a16_pair_cols wide.
  void (*w8a16_pair_gemm)(const W8A16Args& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  int64_t w8a16_pair_min_m;
  int64_t w8a16_pair_cols;
};

namespace portable {
const KernelTable& kernel_table();
}
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 {
const KernelTable& kernel_table();
}
namespace avx512 {
const KernelTable& kernel_table();
}
namespace amx {
const KernelTable& kernel_table();
}
#endif

// The table of the active ISA level (see cpu_features.h).
const KernelTable& active_kernels();

}  // namespace torchslim::cpu
