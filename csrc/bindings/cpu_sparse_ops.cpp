// Torch binding of the sparse CPU kernels (cpu/sparse_gemm.h): the 2:4, bitmask, csr and block
// linear ops, as torchslim._C functions (2-D x) and as the CPU impls of torch.ops.torchslim (any
// leading dims, Python fallback: see registry.h).
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "bindings/cpu_common.h"
#include "bindings/registry.h"
#include "cpu/kernels.h"
#include "torchslim/checks.h"

namespace torchslim {
namespace {

using namespace cpu_bindings;

// Rows of x per block (fp32 rows of K stay in L2) and weight rows per block. The SpMM takes
// bigger blocks: each slice of the block's weight rows serves 16 panels of x (see
// sparse_gemm.h), and each x panel read from L3 serves 64 weight rows.
constexpr int64_t kBlockM = 32;
constexpr int64_t kBlockN = 16;
constexpr int64_t kSpmmBlockM = 256;
constexpr int64_t kSpmmBlockN = 64;
// W8A8 on strips (SparseGemmArgs::q8_strips: 2:4, bitmask, sliced) lays out each strip of weight
// rows once per block of x's rows, as the dense W8A8 strips do (cpu_ops.cpp): blocks of their size.
constexpr int64_t kStripBlockM = 128;
constexpr int64_t kStripBlockN = 64;
// The csr format's widest x: int16 bases in units of 8 columns.
constexpr int64_t kCsrMaxK = int64_t{8} << 15;

int64_t mask_bytes(int64_t K) { return (K + 7) / 8; }
int64_t kept_24(int64_t K) { return 2 * ((K + 3) / 4); }

void check_rows(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t cols) {
  check_cpu(t, name);
  TORCHSLIM_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ",
                       t.scalar_type());
  TORCHSLIM_CHECK(t.dim() == 2 && t.size(1) == cols, name, " must be 2-D with ", cols,
                  " columns, got shape ", t.sizes());
  TORCHSLIM_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name,
                  " must have unit stride in its last dim, got strides ", t.strides());
}

// Row offsets (N + 1 of them) into `limit` entries: from 0, non-decreasing, at most the limit.
void check_offsets(const int64_t* off, int64_t N, int64_t limit, const char* name,
                   const char* limit_name) {
  TORCHSLIM_CHECK(off[0] == 0, name, " must start at 0, got ", off[0]);
  for (int64_t n = 0; n < N; ++n) {
    TORCHSLIM_CHECK(off[n] <= off[n + 1] && off[n + 1] <= limit, name,
                    " must be non-decreasing and at most ", limit_name, " = ", limit, ", got ",
                    name, "[", n, "] = ", off[n], ", ", name, "[", n + 1, "] = ", off[n + 1]);
  }
}

// The values' element type: a float type, or int8 codes (which need scales).
ScalarType value_type(const at::Tensor& values) {
  switch (values.scalar_type()) {
    case at::kChar:
      return ScalarType::kInt8;
    case at::kFloat:
    case at::kBFloat16:
    case at::kHalf:
      return any_float_type(values, "values");
    default:
      TORCHSLIM_CHECK_TYPE(false, "values must be float32, bfloat16, float16 or int8, got ",
                           values.scalar_type());
  }
  return ScalarType::kFloat32;
}

// The arguments every format shares: x (M, K) widened to fp32, the output, bias, scales, and x
// packed in transposed panels when M > kSpMaxTileM (the SpMM kernels'). What lives only inside
// the call (x padded, widened or quantized at decode sizes, the bias widened) is in the calling
// thread's workspace; `held` keeps what outgrows it.
struct SparseOperands {
  at::Tensor x, scales, out, panels, x_bf16, held, held_second, bias_held;
  cpu::SparseGemmArgs args;

  // The kernel over every (rows of x, weight rows) block, the SpMM's blocks with more weight
  // rows: each panel, read from L3, serves them all.
  template <class Kernel>
  void run(const Kernel& kernel) {
    run(kernel, panels.defined() ? kSpmmBlockN : kBlockN);
  }
  template <class Kernel>
  void run(const Kernel& kernel, int64_t block_n) {
    run(kernel, panels.defined() ? kSpmmBlockM : kBlockM, block_n);
  }
  template <class Kernel>
  void run(const Kernel& kernel, int64_t block_m, int64_t block_n) {
    parallel_blocks(
        args.M, args.N, block_m, block_n,
        [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { kernel(args, m0, m1, n0, n1); });
  }
};

// dot_columns > 0: the dot kernels (M <= kSpMaxTileM) read x padded to that width (pad_rows):
// in bf16 when bf16_dot is set and x is bf16 (args.x_bf16; args.x is then null), else in fp32.
// q8: x quantized per token into rows dot_columns wide (args.x_q8, any M; no panels).
SparseOperands sparse_operands(const at::Tensor& x, const at::Tensor& values, int64_t N,
                               const OptTensor& bias, const OptTensor& scales,
                               int64_t dot_columns = 0, bool bf16_dot = false, bool q8 = false) {
  check_activation(x, "x");
  const ScalarType out_type = float_type(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  SparseOperands op;
  op.args = {};
  const auto scratch = [&](int64_t bytes) {
    return workspace(static_cast<std::size_t>(bytes), op.held);
  };
  const bool dot = M <= cpu::kSpMaxTileM;
  if (q8) {
    const std::size_t code_bytes = align_up(static_cast<std::size_t>(M * dot_columns));
    uint8_t* base = scratch(code_bytes + M * sizeof(float));
    op.args.x_q8 = reinterpret_cast<int8_t*>(base);
    op.args.ldx_q8 = dot_columns;
    op.args.x_scales = reinterpret_cast<float*>(base + code_bytes);
    quantize_rows_into(x, reinterpret_cast<int8_t*>(base), dot_columns,
                       reinterpret_cast<float*>(base + code_bytes));
  } else if (dot && dot_columns > 0 && bf16_dot && x.scalar_type() == at::kBFloat16) {
    auto* padded = reinterpret_cast<at::BFloat16*>(scratch(M * dot_columns * 2));
    pad_rows(x, dot_columns, padded);
    op.args.x_bf16 = reinterpret_cast<const uint16_t*>(padded);
    op.args.ldx_bf16 = dot_columns;
  } else if (dot && (dot_columns > 0 || x.scalar_type() == at::kBFloat16)) {
    const int64_t columns = dot_columns > 0 ? dot_columns : K;
    auto* padded = reinterpret_cast<float*>(scratch(M * columns * 4));
    pad_rows(x, columns, padded);
    op.args.x = padded;
    op.args.ldx = columns;
  } else {
    op.x = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat).contiguous();
    op.args.x = op.x.data_ptr<float>();
    op.args.ldx = op.x.stride(0);
  }
  op.args.bias = bias_operand(bias, N, op.bias_held);
  op.out = at::empty({M, N}, x.options());
  check_cpu(values, "values");
  // An empty tensor's data pointer may be null, which the kernels' value walks return for a row
  // whose mask or groups ask for more values than there are: a row of set bits over no values
  // would read as well formed. No value is read through this one.
  static const int64_t no_values = 0;
  op.args.values = values.numel() ? values.data_ptr() : &no_values;
  op.args.v_type = value_type(values);
  if (scales.has_value() && scales->defined()) {
    check_cpu(*scales, "scales");
    TORCHSLIM_CHECK_TYPE(scales->scalar_type() == at::kFloat, "scales must be float32, got ",
                         scales->scalar_type());
    TORCHSLIM_CHECK(scales->dim() == 1 && scales->size(0) == N, "scales must have shape (N,) = (",
                    N, ",), got ", scales->sizes());
    op.scales = scales->contiguous();
    op.args.scales = op.scales.data_ptr<float>();
  }
  // (An empty tensor's data pointer may be null: N = 0 has its scales.)
  TORCHSLIM_CHECK(op.scales.defined() || op.args.v_type != ScalarType::kInt8,
                  "int8 values need scales (N,) float32, got scales=None");
  op.args.out = op.out.data_ptr();
  op.args.ldo = N;
  op.args.out_type = out_type;
  op.args.M = M;
  op.args.N = N;
  op.args.K = K;
  if (!dot && !q8) {  // (P, K, kSpPanel): x transposed, zeros past M
    const int64_t P = (M + cpu::kSpPanel - 1) / cpu::kSpPanel;
    at::Tensor padded = at::zeros({P * cpu::kSpPanel, K}, op.x.options());
    padded.narrow(0, 0, M).copy_(op.x);
    op.panels = padded.view({P, cpu::kSpPanel, K}).transpose(1, 2).contiguous();
    op.args.panels = op.panels.data_ptr<float>();
  }
  return op;
}

// Checks the W8A8 ops' values and K (q8: x quantized per token, int8 codes).
void check_q8(const at::Tensor& values, int64_t K) {
  TORCHSLIM_CHECK_TYPE(values.scalar_type() == at::kChar,
                       "values must be int8 codes for a W8A8 linear, got ", values.scalar_type());
  check_q8_k(K, "x");
}

// 2:4: x (M, K) fp32/bf16; values (N, 2 * ceil(K / 4)) fp32/bf16/fp16/int8; meta
// (N, ceil(K / 8)) uint8; bias (N,) or None; scales (N,) fp32 or None (needed for int8 values).
// With q8 (int8 values only) x is quantized per token and meets the codes in integer sums (the
// W8A8 rule).
at::Tensor sparse24_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                           const OptTensor& bias, const OptTensor& scales, bool q8) {
  TORCHSLIM_CHECK(x.dim() == 2, "x must be 2-D (M, K), got ", x.dim(), "-D");
  const int64_t K = x.size(1);
  TORCHSLIM_CHECK(values.dim() == 2, "values must be 2-D (N, 2 * ceil(K / 4)), got ", values.dim(),
                  "-D");
  const int64_t N = values.size(0);
  if (q8) check_q8(values, K);
  SparseOperands op =
      sparse_operands(x, values, N, bias, scales, q8 ? cpu::sp24_q8_padded_k(K) : 0, false, q8);
  TORCHSLIM_CHECK(values.size(1) == kept_24(K), "values must have 2 * ceil(K / 4) = ", kept_24(K),
                  " columns, got shape ", values.sizes());
  TORCHSLIM_CHECK(values.size(1) <= 1 || values.stride(1) == 1,
                  "values must have unit stride in its last dim, got strides ", values.strides());
  check_rows(meta, "meta", at::kByte, mask_bytes(K));
  TORCHSLIM_CHECK(meta.size(0) == N, "meta must have N = ", N, " rows, got ", meta.size(0));
  op.args.ldv = values.stride(0);
  op.args.meta = meta.data_ptr<uint8_t>();
  op.args.ldm = meta.stride(0);
  const cpu::KernelTable& kt = cpu::active_kernels();  // once: x's order is this table's
  const auto order_x = kt.sparse24_order_x;
  if (!q8 && order_x != nullptr && !op.panels.defined()) {  // the dot kernels' column order
    auto* ordered = reinterpret_cast<float*>(workspace(
        static_cast<std::size_t>(op.args.M * K) * sizeof(float), op.held_second, Slot::kSecond));
    order_x(op.args.x, op.args.ldx, ordered, op.args.M, K);
    op.args.x = ordered;
    op.args.ldx = K;
  }
  op.args.q8_strips = q8 && op.args.M >= kt.sparse24_q8_strip_min_m;
  if (op.args.q8_strips) {
    op.run(kt.sparse24_gemm, kStripBlockM, balanced_block_n(N, kStripBlockN));
  } else {
    op.run(kt.sparse24_gemm);
  }
  return op.out;
}

at::Tensor sparse24_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                               const at::Tensor& meta, const OptTensor& bias,
                               const OptTensor& scales) {
  return sparse24_linear(x, values, meta, bias, scales, false);
}

// W8A8 (torchslim.reference.sparse24_dynamic_linear): int8 values, scales (N,) fp32.
at::Tensor sparse24_dynamic_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                                       const at::Tensor& meta, const at::Tensor& scales,
                                       const OptTensor& bias) {
  return sparse24_linear(x, values, meta, bias, scales, true);
}

// Bitmask: x (M, K) fp32/bf16; values (nnz,) fp32/bf16/fp16/int8 contiguous; mask
// (N, ceil(K / 8)) uint8; row_offsets (N + 1,) int64 from 0, non-decreasing, at most nnz; bias
// and scales as for 2:4. With q8 (int8 values only) x is quantized per token and meets the codes
// in integer sums (the W8A8 rule).
at::Tensor bitmask_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                          const at::Tensor& row_offsets, const OptTensor& bias,
                          const OptTensor& scales, bool q8) {
  TORCHSLIM_CHECK(x.dim() == 2, "x must be 2-D (M, K), got ", x.dim(), "-D");
  const int64_t K = x.size(1);
  check_rows(mask, "mask", at::kByte, mask_bytes(K));
  const int64_t N = mask.size(0);
  TORCHSLIM_CHECK(values.dim() == 1 && values.is_contiguous(),
                  "values must be a contiguous 1-D tensor (nnz,), got shape ", values.sizes(),
                  " and strides ", values.strides());
  if (q8) check_q8(values, K);
  // W8A8's codes of x padded to whole steps of 64 columns, which its strips read.
  SparseOperands op =
      sparse_operands(x, values, N, bias, scales, q8 ? (K + 63) / 64 * 64 : 0, false, q8);
  check_cpu(row_offsets, "row_offsets");
  TORCHSLIM_CHECK_TYPE(row_offsets.scalar_type() == at::kLong, "row_offsets must be int64, got ",
                       row_offsets.scalar_type());
  TORCHSLIM_CHECK(row_offsets.dim() == 1 && row_offsets.size(0) == N + 1,
                  "row_offsets must have shape (N + 1,) = (", N + 1, ",), got ",
                  row_offsets.sizes());
  const at::Tensor offsets = row_offsets.contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t total = values.numel();
  check_offsets(off, N, total, "row_offsets", "values.numel()");
  int64_t bad_row = -1;
  op.args.meta = mask.data_ptr<uint8_t>();
  op.args.ldm = mask.stride(0);
  op.args.row_offsets = off;
  op.args.values_total = total;
  op.args.bad_row = &bad_row;
  const cpu::KernelTable& kernels = cpu::active_kernels();
  if (kernels.bf16_dot && !q8 && !op.panels.defined() && x.scalar_type() == at::kBFloat16 &&
      values.scalar_type() == at::kBFloat16) {  // bf16 x meets bf16 values in vdpbf16ps
    op.x_bf16 = x.stride(1) == 1 ? x : x.contiguous();
    op.args.x_bf16 = reinterpret_cast<const uint16_t*>(op.x_bf16.data_ptr<at::BFloat16>());
    op.args.ldx_bf16 = op.x_bf16.stride(0);
  }
  op.args.q8_strips = q8 && op.args.M >= kernels.bitmask_q8_strip_min_m(K);
  if (op.args.q8_strips) {
    op.run(kernels.bitmask_gemm, kStripBlockM, balanced_block_n(N, kStripBlockN));
  } else {
    op.run(kernels.bitmask_gemm);
  }
  if (bad_row >= 0) {
    int64_t bits = 0;
    const uint8_t* row = mask.data_ptr<uint8_t>() + bad_row * mask.stride(0);
    for (int64_t k = 0; k < K; ++k) bits += row[k / 8] >> (k % 8) & 1;
    TORCHSLIM_CHECK(false, "mask and row_offsets disagree: row ", bad_row, " has ",
                    off[bad_row + 1] - off[bad_row], " values by row_offsets and ", bits,
                    " set bits in mask");
  }
  return op.out;
}

at::Tensor sparse_bitmask_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                                     const at::Tensor& mask, const at::Tensor& row_offsets,
                                     const OptTensor& bias, const OptTensor& scales) {
  return bitmask_linear(x, values, mask, row_offsets, bias, scales, false);
}

// W8A8 (torchslim.reference.sparse_bitmask_dynamic_linear): int8 values, scales (N,) fp32.
at::Tensor sparse_bitmask_dynamic_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                                             const at::Tensor& mask, const at::Tensor& row_offsets,
                                             const at::Tensor& scales, const OptTensor& bias) {
  return bitmask_linear(x, values, mask, row_offsets, bias, scales, true);
}

// csr's and sliced's column bytes: uint8, contiguous, one per value.
void check_columns(const at::Tensor& columns, const at::Tensor& values) {
  check_cpu(columns, "columns");
  TORCHSLIM_CHECK_TYPE(columns.scalar_type() == at::kByte, "columns must be uint8, got ",
                       columns.scalar_type());
  TORCHSLIM_CHECK(columns.sizes() == values.sizes() && columns.is_contiguous(),
                  "columns must be contiguous with the shape of values ", values.sizes(), ", got ",
                  columns.sizes());
}

// CSR: x (M, K) fp32/bf16; values (G, 8) fp32/bf16/fp16/int8 and columns (G, 8) uint8,
// contiguous; bases (G,) int16; group_offsets (N + 1,) int64 from 0, non-decreasing, at most G;
// bias and scales as for 2:4.
at::Tensor sparse_csr_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                                 const at::Tensor& columns, const at::Tensor& bases,
                                 const at::Tensor& group_offsets, const OptTensor& bias,
                                 const OptTensor& scales) {
  TORCHSLIM_CHECK(x.dim() == 2, "x must be 2-D (M, K), got ", x.dim(), "-D");
  const int64_t K = x.size(1);
  // int16 bases in units of 8 columns; the kernels' bounds checks rely on it.
  TORCHSLIM_CHECK(K <= kCsrMaxK, "x must have K <= ", kCsrMaxK, " for the csr format, got K = ", K);
  TORCHSLIM_CHECK(values.dim() == 2 && values.size(1) == 8 && values.is_contiguous(),
                  "values must be a contiguous (G, 8) tensor, got shape ", values.sizes(),
                  " and strides ", values.strides());
  const int64_t G = values.size(0);
  check_columns(columns, values);
  check_cpu(bases, "bases");
  TORCHSLIM_CHECK_TYPE(bases.scalar_type() == at::kShort, "bases must be int16, got ",
                       bases.scalar_type());
  TORCHSLIM_CHECK(bases.dim() == 1 && bases.size(0) == G && bases.is_contiguous(),
                  "bases must be contiguous with shape (G,) = (", G, ",), got ", bases.sizes());
  check_cpu(group_offsets, "group_offsets");
  TORCHSLIM_CHECK_TYPE(group_offsets.scalar_type() == at::kLong,
                       "group_offsets must be int64, got ", group_offsets.scalar_type());
  TORCHSLIM_CHECK(group_offsets.dim() == 1 && group_offsets.size(0) >= 1,
                  "group_offsets must have shape (N + 1,), got ", group_offsets.sizes());
  const int64_t N = group_offsets.size(0) - 1;
  SparseOperands op = sparse_operands(x, values, N, bias, scales, cpu::csr_padded_k(K));
  const at::Tensor offsets = group_offsets.contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_offsets(off, N, G, "group_offsets", "values.shape[0]");
  int64_t bad_row = -1;
  op.args.meta = columns.data_ptr<uint8_t>();
  op.args.ldm = 8;
  op.args.bases = bases.data_ptr<int16_t>();
  op.args.row_offsets = off;
  op.args.bad_row = &bad_row;
  op.run(cpu::active_kernels().csr_gemm);
  if (bad_row >= 0) {
    int64_t col = 0;
    for (int64_t g = off[bad_row]; g < off[bad_row + 1]; ++g) {
      for (int64_t t = 0; t < 8; ++t) {
        col = 8 * int64_t{op.args.bases[g]} + op.args.meta[8 * g + t];
        if (col < 0 || col >= K) break;
      }
      if (col < 0 || col >= K) break;
    }
    TORCHSLIM_CHECK(false, "csr row ", bad_row, " points past K = ", K, ": column ", col);
  }
  return op.out;
}

// Block: x (M, K) fp32/bf16; values (B, R, C) fp32/bf16/fp16/int8, contiguous; col_blocks (B,)
// int32; row_offsets (ceil(N / R) + 1,) int64 from 0, non-decreasing, at most B; n = N; bias and
// scales as for 2:4. With q8 (int8 values only) x is quantized per token and meets the codes in
// integer sums (the W8A8 rule).
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_blocks,
                        const at::Tensor& row_offsets, int64_t n, const OptTensor& bias,
                        const OptTensor& scales, bool q8) {
  TORCHSLIM_CHECK(x.dim() == 2, "x must be 2-D (M, K), got ", x.dim(), "-D");
  const int64_t K = x.size(1);
  TORCHSLIM_CHECK(n >= 0, "n must be an int >= 0 (the output features), got ", n);
  TORCHSLIM_CHECK(values.dim() == 3 && values.size(1) >= 1 && values.size(2) >= 1,
                  "values must have shape (B, R, C) with R, C >= 1, got ", values.sizes());
  const int64_t B = values.size(0), R = values.size(1), C = values.size(2);
  check_cpu(col_blocks, "col_blocks");
  TORCHSLIM_CHECK_TYPE(col_blocks.scalar_type() == at::kInt, "col_blocks must be int32, got ",
                       col_blocks.scalar_type());
  TORCHSLIM_CHECK(col_blocks.dim() == 1 && col_blocks.size(0) == B,
                  "col_blocks must have shape (B,) = (", B, ",), got ", col_blocks.sizes());
  check_cpu(row_offsets, "row_offsets");
  TORCHSLIM_CHECK_TYPE(row_offsets.scalar_type() == at::kLong, "row_offsets must be int64, got ",
                       row_offsets.scalar_type());
  const int64_t block_rows = (n + R - 1) / R;
  TORCHSLIM_CHECK(row_offsets.dim() == 1 && row_offsets.size(0) == block_rows + 1,
                  "row_offsets must have shape (ceil(N / R) + 1,) = (", block_rows + 1,
                  ",) for N = ", n, " and R = ", R, ", got ", row_offsets.sizes());
  if (q8) check_q8(values, K);
  const at::Tensor blocks = values.contiguous();
  SparseOperands op =
      sparse_operands(x, blocks, n, bias, scales, q8 ? cpu::block_q8_padded_k(K, C) : 0, false, q8);
  const at::Tensor offsets = row_offsets.contiguous(), cols = col_blocks.contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_offsets(off, block_rows, B, "row_offsets", "values.shape[0]");
  int64_t bad_row = -1;
  op.args.row_offsets = off;
  op.args.col_blocks = cols.data_ptr<int32_t>();
  op.args.block_rows = R;
  op.args.block_cols = C;
  op.args.bad_row = &bad_row;
  if (q8) {  // whole block rows a block
    op.run(cpu::active_kernels().block_gemm, kBlockM, balanced_block_n(n, (64 + R - 1) / R * R, R));
  } else {
    op.run(cpu::active_kernels().block_gemm);
  }
  if (bad_row >= 0) {
    const int32_t* col = op.args.col_blocks;
    int64_t b = off[bad_row / R];
    while (b + 1 < off[bad_row / R + 1] && col[b] >= 0 && C * int64_t{col[b]} < K) ++b;
    TORCHSLIM_CHECK(false, "col_blocks[", b, "] = ", col[b], " points past K = ", K, " (blocks of ",
                    C, " columns)");
  }
  return op.out;
}

at::Tensor sparse_block_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                                   const at::Tensor& col_blocks, const at::Tensor& row_offsets,
                                   int64_t n, const OptTensor& bias, const OptTensor& scales) {
  return block_linear(x, values, col_blocks, row_offsets, n, bias, scales, false);
}

// W8A8 (torchslim.reference.sparse_block_dynamic_linear): int8 values, scales (N,) fp32.
at::Tensor sparse_block_dynamic_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                                           const at::Tensor& col_blocks,
                                           const at::Tensor& row_offsets, int64_t n,
                                           const at::Tensor& scales, const OptTensor& bias) {
  return block_linear(x, values, col_blocks, row_offsets, n, bias, scales, true);
}

// Sliced: x (M, K) fp32/bf16; values (V,) fp32/bf16/fp16/int8 and columns (V,) uint8,
// contiguous, V >= value_offsets[B] + 16; groups (G, 2) uint8, contiguous; group_offsets
// (B * S + 1,) and value_offsets (B + 1,) int64, from 0, non-decreasing, at most G and V - 16;
// B = ceil(n / 64), S = ceil(K / 128); n = N; bias and scales as for 2:4. With q8 (int8 values
// only) x is quantized per token and meets the codes in integer sums (the W8A8 rule).
at::Tensor sliced_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& columns,
                         const at::Tensor& groups, const at::Tensor& group_offsets,
                         const at::Tensor& value_offsets, int64_t n, const OptTensor& bias,
                         const OptTensor& scales, bool q8) {
  TORCHSLIM_CHECK(x.dim() == 2, "x must be 2-D (M, K), got ", x.dim(), "-D");
  const int64_t K = x.size(1);
  TORCHSLIM_CHECK(n >= 0, "n must be an int >= 0 (the output features), got ", n);
  constexpr int64_t slack = cpu::kSlicedGroup;
  TORCHSLIM_CHECK(values.dim() == 1 && values.size(0) >= slack && values.is_contiguous(),
                  "values must have shape (V,) with V >= ", slack, " and be contiguous, got shape ",
                  values.sizes());
  const int64_t V = values.size(0);
  check_columns(columns, values);
  check_cpu(groups, "groups");
  TORCHSLIM_CHECK_TYPE(groups.scalar_type() == at::kByte, "groups must be uint8, got ",
                       groups.scalar_type());
  TORCHSLIM_CHECK(groups.dim() == 2 && groups.size(1) == 2 && groups.is_contiguous(),
                  "groups must be a contiguous (G, 2) tensor, got shape ", groups.sizes());
  const int64_t B = (n + cpu::kSlicedRows - 1) / cpu::kSlicedRows;
  const int64_t S = (K + cpu::kSlicedCols - 1) / cpu::kSlicedCols;
  for (const auto& [t, name, size] : {std::tuple{&group_offsets, "group_offsets", B * S + 1},
                                      std::tuple{&value_offsets, "value_offsets", B + 1}}) {
    check_cpu(*t, name);
    TORCHSLIM_CHECK_TYPE(t->scalar_type() == at::kLong, name, " must be int64, got ",
                         t->scalar_type());
    TORCHSLIM_CHECK(t->dim() == 1 && t->size(0) == size, name, " must have shape (", size,
                    ",) for N = ", n, " and K = ", K, ", got ", t->sizes());
  }
  if (q8) check_q8(values, K);
  const cpu::KernelTable& kernels = cpu::active_kernels();
  SparseOperands op =
      sparse_operands(x, values, n, bias, scales, cpu::sliced_padded_k(K),
                      kernels.bf16_dot && values.scalar_type() == at::kBFloat16, q8);
  const at::Tensor goff = group_offsets.contiguous(), voff = value_offsets.contiguous();
  check_offsets(goff.data_ptr<int64_t>(), B * S, groups.size(0), "group_offsets",
                "groups.shape[0]");
  check_offsets(voff.data_ptr<int64_t>(), B, V - slack, "value_offsets", "values.shape[0] - 16");
  int64_t bad_row = -1;
  op.args.meta = columns.data_ptr<uint8_t>();
  op.args.values_total = V;
  op.args.groups = groups.data_ptr<uint8_t>();
  op.args.row_offsets = goff.data_ptr<int64_t>();
  op.args.value_offsets = voff.data_ptr<int64_t>();
  op.args.bad_row = &bad_row;
  op.args.q8_strips = q8 && op.args.M >= kernels.sliced_q8_strip_min_m(K);
  if (op.args.q8_strips) {
    op.run(kernels.sliced_gemm, kStripBlockM, balanced_block_n(n, kStripBlockN, cpu::kSlicedRows));
  } else {
    op.run(kernels.sliced_gemm, cpu::kSlicedRows);
  }
  TORCHSLIM_CHECK(bad_row < 0, "the sliced weight's block of rows from ", bad_row,
                  " is malformed: a group's row, count or column is out of range, or the "
                  "counts do not add up to value_offsets (torchslim.sparse.check_sliced says "
                  "which)");
  return op.out;
}

at::Tensor sparse_sliced_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                                    const at::Tensor& columns, const at::Tensor& groups,
                                    const at::Tensor& group_offsets,
                                    const at::Tensor& value_offsets, int64_t n,
                                    const OptTensor& bias, const OptTensor& scales) {
  return sliced_linear(x, values, columns, groups, group_offsets, value_offsets, n, bias, scales,
                       false);
}

// W8A8 (torchslim.reference.sparse_sliced_dynamic_linear): int8 values, scales (N,) fp32.
at::Tensor sparse_sliced_dynamic_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                                            const at::Tensor& columns, const at::Tensor& groups,
                                            const at::Tensor& group_offsets,
                                            const at::Tensor& value_offsets, int64_t n,
                                            const at::Tensor& scales, const OptTensor& bias) {
  return sliced_linear(x, values, columns, groups, group_offsets, value_offsets, n, bias, scales,
                       true);
}

// ----------------------------------------------------------------------------------------------
// torch.ops.torchslim impls: the kernel for what it takes (the Python checks and the "cpu"
// kernel's supports()), the Python impl for everything else.

bool is_sparse_input(const at::Tensor& x, const at::Tensor& values, const OptTensor& bias,
                     const OptTensor& scales, int64_t N) {
  const at::ScalarType vt = values.scalar_type();
  const bool has_scales = scales.has_value() && scales->defined();
  const bool scales_ok = has_scales ? is_cpu_vector(*scales, at::kFloat, N) : vt != at::kChar;
  return registry::automatic("cpu") && is_cpu_float(x) && x.dim() >= 1 &&
         values.device().is_cpu() &&
         (vt == at::kFloat || vt == at::kBFloat16 || vt == at::kHalf || vt == at::kChar) &&
         is_bias(bias, N) && scales_ok;
}

// Whether the W8A8 kernels take these values and x (int8 codes, K within kMaxQ8K); the format's
// own arrays are its *_fast's to check.
bool q8_fast(const at::Tensor& x, const at::Tensor& values) {
  return values.scalar_type() == at::kChar && (x.dim() < 1 || x.size(-1) <= kMaxQ8K);
}

// Whether the 2:4 kernel takes these arguments (else the Python impl checks them).
bool sparse24_fast(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                   const OptTensor& bias, const OptTensor& scales) {
  const int64_t K = x.dim() >= 1 ? x.size(-1) : 0;
  return values.dim() == 2 && is_sparse_input(x, values, bias, scales, values.size(0)) &&
         values.size(1) == kept_24(K) && is_cpu_matrix(meta, at::kByte) &&
         meta.size(0) == values.size(0) && meta.size(1) == mask_bytes(K);
}

at::Tensor sparse24_linear_op(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                              const OptTensor& bias, const OptTensor& scales) {
  if (!sparse24_fast(x, values, meta, bias, scales)) {
    return registry::call_python<at::Tensor>("sparse24_linear", x, values, meta, bias, scales);
  }
  return unflatten(
      sparse24_linear_cpu(rows(x), unit_last_stride(values), unit_last_stride(meta), bias, scales),
      x);
}

at::Tensor sparse24_dynamic_linear_op(const at::Tensor& x, const at::Tensor& values,
                                      const at::Tensor& meta, const at::Tensor& scales,
                                      const OptTensor& bias) {
  if (!q8_fast(x, values) || !sparse24_fast(x, values, meta, bias, scales)) {
    return registry::call_python<at::Tensor>("sparse24_dynamic_linear", x, values, meta, scales,
                                             bias);
  }
  return unflatten(sparse24_dynamic_linear_cpu(rows(x), unit_last_stride(values),
                                               unit_last_stride(meta), scales, bias),
                   x);
}

// Whether the bitmask kernel takes these arguments (else the Python impl checks them).
bool bitmask_fast(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                  const at::Tensor& row_offsets, const OptTensor& bias, const OptTensor& scales) {
  const int64_t K = x.dim() >= 1 ? x.size(-1) : 0;
  return is_cpu_matrix(mask, at::kByte) && mask.size(1) == mask_bytes(K) && values.dim() == 1 &&
         is_sparse_input(x, values, bias, scales, mask.size(0)) &&
         is_cpu_vector(row_offsets, at::kLong, mask.size(0) + 1);
}

at::Tensor sparse_bitmask_linear_op(const at::Tensor& x, const at::Tensor& values,
                                    const at::Tensor& mask, const at::Tensor& row_offsets,
                                    const OptTensor& bias, const OptTensor& scales) {
  if (!bitmask_fast(x, values, mask, row_offsets, bias, scales)) {
    return registry::call_python<at::Tensor>("sparse_bitmask_linear", x, values, mask, row_offsets,
                                             bias, scales);
  }
  return unflatten(sparse_bitmask_linear_cpu(rows(x), values.contiguous(), unit_last_stride(mask),
                                             row_offsets, bias, scales),
                   x);
}

at::Tensor sparse_bitmask_dynamic_linear_op(const at::Tensor& x, const at::Tensor& values,
                                            const at::Tensor& mask, const at::Tensor& row_offsets,
                                            const at::Tensor& scales, const OptTensor& bias) {
  if (!q8_fast(x, values) || !bitmask_fast(x, values, mask, row_offsets, bias, scales)) {
    return registry::call_python<at::Tensor>("sparse_bitmask_dynamic_linear", x, values, mask,
                                             row_offsets, scales, bias);
  }
  return unflatten(
      sparse_bitmask_dynamic_linear_cpu(rows(x), values.contiguous(), unit_last_stride(mask),
                                        row_offsets, scales, bias),
      x);
}

at::Tensor sparse_csr_linear_op(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& columns, const at::Tensor& bases,
                                const at::Tensor& group_offsets, const OptTensor& bias,
                                const OptTensor& scales) {
  const bool fast = values.dim() == 2 && values.size(1) == 8 && group_offsets.dim() == 1 &&
                    group_offsets.size(0) >= 1 &&
                    is_sparse_input(x, values, bias, scales, group_offsets.size(0) - 1) &&
                    is_cpu_matrix(columns, at::kByte) && columns.sizes() == values.sizes() &&
                    is_cpu_vector(bases, at::kShort, values.size(0)) &&
                    group_offsets.device().is_cpu() && group_offsets.scalar_type() == at::kLong;
  if (!fast) {
    return registry::call_python<at::Tensor>("sparse_csr_linear", x, values, columns, bases,
                                             group_offsets, bias, scales);
  }
  return unflatten(sparse_csr_linear_cpu(rows(x), values.contiguous(), columns.contiguous(),
                                         bases.contiguous(), group_offsets, bias, scales),
                   x);
}

// Whether the block kernel takes these arguments (else the Python impl checks them).
bool block_fast(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col_blocks,
                const at::Tensor& row_offsets, int64_t n, const OptTensor& bias,
                const OptTensor& scales) {
  return n >= 0 && values.dim() == 3 && values.size(1) >= 1 && values.size(2) >= 1 &&
         is_sparse_input(x, values, bias, scales, n) &&
         is_cpu_vector(col_blocks, at::kInt, values.size(0)) &&
         is_cpu_vector(row_offsets, at::kLong, (n + values.size(1) - 1) / values.size(1) + 1);
}

at::Tensor sparse_block_linear_op(const at::Tensor& x, const at::Tensor& values,
                                  const at::Tensor& col_blocks, const at::Tensor& row_offsets,
                                  int64_t n, const OptTensor& bias, const OptTensor& scales) {
  if (!block_fast(x, values, col_blocks, row_offsets, n, bias, scales)) {
    return registry::call_python<at::Tensor>("sparse_block_linear", x, values, col_blocks,
                                             row_offsets, n, bias, scales);
  }
  return unflatten(
      sparse_block_linear_cpu(rows(x), values, col_blocks, row_offsets, n, bias, scales), x);
}

at::Tensor sparse_block_dynamic_linear_op(const at::Tensor& x, const at::Tensor& values,
                                          const at::Tensor& col_blocks,
                                          const at::Tensor& row_offsets, int64_t n,
                                          const at::Tensor& scales, const OptTensor& bias) {
  if (!q8_fast(x, values) || !block_fast(x, values, col_blocks, row_offsets, n, bias, scales)) {
    return registry::call_python<at::Tensor>("sparse_block_dynamic_linear", x, values, col_blocks,
                                             row_offsets, n, scales, bias);
  }
  return unflatten(
      sparse_block_dynamic_linear_cpu(rows(x), values, col_blocks, row_offsets, n, scales, bias),
      x);
}

// Whether the sliced kernel takes these arguments (else the Python impl checks them).
bool sliced_fast(const at::Tensor& x, const at::Tensor& values, const at::Tensor& columns,
                 const at::Tensor& groups, const at::Tensor& group_offsets,
                 const at::Tensor& value_offsets, int64_t n, const OptTensor& bias,
                 const OptTensor& scales) {
  const int64_t K = x.dim() >= 1 ? x.size(-1) : 0;
  const int64_t B = (n + cpu::kSlicedRows - 1) / cpu::kSlicedRows;
  const int64_t S = (K + cpu::kSlicedCols - 1) / cpu::kSlicedCols;
  return n >= 0 && values.dim() == 1 && is_sparse_input(x, values, bias, scales, n) &&
         is_cpu_vector(columns, at::kByte, values.size(0)) && is_cpu_matrix(groups, at::kByte) &&
         groups.size(1) == 2 && is_cpu_vector(group_offsets, at::kLong, B * S + 1) &&
         is_cpu_vector(value_offsets, at::kLong, B + 1);
}

at::Tensor sparse_sliced_linear_op(const at::Tensor& x, const at::Tensor& values,
                                   const at::Tensor& columns, const at::Tensor& groups,
                                   const at::Tensor& group_offsets, const at::Tensor& value_offsets,
                                   int64_t n, const OptTensor& bias, const OptTensor& scales) {
  if (!sliced_fast(x, values, columns, groups, group_offsets, value_offsets, n, bias, scales)) {
    return registry::call_python<at::Tensor>("sparse_sliced_linear", x, values, columns, groups,
                                             group_offsets, value_offsets, n, bias, scales);
  }
  return unflatten(
      sparse_sliced_linear_cpu(rows(x), values.contiguous(), columns.contiguous(),
                               groups.contiguous(), group_offsets, value_offsets, n, bias, scales),
      x);
}

at::Tensor sparse_sliced_dynamic_linear_op(const at::Tensor& x, const at::Tensor& values,
                                           const at::Tensor& columns, const at::Tensor& groups,
                                           const at::Tensor& group_offsets,
                                           const at::Tensor& value_offsets, int64_t n,
                                           const at::Tensor& scales, const OptTensor& bias) {
  if (!q8_fast(x, values) ||
      !sliced_fast(x, values, columns, groups, group_offsets, value_offsets, n, bias, scales)) {
    return registry::call_python<at::Tensor>("sparse_sliced_dynamic_linear", x, values, columns,
                                             groups, group_offsets, value_offsets, n, scales, bias);
  }
  return unflatten(sparse_sliced_dynamic_linear_cpu(rows(x), values.contiguous(),
                                                    columns.contiguous(), groups.contiguous(),
                                                    group_offsets, value_offsets, n, scales, bias),
                   x);
}

}  // namespace

void bind_cpu_sparse(pybind11::module_& m) {
  m.def("sparse24_linear_cpu", &sparse24_linear_cpu, "2:4 sparse linear", pybind11::arg("x"),
        pybind11::arg("values"), pybind11::arg("meta"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("scales") = pybind11::none());
  m.def("sparse24_dynamic_linear_cpu", &sparse24_dynamic_linear_cpu, "2:4 sparse linear, W8A8",
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("meta"), pybind11::arg("scales"),
        pybind11::arg("bias") = pybind11::none());
  m.def("sparse_bitmask_linear_cpu", &sparse_bitmask_linear_cpu, "bitmask sparse linear",
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("mask"),
        pybind11::arg("row_offsets"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("scales") = pybind11::none());
  m.def("sparse_bitmask_dynamic_linear_cpu", &sparse_bitmask_dynamic_linear_cpu,
        "bitmask sparse linear, W8A8", pybind11::arg("x"), pybind11::arg("values"),
        pybind11::arg("mask"), pybind11::arg("row_offsets"), pybind11::arg("scales"),
        pybind11::arg("bias") = pybind11::none());
  m.def("sparse_csr_linear_cpu", &sparse_csr_linear_cpu, "csr sparse linear", pybind11::arg("x"),
        pybind11::arg("values"), pybind11::arg("columns"), pybind11::arg("bases"),
        pybind11::arg("group_offsets"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("scales") = pybind11::none());
  m.def("sparse_block_linear_cpu", &sparse_block_linear_cpu, "block-sparse linear",
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("col_blocks"),
        pybind11::arg("row_offsets"), pybind11::arg("n"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("scales") = pybind11::none());
  m.def("sparse_block_dynamic_linear_cpu", &sparse_block_dynamic_linear_cpu,
        "block-sparse linear, W8A8", pybind11::arg("x"), pybind11::arg("values"),
        pybind11::arg("col_blocks"), pybind11::arg("row_offsets"), pybind11::arg("n"),
        pybind11::arg("scales"), pybind11::arg("bias") = pybind11::none());
  m.def("sparse_sliced_linear_cpu", &sparse_sliced_linear_cpu, "sliced sparse linear",
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("columns"),
        pybind11::arg("groups"), pybind11::arg("group_offsets"), pybind11::arg("value_offsets"),
        pybind11::arg("n"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("scales") = pybind11::none());
  m.def("sparse_sliced_dynamic_linear_cpu", &sparse_sliced_dynamic_linear_cpu,
        "sliced sparse linear, W8A8", pybind11::arg("x"), pybind11::arg("values"),
        pybind11::arg("columns"), pybind11::arg("groups"), pybind11::arg("group_offsets"),
        pybind11::arg("value_offsets"), pybind11::arg("n"), pybind11::arg("scales"),
        pybind11::arg("bias") = pybind11::none());
}

}  // namespace torchslim

TORCH_LIBRARY_IMPL(torchslim, CPU, m) {
  m.impl("sparse24_linear", &torchslim::sparse24_linear_op);
  m.impl("sparse24_dynamic_linear", &torchslim::sparse24_dynamic_linear_op);
  m.impl("sparse_bitmask_linear", &torchslim::sparse_bitmask_linear_op);
  m.impl("sparse_bitmask_dynamic_linear", &torchslim::sparse_bitmask_dynamic_linear_op);
  m.impl("sparse_csr_linear", &torchslim::sparse_csr_linear_op);
  m.impl("sparse_block_linear", &torchslim::sparse_block_linear_op);
  m.impl("sparse_block_dynamic_linear", &torchslim::sparse_block_dynamic_linear_op);
  m.impl("sparse_sliced_linear", &torchslim::sparse_sliced_linear_op);
  m.impl("sparse_sliced_dynamic_linear", &torchslim::sparse_sliced_dynamic_linear_op);
}

// Gradients for x and bias (torchslim/ops/_autograd.py), and inference without the Python
// Autograd kernel's cost.
TORCH_LIBRARY_IMPL(torchslim, AutogradCPU, m) {
  m.impl("sparse24_linear", torchslim::registry::linear_autograd());
  m.impl("sparse24_dynamic_linear", torchslim::registry::linear_autograd());
  m.impl("sparse_bitmask_linear", torchslim::registry::linear_autograd());
  m.impl("sparse_bitmask_dynamic_linear", torchslim::registry::linear_autograd());
  m.impl("sparse_csr_linear", torchslim::registry::linear_autograd());
  m.impl("sparse_block_linear", torchslim::registry::linear_autograd());
  m.impl("sparse_block_dynamic_linear", torchslim::registry::linear_autograd());
  m.impl("sparse_sliced_linear", torchslim::registry::linear_autograd());
  m.impl("sparse_sliced_dynamic_linear", torchslim::registry::linear_autograd());
}
