// Torch binding of the CPU kernels: argument checks, allocation, and the split of the output
// into blocks run across at::parallel_for (so torch.set_num_threads applies). The kernels are
// bound twice: as torchslim._C functions (2-D operands) and as the CPU impls of the
// torch.ops.torchslim ops (any leading dims, Python fallback: see registry.h).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "bindings/cpu_common.h"
#include "bindings/registry.h"
#include "cpu/kernels.h"
#include "torchslim/checks.h"

namespace torchslim {
namespace {

using namespace cpu_bindings;

// Block sizes: the int8 activation block (kBlockM x K bytes) and the weight block
// (kBlockN x K bytes) both fit in L2 for K up to ~4k; fp32 activations are 4x larger.
constexpr int64_t kBlockM_I8 = 64;
constexpr int64_t kBlockM_F32 = 32;
constexpr int64_t kBlockN = 64;
constexpr int64_t kVectorStepN = 12;
// At few rows (M <= kFewRows: the register tile's rows on AVX-512) a vector kernel's block is
// its weight streams: each of a tile's NR columns walks a part of the block's columns
// (strided_column_tiles in cpu/int8_gemm.h), and the hardware prefetcher starts over with each
// part. Blocks of 64 columns cut 576x1536 into streams of 9 KB (16 rows of 576 bytes). With
// blocks of 256, at M = 1 on Zen 4 (2 threads, weights cold, one process per variant,
// alternating, 6-10 rounds, median), 576x1536 W8A8 took 0.76-0.77x the time, W8A16 0.88-0.92x,
// and int4 0.89-0.98x on the benchmark's layers; the large int8 layers moved within the noise
// (0.94-1.08x). At the AVX2 level 0.86-1.03x.
constexpr int64_t kFewRows = 4;
constexpr int64_t kBlockN_FewRows = 256;
// The tile unit's blocks (multiples of the 32 x 32 register block): a block's weight rows
// (kBlockN_Amx x K bytes) stay in L2 while its activation panels pass.
constexpr int64_t kBlockM_Amx = 128;
constexpr int64_t kBlockN_Amx = 256;
// int4 unpacks each 32-row weight strip once per block, so its blocks are twice as tall: 256
// rows of panels over a slice of K (cpu/amx_gemm.h, 512 KB) still stay in L2.
constexpr int64_t kBlockM_W4Amx = 256;
// The strip kernels (AVX-512 and AVX2; W8A8 in cpu/int8_gemm.h, int4 unpacked to bytes in
// cpu/int4_gemm.h) lay out each strip of weight columns once per block of rows: a block's
// activation codes are read from L2 or L3 once per strip.
constexpr int64_t kBlockM_Strips = 128;
constexpr int64_t kBlockN_Strips = 64;
// The strip kernels' blocks of columns: a whole number of strips of `cols` columns (32 with
// AVX-512, 24 with AVX2; a strip cut short makes its whole tile's products all the same).
int64_t strip_block_n(int64_t N, int64_t cols) {
  return balanced_block_n(N, (kBlockN_Strips + cols - 1) / cols * cols, cols);
}
// The bf16 tiles' blocks: each weight is converted to bf16 once per block, so the blocks are
// tall; a block's panels, a slice of K at a time, stay in L2 (cpu/amx_gemm.h).
constexpr int64_t kBlockM_Bf16 = 256;
constexpr int64_t kBlockN_Bf16 = 256;
// int4 on bf16 tiles dequantizes each weight once per block of rows, so its blocks are taller:
// 512 rows took 0.91-0.93x the time of 256 at M = 512 (4096^2, 11008x4096, 1536x576, g32).
constexpr int64_t kBlockM_W4Bf16 = 512;

// The vector kernels' blocks of columns.
int64_t vector_block_n(int64_t M, int64_t N) {
  return balanced_block_n(N, M <= kFewRows ? kBlockN_FewRows : kBlockN, kVectorStepN);
}

// The tile kernels' blocks, run across the threads. The threads split the columns
// (balanced_block_n) and each walks all rows in blocks of `most_m`; a layer with fewer than 2M
// columns and at least 128 rows a thread splits its rows instead: each thread takes its share
// of rows (the panels it packed itself, in pairs) and all columns, in blocks of up to `most_n`,
// so it reads its activation panels from its own L2 (split by columns, half of them come from
// the other core's) and no thread waits on an uneven share of columns. The price, each weight
// unpacked once per thread rather than once, is the smaller there: with 2 threads, 1536x576 at
// M = 512 took 0.70-0.84x the time (int4 g32 and g128, W8A8, W8A16 on fp32 and bf16 x), and
// 4096x512, 2048x1024 and 576x1536 at M = 512-1024 0.83-0.95x; 4096^2 at M = 512 split by rows
// took 1.1x, and 1536x576 at M = 128 1.2x (g32).
constexpr int64_t kRowSplitMinRows = 128;

template <class F>
void parallel_tile_blocks(int64_t M, int64_t N, int64_t most_m, int64_t most_n, const F& fn) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (threads == 1 || N >= 2 * M || M < threads * kRowSplitMinRows) {
    return parallel_blocks(M, N, most_m, balanced_block_n(N, most_n), fn);
  }
  const int64_t pair = 2 * cpu::kAmxPanel;
  const int64_t panels = (M + cpu::kAmxPanel - 1) / cpu::kAmxPanel;
  const int64_t share =
      ((panels + threads - 1) / threads * cpu::kAmxPanel + pair - 1) / pair * pair;
  const int64_t blocks_n = (N + most_n - 1) / most_n;
  const int64_t block_n = ((N + blocks_n - 1) / blocks_n + pair - 1) / pair * pair;
  parallel_blocks(M, N, std::min(share, most_m), block_n, fn, /*rows_first=*/true);
}

// x (args.x or args.x_bf16) as the bf16 tiles' panels in args.x_parts parts, in the calling
// thread's workspace (or `held`).
const uint16_t* pack_bf16_panels(const cpu::W8A16Args& args, at::Tensor& held) {
  const cpu::KernelTable& kt = cpu::active_kernels();
  const int64_t panels = cpu::amx_bf16_panels(args.M);
  auto* packed = reinterpret_cast<uint16_t*>(workspace(
      panels * args.x_parts * cpu::amx_bf16_panel_elems(args.K) * sizeof(uint16_t), held));
  at::parallel_for(0, panels, 1,
                   [&](int64_t p0, int64_t p1) { kt.w8a16_pack_panels(args, packed, p0, p1); });
  return packed;
}

void check_int8_matrix(const at::Tensor& w, const char* name, int64_t K) {
  check_cpu(w, name);
  TORCHSLIM_CHECK_TYPE(w.scalar_type() == at::kChar, name, " must be int8, got ", w.scalar_type());
  TORCHSLIM_CHECK(w.dim() == 2, name, " must be 2-D (N, K), got ", w.dim(), "-D");
  TORCHSLIM_CHECK(w.size(1) == K, name, " must have K=", K, " columns, got ", w.size(1));
  TORCHSLIM_CHECK(w.size(1) <= 1 || w.stride(1) == 1, name,
                  " must have unit stride in its last dim, got strides ", w.strides());
}

// Returns w_scale as a (N,) fp32 contiguous tensor.
at::Tensor scale_operand(const at::Tensor& w_scale, int64_t N) {
  check_cpu(w_scale, "w_scale");
  TORCHSLIM_CHECK_TYPE(w_scale.scalar_type() == at::kFloat, "w_scale must be float32, got ",
                       w_scale.scalar_type());
  TORCHSLIM_CHECK(w_scale.dim() == 1 && w_scale.size(0) == N, "w_scale must have shape (N,) = (", N,
                  ",), got ", w_scale.sizes());
  return w_scale.contiguous();
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x) {
  check_activation(x, "x");
  return quantize_rows(x, x.size(1));
}

void run_int8_gemm(cpu::Int8GemmArgs args) {
  const cpu::KernelTable& kt = cpu::active_kernels();
  const auto run = [&](int64_t block_m, int64_t block_n) {
    parallel_blocks(args.M, args.N, block_m, block_n,
                    [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
                      kt.int8_gemm(args, m0, m1, n0, n1);
                    });
  };
  args.strips = kt.int8_strip_min_m != nullptr && args.M >= kt.int8_strip_min_m(args.K);
  if (args.strips) return run(kBlockM_Strips, strip_block_n(args.N, kt.int8_strip_cols));
  if (kt.int8_pack_panels == nullptr || args.M < kt.int8_panel_min_m) {
    return run(kBlockM_I8, vector_block_n(args.M, args.N));
  }
  // The tile unit: the activation rows rewritten once into panels (cpu/kernels.h).
  const int64_t panels = (args.M + cpu::kAmxPanel - 1) / cpu::kAmxPanel;
  at::Tensor held;
  int8_t* packed = reinterpret_cast<int8_t*>(
      workspace(static_cast<std::size_t>(panels * cpu::amx_panel_bytes(args.K)), held));
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    kt.int8_pack_panels(args.a, args.lda, args.M, args.K, packed, p0, p1);
  });
  args.a_panels = packed;
  parallel_tile_blocks(
      args.M, args.N, kBlockM_Amx, kBlockN_Amx,
      [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { kt.int8_gemm(args, m0, m1, n0, n1); });
}

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCHSLIM_CHECK(a.dim() == 2, "a must be 2-D (M, K), got ", a.dim(), "-D");
  const int64_t M = a.size(0), K = a.size(1);
  check_int8_matrix(a, "a", K);
  check_q8_k(K, "a");
  check_int8_matrix(b, "b", K);
  const int64_t N = b.size(0);
  // The AVX2 kernel negates activation codes (see cpu/simd.h); -128 has no negation in int8.
  TORCHSLIM_CHECK(a.numel() == 0 || a.min().item<int8_t>() > -128,
                  "a must hold symmetric int8 codes in [-127, 127], got -128");
  at::Tensor out = at::empty({M, N}, a.options().dtype(at::kInt));
  run_int8_gemm({a.data_ptr<int8_t>(), a.stride(0), b.data_ptr<int8_t>(), b.stride(0), nullptr,
                 nullptr, nullptr, out.data_ptr(), N, ScalarType::kInt32, M, N, K});
  return out;
}

// The checked operands of a linear op: x (M, K), w_q (N, K), fp32 scale and bias, and the
// (M, N) output in x's dtype.
struct LinearOperands {
  ScalarType x_type;
  int64_t M, N, K;
  at::Tensor w_scale, out, bias_held;
  const float* bias = nullptr;  // bias_operand
};

LinearOperands linear_operands(const at::Tensor& x, const at::Tensor& w_q,
                               const at::Tensor& w_scale, const std::optional<at::Tensor>& bias) {
  check_activation(x, "x");
  LinearOperands op;
  op.x_type = float_type(x, "x");
  op.M = x.size(0);
  op.K = x.size(1);
  op.N = w_q.size(0);
  check_int8_matrix(w_q, "w_q", op.K);
  op.w_scale = scale_operand(w_scale, op.N);
  op.bias = bias_operand(bias, op.N, op.bias_held);
  op.out = at::empty({op.M, op.N}, x.options());
  return op;
}

at::Tensor int8_dynamic_linear_cpu(const at::Tensor& x, const at::Tensor& w_q,
                                   const at::Tensor& w_scale,
                                   const std::optional<at::Tensor>& bias) {
  const LinearOperands op = linear_operands(x, w_q, w_scale, bias);
  check_q8_k(op.K, "x");
  if (op.M == 0 || op.N == 0) return op.out;
  // x's codes and scales in the second workspace slot (the tile unit's panels take the first).
  at::Tensor held;
  const std::size_t code_bytes = align_up(static_cast<std::size_t>(op.M * op.K));
  uint8_t* scratch = workspace(code_bytes + op.M * sizeof(float), held, Slot::kSecond);
  auto* x_q = reinterpret_cast<int8_t*>(scratch);
  auto* x_scale = reinterpret_cast<float*>(scratch + code_bytes);
  quantize_rows_into(x, x_q, op.K, x_scale);
  run_int8_gemm({x_q, op.K, w_q.data_ptr<int8_t>(), w_q.stride(0), x_scale,
                 op.w_scale.data_ptr<float>(), op.bias, op.out.data_ptr(), op.N, op.x_type, op.M,
                 op.N, op.K});
  return op.out;
}

at::Tensor int8_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& w_q,
                                       const at::Tensor& w_scale,
                                       const std::optional<at::Tensor>& bias) {
  const LinearOperands op = linear_operands(x, w_q, w_scale, bias);
  if (op.M == 0 || op.N == 0) return op.out;
  cpu::W8A16Args args{.ldx = x.stride(0),
                      .w = w_q.data_ptr<int8_t>(),
                      .ldw = w_q.stride(0),
                      .w_scale = op.w_scale.data_ptr<float>(),
                      .bias = op.bias,
                      .out = op.out.data_ptr(),
                      .ldo = op.N,
                      .out_type = op.x_type,
                      .M = op.M,
                      .N = op.N,
                      .K = op.K};
  const cpu::KernelTable& kt = cpu::active_kernels();
  if (op.x_type == ScalarType::kBFloat16 && kt.w8a16_pair_gemm != nullptr &&
      op.M >= kt.w8a16_pair_min_m && op.K > 0) {
    // bf16 x as it is, against weight strips of bf16 pairs (cpu/pair_gemm.h).
    args.x_bf16 = static_cast<const uint16_t*>(x.data_ptr());
    parallel_blocks(op.M, op.N, kBlockM_Strips, strip_block_n(op.N, kt.w8a16_pair_cols),
                    [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
                      kt.w8a16_pair_gemm(args, m0, m1, n0, n1);
                    });
    return op.out;
  }
  if (kt.w8a16_pack_panels == nullptr || op.M < kt.w8a16_panel_min_m || op.K == 0) {
    // The vector kernels read fp32 rows: bf16 x is widened once, into the calling thread's
    // workspace (a dispatched to() cost 1-2 us of a 3-20 us decode-sized call).
    at::Tensor held;
    if (op.x_type == ScalarType::kBFloat16) {
      auto* wide = reinterpret_cast<float*>(
          workspace(static_cast<std::size_t>(op.M * op.K) * sizeof(float), held, Slot::kSecond));
      pad_rows(x, op.K, wide);
      args.x = wide;
      args.ldx = op.K;
    } else {
      args.x = x.data_ptr<float>();
    }
    parallel_blocks(op.M, op.N, kBlockM_F32, vector_block_n(op.M, op.N),
                    [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
                      kt.w8a16_gemm(args, m0, m1, n0, n1);
                    });
    return op.out;
  }
  // The panels are packed from x as it is (fp32, or bf16 without a widened copy).
  if (op.x_type == ScalarType::kBFloat16) {
    args.x_bf16 = static_cast<const uint16_t*>(x.data_ptr());
  } else {
    args.x = x.data_ptr<float>();
  }
  // The bf16 tiles: x split into bf16 parts (one for bf16 x, three for fp32), as panels.
  args.x_parts = op.x_type == ScalarType::kBFloat16 ? 1 : 3;
  at::Tensor held;
  args.x_panels = pack_bf16_panels(args, held);
  parallel_tile_blocks(
      op.M, op.N, kBlockM_Bf16, kBlockN_Bf16,
      [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { kt.w8a16_gemm(args, m0, m1, n0, n1); });
  return op.out;
}

void check_group_params(const at::Tensor& t, const char* name, int64_t N, int64_t groups,
                        const at::Tensor& like) {
  check_cpu(t, name);
  TORCHSLIM_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == groups, name,
                  " must have shape (N, K / group_size) = (", N, ", ", groups, "), got ",
                  t.sizes());
  TORCHSLIM_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
  TORCHSLIM_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name,
                       " must have the dtype of scales (", like.scalar_type(), "), got ",
                       t.scalar_type());
}

// W4A16: x (M, K) fp32/bf16, packed_w (N, K/2) uint8 (low nibble = even k), scales and zeros
// (N, K/group_size); group_size -1 means one group per row. Activations are quantized per
// block of 32 (see cpu/kernels.h) and meet the codes in integer dot products.
at::Tensor int4_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& packed_w,
                                       const at::Tensor& scales, const at::Tensor& zeros,
                                       int64_t group_size, const std::optional<at::Tensor>& bias) {
  check_activation(x, "x");
  const ScalarType xt = float_type(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  TORCHSLIM_CHECK(K % 2 == 0, "x must have an even K (two int4 codes per byte), got K=", K);
  check_cpu(packed_w, "packed_w");
  TORCHSLIM_CHECK_TYPE(packed_w.scalar_type() == at::kByte, "packed_w must be uint8, got ",
                       packed_w.scalar_type());
  TORCHSLIM_CHECK(packed_w.dim() == 2 && packed_w.size(1) == K / 2,
                  "packed_w must have shape (N, K / 2) with K / 2 = ", K / 2, ", got ",
                  packed_w.sizes());
  TORCHSLIM_CHECK(packed_w.size(1) <= 1 || packed_w.stride(1) == 1,
                  "packed_w must have unit stride in its last dim, got strides ",
                  packed_w.strides());
  const int64_t N = packed_w.size(0);
  const int64_t G = group_size == -1 ? K : group_size;
  TORCHSLIM_CHECK(group_size == -1 || (G > 0 && K % G == 0 && (G % cpu::kQ8Block == 0 || G == K)),
                  "group_size must be -1 or a multiple of 32 that divides K=", K, ", got ",
                  group_size);
  const int64_t groups = K == 0 ? 0 : K / G;
  const ScalarType st = any_float_type(scales, "scales");
  check_group_params(scales, "scales", N, groups, scales);
  check_group_params(zeros, "zeros", N, groups, scales);
  at::Tensor bias_held;
  const float* b = bias_operand(bias, N, bias_held);

  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return b ? out.copy_(bias->to(at::kFloat).expand({M, N})) : out.zero_();

  const cpu::KernelTable& kt = cpu::active_kernels();
  const int64_t blocks = (K + cpu::kQ8Block - 1) / cpu::kQ8Block;
  cpu::W4GemmArgs args{nullptr,
                       K,
                       nullptr,
                       blocks,
                       nullptr,
                       groups,
                       nullptr,
                       0,
                       packed_w.data_ptr<uint8_t>(),
                       packed_w.stride(0),
                       scales.data_ptr(),
                       zeros.data_ptr(),
                       groups,
                       st,
                       b,
                       out.data_ptr(),
                       N,
                       xt,
                       M,
                       N,
                       K,
                       G};
  cpu::Q8BlockArgs qa{x.data_ptr(), x.stride(0), xt,      nullptr, K, nullptr, blocks,
                      nullptr,      groups,      nullptr, 0,       K, G};
  if (kt.w4_bf16_min_m != nullptr && M >= kt.w4_bf16_min_m(cpu::q8_run(K, G), N)) {
    // The bf16 tiles: x (fp32 or bf16, as it is) rounded to bf16 into panels; each weight strip
    // dequantized to bf16 once per block of rows.
    const bool bf16 = xt == ScalarType::kBFloat16;
    const cpu::W8A16Args pack{
        .x = bf16 ? nullptr : x.data_ptr<float>(),
        .ldx = x.stride(0),
        .out_type = xt,
        .M = M,
        .N = N,
        .K = K,
        .x_parts = 1,
        .x_bf16 = bf16 ? static_cast<const uint16_t*>(x.data_ptr()) : nullptr};
    at::Tensor held;
    args.x_bf16_panels = pack_bf16_panels(pack, held);
    parallel_tile_blocks(
        M, N, kBlockM_W4Bf16, kBlockN_Bf16,
        [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { kt.w4_gemm(args, m0, m1, n0, n1); });
    return out;
  }
  if (kt.w4_pack_panels != nullptr && M >= kt.w4_panel_min_m(cpu::q8_run(K, G))) {
    // The tile unit: the activation quantized straight into panels of codes, block scales and
    // group sums.
    const int64_t panels = (M + cpu::kAmxPanel - 1) / cpu::kAmxPanel;
    const std::size_t code_bytes = align_up(panels * cpu::amx_panel_bytes(K));
    const std::size_t scale_bytes =
        align_up(panels * cpu::w4_panel_scale_floats(K) * sizeof(float));
    at::Tensor held;
    uint8_t* base = workspace(
        code_bytes + scale_bytes + panels * groups * cpu::kAmxPanel * sizeof(float), held);
    int8_t* codes = reinterpret_cast<int8_t*>(base);
    float* panel_scales = reinterpret_cast<float*>(base + code_bytes);
    float* panel_sums = reinterpret_cast<float*>(base + code_bytes + scale_bytes);
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      kt.w4_pack_panels(qa, M, codes, panel_scales, panel_sums, p0, p1);
    });
    args.panel_codes = codes;
    args.panel_scales = panel_scales;
    args.panel_group_sums = panel_sums;
    parallel_tile_blocks(
        M, N, kBlockM_W4Amx, kBlockN_Amx,
        [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { kt.w4_gemm(args, m0, m1, n0, n1); });
    return out;
  }
  // The activation's Q8 blocks: codes, block scales, group sums, lane biases.
  const int64_t lanes = (K + cpu::kQ4Chunk - 1) / cpu::kQ4Chunk * cpu::kQ4Lanes;
  const std::size_t q_bytes = align_up(M * K), s_bytes = align_up(M * blocks * sizeof(float)),
                    g_bytes = align_up(M * groups * sizeof(float));
  at::Tensor held;
  uint8_t* scratch = workspace(q_bytes + s_bytes + g_bytes + M * lanes * sizeof(int32_t), held);
  qa.q = reinterpret_cast<int8_t*>(scratch);
  qa.scale = reinterpret_cast<float*>(scratch + q_bytes);
  qa.group_sum = reinterpret_cast<float*>(scratch + q_bytes + s_bytes);
  qa.lane_bias = reinterpret_cast<int32_t*>(scratch + q_bytes + s_bytes + g_bytes);
  qa.ldb = lanes;
  args.xq = qa.q;
  args.x_scale = qa.scale;
  args.x_group_sum = qa.group_sum;
  args.x_lane_bias = qa.lane_bias;
  args.ldxb = lanes;
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K),
                   [&](int64_t m0, int64_t m1) { kt.quantize_q8_blocks(qa, m0, m1); });
  args.int8_strips = kt.w4_strip_min_m != nullptr && M >= kt.w4_strip_min_m(cpu::q8_run(K, G)) &&
                     K % cpu::kQ4Chunk == 0;
  if (args.int8_strips) {
    parallel_blocks(
        M, N, kBlockM_Strips, strip_block_n(N, kt.int8_strip_cols),
        [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { kt.w4_gemm(args, m0, m1, n0, n1); });
    return out;
  }
  parallel_blocks(
      M, N, kBlockM_I8, vector_block_n(M, N),
      [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { kt.w4_gemm(args, m0, m1, n0, n1); });
  return out;
}

// ----------------------------------------------------------------------------------------------
// The CPU impls of torch.ops.torchslim: each takes the op's arguments as the Python impl does
// (x with any leading dims), runs the kernel when it can prove the arguments valid and the
// automatic choice is the CPU kernel, and calls the Python impl otherwise (see registry.h).
// The conditions below are those of the Python checks and of the "cpu" kernel's supports().

std::tuple<at::Tensor, at::Tensor> quantize_per_token_op(const at::Tensor& x) {
  if (!registry::automatic("cpu") || !is_cpu_float(x) || x.dim() < 1) {
    return registry::call_python<std::tuple<at::Tensor, at::Tensor>>("quantize_per_token", x);
  }
  auto [q, scale] = quantize_per_token_cpu(rows(x));
  return {q.view(x.sizes()), scale.view(x.sizes().slice(0, x.dim() - 1))};
}

at::Tensor int8_mm_op(const at::Tensor& a, const at::Tensor& b) {
  if (!registry::automatic("cpu") || !is_cpu_matrix(a, at::kChar) || !is_cpu_matrix(b, at::kChar) ||
      b.size(1) != a.size(1)) {
    return registry::call_python<at::Tensor>("int8_mm", a, b);
  }
  return int8_mm_cpu(rows(a), unit_last_stride(b));
}

template <at::Tensor (*Kernel)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const OptTensor&)>
at::Tensor int8_linear_op(const char* op, const at::Tensor& x, const at::Tensor& w_q,
                          const at::Tensor& w_scale, const OptTensor& bias) {
  const bool fast = registry::automatic("cpu") && is_cpu_float(x) && x.dim() >= 1 &&
                    is_cpu_matrix(w_q, at::kChar) && w_q.size(1) == x.size(-1) &&
                    is_cpu_vector(w_scale, at::kFloat, w_q.size(0)) && is_bias(bias, w_q.size(0));
  if (!fast) return registry::call_python<at::Tensor>(op, x, w_q, w_scale, bias);
  return unflatten(Kernel(rows(x), unit_last_stride(w_q), w_scale.contiguous(), bias), x);
}

at::Tensor int8_dynamic_linear_op(const at::Tensor& x, const at::Tensor& w_q,
                                  const at::Tensor& w_scale, const OptTensor& bias) {
  return int8_linear_op<int8_dynamic_linear_cpu>("int8_dynamic_linear", x, w_q, w_scale, bias);
}

at::Tensor int8_weight_only_linear_op(const at::Tensor& x, const at::Tensor& w_q,
                                      const at::Tensor& w_scale, const OptTensor& bias) {
  return int8_linear_op<int8_weight_only_linear_cpu>("int8_weight_only_linear", x, w_q, w_scale,
                                                     bias);
}

// group_size: -1, or an even size dividing K that the kernel takes (a multiple of its Q8 block,
// or K itself).
bool is_cpu_group_size(int64_t group_size, int64_t K) {
  if (group_size == -1) return true;
  return group_size >= 2 && group_size % 2 == 0 && K % group_size == 0 &&
         (group_size % cpu::kQ8Block == 0 || group_size == K);
}

bool is_group_params(const at::Tensor& t, at::ScalarType dtype, int64_t N, int64_t groups) {
  return t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == N &&
         t.size(1) == groups;
}

at::Tensor int4_weight_only_linear_op(const at::Tensor& x, const at::Tensor& packed_w,
                                      const at::Tensor& scales, const at::Tensor& zeros,
                                      int64_t group_size, const OptTensor& bias) {
  const int64_t K = x.dim() >= 1 ? x.size(-1) : 0;
  const at::ScalarType st = scales.scalar_type();
  bool fast = registry::automatic("cpu") && is_cpu_float(x) && K > 0 && K % 2 == 0 &&
              is_cpu_group_size(group_size, K) && is_cpu_matrix(packed_w, at::kByte) &&
              packed_w.size(1) == K / 2 &&
              (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf);
  if (fast) {
    const int64_t N = packed_w.size(0), groups = K / (group_size == -1 ? K : group_size);
    fast = is_group_params(scales, st, N, groups) && is_group_params(zeros, st, N, groups) &&
           is_bias(bias, N);
  }
  if (!fast) {
    return registry::call_python<at::Tensor>("int4_weight_only_linear", x, packed_w, scales, zeros,
                                             group_size, bias);
  }
  return unflatten(
      int4_weight_only_linear_cpu(rows(x), unit_last_stride(packed_w), scales.contiguous(),
                                  zeros.contiguous(), group_size, bias),
      x);
}

// Key splits per work item for split-KV: only for a few query rows (decode, short chunks) when
// there are too few items to give every thread several, and never below 4 key tiles a split.
int64_t attention_kv_splits(int64_t items, int64_t Sq, int64_t Sk) {
  if (Sq > 16 || items == 0) return 1;
  const int64_t want = (4 * at::get_num_threads() + items - 1) / items;
  const int64_t most = Sk / (4 * cpu::kAttnBlockK);
  return std::max<int64_t>(1, std::min(want, most));
}

// Whether the tile kernel's key/value heads go to the threads whole (each packs a head and runs
// its items; attention_cpu), rather than packed by all threads a wave at a time and their items
// shared: with one key split, heads that share out evenly (or many of them), and every thread's
// head in the reused workspace (fresh pages would cost more than the tiles read from the core's
// own cache save).
bool attention_head_tasks(int64_t heads, int64_t threads, int64_t head_bytes, int64_t splits) {
  return splits == 1 && threads * head_bytes <= static_cast<int64_t>(kWorkspaceMax) &&
         heads >= threads && (heads % threads == 0 || heads >= 4 * threads);
}

// A query row holding a NaN gives NaN outputs, as softmax does in PyTorch's attention: the
// kernels' online softmax takes a row of scores that are all NaN for a row that has seen no key
// yet and gives it zeros. Only a row of zeros is looked at again (its first output is read, a
// load a row: a pass over q cost 1.4 ms of a 6 ms bf16 prefill at S = 512).
void nan_where_q_is_nan(const at::Tensor& q, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Dv = out.size(3);
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  // |v| as bits: 0 for a zero, above inf's for a NaN (bf16: the top half of fp32's).
  const auto abs_bits = [bf16](const void* p, int64_t i) -> uint32_t {
    if (bf16) return static_cast<const uint16_t*>(p)[i] & 0x7fffu;
    uint32_t u;
    __builtin_memcpy(&u, static_cast<const float*>(p) + i, sizeof u);
    return u & 0x7fffffffu;
  };
  const uint32_t inf = bf16 ? 0x7f80u : 0x7f800000u;
  const auto* o = static_cast<const char*>(out.data_ptr());
  const auto* qd = static_cast<const char*>(q.data_ptr());
  const int64_t size = static_cast<int64_t>(q.element_size());
  for (int64_t r = 0; r < B * H * Sq; ++r) {  // out is contiguous (B, H, Sq, Dv)
    const void* orow = o + r * Dv * size;
    bool zeros = true;
    for (int64_t d = 0; d < Dv && zeros; ++d) zeros = abs_bits(orow, d) == 0;
    if (!zeros) continue;
    const int64_t b = r / (H * Sq), h = r / Sq % H, i = r % Sq;
    const void* qrow = qd + (b * q.stride(0) + h * q.stride(1) + i * q.stride(2)) * size;
    bool nan = false;
    for (int64_t d = 0; d < D; ++d) nan |= abs_bits(qrow, d * q.stride(3)) > inf;
    if (nan) out[b][h][i].fill_(std::numeric_limits<float>::quiet_NaN());
  }
}

// Fused attention (cpu/attention.h): q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), one
// dtype (fp32/bf16); attn_mask bool or float, broadcastable to (B, H, Sq, Sk); window <= 0 for
// none; kv_lens (B,) int. Work items are blocks of up to kAttnBlockQ query rows of one batch
// and of heads that share a key/value head.
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const OptTensor& attn_mask, bool causal, std::optional<double> scale,
                         int64_t window, const OptTensor& kv_lens) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    check_cpu(*t, name);
    TORCHSLIM_CHECK(t->dim() == 4, name, " must be 4-D (B, H, S, D), got ", t->dim(), "-D");
    TORCHSLIM_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ",
                         q.scalar_type(), ", got ", t->scalar_type());
  }
  const ScalarType type = float_type(q, "q");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2), Dv = v.size(3);
  TORCHSLIM_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(1) == Hkv &&
                      v.size(2) == Sk && Hkv > 0 && H % Hkv == 0,
                  "q, k, v must be (B, H, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv) with Hkv "
                  "dividing H, got ",
                  q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  auto unit_d = [](const at::Tensor& t) {
    return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
  };
  const at::Tensor qc = unit_d(q), kc = unit_d(k), vc = unit_d(v);
  at::Tensor mask;
  if (attn_mask.has_value() && attn_mask->defined()) {
    check_cpu(*attn_mask, "attn_mask");
    mask = attn_mask->scalar_type() == at::kBool
               ? at::where(*attn_mask, 0.0f, -std::numeric_limits<float>::infinity())
               : attn_mask->to(at::kFloat);
    mask = mask.expand({B, H, Sq, Sk});
  }
  at::Tensor lens;
  if (kv_lens.has_value() && kv_lens->defined()) {
    check_cpu(*kv_lens, "kv_lens");
    TORCHSLIM_CHECK(kv_lens->dim() == 1 && kv_lens->size(0) == B, "kv_lens must have shape (", B,
                    ",), got ", kv_lens->sizes());
    lens = kv_lens->to(at::kLong).contiguous();
    TORCHSLIM_CHECK(B == 0 || (lens.min().item<int64_t>() >= 0 && lens.max().item<int64_t>() <= Sk),
                    "kv_lens must be in [0, Sk=", Sk, "]");
  }
  at::Tensor out = at::empty({B, H, Sq, Dv}, q.options());
  if (out.numel() == 0) return out;
  if (Sk == 0) {  // no key: every row is a row with no visible key
    out.zero_();
    nan_where_q_is_nan(qc, out);
    return out;
  }
  // Past Sq + Sk a window hides no key: clamped, so the kernels' position arithmetic cannot
  // overflow (a window of 2^63 - 1 zeroed rows).
  const int64_t visible = window > 0 ? std::min(window, Sq + Sk) : 0;
  cpu::AttentionArgs args{
      qc.data_ptr(),
      qc.stride(0),
      qc.stride(1),
      qc.stride(2),
      kc.data_ptr(),
      kc.stride(0),
      kc.stride(1),
      kc.stride(2),
      vc.data_ptr(),
      vc.stride(0),
      vc.stride(1),
      vc.stride(2),
      out.data_ptr(),
      out.stride(0),
      out.stride(1),
      out.stride(2),
      type,
      mask.defined() ? mask.data_ptr<float>() : nullptr,
      mask.defined() ? mask.stride(0) : 0,
      mask.defined() ? mask.stride(1) : 0,
      mask.defined() ? mask.stride(2) : 0,
      mask.defined() ? mask.stride(3) : 0,
      lens.defined() ? lens.data_ptr<int64_t>() : nullptr,
      B,
      H,
      Hkv,
      Sq,
      Sk,
      D,
      Dv,
      static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D))),
      causal,
      visible};
  const cpu::KernelTable& kt = cpu::active_kernels();
  const int64_t work_floats = cpu::attention_work_floats(D, Dv);
  // Work items: up to kAttnBlockQ rows of one batch: nq queries of nh heads that share a key /
  // value head (all G = H / Hkv of them when the queries are few: decode reads each K/V once).
  struct Item {
    int64_t b, h0, nh, i0, i1;
  };
  const int64_t G = H / Hkv, nq0 = std::min(Sq, cpu::kAttnBlockQ);
  const int64_t nh = std::max<int64_t>(1, std::min(G, cpu::kAttnBlockQ / nq0));
  // The kernel on bf16 pairs (the amx level's tiles; VDPBF16PS at the avx512 level on a CPU with
  // AVX512_BF16) takes items of enough rows. A long prefill's items are twice as tall (measured
  // on the tiles), so each packed key and value tile serves more rows, in fp32 (six multiplies a
  // product there: S = 2048, D = 128, 192 against 210 ms) and in bf16 where the item's fp32 output
  // rows take at most 32 KB of L1 (Dv <= 64: B 1, H 32, S 512, D 64, 2.08 ms against 2.32; at D
  // 128, 64 KB of output rows, the same time or up to 5-15% slower).
  const bool tiles = kt.attention_pack != nullptr && cpu::attention_tiles_fit(args) &&
                     nh * nq0 >= kt.attention_tile_min_rows &&
                     (type != ScalarType::kFloat32 || Sq * G >= kt.attention_tile_fp32_min_rows);
  // fp32's items are twice as tall again from Sq = 256, at the price of output rows in L2 (not
  // causal, S 4096, D 128: 661 -> 612 ms; S 512, D 64: 6.40 -> 6.18; causal, S 2048, D 128:
  // 96.5 -> 93.2; items of 512 rows gained at most 2% more).
  // (Never split-KV, which takes Sq <= 16, so `partial` keeps kAttnBlockQ rows an item.)
  constexpr int64_t kTallOutputBytes = 32 << 10;
  int64_t nq = nq0;
  if (tiles && Sq >= 2 * cpu::kAttnBlockQ) {
    if (type == ScalarType::kFloat32) {
      nq = (Sq >= 4 * cpu::kAttnBlockQ ? 4 : 2) * cpu::kAttnBlockQ;
    } else if (2 * cpu::kAttnBlockQ * Dv * static_cast<int64_t>(sizeof(float)) <=
               kTallOutputBytes) {
      nq = 2 * cpu::kAttnBlockQ;
    }
  }
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h0 = 0; h0 < H;) {
      const int64_t heads = std::min(nh, (h0 / G + 1) * G - h0);  // not past the k/v head
      for (int64_t i0 = 0; i0 < Sq; i0 += nq) {
        items.push_back({b, h0, heads, i0, std::min(i0 + nq, Sq)});
      }
      h0 += heads;
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t splits = attention_kv_splits(n_items, Sq, Sk);
  // Items [first, last) with their key splits. Split-KV (a few queries, one block per head
  // group): each (item, split) leaves its rows' (max, sum, unnormalised output) in `partial`,
  // then each item merges its splits.
  const int64_t span = (Sk + splits - 1) / splits, stride = cpu::kAttnBlockQ * (Dv + 2);
  std::vector<float> partial(splits > 1 ? n_items * splits * stride : 0);
  // Threads take the next (item, split) as they finish one, last first: with causal, the last
  // queries see the most keys, and the short items even out the end.
  const auto run = [&](int64_t first, int64_t last) {
    std::atomic<int64_t> next{last * splits};
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), (last - first) * splits);
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      std::vector<float> work(work_floats);
      for (int64_t t = --next; t >= first * splits; t = --next) {
        const Item& it = items[t / splits];
        const int64_t j0 = (t % splits) * span;
        kt.attention(args, it.b, it.h0, it.nh, it.i0, it.i1, j0, std::min(j0 + span, Sk),
                     work.data(), splits > 1 ? partial.data() + t * stride : nullptr);
      }
    });
  };
  const int64_t heads = B * Hkv, n_threads = at::get_num_threads();
  const int64_t keys = tiles ? cpu::attention_tile_keys(Sk) : 0;
  const int64_t parts = tiles ? cpu::attention_tile_parts(type) : 0;
  const int64_t head_elems = parts * keys * (D + Dv);  // one key/value head's tiles
  if (tiles && attention_head_tasks(heads, n_threads, head_elems * 2, splits)) {
    // Each thread takes the next key/value head, packs it into its own buffer and runs every
    // item that reads it (they follow one another in `items`), so the items read tiles their
    // own core has just written. Packed by one thread and read by another, the tiles cost the
    // items more than the packing itself (B 1, H 32, S 512, D 64, bf16, 2 threads: 2.88 ms
    // shared against 2.43 ms as head tasks; the pack alone is 0.18 ms).
    std::vector<int64_t> head_first(heads + 1);
    for (int64_t hd = 0, t = 0; hd <= heads; ++hd) {
      while (t < n_items && items[t].b * Hkv + items[t].h0 / G < hd) ++t;
      head_first[hd] = t;
    }
    at::Tensor held;
    auto* base = reinterpret_cast<uint16_t*>(workspace(2 * n_threads * head_elems, held));
    std::atomic<int64_t> next{heads};
    at::parallel_for(0, n_threads, 1, [&](int64_t slot, int64_t) {
      cpu::AttentionArgs own = args;
      auto* k_tiles = base + slot * head_elems;
      uint16_t* v_tiles = k_tiles + parts * keys * D;
      own.k_tiles = k_tiles;
      own.v_tiles = v_tiles;
      std::vector<float> work(work_floats);
      for (int64_t hd = --next; hd >= 0; hd = --next) {
        kt.attention_pack(own, hd / Hkv, hd % Hkv, 0, keys, k_tiles, v_tiles);
        own.tile_head0 = hd;
        for (int64_t t = head_first[hd + 1] - 1; t >= head_first[hd]; --t) {
          const Item& it = items[t];
          kt.attention(own, it.b, it.h0, it.nh, it.i0, it.i1, 0, Sk, work.data(), nullptr);
        }
      }
    });
  } else if (tiles) {
    // The tile layouts of a wave of key/value heads at a time, in a buffer reused from wave to
    // wave (and call to call, up to kWorkspaceMax): each head is packed once for all the items
    // that read it, which follow one another in `items`.
    const int64_t chunk = 2 * cpu::kAttnTileBlockK;
    const int64_t chunks = (keys + chunk - 1) / chunk;
    const int64_t wave =
        std::clamp<int64_t>(static_cast<int64_t>(kWorkspaceMax) / (2 * head_elems), 1, heads);
    at::Tensor held;
    auto* k_tiles = reinterpret_cast<uint16_t*>(workspace(2 * wave * head_elems, held));
    uint16_t* v_tiles = k_tiles + wave * parts * keys * D;
    args.k_tiles = k_tiles;
    args.v_tiles = v_tiles;
    int64_t first = 0;
    for (int64_t h0 = 0; h0 < heads; h0 += wave) {
      const int64_t n = std::min(wave, heads - h0);
      at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t h = t / chunks, j0 = t % chunks * chunk;
          kt.attention_pack(args, (h0 + h) / Hkv, (h0 + h) % Hkv, j0, std::min(j0 + chunk, keys),
                            k_tiles + h * parts * keys * D, v_tiles + h * parts * keys * Dv);
        }
      });
      args.tile_head0 = h0;
      int64_t last = first;
      while (last < n_items && items[last].b * Hkv + items[last].h0 / G < h0 + n) ++last;
      run(first, last);
      first = last;
    }
  } else {
    run(0, n_items);
  }
  if (splits == 1) {
    nan_where_q_is_nan(qc, out);
    return out;
  }
  constexpr float kNoKey = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(Dv);
    for (int64_t t = begin; t < end; ++t) {
      const Item& it = items[t];
      const int64_t rows_q = it.i1 - it.i0;
      for (int64_t r = 0; r < it.nh * rows_q; ++r) {
        const float* part = partial.data() + t * splits * stride + r * (Dv + 2);
        float top = kNoKey;
        for (int64_t s = 0; s < splits; ++s) top = std::max(top, part[s * stride]);
        std::fill(acc.begin(), acc.end(), 0.0f);
        float sum = 0.0f;
        for (int64_t s = 0; top != kNoKey && s < splits; ++s) {
          const float* ps = part + s * stride;
          if (ps[0] == kNoKey) continue;  // a split that saw no key
          const float w = std::exp(ps[0] - top);
          sum += w * ps[1];
          for (int64_t d = 0; d < Dv; ++d) acc[d] += w * ps[2 + d];
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        const int64_t row = it.b * out.stride(0) + (it.h0 + r / rows_q) * out.stride(1) +
                            (it.i0 + r % rows_q) * out.stride(2);
        if (type == ScalarType::kBFloat16) {
          at::BFloat16* o = out.data_ptr<at::BFloat16>() + row;
          for (int64_t d = 0; d < Dv; ++d) o[d] = acc[d] * inv;
        } else {
          float* o = out.data_ptr<float>() + row;
          for (int64_t d = 0; d < Dv; ++d) o[d] = acc[d] * inv;
        }
      }
    }
  });
  nan_where_q_is_nan(qc, out);
  return out;
}

// What attention_cpu takes as the Python impl would (torchslim/ops/attention.py); anything else
// goes to the Python impl, which raises or runs the reference.
bool is_attention_input(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const OptTensor& attn_mask, bool causal, std::optional<double> scale,
                        int64_t window, const OptTensor& kv_lens) {
  if (!is_cpu_float(q) || q.dim() != 4) return false;
  for (const at::Tensor* t : {&k, &v}) {
    if (!t->device().is_cpu() || t->scalar_type() != q.scalar_type() || t->dim() != 4) {
      return false;
    }
  }
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), Sk = k.size(2);
  if (k.size(0) != B || v.size(0) != B || k.size(3) != q.size(3) || v.size(1) != Hkv ||
      v.size(2) != Sk || Hkv == 0 || H % Hkv != 0) {
    return false;
  }
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    const at::ScalarType mt = m.scalar_type();
    if (!m.device().is_cpu() || m.dim() > 4 ||
        !(mt == at::kBool || mt == at::kFloat || mt == at::kBFloat16 || mt == at::kHalf)) {
      return false;
    }
    const int64_t want[4] = {B, H, q.size(2), Sk};
    for (int64_t d = 0; d < m.dim(); ++d) {
      const int64_t size = m.size(m.dim() - 1 - d), target = want[3 - d];
      if (size != target && size != 1) return false;
    }
  }
  if (kv_lens.has_value() &&
      !(kv_lens->device().is_cpu() && kv_lens->dim() == 1 && kv_lens->size(0) == B &&
        (kv_lens->scalar_type() == at::kInt || kv_lens->scalar_type() == at::kLong))) {
    return false;
  }
  return (!scale.has_value() || std::isfinite(*scale)) && (window == -1 || (window > 0 && causal));
}

at::Tensor attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const OptTensor& attn_mask, bool causal, std::optional<double> scale,
                        int64_t window, const OptTensor& kv_lens) {
  if (!registry::automatic("cpu") ||
      !is_attention_input(q, k, v, attn_mask, causal, scale, window, kv_lens)) {
    return registry::call_python<at::Tensor>("attention", q, k, v, attn_mask, causal, scale, window,
                                             kv_lens);
  }
  return attention_cpu(q, k, v, attn_mask, causal, scale, window, kv_lens);
}

}  // namespace

void bind_cpu(pybind11::module_& m) {
  m.def("quantize_per_token_cpu", &quantize_per_token_cpu, "x (M, K) fp32/bf16 -> (q, scale)",
        pybind11::arg("x"));
  m.def("int8_mm_cpu", &int8_mm_cpu, "a (M, K) int8, b (N, K) int8 -> (M, N) int32",
        pybind11::arg("a"), pybind11::arg("b"));
  m.def("int8_dynamic_linear_cpu", &int8_dynamic_linear_cpu, "W8A8 dynamic linear",
        pybind11::arg("x"), pybind11::arg("w_q"), pybind11::arg("w_scale"),
        pybind11::arg("bias") = pybind11::none());
  m.def("int8_weight_only_linear_cpu", &int8_weight_only_linear_cpu, "W8A16 linear",
        pybind11::arg("x"), pybind11::arg("w_q"), pybind11::arg("w_scale"),
        pybind11::arg("bias") = pybind11::none());
  m.def("int4_weight_only_linear_cpu", &int4_weight_only_linear_cpu,
        "W4A16 linear (activations in Q8 blocks of 32)", pybind11::arg("x"),
        pybind11::arg("packed_w"), pybind11::arg("scales"), pybind11::arg("zeros"),
        pybind11::arg("group_size"), pybind11::arg("bias") = pybind11::none());
  m.def("attention_cpu", &attention_cpu, "fused attention (online softmax over key tiles)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("attn_mask") = pybind11::none(), pybind11::arg("causal") = false,
        pybind11::arg("scale") = pybind11::none(), pybind11::arg("window") = -1,
        pybind11::arg("kv_lens") = pybind11::none());
}

}  // namespace torchslim

TORCH_LIBRARY_IMPL(torchslim, CPU, m) {
  m.impl("quantize_per_token", &torchslim::quantize_per_token_op);
  m.impl("int8_mm", &torchslim::int8_mm_op);
  m.impl("int8_dynamic_linear", &torchslim::int8_dynamic_linear_op);
  m.impl("int8_weight_only_linear", &torchslim::int8_weight_only_linear_op);
  m.impl("int4_weight_only_linear", &torchslim::int4_weight_only_linear_op);
  m.impl("attention", &torchslim::attention_op);
}

// Gradients for x and bias (torchslim/ops/_autograd.py), and inference without the Python
// Autograd kernel's cost.
TORCH_LIBRARY_IMPL(torchslim, AutogradCPU, m) {
  m.impl("int8_dynamic_linear", torchslim::registry::linear_autograd());
  m.impl("int8_weight_only_linear", torchslim::registry::linear_autograd());
  m.impl("int4_weight_only_linear", torchslim::registry::linear_autograd());
}
