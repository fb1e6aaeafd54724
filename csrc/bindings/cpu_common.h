// Helpers shared by the CPU bindings (cpu_ops.cpp, cpu_sparse_ops.cpp): argument checks,
// operand conversion, the (M, N) block split over at::parallel_for, and the predicates the
// torch.ops impls use to decide between the C++ kernel and the Python impl (registry.h).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/TensorUtils.h>
#include <ATen/ops/view_native.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"
#include "torchslim/checks.h"

namespace torchslim::cpu_bindings {

using cpu::ScalarType;
using OptTensor = std::optional<at::Tensor>;

inline ScalarType float_type(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat) return ScalarType::kFloat32;
  if (t.scalar_type() == at::kBFloat16) return ScalarType::kBFloat16;
  TORCHSLIM_CHECK_TYPE(false, name, " must be float32 or bfloat16 on the CPU, got ",
                       t.scalar_type());
  return ScalarType::kFloat32;
}

// fp32, bf16 or fp16 storage (scales, sparse values).
inline ScalarType any_float_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ScalarType::kFloat32;
    case at::kBFloat16:
      return ScalarType::kBFloat16;
    case at::kHalf:
      return ScalarType::kFloat16;
    default:
      TORCHSLIM_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ",
                           t.scalar_type());
  }
  return ScalarType::kFloat32;
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCHSLIM_CHECK_RUNTIME(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

inline void check_activation(const at::Tensor& x, const char* name) {
  check_cpu(x, name);
  TORCHSLIM_CHECK(x.dim() == 2, name, " must be 2-D (M, K), got ", x.dim(), "-D");
  TORCHSLIM_CHECK(x.size(1) <= 1 || x.stride(1) == 1, name,
                  " must have unit stride in its last dim, got strides ", x.strides());
}

// The most columns an int8 GEMM sums exactly in int32: K * 127 * 128 < 2^31 (activation codes are
// at most 127 in magnitude, a weight's code may be -128).
constexpr int64_t kMaxQ8K = ((int64_t{1} << 31) - 1) / (127 * 128);

inline void check_q8_k(int64_t K, const char* name) {
  TORCHSLIM_CHECK(K <= kMaxQ8K, name, "'s K must be at most ", kMaxQ8K,
                  " for an int8 GEMM (its int32 sums stay exact), got K = ", K);
}

// Scratch for what lives only inside one op call (an activation's int8 codes and scales): a
// request up to kWorkspaceMax bytes reuses the calling thread's buffer, so a decode step does
// not allocate four tensors per int4 layer, and a prefill's activation panels (2 MB at M = 512,
// K = 4096) do not come as fresh pages the kernel must clear each call; a larger one is held by
// `fallback`. 64-byte aligned. Each slot is its own buffer: an op that keeps one slot's contents
// while it asks for more (W8A8's codes, then the tile unit's panels) takes two; kBias holds the
// epilogue's bias widened to fp32 (bias_operand).
constexpr std::size_t kWorkspaceAlign = 64;
constexpr std::size_t kWorkspaceMax = std::size_t{8} << 20;
enum class Slot { kFirst = 0, kSecond = 1, kBias = 2 };

inline std::size_t align_up(std::size_t n) {
  return (n + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

inline uint8_t* workspace(std::size_t bytes, at::Tensor& fallback, Slot slot = Slot::kFirst) {
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  struct Buffer {
    std::unique_ptr<uint8_t, Free> data;
    std::size_t capacity = 0;
  };
  thread_local std::array<Buffer, 3> buffers;
  if (bytes > kWorkspaceMax) {
    fallback = at::empty({static_cast<int64_t>(bytes + kWorkspaceAlign)}, at::kByte);
    const auto address = reinterpret_cast<std::uintptr_t>(fallback.data_ptr<uint8_t>());
    return reinterpret_cast<uint8_t*>(align_up(address));
  }
  Buffer& buffer = buffers[static_cast<std::size_t>(slot)];
  if (bytes > buffer.capacity) {
    const std::size_t grown = std::max(align_up(bytes), std::size_t{64} << 10);
    buffer.data.reset(static_cast<uint8_t*>(std::aligned_alloc(kWorkspaceAlign, grown)));
    buffer.capacity = buffer.data ? grown : 0;
    TORCHSLIM_CHECK_RUNTIME(buffer.data != nullptr, "could not allocate a ", grown,
                            "-byte workspace");
  }
  return buffer.data.get();
}

// bias (N,) as the kernels' fp32 array, or null without a bias: its own data when it is fp32
// with unit stride, else widened in a loop into the calling thread's kBias workspace (a
// dispatched to() cost ~1 us of a ~5 us decode-sized call). `held` keeps what neither the
// caller's tensor nor the workspace holds.
inline const float* bias_operand(const std::optional<at::Tensor>& bias, int64_t N,
                                 at::Tensor& held) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_cpu(*bias, "bias");
  TORCHSLIM_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must have shape (N,) = (", N,
                  ",), got ", bias->sizes());
  const at::ScalarType type = bias->scalar_type();
  TORCHSLIM_CHECK_TYPE(at::isFloatingType(type), "bias must be a floating-point tensor, got ",
                       type);
  const int64_t stride = N <= 1 ? 1 : bias->stride(0);
  if (type == at::kFloat && stride == 1) return bias->data_ptr<float>();
  if (type != at::kFloat && type != at::kBFloat16 && type != at::kHalf && type != at::kDouble) {
    held = bias->to(at::kFloat).contiguous();  // the rarer float types (float8)
    return held.data_ptr<float>();
  }
  auto* wide = reinterpret_cast<float*>(
      workspace(static_cast<std::size_t>(N) * sizeof(float), held, Slot::kBias));
  const auto widen = [&](const auto* src) {
    for (int64_t n = 0; n < N; ++n) wide[n] = static_cast<float>(src[n * stride]);
  };
  if (type == at::kFloat) widen(bias->data_ptr<float>());
  if (type == at::kBFloat16) widen(bias->data_ptr<at::BFloat16>());
  if (type == at::kHalf) widen(bias->data_ptr<at::Half>());
  if (type == at::kDouble) widen(bias->data_ptr<double>());
  return wide;
}

// x (M, K) into `dst` as rows `columns` wide, NaN past K (csr_padded_k and sliced_padded_k: the
// csr and sliced dot kernels' x; columns = K: bf16 x widened), in fp32 (from fp32 or bf16 x) or
// in bf16 (from bf16 x). One pass without torch ops: at M = 1 their dispatch would cost more
// than the copy.
template <typename T>
inline void pad_rows(const at::Tensor& x, int64_t columns, T* dst) {
  const int64_t M = x.size(0), K = x.size(1);
  const auto fill = [&](const auto* src) {
    for (int64_t m = 0; m < M; ++m, dst += columns, src += x.stride(0)) {
      std::copy(src, src + K, dst);  // bf16 to fp32: exact
      std::fill(dst + K, dst + columns, std::numeric_limits<T>::quiet_NaN());
    }
  };
  if (x.scalar_type() == at::kBFloat16) {
    fill(x.data_ptr<at::BFloat16>());
  } else {
    fill(x.data_ptr<float>());
  }
}

// Runs fn(m0, m1, n0, n1) over the (M, N) output in blocks. Blocks are ordered n-major so the
// blocks one thread takes in a row share their weight rows; with `rows_first`, m-major, so that
// they share their activation rows.
template <class F>
inline void parallel_blocks(int64_t M, int64_t N, int64_t block_m, int64_t block_n, const F& fn,
                            bool rows_first = false) {
  if (M == 0 || N == 0) return;
  const int64_t tiles_m = (M + block_m - 1) / block_m;
  const int64_t tiles_n = (N + block_n - 1) / block_n;
  at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t mt = rows_first ? t / tiles_n : t % tiles_m;
      const int64_t nt = rows_first ? t % tiles_n : t / tiles_m;
      fn(mt * block_m, std::min((mt + 1) * block_m, M), nt * block_n,
         std::min((nt + 1) * block_n, N));
    }
  });
}

// A block of output columns near `most`: `most` itself where N is a whole number of such blocks
// and their count a multiple of the thread count; otherwise N in equal blocks, as many as a
// multiple of the thread count, rounded up to a multiple of `step` (the tile kernels' register
// block of 32; 12 for the vector kernels, whose register tiles are 2, 3 or 4 columns wide), so
// that a layer of a few blocks (N = 576: three of 256, or nine of 64) does not leave a thread
// idle for part of the call.
inline int64_t balanced_block_n(int64_t N, int64_t most, int64_t step = 32) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t blocks = (N + most - 1) / most;
  if (N % most == 0 && blocks % threads == 0) return most;
  blocks = (blocks + threads - 1) / threads * threads;
  return std::max<int64_t>(step, ((N + blocks - 1) / blocks + step - 1) / step * step);
}

inline bool is_cpu_float(const at::Tensor& t) {
  return t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16);
}

inline bool is_cpu_matrix(const at::Tensor& t, at::ScalarType dtype) {
  return t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 2;
}

inline bool is_cpu_vector(const at::Tensor& t, at::ScalarType dtype, int64_t n) {
  return t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == n;
}

inline bool is_bias(const OptTensor& bias, int64_t n) {
  return !bias.has_value() || (bias->device().is_cpu() && at::isFloatingType(bias->scalar_type()) &&
                               bias->dim() == 1 && bias->size(0) == n);
}

// x (M, K) fp32/bf16 quantized per token (torchslim.reference.quantize_per_token) into `codes`
// (M, columns) int8, zeros past K (columns >= K), and `scale` (M,) fp32.
inline void quantize_rows_into(const at::Tensor& x, int8_t* codes, int64_t columns, float* scale) {
  check_activation(x, "x");
  const ScalarType xt = float_type(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  for (int64_t m = 0; m < M && columns > K; ++m) {  // no torch op: at M = 1 its dispatch
    std::fill(codes + m * columns + K, codes + (m + 1) * columns, int8_t{0});  // costs more
  }
  const cpu::QuantizeArgs args{x.data_ptr(), x.stride(0), xt, codes, columns, scale, K};
  const cpu::KernelTable& kt = cpu::active_kernels();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)),
                   [&](int64_t m0, int64_t m1) { kt.quantize_rows(args, m0, m1); });
}

// quantize_rows_into, as tensors: the codes (M, columns) and the scales (M,).
inline std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t columns) {
  check_activation(x, "x");
  at::Tensor q = at::empty({x.size(0), columns}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  quantize_rows_into(x, q.data_ptr<int8_t>(), columns, scale.data_ptr<float>());
  return {q, scale};
}

// The views below are taken with at::native::view, the CPU kernel of aten::view, rather than
// through the dispatcher: these helpers run inside the ops' CPU kernels, below autograd, where
// a dispatched reshape and view cost ~0.7 us of a decode-sized (M = 1) call's ~5.

// x (..., K) as (M, K) with unit stride in K, copying only when it must. (M is spelled out:
// reshape cannot infer it when K = 0.)
inline at::Tensor rows(const at::Tensor& x) {
  if (x.dim() == 2) return x.size(1) <= 1 || x.stride(1) == 1 ? x : x.contiguous();
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  const std::vector<int64_t> shape = {M, x.size(-1)};
  const auto strides = at::detail::computeStride(x.sizes(), x.strides(), at::IntArrayRef(shape));
  if (!strides.has_value() || (shape[1] > 1 && (*strides)[1] != 1)) {
    return x.reshape(shape).contiguous();
  }
  return at::native::view(x, shape);
}

inline at::Tensor unit_last_stride(const at::Tensor& w) {
  return w.size(1) <= 1 || w.stride(1) == 1 ? w : w.contiguous();
}

// out (M, N) as (..., N) with x's leading dims.
inline at::Tensor unflatten(const at::Tensor& out, const at::Tensor& x) {
  if (x.dim() == 2) return out;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(out.size(1));
  return at::native::view(out, shape);
}

}  // namespace torchslim::cpu_bindings
