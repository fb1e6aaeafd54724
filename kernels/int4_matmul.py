"""W4A16 linear in Triton: group-wise int4 weights, float activations.

The math (the specification is :mod:`torchslim.reference.int4`), for x: (M, K) and the plain
packed weight (N, K // 2), two codes per byte, low nibble first:

    w[n, k]   = (code[n, k] - zeros[n, k // G]) * scales[n, k // G]
    out[m, n] = sum_k x[m, k] * w[n, k] + bias[n]

Each program loads a (BLOCK_N, BLOCK_K // 2) tile of packed bytes, splits the nibbles and
interleaves them back into K order in registers, dequantizes them in fp32 with the group's scale
and zero point, and feeds the tile to tl.dot in x's dtype with an fp32 accumulator: the weight
travels at 4 bits and the dequantized weight never exists in memory. BLOCK_K divides the group
size (or the group is the whole row) in every config the autotuner keeps, so one scale and one
zero point per column cover a tile; a config with longer tiles (forced by hand) reads them per
element.

Kernels:
    _w4a16_kernel       C = A @ dequant(B)^T (+ bias). Two autotuned entry points share it:
        _w4a16_tiled        M > DECODE_MAX_M (W4A16_TILED_CONFIGS)
        _w4a16_decode       M <= DECODE_MAX_M, split-K: partial sums are added atomically into a
                            zero-filled fp32 output, then cast to x.dtype (W4A16_DECODE_CONFIGS)
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
    no_launch,
    store_tile,
)
from .autotune import (
    W4A16_DECODE_CONFIGS,
    W4A16_TILED_CONFIGS,
    autotune_w4a16,
    m_bucket,
)

__all__ = ["int4_weight_only_linear"]

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _w4a16_kernel(
    # Matrices
    a_ptr,  # A: (M, K) fp32/fp16/bf16; strides (stride_am, stride_ak)
    b_ptr,  # B: (N, K // 2) uint8 packed codes, row stride stride_bn, unit byte stride
    c_ptr,  # C: (M, N) float (fp32 and zero-filled when SPLIT_K > 1)
    # Group parameters: (N, K // G), row stride stride_sn, unit group stride
    scales_ptr,
    zeros_ptr,
    bias_ptr,  # (N,) any float dtype (HAS_BIAS)
    # Sizes
    M,
    N,
    K,
    M_BUCKET,  # m_bucket(M): part of the autotune key, unused here
    GROUP_SIZE,  # G: a multiple of BLOCK_K, or K (one group per row)
    # Strides, in elements
    stride_am,
    stride_ak,
    stride_bn,
    stride_sn,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision, matters for fp32 A only
    # Tiling (autotuned; EVEN_K from a heuristic)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: program (pid, k) sums K blocks k, k + SPLIT_K, ...
    EVEN_K: tl.constexpr,  # K % (BLOCK_K * SPLIT_K) == 0: no K mask needed
    TILE_IN_GROUP: tl.constexpr,  # every K tile lies inside one group (the pruned configs)
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    # Rows and columns past the edge wrap around (% M, % N): loads need no M/N mask, and the
    # wrapped results are never stored. 64-bit row offsets: M * K may exceed 2**31.
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_kb = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)  # packed bytes
    a_ptrs = a_ptr + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_bn.to(tl.int64)[:, None] * stride_bn + offs_kb[None, :]
    s_rows = offs_bn.to(tl.int64) * stride_sn
    last_group = (K - 1) // GROUP_SIZE

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K * SPLIT_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            packed = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
            packed = tl.load(b_ptrs, mask=offs_kb[None, :] < (K - k0) // 2, other=0)
        # (BLOCK_N, BLOCK_K // 2) bytes -> (BLOCK_N, BLOCK_K) codes in K order.
        codes = tl.interleave(packed & 0xF, packed >> 4)
        # A tile past K (split-K tails) is all masked; its group index is clamped in bounds.
        if TILE_IN_GROUP:  # one scale and zero point per column
            group = tl.minimum((k0 + pid_k * BLOCK_K) // GROUP_SIZE, last_group)
            scale = tl.load(scales_ptr + s_rows + group).to(tl.float32)[:, None]
            zero = tl.load(zeros_ptr + s_rows + group).to(tl.float32)[:, None]
        else:  # groups shorter than the tile: per element
            group = tl.minimum((k0 + offs_k) // GROUP_SIZE, last_group)
            s_ptrs = s_rows[:, None] + group[None, :]
            scale = tl.load(scales_ptr + s_ptrs).to(tl.float32)
            zero = tl.load(zeros_ptr + s_ptrs).to(tl.float32)
        w = ((codes.to(tl.float32) - zero) * scale).to(a.dtype)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * SPLIT_K * stride_ak
        b_ptrs += BLOCK_K * SPLIT_K // 2

    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out = acc
    if HAS_BIAS:
        out = add_bias(out, bias_ptr, offs_cn, N, pid_k, SPLIT_K)
    store_tile(c_ptr, out, offs_cm, offs_cn, M, N, stride_cm, stride_cn, SPLIT_K)


def _tile_in_group(args) -> bool:
    return args["GROUP_SIZE"] == args["K"] or args["GROUP_SIZE"] % args["BLOCK_K"] == 0


_heuristic = triton.heuristics({"EVEN_K": even_k, "TILE_IN_GROUP": _tile_in_group})
_w4a16_tiled = autotune_w4a16(W4A16_TILED_CONFIGS)(_heuristic(_w4a16_kernel))
# Split-K accumulates into C: the autotuner must zero it before every trial run.
_w4a16_decode = autotune_w4a16(W4A16_DECODE_CONFIGS, reset_to_zero=["c_ptr"])(
    _heuristic(_w4a16_kernel)
)


def _check(x, packed_w, scales, zeros, group_size, bias) -> int:
    """Validates the arguments; returns the group length G."""
    check_tensor("x", x, FLOAT_DTYPES, (None, None), "(M, K)")
    K = x.shape[1]
    if K % 2:
        raise ValueError(f"x must have an even K (two int4 codes per byte), got K={K}")
    check_tensor("packed_w", packed_w, (torch.uint8,), (None, K // 2), "(N, K // 2)",
                 " to match x's K")  # fmt: skip
    N = packed_w.shape[0]
    G = K if group_size == -1 else group_size
    ok = not isinstance(group_size, bool) and isinstance(group_size, int)
    if not ok or (K and (G < 1 or K % G)):
        raise ValueError(f"group_size must be -1 or a size that divides K={K}, got {group_size}")
    groups = K // G if K else 0
    check_tensor("scales", scales, SCALE_DTYPES, (N, groups), "(N, K // group_size)")
    check_tensor("zeros", zeros, (scales.dtype,), (N, groups), "(N, K // group_size)",
                 " like scales")  # fmt: skip
    if bias is not None:
        check_tensor("bias", bias, None, (N,), "(N,)", " to match packed_w's N")
    check_same_device(x=x, packed_w=packed_w, scales=scales, zeros=zeros, bias=bias)
    return G


def int4_weight_only_linear(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W4A16 linear: out = x @ ((codes - zeros) * scales).T + bias.

    Weight tiles are dequantized to x.dtype inside the K loop and accumulated in fp32. M <= 16
    (decode) uses split-K configs that accumulate into an fp32 buffer. fp32 x follows
    ``torch.get_float32_matmul_precision()``: "highest" computes in IEEE fp32, else TF32.

    Args:
        x: (M, K) fp32/fp16/bf16, any strides; K even.
        packed_w: (N, K // 2) uint8, two codes per byte, low nibble first.
        scales, zeros: (N, K // G) fp32/bf16/fp16, one dtype.
        group_size: G dividing K, or -1 for one group per row.
        bias: (N,) any float dtype, or None.

    Returns:
        out: (M, N) in x.dtype, row-major.
    """
    G = _check(x, packed_w, scales, zeros, group_size, bias)
    M, K = x.shape
    N = packed_w.shape[0]
    out, decode = gemm_output(x, N)
    if (done := no_launch(out, K, bias, x.dtype)) is not None:
        return done
    packed_w = packed_w if packed_w.stride(1) == 1 else packed_w.contiguous()
    scales, zeros = scales.contiguous(), zeros.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernel reads it at stride 1
    precision = dot_precision(x.dtype)
    kernel = _w4a16_decode if decode else _w4a16_tiled

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    with device_guard(x):
        kernel[grid](
            x, packed_w, out, scales, zeros, bias if bias is not None else out,
            M, N, K, m_bucket(M), G,
            x.stride(0), x.stride(1), packed_w.stride(0), scales.stride(0),
            out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None,
            DOT_PRECISION=precision,
        )  # fmt: skip
    return out.to(x.dtype)
