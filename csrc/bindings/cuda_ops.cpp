// Torch binding of the CUDA kernels (csrc/cuda/int8_gemm.cu, int4_gemm.cu, sparse24_gemm.cu):
// argument checks, device guard, current stream, allocation, then one call into the torch-free
// kernel API per step.
//
// Every function takes 2-D tensors. Activations and int8 matrices must have unit stride in their
// last dim; their row stride may be anything (it is passed to the kernels as the leading dim).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "cuda/int4_gemm.h"
#include "cuda/int8_gemm.h"
#include "cuda/sparse24_gemm.h"
#include "torchslim/checks.h"

namespace torchslim {
namespace {

using cuda::DType;

DType float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat32;
    default:
      break;
  }
  TORCHSLIM_CHECK_TYPE(false, name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  return DType::kFloat32;
}

// `t` must be a CUDA tensor on `device` (the device of the first operand).
void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCHSLIM_CHECK_RUNTIME(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCHSLIM_CHECK_RUNTIME(t.device() == device, name, " must be on ", device,
                          " like the other operands, got ", t.device());
}

void check_matrix(const at::Tensor& t, const char* name, const char* shape) {
  TORCHSLIM_CHECK(t.dim() == 2, name, " must be 2-D ", shape, ", got ", t.dim(), "-D with shape ",
                  t.sizes());
  TORCHSLIM_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name,
                  " must have unit stride in its last dim, got strides ", t.strides());
}

// x: (M, K) fp16 / bf16 / fp32 CUDA tensor.
DType check_activation(const at::Tensor& x, const char* name) {
  TORCHSLIM_CHECK_RUNTIME(x.is_cuda(), name, " must be a CUDA tensor, got device ", x.device());
  check_matrix(x, name, "(M, K)");
  return float_dtype(x, name);
}

// w: (N, K) int8 on `device`.
void check_int8_matrix(const at::Tensor& w, const char* name, int64_t K, const at::Device& device) {
  check_device(w, name, device);
  TORCHSLIM_CHECK_TYPE(w.scalar_type() == at::kChar, name, " must be int8, got ", w.scalar_type());
  check_matrix(w, name, "(N, K)");
  TORCHSLIM_CHECK(w.size(1) == K, name, " must have K=", K, " columns, got ", w.size(1));
}

// The row stride handed to the kernels; for a single row it is meaningless (torch may report
// any value), so K is passed instead.
int64_t leading_dim(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

// bias as a contiguous (N,) float tensor of its own dtype on `device` (undefined when absent).
at::Tensor bias_operand(const std::optional<at::Tensor>& bias, int64_t N,
                        const at::Device& device) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_device(*bias, "bias", device);
  TORCHSLIM_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must have shape (N,) = (", N,
                  ",), got ", bias->sizes());
  float_dtype(*bias, "bias");
  return bias->contiguous();
}

// w_scale as a contiguous (N,) fp32 tensor and bias as in bias_operand.
std::pair<at::Tensor, at::Tensor> epilogue_operands(const at::Tensor& w_scale,
                                                    const std::optional<at::Tensor>& bias,
                                                    int64_t N, const at::Device& device) {
  check_device(w_scale, "w_scale", device);
  TORCHSLIM_CHECK_TYPE(w_scale.scalar_type() == at::kFloat, "w_scale must be float32, got ",
                       w_scale.scalar_type());
  TORCHSLIM_CHECK(w_scale.dim() == 1 && w_scale.size(0) == N, "w_scale must have shape (N,) = (", N,
                  ",), got ", w_scale.sizes());
  return {w_scale.contiguous(), bias_operand(bias, N, device)};
}

void check_status(cudaError_t status, const char* kernel) {
  TORCHSLIM_CHECK_RUNTIME(status == cudaSuccess, "torchslim CUDA kernel ", kernel,
                          " failed: ", cudaGetErrorString(status));
}

// The checked operands of a linear op: x (M, K), w_q (N, K), w_scale (N,) fp32, bias (N,) in
// its own float dtype (undefined when absent), and the (M, N) output in x's dtype.
struct LinearOperands {
  DType x_type;
  int64_t M, N, K;
  at::Tensor w_scale, bias, out;
  const void* bias_ptr() const { return bias.defined() ? bias.data_ptr() : nullptr; }
  DType bias_type() const { return bias.defined() ? float_dtype(bias, "bias") : DType::kFloat32; }
};

LinearOperands linear_operands(const at::Tensor& x, const at::Tensor& w_q,
                               const at::Tensor& w_scale, const std::optional<at::Tensor>& bias) {
  LinearOperands op;
  op.x_type = check_activation(x, "x");
  op.M = x.size(0);
  op.K = x.size(1);
  check_int8_matrix(w_q, "w_q", op.K, x.device());
  op.N = w_q.size(0);
  std::tie(op.w_scale, op.bias) = epilogue_operands(w_scale, bias, op.N, x.device());
  op.out = at::empty({op.M, op.N}, x.options());
  return op;
}

}  // namespace

// x: (M, K) float -> (x_q (M, K) int8, x_scale (M,) fp32), bit-exact with
// torchslim.reference.quantize_per_token (IEEE division amax / 127).
std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x) {
  const DType xt = check_activation(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor x_scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {x_q, x_scale};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_status(cuda::quantize_per_token(x.data_ptr(), leading_dim(x), xt, M, K,
                                        x_q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), stream),
               "quantize_per_token");
  return {x_q, x_scale};
}

// a: (M, K) int8, b: (N, K) int8 -> (M, N) int32 = a @ b.T, exact.
at::Tensor int8_mm_cuda(const at::Tensor& a, const at::Tensor& b) {
  TORCHSLIM_CHECK_RUNTIME(a.is_cuda(), "a must be a CUDA tensor, got device ", a.device());
  TORCHSLIM_CHECK_TYPE(a.scalar_type() == at::kChar, "a must be int8, got ", a.scalar_type());
  check_matrix(a, "a", "(M, K)");
  const int64_t M = a.size(0), K = a.size(1);
  check_int8_matrix(b, "b", K, a.device());
  const int64_t N = b.size(0);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_status(cuda::int8_scaled_mm(a.data_ptr<int8_t>(), leading_dim(a), b.data_ptr<int8_t>(),
                                    leading_dim(b), nullptr, nullptr, nullptr, DType::kFloat32,
                                    out.data_ptr(), N, DType::kInt32, M, N, K, stream),
               "int8_scaled_mm");
  return out;
}

// W8A8: x (M, K) float, w_q (N, K) int8, w_scale (N,) fp32, bias (N,) float or None
// -> (M, N) in x.dtype. x is quantized per row into a torch-allocated workspace first.
at::Tensor int8_dynamic_linear_cuda(const at::Tensor& x, const at::Tensor& w_q,
                                    const at::Tensor& w_scale,
                                    const std::optional<at::Tensor>& bias) {
  const LinearOperands op = linear_operands(x, w_q, w_scale, bias);
  if (op.M == 0 || op.N == 0) return op.out;
  const c10::cuda::CUDAGuard guard(x.device());
  auto [x_q, x_scale] = quantize_per_token_cuda(x);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_status(cuda::int8_scaled_mm(x_q.data_ptr<int8_t>(), op.K, w_q.data_ptr<int8_t>(),
                                    leading_dim(w_q), x_scale.data_ptr<float>(),
                                    op.w_scale.data_ptr<float>(), op.bias_ptr(), op.bias_type(),
                                    op.out.data_ptr(), op.N, op.x_type, op.M, op.N, op.K, stream),
               "int8_scaled_mm");
  return op.out;
}

// W8A16: x (M, K) float, w_q (N, K) int8, w_scale (N,) fp32, bias (N,) float or None
// -> (M, N) in x.dtype = x @ (w_q * w_scale[:, None]).T + bias.
at::Tensor int8_weight_only_linear_cuda(const at::Tensor& x, const at::Tensor& w_q,
                                        const at::Tensor& w_scale,
                                        const std::optional<at::Tensor>& bias) {
  const LinearOperands op = linear_operands(x, w_q, w_scale, bias);
  if (op.M == 0 || op.N == 0) return op.out;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_status(cuda::int8_weight_only_gemm(
                   x.data_ptr(), leading_dim(x), op.x_type, w_q.data_ptr<int8_t>(),
                   leading_dim(w_q), op.w_scale.data_ptr<float>(), op.bias_ptr(), op.bias_type(),
                   op.out.data_ptr(), op.N, op.M, op.N, op.K, stream),
               "int8_weight_only_gemm");
  return op.out;
}

// W4A16 on the tc layout: x (M, K) fp16/bf16, packed_tc (N / 64, K / 16 * 512) uint8 (see
// torchslim.reference.pack_int4_tc), scales and zeros (N, K / G) of one float dtype, group_size
// G (-1: K), bias (N,) float or None -> (M, N) in x.dtype. split_k <= 0 picks the split for the
// current GPU; a positive value forces it (tests run every path with it).
at::Tensor int4_weight_only_linear_tc_cuda(const at::Tensor& x, const at::Tensor& packed_tc,
                                           const at::Tensor& scales, const at::Tensor& zeros,
                                           int64_t group_size,
                                           const std::optional<at::Tensor>& bias, int64_t split_k) {
  const DType xt = check_activation(x, "x");
  TORCHSLIM_CHECK_TYPE(xt != DType::kFloat32, "x must be float16 or bfloat16, got float32");
  const int64_t M = x.size(0), K = x.size(1);
  TORCHSLIM_CHECK(K > 0 && K % cuda::kInt4TcTileK == 0, "x must have K > 0 divisible by ",
                  cuda::kInt4TcTileK, " (the tc layout's k tile), got K=", K);
  check_device(packed_tc, "packed_tc", x.device());
  TORCHSLIM_CHECK_TYPE(packed_tc.scalar_type() == at::kByte, "packed_tc must be uint8, got ",
                       packed_tc.scalar_type());
  const int64_t row_bytes = K / cuda::kInt4TcTileK * cuda::kInt4TcTileBytes;
  TORCHSLIM_CHECK(packed_tc.dim() == 2 && packed_tc.size(1) == row_bytes,
                  "packed_tc must have shape (N / 64, K / 16 * 512) with K / 16 * 512 = ",
                  row_bytes, ", got ", packed_tc.sizes());
  const int64_t N = packed_tc.size(0) * cuda::kInt4TcTileN;
  const int64_t G = group_size == -1 ? K : group_size;
  TORCHSLIM_CHECK(G > 0 && G % cuda::kInt4TcTileK == 0 && K % G == 0,
                  "group_size must be -1 or a multiple of ", cuda::kInt4TcTileK, " dividing K=", K,
                  ", got ", group_size);
  const DType st = float_dtype(scales, "scales");
  for (const auto& [t, name] : {std::pair{&scales, "scales"}, std::pair{&zeros, "zeros"}}) {
    check_device(*t, name, x.device());
    TORCHSLIM_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == K / G, name,
                    " must have shape (N, K / group_size) = (", N, ", ", K / G, "), got ",
                    t->sizes());
  }
  TORCHSLIM_CHECK_TYPE(zeros.scalar_type() == scales.scalar_type(),
                       "zeros must have the dtype of scales (", scales.scalar_type(), "), got ",
                       zeros.scalar_type());
  const at::Tensor b = bias_operand(bias, N, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  // The kernel reads 16 bytes per lane: the codes must be contiguous and 16-byte aligned.
  at::Tensor w = packed_tc.contiguous();
  if (reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 != 0) w = w.clone();
  const at::Tensor s = scales.contiguous(), z = zeros.contiguous();
  if (split_k <= 0) {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    split_k = cuda::w4a16_tc_default_split_k(M, N, K, sms);
  }
  TORCHSLIM_CHECK(split_k <= 65535, "split_k must be at most 65535, got ", split_k);
  at::Tensor workspace;
  if (split_k > 1) workspace = at::empty({split_k, M, N}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_status(
      cuda::w4a16_tc_gemm(x.data_ptr(), leading_dim(x), xt, w.data_ptr<uint8_t>(), s.data_ptr(),
                          z.data_ptr(), st, G, b.defined() ? b.data_ptr() : nullptr,
                          b.defined() ? float_dtype(b, "bias") : DType::kFloat32, out.data_ptr(), N,
                          M, N, K, static_cast<int>(split_k),
                          split_k > 1 ? workspace.data_ptr<float>() : nullptr, stream),
      "w4a16_tc_gemm");
  return out;
}

// 2:4 on the sparse tensor cores: x (M, K) fp16/bf16, values (N, 2 * ceil(K / 4)) in x's dtype,
// meta (N, ceil(K / 8)) uint8 (torchslim.reference.sparse: the 2:4 format), bias (N,) float or
// None, scales (N,) fp32 or None -> (M, N) in x.dtype = x @ (W * scales[:, None]).T + bias.
at::Tensor sparse24_linear_cuda(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& meta, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& scales) {
  const DType xt = check_activation(x, "x");
  TORCHSLIM_CHECK_TYPE(xt != DType::kFloat32, "x must be float16 or bfloat16, got float32");
  const int64_t M = x.size(0), K = x.size(1), G = (K + 3) / 4;
  check_device(values, "values", x.device());
  TORCHSLIM_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "values must have x's dtype (",
                       x.scalar_type(), "), got ", values.scalar_type());
  check_matrix(values, "values", "(N, 2 * ceil(K / 4))");
  TORCHSLIM_CHECK(values.size(1) == 2 * G, "values must have 2 * ceil(K / 4) = ", 2 * G,
                  " columns, got ", values.size(1));
  const int64_t N = values.size(0);
  check_device(meta, "meta", x.device());
  TORCHSLIM_CHECK_TYPE(meta.scalar_type() == at::kByte, "meta must be uint8, got ",
                       meta.scalar_type());
  check_matrix(meta, "meta", "(N, ceil(K / 8))");
  TORCHSLIM_CHECK(meta.size(0) == N && meta.size(1) == (G + 1) / 2,
                  "meta must have shape (N, ceil(K / 8)) = (", N, ", ", (G + 1) / 2, "), got ",
                  meta.sizes());
  at::Tensor s;
  if (scales.has_value() && scales->defined()) {
    check_device(*scales, "scales", x.device());
    TORCHSLIM_CHECK_TYPE(scales->scalar_type() == at::kFloat, "scales must be float32, got ",
                         scales->scalar_type());
    TORCHSLIM_CHECK(scales->dim() == 1 && scales->size(0) == N, "scales must have shape (N,) = (",
                    N, ",), got ", scales->sizes());
    s = scales->contiguous();
  }
  const at::Tensor b = bias_operand(bias, N, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  check_status(cuda::sparse24_gemm(x.data_ptr(), leading_dim(x), xt, values.data_ptr(),
                                   leading_dim(values), meta.data_ptr<uint8_t>(), leading_dim(meta),
                                   s.defined() ? s.data_ptr<float>() : nullptr,
                                   b.defined() ? b.data_ptr() : nullptr,
                                   b.defined() ? float_dtype(b, "bias") : DType::kFloat32,
                                   out.data_ptr(), N, M, N, K, stream),
               "sparse24_gemm");
  return out;
}

void bind_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("quantize_per_token_cuda", &quantize_per_token_cuda,
        "x (M, K) fp16/bf16/fp32 CUDA -> (x_q (M, K) int8, x_scale (M,) fp32)", py::arg("x"));
  m.def("int8_mm_cuda", &int8_mm_cuda, "a (M, K) int8, b (N, K) int8 -> (M, N) int32 = a @ b.T",
        py::arg("a"), py::arg("b"));
  m.def("int8_dynamic_linear_cuda", &int8_dynamic_linear_cuda,
        "W8A8 linear with per-token dynamic quantization of x (CUDA)", py::arg("x"), py::arg("w_q"),
        py::arg("w_scale"), py::arg("bias") = py::none());
  m.def("int8_weight_only_linear_cuda", &int8_weight_only_linear_cuda,
        "W8A16 linear: x @ (w_q * w_scale[:, None]).T + bias (CUDA)", py::arg("x"), py::arg("w_q"),
        py::arg("w_scale"), py::arg("bias") = py::none());
  m.def("int4_weight_only_linear_tc_cuda", &int4_weight_only_linear_tc_cuda,
        "W4A16 linear on int4 codes in the tc layout (CUDA)", py::arg("x"), py::arg("packed_tc"),
        py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("bias") = py::none(),
        py::arg("split_k") = 0);
  m.def("sparse24_linear_cuda", &sparse24_linear_cuda,
        "2:4 sparse linear on the sparse tensor cores (mma.sp): x @ W.T + bias (CUDA)",
        py::arg("x"), py::arg("values"), py::arg("meta"), py::arg("bias") = py::none(),
        py::arg("scales") = py::none());
}

}  // namespace torchslim
