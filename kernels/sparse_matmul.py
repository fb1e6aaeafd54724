"""Linear on sparse weights in Triton: 2:4 expanded in registers, and block-sparse.

2:4

The format and the math (the specification is :mod:`torchslim.reference.sparse`), for x: (M, K)
and a weight (N, K) with at most 2 nonzeros in each group of 4 columns, stored as

    values (N, 2 * ceil(K / 4))  the two kept values of group g at 2 g and 2 g + 1
    meta   (N, ceil(K / 8))      uint8: group g's two 2-bit column indices i0, i1 in bits
                                 4 (g % 2) .. 4 (g % 2) + 3 of byte g // 2, i0 in the low pair

    w[n, 4 g + p] = (i0 == p) * values[n, 2 g] + (i1 == p) * values[n, 2 g + 1]
    out[m, n]     = sum_k x[m, k] * w[n, k] * scales[n] + bias[n]

Each program loads a (BLOCK_N, BLOCK_K / 2) tile of kept values and its (BLOCK_N, BLOCK_K / 8)
meta bytes, splits the nibbles into each group's two indices, places the two values in their
columns with selects, interleaves the four columns of every group back into K order and feeds
the (BLOCK_N, BLOCK_K) tile to tl.dot in x's dtype with an fp32 accumulator. The weight travels
at 2:4's bytes (9/16 of dense fp16, 5/16 with int8 values) and the dense weight never exists in
memory: decode, where the weight's bytes set the time, gains; at large M the expansion costs ALU
work the dense GEMM does not do, and sparse tensor cores (mma.sp) are the way to win there.

int8 values are codes: they meet x exactly (|code| <= 127 fits fp16 and bf16), and each output
column is multiplied by scales[n] in fp32 after the K loop.

Block-sparse (the block format of :mod:`torchslim.reference.sparse`: whole R x C blocks,
values (B, R, C), col_blocks (B,) int32, row_offsets (ceil(N / R) + 1,) int64): one program per
block row and tile of BLOCK_M rows of x walks only that row's stored blocks, a tl.dot per block
against the x columns it covers; empty blocks cost nothing. Blocks of at least 16 x 16 fill the
tensor cores; smaller blocks (1 x 16, 4 x 4) are padded to 16 in registers, so they save the
bytes but not the arithmetic.

Kernels:
    _block_kernel       C = A @ W^T (* scales) (+ bias), W block-sparse; BLOCK_M by the size of M
    _sp24_kernel        C = A @ expand(values, meta)^T (* scales) (+ bias). Two autotuned entry
                        points share it, as in int4_matmul:
        _sp24_tiled         M > DECODE_MAX_M (SP24_TILED_CONFIGS)
        _sp24_decode        M <= DECODE_MAX_M, split-K: partial sums added atomically into a
                            zero-filled fp32 output, then cast to x.dtype (SP24_DECODE_CONFIGS)
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
    DECODE_MAX_M,
    INTERPRET,
    SP24_DECODE_CONFIGS,
    SP24_TILED_CONFIGS,
    autotune_gemm,
    m_bucket,
)

__all__ = ["sparse24_linear", "sparse_block_linear"]

VALUE_DTYPES = (*FLOAT_DTYPES, torch.int8)


@triton.jit
def _place(i0, i1, v0, v1, p: tl.constexpr):
    """Column p of every group: the kept value whose index is p (both when the indices agree)."""
    return tl.where(i0 == p, v0, 0.0) + tl.where(i1 == p, v1, 0.0)


@triton.jit
def expand_24(vals, meta, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K // 2) kept values and their (BLOCK_N, BLOCK_K // 8) meta bytes -> the
    (BLOCK_N, BLOCK_K) dense tile in fp32, columns in K order."""
    v0, v1 = tl.split(tl.reshape(vals.to(tl.float32), (BLOCK_N, BLOCK_K // 4, 2)))
    nibbles = tl.interleave(meta & 0xF, meta >> 4)  # (BLOCK_N, BLOCK_K // 4): one per group
    i0 = nibbles & 3
    i1 = nibbles >> 2
    w0 = _place(i0, i1, v0, v1, 0)
    w1 = _place(i0, i1, v0, v1, 1)
    w2 = _place(i0, i1, v0, v1, 2)
    w3 = _place(i0, i1, v0, v1, 3)
    # interleave(interleave(w0, w2), interleave(w1, w3))[4 g + p] = w_p[g]
    return tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))


@triton.jit(do_not_specialize=["M_BUCKET"])
def _sp24_kernel(
    # Matrices
    a_ptr,  # A: (M, K) fp32/fp16/bf16; strides (stride_am, stride_ak)
    b_ptr,  # kept values: (N, 2 * ceil(K / 4)) float or int8, row stride stride_bn, unit stride
    meta_ptr,  # (N, ceil(K / 8)) uint8, row stride stride_mn, unit stride
    c_ptr,  # C: (M, N) float (fp32 and zero-filled when SPLIT_K > 1)
    scales_ptr,  # (N,) fp32 (HAS_SCALES)
    bias_ptr,  # (N,) any float dtype (HAS_BIAS)
    # Sizes
    M,
    N,
    K,
    M_BUCKET,  # m_bucket(M): part of the autotune key, unused here
    # Strides, in elements
    stride_am,
    stride_ak,
    stride_bn,
    stride_mn,
    stride_cm,
    stride_cn,
    HAS_SCALES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision, matters for fp32 A only
    # Tiling (autotuned; EVEN_K from a heuristic). BLOCK_K is a multiple of 8: whole meta bytes.
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
    offs_v = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)  # kept values
    offs_b = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)  # meta bytes
    rows = offs_bn.to(tl.int64)
    a_ptrs = a_ptr + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    v_ptrs = b_ptr + rows[:, None] * stride_bn + offs_v[None, :]
    m_ptrs = meta_ptr + rows[:, None] * stride_mn + offs_b[None, :]
    kept = 2 * tl.cdiv(K, 4)  # values per row
    meta_bytes = tl.cdiv(K, 8)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K * SPLIT_K):
        in_k = offs_k[None, :] < K - k0
        if EVEN_K:
            a = tl.load(a_ptrs)
            vals = tl.load(v_ptrs)
            meta = tl.load(m_ptrs)
        else:
            a = tl.load(a_ptrs, mask=in_k, other=0.0)
            vals = tl.load(v_ptrs, mask=offs_v[None, :] < kept - k0 // 2, other=0)
            meta = tl.load(m_ptrs, mask=offs_b[None, :] < meta_bytes - k0 // 8, other=0)
        w = expand_24(vals, meta, BLOCK_N, BLOCK_K)
        if not EVEN_K:  # a short last group's columns past K hold no weight
            w = tl.where(in_k, w, 0.0)
        acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * SPLIT_K * stride_ak
        v_ptrs += BLOCK_K * SPLIT_K // 2
        m_ptrs += BLOCK_K * SPLIT_K // 8

    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out = acc
    if HAS_SCALES:
        scale = tl.load(scales_ptr + offs_cn, mask=offs_cn < N, other=0.0)
        out = out * scale[None, :]
    if HAS_BIAS:
        out = add_bias(out, bias_ptr, offs_cn, N, pid_k, SPLIT_K)
    store_tile(c_ptr, out, offs_cm, offs_cn, M, N, stride_cm, stride_cn, SPLIT_K)


_heuristic = triton.heuristics({"EVEN_K": even_k})
_sp24_tiled = autotune_gemm(SP24_TILED_CONFIGS)(_heuristic(_sp24_kernel))
# Split-K accumulates into C: the autotuner must zero it before every trial run.
_sp24_decode = autotune_gemm(SP24_DECODE_CONFIGS, reset_to_zero=["c_ptr"])(_heuristic(_sp24_kernel))


def _check(x, values, meta, bias, scales) -> None:
    check_tensor("x", x, FLOAT_DTYPES, (None, None), "(M, K)")
    K = x.shape[1]
    kept, meta_bytes = 2 * -(-K // 4), -(-K // 8)
    check_tensor("values", values, VALUE_DTYPES, (None, kept), "(N, 2 * ceil(K / 4))",
                 " to match x's K")  # fmt: skip
    N = values.shape[0]
    check_tensor("meta", meta, (torch.uint8,), (N, meta_bytes), "(N, ceil(K / 8))",
                 " to match values' N and x's K")  # fmt: skip
    if scales is not None:
        check_tensor("scales", scales, (torch.float32,), (N,), "(N,)", " to match values' N")
    elif values.dtype == torch.int8:
        raise ValueError("int8 values need scales (N,) float32, got scales=None")
    if bias is not None:
        check_tensor("bias", bias, None, (N,), "(N,)", " to match values' N")
    check_same_device(x=x, values=values, meta=meta, bias=bias, scales=scales)


def sparse24_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = x @ (decompress_24(values, meta) * scales[:, None]).T + bias.

    Weight tiles are expanded to x.dtype inside the K loop and accumulated in fp32. M <= 16
    (decode) uses split-K configs that accumulate into an fp32 buffer. fp32 x follows
    ``torch.get_float32_matmul_precision()``: "highest" computes in IEEE fp32, else TF32.

    Args:
        x: (M, K) fp32/fp16/bf16, any strides.
        values: (N, 2 * ceil(K / 4)) fp32/fp16/bf16, or int8 codes (then ``scales`` is needed).
        meta: (N, ceil(K / 8)) uint8, the kept values' 2-bit column indices.
        bias: (N,) any float dtype, or None.
        scales: (N,) fp32, row n of the weight times scales[n], or None.

    Returns:
        out: (M, N) in x.dtype, row-major.
    """
    _check(x, values, meta, bias, scales)
    M, K = x.shape
    N = values.shape[0]
    out, decode = gemm_output(x, N)
    if (done := no_launch(out, K, bias, x.dtype)) is not None:
        return done
    values = values if values.stride(1) == 1 else values.contiguous()
    meta = meta if meta.stride(1) == 1 else meta.contiguous()
    scales = None if scales is None else scales.contiguous()
    bias = None if bias is None else bias.contiguous()
    precision = dot_precision(x.dtype)
    kernel = _sp24_decode if decode else _sp24_tiled

    def grid(meta_args):
        tiles = triton.cdiv(M, meta_args["BLOCK_M"]) * triton.cdiv(N, meta_args["BLOCK_N"])
        return (tiles, meta_args["SPLIT_K"])

    with device_guard(x):
        kernel[grid](
            x, values, meta, out, scales if scales is not None else out,
            bias if bias is not None else out,
            M, N, K, m_bucket(M),
            x.stride(0), x.stride(1), values.stride(0), meta.stride(0),
            out.stride(0), out.stride(1),
            HAS_SCALES=scales is not None,
            HAS_BIAS=bias is not None,
            DOT_PRECISION=precision,
        )  # fmt: skip
    return out.to(x.dtype)


@triton.jit
def _block_kernel(
    a_ptr,  # A: (M, K) fp32/fp16/bf16; strides (stride_am, stride_ak)
    v_ptr,  # values: (B, R, C) float or int8, contiguous
    col_ptr,  # col_blocks: (B,) int32
    off_ptr,  # row_offsets: (ceil(N / R) + 1,) int64
    c_ptr,  # C: (M, N) x.dtype
    scales_ptr,  # (N,) fp32 (HAS_SCALES)
    bias_ptr,  # (N,) any float dtype (HAS_BIAS)
    M,
    N,
    K,
    R,
    C,
    stride_am,
    stride_ak,
    stride_cm,
    stride_cn,
    HAS_SCALES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,  # R padded to a power of two >= 16
    BLOCK_C: tl.constexpr,  # C padded to a power of two >= 16
):
    block_row = tl.program_id(0)  # axis 0: N / R can pass the 65535 programs of axes 1 and 2
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.arange(0, BLOCK_R)
    offs_j = tl.arange(0, BLOCK_C)
    in_m = offs_m < M
    in_c = offs_j < C
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    w_tile = offs_i[:, None] * C + offs_j[None, :]  # within a (R, C) block
    in_block = (offs_i < R)[:, None] & in_c[None, :]
    first = tl.load(off_ptr + block_row)
    last = tl.load(off_ptr + block_row + 1)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for b in range(first, last):
        col = tl.load(col_ptr + b).to(tl.int64) * C + offs_j  # the block's columns of x
        in_k = in_c & (col >= 0) & (col < K)
        a = tl.load(
            a_rows + col[None, :] * stride_ak, mask=in_m[:, None] & in_k[None, :], other=0.0
        )
        w = tl.load(v_ptr + b * R * C + w_tile, mask=in_block, other=0)  # b: int64, as the offsets
        acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision=DOT_PRECISION)

    offs_n = block_row * R + offs_i
    out = acc
    if HAS_SCALES:
        out = out * tl.load(scales_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_BIAS:
        out = add_bias(out, bias_ptr, offs_n, N, 0, 1)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = in_m[:, None] & ((offs_i < R) & (offs_n < N))[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


def _check_block(x, values, col_blocks, row_offsets, n, bias, scales) -> None:
    check_tensor("x", x, FLOAT_DTYPES, (None, None), "(M, K)")
    check_tensor("values", values, VALUE_DTYPES, (None, None, None), "(B, R, C)")
    blocks, rows, cols = values.shape
    if rows < 1 or cols < 1:
        raise ValueError(f"values must be (B, R, C) with R, C >= 1, got {tuple(values.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0 (the output features), got {n!r}")
    check_tensor("col_blocks", col_blocks, (torch.int32,), (blocks,), "(B,)",
                 " to match values' B")  # fmt: skip
    check_tensor("row_offsets", row_offsets, (torch.int64,), (-(-n // rows) + 1,),
                 "(ceil(N / R) + 1,)", f" for N = {n} and R = {rows}")  # fmt: skip
    if scales is not None:
        check_tensor("scales", scales, (torch.float32,), (n,), "(N,)", " to match n")
    elif values.dtype == torch.int8:
        raise ValueError("int8 values need scales (N,) float32, got scales=None")
    if bias is not None:
        check_tensor("bias", bias, None, (n,), "(N,)", " to match n")
    check_same_device(x=x, values=values, col_blocks=col_blocks, row_offsets=row_offsets,
                      bias=bias, scales=scales)  # fmt: skip


def sparse_block_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    col_blocks: torch.Tensor,
    row_offsets: torch.Tensor,
    n: int,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = x @ (decompress_block(values, col_blocks, row_offsets, n, K) * scales[:, None]).T
    + bias, visiting only the stored blocks.

    The block format's contents (offsets within the blocks, columns of blocks inside K) are
    the caller's to check (torchslim.reference.sparse.check_block; the op does): a column of
    blocks past K reads no x (it is masked) but would be silently dropped.

    Args:
        x: (M, K) fp32/fp16/bf16, any strides.
        values: (B, R, C) fp32/fp16/bf16, or int8 codes (then ``scales`` is needed).
        col_blocks: (B,) int32. row_offsets: (ceil(N / R) + 1,) int64. n: N.
        bias: (N,) any float dtype, or None. scales: (N,) fp32, or None.

    Returns:
        out: (M, N) in x.dtype, row-major.
    """
    _check_block(x, values, col_blocks, row_offsets, n, bias, scales)
    M, K = x.shape
    _, R, C = values.shape
    out = torch.empty((M, n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    values = values.contiguous()
    col_blocks, row_offsets = col_blocks.contiguous(), row_offsets.contiguous()
    scales = None if scales is None else scales.contiguous()
    bias = None if bias is None else bias.contiguous()
    precision = dot_precision(x.dtype)
    block_m = 16 if M <= DECODE_MAX_M or INTERPRET else 64
    grid = (row_offsets.numel() - 1, triton.cdiv(M, block_m))
    with device_guard(x):
        _block_kernel[grid](
            x, values, col_blocks, row_offsets, out,
            scales if scales is not None else out, bias if bias is not None else out,
            M, n, K, R, C,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            HAS_SCALES=scales is not None,
            HAS_BIAS=bias is not None,
            DOT_PRECISION=precision,
            BLOCK_M=block_m,
            BLOCK_R=max(16, triton.next_power_of_2(R)),
            BLOCK_C=max(16, triton.next_power_of_2(C)),
        )  # fmt: skip
    return out
