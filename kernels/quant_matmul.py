"""Quantized matrix multiplication in Triton: int8 GEMM, W8A8 dynamic linear, W8A16 linear.

The math (the specification is :mod:`torchslim.reference.int8`), for x: (M, K), w_q: (N, K):

    int8_mm                  c[m, n] = sum_k a[m, k] * b[n, k]                    exact, int32

    quantize_per_token       s[m]    = max_k |x[m, k]| / 127    (1 if that is 0, NaN if the row
                                                                 holds an inf or a NaN: codes 0)
                             q[m, k] = clamp(rne(x[m, k] / s[m]), -127, 127)     fp32, IEEE /

    int8_dynamic_linear      q, s    = quantize_per_token(x)
                             y[m, n] = (sum_k q[m, k] * w_q[n, k]) * s[m] * w_scale[n] + bias[n]

    int8_weight_only_linear  y[m, n] = (sum_k x[m, k] * w_q[n, k]) * w_scale[n] + bias[n]

(rne = round half to even.) Every scale is per row of A or per column of C, so it factors out of
the K sum: the GEMM main loop only ever multiplies raw operands and the scales are applied once
in the epilogue. For W8A16 each int8 weight tile is converted to x's dtype in registers (exact:
|w_q| <= 127 fits fp16 and bf16) and fed to the tensor cores with an fp32 accumulator; the
dequantized weight never exists in memory.

Kernels:
    _quantize_per_token_kernel   BLOCK_M rows per program: an amax pass over K, a quantize pass
    _gemm_kernel                 C = epilogue(A @ B^T): int8 A -> int32 accumulator (int8 tensor
                                 cores), float A -> fp32 accumulator; B is always int8. Three
                                 autotuned entry points share it:
        _int8_gemm                   int8_mm and W8A8 (INT8_GEMM_CONFIGS)
        _w8a16_tiled                 W8A16, M > DECODE_MAX_M (W8A16_TILED_CONFIGS)
        _w8a16_decode                W8A16, M <= DECODE_MAX_M, split-K: partial sums are added
                                     atomically into a zero-filled fp32 output, which is then
                                     cast to x.dtype (W8A16_DECODE_CONFIGS)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    add_bias,
    check_same_device,
    check_tensor,
    device_guard,
    dot_precision,
    even_k,
    gemm_output,
    grouped_tile,
    round_half_even,
    store_tile,
)
from .autotune import (
    INT8_GEMM_CONFIGS,
    W8A16_DECODE_CONFIGS,
    W8A16_TILED_CONFIGS,
    autotune_gemm,
    m_bucket,
    quantize_config,
)

__all__ = ["int8_dynamic_linear", "int8_mm", "int8_weight_only_linear", "quantize_per_token"]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _quantize_per_token_kernel(
    # Pointers
    x_ptr,  # x:       (M, K) fp32/fp16/bf16, strides (stride_xm, stride_xk)
    q_ptr,  # x_q:     (M, K) int8, row stride stride_qm, unit column stride
    scale_ptr,  # x_scale: (M,) fp32, contiguous
    # Sizes and strides (in elements)
    M,
    K,
    stride_xm,
    stride_xk,
    stride_qm,
    # Tiling: BLOCK_M rows per program, BLOCK_K columns per step
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """x_scale[m] = amax(|x[m, :]|) / 127 (1 if 0, NaN for an inf or a NaN: codes 0);
    x_q[m, :] = clamp(rne(x[m, :] / x_scale[m]))."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
    cols = tl.arange(0, BLOCK_K)

    # |x| as integer bits: NaN's above inf's above every finite value, so a NaN is kept where a
    # float max may drop it; a row holding an inf or a NaN has no scale (NaN) and codes 0.
    amax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_mask[:, None] & (k0 + cols < K)[None, :]
        x = tl.load(x_rows + (k0 + cols)[None, :] * stride_xk, mask=mask, other=0.0)
        amax = tl.maximum(amax, x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF)
    amax_row = tl.max(amax, axis=1)
    finite = amax_row < 0x7F800000
    # IEEE division everywhere: the approximate `/` of the GPU backends would change codes.
    scale = tl.math.div_rn(amax_row.to(tl.float32, bitcast=True), 127.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    scale = tl.where(finite, scale, float("nan"))

    for k0 in range(0, K, BLOCK_K):
        mask = row_mask[:, None] & (k0 + cols < K)[None, :]
        x = tl.load(x_rows + (k0 + cols)[None, :] * stride_xk, mask=mask, other=0.0)
        q = round_half_even(tl.math.div_rn(x.to(tl.float32), scale[:, None]))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        q = tl.where(finite[:, None], q, 0.0)
        tl.store(q_rows + (k0 + cols)[None, :], q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_mask)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _gemm_kernel(
    # Matrices
    a_ptr,  # A: (M, K) int8, or fp32/fp16/bf16; strides (stride_am, stride_ak)
    b_ptr,  # B: (N, K) int8, one row per output column; strides (stride_bn, stride_bk)
    c_ptr,  # C: (M, N) int32 or float (fp32 and zero-filled when SPLIT_K > 1)
    # Epilogue vectors, contiguous; each read only when its flag is set
    a_scale_ptr,  # (M,) fp32, per row of A    (HAS_A_SCALE)
    b_scale_ptr,  # (N,) fp32, per row of B    (HAS_B_SCALE)
    bias_ptr,  # (N,) any float dtype       (HAS_BIAS)
    # Sizes
    M,
    N,
    K,
    M_BUCKET,  # m_bucket(M): part of the autotune key, unused here
    # Strides, in elements
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    # Epilogue: C = (acc * a_scale[m] * b_scale[n] + bias[n]) in fp32, then cast to C's dtype
    HAS_A_SCALE: tl.constexpr,
    HAS_B_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision, matters for fp32 A only
    # Tiling (autotuned; EVEN_K from a heuristic)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: program (pid, k) sums K blocks k, k + SPLIT_K, ...
    EVEN_K: tl.constexpr,  # K % (BLOCK_K * SPLIT_K) == 0: no K mask needed
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    # Rows and columns past the edge wrap around (% M, % N): loads need no M/N mask, and the
    # wrapped results are never stored. 64-bit row offsets: M * K may exceed 2**31.
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn.to(tl.int64)[None, :] * stride_bn

    if a_ptr.dtype.element_ty == tl.int8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K * SPLIT_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0)
        # int8 -> A's dtype in registers (a no-op for int8 A; exact for fp16/bf16/fp32).
        # out_dtype is explicit: Triton 3.6 defaults it to fp32 even with an int32 accumulator.
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        a_ptrs += BLOCK_K * SPLIT_K * stride_ak
        b_ptrs += BLOCK_K * SPLIT_K * stride_bk

    # Epilogue, in fp32 and in the reference's order: ((acc * a_scale) * b_scale) + bias.
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_cm < M
    mask_n = offs_cn < N
    out = acc
    if HAS_A_SCALE:
        a_scale = tl.load(a_scale_ptr + offs_cm, mask=mask_m, other=0.0)
        out = out.to(tl.float32) * a_scale[:, None]
    if HAS_B_SCALE:
        b_scale = tl.load(b_scale_ptr + offs_cn, mask=mask_n, other=0.0)
        out = out.to(tl.float32) * b_scale[None, :]
    if HAS_BIAS:
        out = add_bias(out, bias_ptr, offs_cn, N, pid_k, SPLIT_K)
    store_tile(c_ptr, out, offs_cm, offs_cn, M, N, stride_cm, stride_cn, SPLIT_K)


_gemm_heuristic = triton.heuristics({"EVEN_K": even_k})
_int8_gemm = autotune_gemm(INT8_GEMM_CONFIGS)(_gemm_heuristic(_gemm_kernel))
_w8a16_tiled = autotune_gemm(W8A16_TILED_CONFIGS)(_gemm_heuristic(_gemm_kernel))
# Split-K accumulates into C: the autotuner must zero it before every trial run.
_w8a16_decode = autotune_gemm(W8A16_DECODE_CONFIGS, reset_to_zero=["c_ptr"])(
    _gemm_heuristic(_gemm_kernel)
)


# ----------------------------------------------------------------------------------------------
# Launchers: check -> allocate -> launch
# ----------------------------------------------------------------------------------------------


def _launch_gemm(
    kernel,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dot_precision: str = "tf32",
) -> None:
    """Launch one of the autotuned ``_gemm_kernel`` entry points; C must be non-empty."""
    M, K = a.shape
    N = b.shape[0]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    # Vectors that are absent are never read: any tensor stands in for their pointer.
    vectors = [v.contiguous() if v is not None else c for v in (a_scale, b_scale, bias)]
    with device_guard(a):
        kernel[grid](
            a, b, c, *vectors,
            M, N, K, m_bucket(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            HAS_A_SCALE=a_scale is not None,
            HAS_B_SCALE=b_scale is not None,
            HAS_BIAS=bias is not None,
            DOT_PRECISION=dot_precision,
        )  # fmt: skip


def _check_linear(x, w_q, w_scale, bias) -> None:
    check_tensor("x", x, FLOAT_DTYPES, (None, None), "(M, K)")
    K = x.shape[1]
    check_tensor("w_q", w_q, (torch.int8,), (None, K), "(N, K)", " to match x's K")
    N = w_q.shape[0]
    check_tensor("w_scale", w_scale, (torch.float32,), (N,), "(N,)", " to match w_q's N")
    if bias is not None:
        check_tensor("bias", bias, None, (N,), "(N,)", " to match w_q's N")
    check_same_device(x=x, w_q=w_q, w_scale=w_scale, bias=bias)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization, bit-exact with ``reference.quantize_per_token``.

    x_scale[m] = max_k |x[m, k]| / 127 (1.0 for an all-zero row, NaN for a row holding an inf
    or a NaN, whose codes are 0);
    x_q[m, k] = clamp(round_half_even(x[m, k] / x_scale[m]), -127, 127), all in fp32.

    Args:
        x: (M, K) fp32/fp16/bf16, any strides.

    Returns:
        x_q: (M, K) int8, row-major, codes in [-127, 127].
        x_scale: (M,) fp32, contiguous, with x ≈ x_q * x_scale[:, None].
    """
    check_tensor("x", x, FLOAT_DTYPES, (None, None), "(M, K)")
    check_same_device(x=x)
    M, K = x.shape
    x_q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    x_scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return x_q, x_scale
    cfg = quantize_config(M, K)
    with device_guard(x):
        _quantize_per_token_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            x, x_q, x_scale,
            M, K, x.stride(0), x.stride(1), x_q.stride(0),
            **cfg,
        )  # fmt: skip
    return x_q, x_scale


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 GEMM: c = a @ b.T with int32 accumulation (int8 tensor cores).

    Args:
        a: (M, K) int8, any strides.
        b: (N, K) int8, any strides (one row per output column, i.e. a Linear weight).

    Returns:
        c: (M, N) int32, row-major; exact (no int32 overflow) for any int8 inputs while
        K <= 131,071 = (2**31 - 1) // 128**2.
    """
    check_tensor("a", a, (torch.int8,), (None, None), "(M, K)")
    check_tensor("b", b, (torch.int8,), (None, a.shape[1]), "(N, K)", " to match a's K")
    check_same_device(a=a, b=b)
    M, N = a.shape[0], b.shape[0]
    c = torch.empty((M, N), dtype=torch.int32, device=a.device)
    if c.numel() == 0:
        return c
    _launch_gemm(_int8_gemm, a, b, c)
    return c


def int8_dynamic_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 linear with dynamic per-token activation quantization.

    x_q, x_scale = quantize_per_token(x)
    out[m, n] = (sum_k x_q[m, k] * w_q[n, k]) * x_scale[m] * w_scale[n] + bias[n]

    The sum is exact in int32; the epilogue runs in fp32 inside the GEMM kernel.

    Args:
        x: (M, K) fp32/fp16/bf16, any strides.
        w_q: (N, K) int8, any strides.
        w_scale: (N,) fp32, per output channel.
        bias: (N,) any float dtype, or None.

    Returns:
        out: (M, N) in x.dtype, row-major.
    """
    _check_linear(x, w_q, w_scale, bias)
    M, N = x.shape[0], w_q.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x_q, x_scale = quantize_per_token(x)
    _launch_gemm(_int8_gemm, x_q, w_q, out, a_scale=x_scale, b_scale=w_scale, bias=bias)
    return out


def int8_weight_only_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A16 linear: int8 weights, float activations.

    out[m, n] = (sum_k x[m, k] * w_q[n, k]) * w_scale[n] + bias[n]
              = x @ (w_q * w_scale[:, None]).T + bias

    Weight tiles are converted to x.dtype inside the K loop and accumulated in fp32; w_scale and
    bias are applied in the epilogue. M <= 16 (decode) uses split-K configs that accumulate into
    an fp32 buffer (the output itself for fp32 x). fp32 x follows
    ``torch.get_float32_matmul_precision()``: "highest" computes in IEEE fp32, else TF32.

    Args:
        x: (M, K) fp32/fp16/bf16, any strides.
        w_q: (N, K) int8, any strides.
        w_scale: (N,) fp32, per output channel.
        bias: (N,) any float dtype, or None.

    Returns:
        out: (M, N) in x.dtype, row-major.
    """
    _check_linear(x, w_q, w_scale, bias)
    out, decode = gemm_output(x, w_q.shape[0])
    if out.numel() == 0:
        return out.to(x.dtype)
    kernel = _w8a16_decode if decode else _w8a16_tiled
    _launch_gemm(
        kernel, x, w_q, out, b_scale=w_scale, bias=bias, dot_precision=dot_precision(x.dtype)
    )
    return out.to(x.dtype)
