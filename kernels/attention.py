"""Fused attention in Triton, FlashAttention-2 style: forward, split-KV decode and backward.

The math (the specification is :mod:`torchslim.reference.attention`). Query row i of head h in
sequence b reads kv head hk = h // (H // Hkv) (GQA, never expanded in memory); L = kv_lens[b]
(or Sk) keys are valid, and the row sits at position p = i + L - Sq (causal aligned
bottom-right). Key j is visible when

    j < L,  and j <= p (causal),  and j > p - window (window),  and attn_mask[b, h, i, j] (bool)

and, over the visible keys (a row with none gives zeros and lse = -inf):

    s[j]   = scale * q[b, h, i] . k[b, hk, j]  (+ attn_mask[b, h, i, j] when it is float)
    out    = sum_j exp(s[j] - lse) v[b, hk, j],     lse = log sum_j exp(s[j])

Forward (online softmax). A program keeps BLOCK_M query rows in registers and streams the keys
in BLOCK_N blocks, with a running row max m, row sum l and unnormalised output acc, all fp32.
The scores are kept in base 2, log2(e) folded into the scale, so that every exponential is an
exp2:

    t = (q k^T) * scale * log2(e)                          (+ mask * log2(e))
    m' = max(m, rowmax t);  p = exp2(t - m');  alpha = exp2(m - m')
    l = alpha l + rowsum p;  acc = alpha acc + p v          (p cast to v's dtype for tl.dot)
    out = acc / l;  lse = (m + log2 l) * ln(2)

The key range of a query block is cut to what its rows can see (causal: nothing past the last
row's position; window: nothing before the first row's window), and split in whole key blocks
into a middle part that every row sees entirely, run with no element mask at all, and the edges
(the diagonal, the window's start, the last partial block at L) where causal / window / kv_lens
are applied per element. Rows whose running max is still -inf (nothing visible yet) use 0 in
its place, so an empty row never produces inf - inf. Under causal, the query blocks of each
(b, h) that see the most keys are launched first.

Split-KV decode (FlashDecoding), for Sq <= ATTN_DECODE_MAX_SQ. A program packs the query rows
of all the GROUP = H // Hkv query heads that share one kv head (row r = g * Sq + i), so every K/V
tile is loaded once for the whole group, and takes one of ``num_splits`` slices of the visible
key range. With one slice it writes the output directly; otherwise each slice writes its
partial (acc, m, l) in fp32 and a merge kernel combines them per row:

    M = max_s m_s;  w_s = exp2(m_s - M);  out = sum_s w_s acc_s / sum_s w_s l_s

The number of slices grows until there are about ATTN_DECODE_PROGRAMS_PER_SM programs per SM,
each slice keeping at least ATTN_SPLIT_MIN_KEYS keys (kernels/autotune.py).

Backward (FlashAttention-2), from the forward's out and lse; no score matrix in memory:

    delta_i = sum_d dO[i, d] O[i, d]                                     (_attn_bwd_delta_kernel)
    p = exp2(t - lse * log2(e));  dv += p^T dO;  dp = dO v^T;  ds = p * (dp - delta)
    dk += scale * ds^T q;  dq += scale * ds k

dK/dV: one program per BLOCK_N keys of one kv head; it holds K, V and the dK, dV accumulators
and streams the query blocks of every query head of its GQA group, so the sum over the group
happens in registers and dk/dv are written once, with no atomics. dQ: a separate kernel, one
program per BLOCK_M query rows, streaming the key blocks like the forward. Both recompute p
from lse, skip the blocks no row can see and mask only the edge blocks. Rows with no visible
key (lse = -inf) get p = 0, so zero gradient. attn_mask gets no gradient.

Kernels (configs: kernels/autotune.py, one table per head-dim class 64 / 128 / 256). Every
grid is 1-D (no 65535 limit on the batch x heads), the first index varying fastest:
    _attn_fwd_kernel        forward; (query block, b * H + h); ATTN_FWD_CONFIGS
    _attn_decode_kernel     split-KV decode; (split, row block, b * Hkv + hk); ATTN_DECODE_CONFIGS
    _attn_merge_kernel      combines the decode slices; one program per (b, h, i) row
    _attn_bwd_delta_kernel  delta = rowsum(dO * O); (query block, b * H + h)
    _attn_bwd_dkdv_kernel   dK, dV; (key block, b * Hkv + hk); ATTN_BWD_KV_CONFIGS
    _attn_bwd_dq_kernel     dQ; (query block, b * H + h); ATTN_BWD_Q_CONFIGS

fp32 inputs follow torch.get_float32_matmul_precision(): "highest" makes every tl.dot IEEE fp32
(no tensor cores: correct, slow), anything else TF32.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import autotune as _tune
from ._common import FLOAT_DTYPES, check_same_device, check_tensor, device_guard, dot_precision
from .autotune import (
    ATTN_BWD_KV_CONFIGS,
    ATTN_BWD_Q_CONFIGS,
    ATTN_DECODE_CONFIGS,
    ATTN_FWD_CONFIGS,
    INTERPRET,
    attention_head_class,
    autotune_attention,
    prune_attention_configs,
)

__all__ = ["attention_backward", "attention_forward"]

# Largest head dim (D and Dv): the tiles of wider heads no longer fit registers and shared memory.
MAX_HEAD_DIM = 256

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# attn_mask kinds (the MASK_KIND constexpr).
_NO_MASK, _BOOL_MASK, _FLOAT_MASK = 0, 1, 2


# --------------------------------------------------------------------------------- helpers
@triton.jit
def _load_2d(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Loads a tile, zero where a checked row or column is out of bounds (no mask otherwise)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _seq_len(lens_ptr, b, Sk, HAS_LENS: tl.constexpr):
    """L: the valid keys of sequence b, clamped to [0, Sk] so a bad value never reads out of
    bounds (the op rejects such values before launching)."""
    L = Sk
    if HAS_LENS:
        L = tl.minimum(tl.maximum(tl.load(lens_ptr + b).to(tl.int32), 0), Sk)
    return L


@triton.jit
def _visible(keys, pos, L, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Broadcasts key indices against query positions: j < L, j <= p (causal), j > p - window."""
    vis = keys < L
    if CAUSAL:
        vis = vis & (keys <= pos)
        if HAS_WINDOW:
            vis = vis & (keys > pos - window)
    return vis


@triton.jit
def _add_attn_mask(t, mask_ptrs, ok, MASK_KIND: tl.constexpr, CHECK: tl.constexpr):
    """Applies attn_mask to base-2 scores t: -inf where a bool mask is False, + mask * log2(e)
    for a float one. ``ok`` bounds the load when CHECK."""
    m = tl.load(mask_ptrs, mask=ok, other=0) if CHECK else tl.load(mask_ptrs)
    keep = m != 0
    return tl.where(keep, t, float("-inf")) if MASK_KIND == 1 else t + m.to(tl.float32) * _LOG2E


@triton.jit
def _key_range(p_first, p_last, L, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """Keys [lo, hi) that query rows at positions p_first..p_last can see, and the part
    [full_lo, full_hi) made of whole key blocks that every one of those rows sees entirely.
    lo <= full_lo <= full_hi <= hi; lo, full_lo and full_hi are multiples of BLOCK_N or hi."""
    lo = 0
    hi = L
    full_lo = 0
    full_hi = (L // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(p_last + 1, 0))
        full_hi = tl.minimum(full_hi, (tl.maximum(p_first + 1, 0) // BLOCK_N) * BLOCK_N)
        if HAS_WINDOW:
            lo = (tl.maximum(p_first - window + 1, 0) // BLOCK_N) * BLOCK_N
            full_lo = tl.cdiv(tl.maximum(p_last - window + 1, 0), BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, hi, full_lo, full_hi


@triton.jit
def _query_range(n0, L, Sq, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Query rows [lo, hi) that can see some key of the block [n0, n0 + BLOCK_N), and the part
    [full_lo, full_hi) made of whole query blocks, all inside Sq, that see every key of it.
    Row i sees key j < L when j <= i + L - Sq (causal) and j > i + L - Sq - window (window)."""
    shift = Sq - L  # row i sits at position i - shift
    lo = 0
    hi = tl.where(n0 < L, Sq, 0)
    full_lo = 0
    full_hi = tl.where(n0 + BLOCK_N <= L, (Sq // BLOCK_M) * BLOCK_M, 0)
    if CAUSAL:
        lo = (tl.maximum(n0 + shift, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 + shift, 0), BLOCK_M) * BLOCK_M
        if HAS_WINDOW:
            hi = tl.minimum(hi, tl.maximum(n0 + BLOCK_N - 1 + window + shift, 0))
            last = tl.maximum(n0 + window + shift, 0)
            full_hi = tl.minimum(full_hi, (last // BLOCK_M) * BLOCK_M)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, hi, full_lo, full_hi


@triton.jit
def _finish_rows(acc, m_i, l_i):
    """(out, lse) of rows from the online-softmax state; rows that saw nothing: 0 and -inf."""
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    return out, lse


# --------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_blocks(
    acc, m_i, l_i,  # online-softmax state: (BLOCK_M, BLOCK_DV), (BLOCK_M,), (BLOCK_M,) fp32
    q,  # (BLOCK_M, BLOCK_D) the rows' queries
    k_ptr, v_ptr,  # this kv head's key / value 0
    mask_ptrs,  # (BLOCK_M,) &attn_mask[b, h, i, 0] per row (MASK_KIND)
    rows_ok, pos,  # (BLOCK_M,) rows inside the problem; their causal positions
    start, end,  # keys [start, end), start a multiple of BLOCK_N
    L, window, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    MASKED: tl.constexpr,  # apply kv_lens / causal / window per element (edge blocks)
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key blocks in [start, end) (module docstring)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    first = tl.cast(start, tl.int64)
    k_ptrs = k_ptr + first * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_ptr + first * stride_vn + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        keys_ok = keys < L  # loads stop at L: keys past it may be anything, NaN included
        k = _load_2d(k_ptrs, keys_ok, offs_d < HEAD_D, MASKED, HEAD_D != BLOCK_D)
        t = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK_KIND != 0:
            m_ptrs = mask_ptrs[:, None] + keys[None, :] * stride_mn
            t = _add_attn_mask(t, m_ptrs, rows_ok[:, None] & keys_ok[None, :], MASK_KIND, True)
        if MASKED:
            vis = _visible(keys[None, :], pos[:, None], L, window, CAUSAL, HAS_WINDOW)
            t = tl.where(vis, t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(t, 1))
        m_use = m_new
        if MASKED or MASK_KIND != 0:  # a row may have seen nothing yet: subtract 0, not -inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(t - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_2d(v_ptrs, keys_ok, offs_dv < HEAD_DV, MASKED, HEAD_DV != BLOCK_DV)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, m_i, l_i


@triton.jit
def _fwd_range(
    acc, m_i, l_i, q, k_ptr, v_ptr, mask_ptrs, rows_ok, pos,
    start, end, full_lo, full_hi,  # keys [start, end); [full_lo, full_hi) needs no element mask
    L, window, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The keys [start, end) in three runs: masked edge, unmasked middle, masked edge."""
    acc, m_i, l_i = _fwd_blocks(
        acc, m_i, l_i, q, k_ptr, v_ptr, mask_ptrs, rows_ok, pos,
        start, tl.minimum(end, full_lo), L, window, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        True, CAUSAL, HAS_WINDOW, MASK_KIND, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N,
        DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _fwd_blocks(
        acc, m_i, l_i, q, k_ptr, v_ptr, mask_ptrs, rows_ok, pos,
        tl.maximum(start, full_lo), tl.minimum(end, full_hi), L, window, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        False, CAUSAL, HAS_WINDOW, MASK_KIND, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N,
        DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _fwd_blocks(
        acc, m_i, l_i, q, k_ptr, v_ptr, mask_ptrs, rows_ok, pos,
        tl.maximum(start, full_hi), end, L, window, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        True, CAUSAL, HAS_WINDOW, MASK_KIND, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N,
        DOT_PRECISION,
    )  # fmt: skip
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["Sq", "Sk", "SQ_BUCKET", "SK_BUCKET", "window"])
def _attn_fwd_kernel(
    # Inputs, any strides
    q_ptr,  # (B, H, Sq, D) fp32/fp16/bf16
    k_ptr,  # (B, Hkv, Sk, D) q's dtype
    v_ptr,  # (B, Hkv, Sk, Dv) q's dtype
    mask_ptr,  # attn_mask seen as (B, H, Sq, Sk) through strides, 0 on broadcast dims;
    #            bool read as uint8 (MASK_KIND 1) or any float (MASK_KIND 2)
    lens_ptr,  # (B,) int32/int64 valid keys per sequence (HAS_LENS)
    # Outputs, contiguous
    o_ptr,  # (B, H, Sq, Dv) q's dtype
    lse_ptr,  # (B, H, Sq) fp32, natural log (STORE_LSE)
    # Sizes
    H, GROUP,  # query heads; query heads per kv head (H // Hkv)
    Sq, Sk,
    SQ_BUCKET, SK_BUCKET,  # next_pow2(Sq), next_pow2(Sk): autotune key and prune only
    qk_scale,  # scale * log2(e)
    window,  # sliding window (HAS_WINDOW)
    # Strides, in elements
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    # Problem
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,  # D, Dv
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # next powers of two (>= 16)
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool, 2 float
    HAS_LENS: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision, matters for fp32 only
    # Tiling (autotuned)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    # 1-D grid, query blocks of one (b, h) consecutive (they share K/V in L2)
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    bh = tl.program_id(0) // num_m
    if CAUSAL:  # the query blocks that see the most keys start first
        pid_m = num_m - 1 - pid_m
    b = bh // H
    h = bh % H
    L = _seq_len(lens_ptr, b, Sk, HAS_LENS)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < Sq
    pos = offs_m + (L - Sq)
    rows = offs_m.to(tl.int64)

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    q_ptrs = (q_ptr + b64 * stride_qb + h64 * stride_qh
              + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd)  # fmt: skip
    q = _load_2d(q_ptrs, rows_ok, offs_d < HEAD_D, True, HEAD_D != BLOCK_D)
    k_base = k_ptr + b64 * stride_kb + hk64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk64 * stride_vh
    mask_ptrs = mask_ptr + b64 * stride_mb + h64 * stride_mh + rows * stride_mm

    lo, hi, full_lo, full_hi = _key_range(
        m0 + L - Sq, m0 + BLOCK_M - 1 + L - Sq, L, window, CAUSAL, HAS_WINDOW, BLOCK_N
    )
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _fwd_range(
        acc, m_i, l_i, q, k_base, v_base, mask_ptrs, rows_ok, pos,
        lo, hi, full_lo, full_hi, L, window, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        CAUSAL, HAS_WINDOW, MASK_KIND, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N,
        DOT_PRECISION,
    )  # fmt: skip
    out, lse = _finish_rows(acc, m_i, l_i)

    out_rows = (b64 * H + h64) * Sq + rows
    o_ptrs = o_ptr + out_rows[:, None] * HEAD_DV + offs_dv[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty),
             mask=rows_ok[:, None] & (offs_dv < HEAD_DV)[None, :])  # fmt: skip
    if STORE_LSE:
        tl.store(lse_ptr + out_rows, lse, mask=rows_ok)


# --------------------------------------------------------------------------------- decode
@triton.jit(do_not_specialize=["Sq", "Sk", "SQ_BUCKET", "SK_BUCKET", "window", "num_splits"])
def _attn_decode_kernel(
    # Inputs, any strides: as _attn_fwd_kernel
    q_ptr, k_ptr, v_ptr, mask_ptr, lens_ptr,
    # Outputs, contiguous
    o_ptr,  # (B, H, Sq, Dv) q's dtype (one slice: SPLIT False)
    lse_ptr,  # (B, H, Sq) fp32 (one slice and STORE_LSE)
    po_ptr,  # (B * H * Sq, num_splits, Dv) fp32 unnormalised partial outputs (SPLIT)
    pm_ptr, pl_ptr,  # (B * H * Sq, num_splits) fp32 partial row max (base 2) and sum (SPLIT)
    # Sizes
    H, GROUP, Sq, Sk,
    SQ_BUCKET, SK_BUCKET,  # next_pow2(GROUP * Sq), next_pow2(Sk): autotune key only
    num_splits,  # key slices per row block
    qk_scale, window,
    # Strides, in elements
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    # Problem
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_LENS: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: write partials for _attn_merge_kernel
    # Tiling: BLOCK_M packed rows (set by the launcher), BLOCK_N keys (autotuned)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    # 1-D grid over (b, kv head, row block, split), splits fastest
    num_r = tl.cdiv(GROUP * Sq, BLOCK_M)
    split = tl.program_id(0) % num_splits
    pid_r = (tl.program_id(0) // num_splits) % num_r
    bhk = tl.program_id(0) // (num_splits * num_r)
    Hkv = H // GROUP
    b = bhk // Hkv
    hk = bhk % Hkv
    L = _seq_len(lens_ptr, b, Sk, HAS_LENS)

    # Row r = g * Sq + i: query i of head hk * GROUP + g.
    r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = r < GROUP * Sq
    i = r % Sq
    h = hk * GROUP + r // Sq
    pos = i + (L - Sq)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_rows = b64 * stride_qb + h.to(tl.int64) * stride_qh + i.to(tl.int64) * stride_qm
    q = _load_2d(q_ptr + q_rows[:, None] + offs_d[None, :] * stride_qd,
                 rows_ok, offs_d < HEAD_D, True, HEAD_D != BLOCK_D)  # fmt: skip
    k_base = k_ptr + b64 * stride_kb + hk64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk64 * stride_vh
    mask_ptrs = (mask_ptr + b64 * stride_mb + h.to(tl.int64) * stride_mh
                 + i.to(tl.int64) * stride_mm)  # fmt: skip

    # This program's slice of the keys its rows can see.
    p_first = tl.min(tl.where(rows_ok, pos, Sk), 0)
    p_last = tl.max(tl.where(rows_ok, pos, -1), 0)
    lo, hi, full_lo, full_hi = _key_range(p_first, p_last, L, window, CAUSAL, HAS_WINDOW, BLOCK_N)
    per_split = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), num_splits) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(hi, start + per_split)

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _fwd_range(
        acc, m_i, l_i, q, k_base, v_base, mask_ptrs, rows_ok, pos,
        start, end, full_lo, full_hi, L, window, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        CAUSAL, HAS_WINDOW, MASK_KIND, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N,
        DOT_PRECISION,
    )  # fmt: skip

    # The group's rows are consecutive in (B, H, Sq) order: (b * H + hk * GROUP) * Sq + r.
    out_rows = (b64 * H + hk64 * GROUP) * Sq + r.to(tl.int64)
    dv_ok = offs_dv < HEAD_DV
    if SPLIT:
        part = out_rows * num_splits + split
        tl.store(po_ptr + part[:, None] * HEAD_DV + offs_dv[None, :], acc,
                 mask=rows_ok[:, None] & dv_ok[None, :])  # fmt: skip
        tl.store(pm_ptr + part, m_i, mask=rows_ok)
        tl.store(pl_ptr + part, l_i, mask=rows_ok)
    else:
        out, lse = _finish_rows(acc, m_i, l_i)
        o_ptrs = o_ptr + out_rows[:, None] * HEAD_DV + offs_dv[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=rows_ok[:, None] & dv_ok[None, :])
        if STORE_LSE:
            tl.store(lse_ptr + out_rows, lse, mask=rows_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _attn_merge_kernel(
    po_ptr, pm_ptr, pl_ptr,  # the decode kernel's partials (SPLIT)
    o_ptr,  # (B, H, Sq, Dv) contiguous, q's dtype
    lse_ptr,  # (B, H, Sq) fp32 (STORE_LSE)
    num_splits,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next_pow2(num_splits)
    STORE_LSE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < num_splits
    m_s = tl.load(pm_ptr + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(pl_ptr + row * num_splits + offs_s, mask=s_ok, other=0.0)
    m = tl.max(m_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.sum(tl.exp2(m_s - m_use) * l_s, 0)
    acc = tl.zeros((BLOCK_DV,), dtype=tl.float32)
    for s in range(0, num_splits):
        w = tl.exp2(tl.load(pm_ptr + row * num_splits + s) - m_use)
        part = tl.load(po_ptr + (row * num_splits + s) * HEAD_DV + offs_dv,
                       mask=offs_dv < HEAD_DV, other=0.0)  # fmt: skip
        acc += w * part
    seen = l_sum > 0
    l_safe = tl.where(seen, l_sum, 1.0)
    tl.store(o_ptr + row * HEAD_DV + offs_dv, (acc / l_safe).to(o_ptr.dtype.element_ty),
             mask=offs_dv < HEAD_DV)  # fmt: skip
    if STORE_LSE:
        tl.store(lse_ptr + row, tl.where(seen, (m + tl.log2(l_safe)) * _LN2, float("-inf")))


# --------------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["Sq"])
def _attn_bwd_delta_kernel(
    o_ptr,  # (B, H, Sq, Dv) any strides
    do_ptr,  # (B, H, Sq, Dv) any strides
    delta_ptr,  # (B, H, Sq) fp32 contiguous: rowsum(dO * O)
    H, Sq,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    num_m = tl.cdiv(Sq, BLOCK_M)
    bh = tl.program_id(0) // num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = (tl.program_id(0) % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < Sq
    rows = offs_m.to(tl.int64)
    cols_ok = offs_dv < HEAD_DV
    o = _load_2d(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om
                 + offs_dv[None, :] * stride_od, rows_ok, cols_ok, True, True)  # fmt: skip
    do = _load_2d(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom
                  + offs_dv[None, :] * stride_dod, rows_ok, cols_ok, True, True)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + (b * H + h) * Sq + rows, delta, mask=rows_ok)


@triton.jit
def _bwd_kv_blocks(
    dk, dv,  # (BLOCK_N, BLOCK_D), (BLOCK_N, BLOCK_DV) fp32 accumulators
    k, v,  # (BLOCK_N, BLOCK_D), (BLOCK_N, BLOCK_DV) this program's keys and values
    keys, keys_ok,  # (BLOCK_N,) key indices, keys < L
    q_ptr, do_ptr,  # this query head's q / dO row 0
    lse_ptr, delta_ptr,  # this query head's lse / delta row 0 (contiguous)
    mask_ptr,  # &attn_mask[b, h, 0, 0] (MASK_KIND)
    start, end,  # query rows [start, end), start a multiple of BLOCK_M
    L, Sq, window, qk_scale,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
    MASKED: tl.constexpr,  # rows past Sq, kv_lens, causal, window per element (edge blocks)
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dK, dV contributions of the query blocks in [start, end), in the transposed (key, row)
    orientation, so that the accumulators need no transpose."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    first = tl.cast(start, tl.int64)
    q_ptrs = q_ptr + first * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = (do_ptr + first * stride_dom + offs_m[:, None] * stride_dom
               + offs_dv[None, :] * stride_dod)  # fmt: skip
    mask_ptrs = mask_ptr + keys[:, None] * stride_mn + (first + offs_m)[None, :] * stride_mm
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_m
        rows_ok = rows < Sq
        q = _load_2d(q_ptrs, rows_ok, offs_d < HEAD_D, MASKED, HEAD_D != BLOCK_D)
        do = _load_2d(do_ptrs, rows_ok, offs_dv < HEAD_DV, MASKED, HEAD_DV != BLOCK_DV)
        if MASKED:
            lse = tl.load(lse_ptr + rows, mask=rows_ok, other=float("inf"))
            delta = tl.load(delta_ptr + rows, mask=rows_ok, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        # Rows with no visible key have lse = -inf: treat it as +inf so that p = 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
        t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASK_KIND != 0:
            t = _add_attn_mask(t, mask_ptrs, keys_ok[:, None] & rows_ok[None, :], MASK_KIND,
                               MASKED)  # fmt: skip
        p = tl.exp2(t - lse2[None, :])
        if MASKED:
            pos = rows + (L - Sq)
            p = tl.where(_visible(keys[:, None], pos[None, :], L, window, CAUSAL, HAS_WINDOW),
                         p, 0.0)  # fmt: skip
        dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[None, :])
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
        mask_ptrs += BLOCK_M * stride_mm
    return dk, dv


@triton.jit(do_not_specialize=["Sq", "Sk", "SQ_BUCKET", "SK_BUCKET", "window"])
def _attn_bwd_dkdv_kernel(
    # Inputs, any strides: as _attn_fwd_kernel, plus dO (B, H, Sq, Dv) in q's dtype
    q_ptr, k_ptr, v_ptr, mask_ptr, lens_ptr, do_ptr,
    lse_ptr,  # (B, H, Sq) fp32 contiguous, from the forward
    delta_ptr,  # (B, H, Sq) fp32 contiguous, from _attn_bwd_delta_kernel
    # Outputs, contiguous, in k's / v's dtype
    dk_ptr,  # (B, Hkv, Sk, D)
    dv_ptr,  # (B, Hkv, Sk, Dv)
    # Sizes
    H, GROUP, Sq, Sk, SQ_BUCKET, SK_BUCKET,
    sm_scale, qk_scale, window,
    # Strides, in elements
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    # Problem
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # Tiling (autotuned): BLOCK_N keys per program, BLOCK_M query rows per step
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    num_n = tl.cdiv(Sk, BLOCK_N)
    pid_n = tl.program_id(0) % num_n
    bhk = tl.program_id(0) // num_n
    Hkv = H // GROUP
    b = bhk // Hkv
    hk = bhk % Hkv
    L = _seq_len(lens_ptr, b, Sk, HAS_LENS)

    n0 = pid_n * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    keys_ok = keys < L
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    krows = keys.to(tl.int64)
    k = _load_2d(k_ptr + b64 * stride_kb + hk64 * stride_kh + krows[:, None] * stride_kn
                 + offs_d[None, :] * stride_kd, keys_ok, offs_d < HEAD_D, True,
                 HEAD_D != BLOCK_D)  # fmt: skip
    v = _load_2d(v_ptr + b64 * stride_vb + hk64 * stride_vh + krows[:, None] * stride_vn
                 + offs_dv[None, :] * stride_vd, keys_ok, offs_dv < HEAD_DV, True,
                 HEAD_DV != BLOCK_DV)  # fmt: skip
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)

    lo, hi, full_lo, full_hi = _query_range(n0, L, Sq, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for g in range(0, GROUP):  # every query head of the group: dK, dV summed in registers
        h64 = hk64 * GROUP + g
        q_base = q_ptr + b64 * stride_qb + h64 * stride_qh
        do_base = do_ptr + b64 * stride_dob + h64 * stride_doh
        row0 = (b64 * H + h64) * Sq
        mask_base = mask_ptr + b64 * stride_mb + h64 * stride_mh
        dk, dv = _bwd_kv_blocks(
            dk, dv, k, v, keys, keys_ok, q_base, do_base, lse_ptr + row0, delta_ptr + row0,
            mask_base, lo, full_lo, L, Sq, window, qk_scale,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
            True, CAUSAL, HAS_WINDOW, MASK_KIND, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV,
            BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        dk, dv = _bwd_kv_blocks(
            dk, dv, k, v, keys, keys_ok, q_base, do_base, lse_ptr + row0, delta_ptr + row0,
            mask_base, full_lo, full_hi, L, Sq, window, qk_scale,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
            False, CAUSAL, HAS_WINDOW, MASK_KIND, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV,
            BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        dk, dv = _bwd_kv_blocks(
            dk, dv, k, v, keys, keys_ok, q_base, do_base, lse_ptr + row0, delta_ptr + row0,
            mask_base, full_hi, hi, L, Sq, window, qk_scale,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
            True, CAUSAL, HAS_WINDOW, MASK_KIND, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV,
            BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip

    out_rows = (b64 * (H // GROUP) + hk64) * Sk + krows
    in_sk = keys < Sk
    tl.store(dk_ptr + out_rows[:, None] * HEAD_D + offs_d[None, :],
             (dk * sm_scale).to(dk_ptr.dtype.element_ty),
             mask=in_sk[:, None] & (offs_d < HEAD_D)[None, :])  # fmt: skip
    tl.store(dv_ptr + out_rows[:, None] * HEAD_DV + offs_dv[None, :],
             dv.to(dv_ptr.dtype.element_ty),
             mask=in_sk[:, None] & (offs_dv < HEAD_DV)[None, :])  # fmt: skip


@triton.jit
def _bwd_q_blocks(
    dq,  # (BLOCK_M, BLOCK_D) fp32 accumulator
    q, do,  # (BLOCK_M, BLOCK_D), (BLOCK_M, BLOCK_DV) the rows' queries and output gradients
    lse2, delta,  # (BLOCK_M,) fp32 base-2 lse (+inf for empty rows) and rowsum(dO * O)
    k_ptr, v_ptr, mask_ptrs, rows_ok, pos,  # as _fwd_blocks
    start, end, L, window, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dQ contributions of the key blocks in [start, end)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    first = tl.cast(start, tl.int64)
    k_ptrs = k_ptr + first * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_ptr + first * stride_vn + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        keys_ok = keys < L
        k = _load_2d(k_ptrs, keys_ok, offs_d < HEAD_D, MASKED, HEAD_D != BLOCK_D)
        v = _load_2d(v_ptrs, keys_ok, offs_dv < HEAD_DV, MASKED, HEAD_DV != BLOCK_DV)
        t = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK_KIND != 0:
            m_ptrs = mask_ptrs[:, None] + keys[None, :] * stride_mn
            t = _add_attn_mask(t, m_ptrs, rows_ok[:, None] & keys_ok[None, :], MASK_KIND, True)
        p = tl.exp2(t - lse2[:, None])
        if MASKED:
            vis = _visible(keys[None, :], pos[:, None], L, window, CAUSAL, HAS_WINDOW)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit(do_not_specialize=["Sq", "Sk", "SQ_BUCKET", "SK_BUCKET", "window"])
def _attn_bwd_dq_kernel(
    # Inputs: as _attn_bwd_dkdv_kernel
    q_ptr, k_ptr, v_ptr, mask_ptr, lens_ptr, do_ptr, lse_ptr, delta_ptr,
    # Output, contiguous, in q's dtype
    dq_ptr,  # (B, H, Sq, D)
    # Sizes
    H, GROUP, Sq, Sk, SQ_BUCKET, SK_BUCKET,
    sm_scale, qk_scale, window,
    # Strides, in elements
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    # Problem
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # Tiling (autotuned): BLOCK_M query rows per program, BLOCK_N keys per step
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    bh = tl.program_id(0) // num_m
    if CAUSAL:
        pid_m = num_m - 1 - pid_m
    b = bh // H
    h = bh % H
    L = _seq_len(lens_ptr, b, Sk, HAS_LENS)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < Sq
    pos = offs_m + (L - Sq)
    rows = offs_m.to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    q = _load_2d(q_ptr + b64 * stride_qb + h64 * stride_qh + rows[:, None] * stride_qm
                 + offs_d[None, :] * stride_qd, rows_ok, offs_d < HEAD_D, True,
                 HEAD_D != BLOCK_D)  # fmt: skip
    do = _load_2d(do_ptr + b64 * stride_dob + h64 * stride_doh + rows[:, None] * stride_dom
                  + offs_dv[None, :] * stride_dod, rows_ok, offs_dv < HEAD_DV, True,
                  HEAD_DV != BLOCK_DV)  # fmt: skip
    out_rows = (b64 * H + h64) * Sq + rows
    lse = tl.load(lse_ptr + out_rows, mask=rows_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(delta_ptr + out_rows, mask=rows_ok, other=0.0)
    k_base = k_ptr + b64 * stride_kb + hk64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk64 * stride_vh
    mask_ptrs = mask_ptr + b64 * stride_mb + h64 * stride_mh + rows * stride_mm

    lo, hi, full_lo, full_hi = _key_range(
        m0 + L - Sq, m0 + BLOCK_M - 1 + L - Sq, L, window, CAUSAL, HAS_WINDOW, BLOCK_N
    )
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _bwd_q_blocks(
        dq, q, do, lse2, delta, k_base, v_base, mask_ptrs, rows_ok, pos,
        lo, full_lo, L, window, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        True, CAUSAL, HAS_WINDOW, MASK_KIND, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N,
        DOT_PRECISION,
    )  # fmt: skip
    dq = _bwd_q_blocks(
        dq, q, do, lse2, delta, k_base, v_base, mask_ptrs, rows_ok, pos,
        full_lo, full_hi, L, window, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        False, CAUSAL, HAS_WINDOW, MASK_KIND, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N,
        DOT_PRECISION,
    )  # fmt: skip
    dq = _bwd_q_blocks(
        dq, q, do, lse2, delta, k_base, v_base, mask_ptrs, rows_ok, pos,
        full_hi, hi, L, window, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        True, CAUSAL, HAS_WINDOW, MASK_KIND, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N,
        DOT_PRECISION,
    )  # fmt: skip
    tl.store(dq_ptr + out_rows[:, None] * HEAD_D + offs_d[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=rows_ok[:, None] & (offs_d < HEAD_D)[None, :])  # fmt: skip


# One autotuned entry point per kernel and head-dim class (see kernels/autotune.py).
_KERNELS = {
    kind: (kernel, tables, {cls: autotune_attention(tables[cls], kind)(kernel) for cls in tables})
    for kind, kernel, tables in (
        ("fwd", _attn_fwd_kernel, ATTN_FWD_CONFIGS),
        ("decode", _attn_decode_kernel, ATTN_DECODE_CONFIGS),
        ("bwd_kv", _attn_bwd_dkdv_kernel, ATTN_BWD_KV_CONFIGS),
        ("bwd_q", _attn_bwd_dq_kernel, ATTN_BWD_Q_CONFIGS),
    )
}

# Rows per program of the delta preprocessing.
_DELTA_BLOCK_M = 16 if INTERPRET else 64


# --------------------------------------------------------------------------------- launchers
def _dims(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _check_inputs(q, k, v, attn_mask, causal, scale, window, kv_lens) -> int:
    """Validates the forward's arguments; returns the window (-1 for none)."""
    check_tensor("q", q, FLOAT_DTYPES, (None,) * 4, "(B, H, Sq, D)")
    B, H, Sq, D = q.shape
    check_tensor("k", k, (q.dtype,), (B, None, None, D), "(B, Hkv, Sk, D)",
                 " to match q's batch and head_dim")  # fmt: skip
    Hkv, Sk = k.shape[1], k.shape[2]
    check_tensor("v", v, (q.dtype,), (B, Hkv, Sk, None), "(B, Hkv, Sk, Dv)",
                 " to match k's batch, heads and length")  # fmt: skip
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"k's heads Hkv={Hkv} must divide q's heads H={H} (grouped-query "
                         f"attention), got k of shape {_dims(k)}")  # fmt: skip
    for name, dim in (("q", D), ("v", v.shape[3])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must have a head dim in [1, {MAX_HEAD_DIM}], got {dim}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got "
                            f"{type(attn_mask).__name__}")  # fmt: skip
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        try:
            ok = torch.broadcast_shapes(attn_mask.shape, (B, H, Sq, Sk)) == (B, H, Sq, Sk)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask must broadcast to (B, H, Sq, Sk) = {(B, H, Sq, Sk)}, "
                             f"got {_dims(attn_mask)}")  # fmt: skip
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):  # fmt: skip
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if window is None:
        window = -1
    if isinstance(window, bool) or not isinstance(window, int) or (window != -1 and window < 1):
        raise ValueError(f"window must be a positive int, or -1 or None for none, got {window!r}")
    if window != -1 and not causal:
        raise ValueError(f"window={window} (a sliding window over past keys) needs causal=True")
    if kv_lens is not None:
        check_tensor("kv_lens", kv_lens, (torch.int32, torch.int64), (B,), "(B,)",
                     " to match q's batch")  # fmt: skip
    check_same_device(q=q, k=k, v=v, attn_mask=attn_mask, kv_lens=kv_lens)
    return window


def _mask_args(attn_mask, q, B, H, Sq, Sk):
    """(tensor, 4 strides, MASK_KIND): the mask seen as (B, H, Sq, Sk) without copying."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), _NO_MASK
    mask = attn_mask.expand(B, H, Sq, Sk)
    kind = _FLOAT_MASK
    if mask.dtype == torch.bool:
        mask, kind = mask.view(torch.uint8), _BOOL_MASK
    return mask, mask.stride(), kind


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(t: torch.Tensor) -> int:
    if not t.is_cuda:
        return _tune.ATTN_INTERPRETER_SMS
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _decode_rows(group: int, Sq: int, block_d: int, block_dv: int) -> int:
    """BLOCK_M of the decode kernel: the group's G * Sq rows, capped (registers)."""
    cap = _tune.ATTN_DECODE_MAX_ROWS
    if max(block_d, block_dv) > 128:
        cap //= 2
    return min(max(16, triton.next_power_of_2(group * Sq)), max(16, cap))


def decode_splits(programs: int, Sk: int, num_sms: int) -> int:
    """Key slices per row block of the split-KV decode: enough for ATTN_DECODE_PROGRAMS_PER_SM
    programs per SM, each slice at least ATTN_SPLIT_MIN_KEYS keys, at most ATTN_MAX_SPLITS."""
    want = triton.cdiv(_tune.ATTN_DECODE_PROGRAMS_PER_SM * num_sms, max(programs, 1))
    by_len = max(1, Sk // _tune.ATTN_SPLIT_MIN_KEYS)
    return max(1, min(want, by_len, _tune.ATTN_MAX_SPLITS))


def _launch(kind, grid, args, kwargs) -> None:
    """Launches the ``kind`` kernel with its head-dim class's configs: autotuned, or, when not
    autotuning (TORCHSLIM_TRITON_AUTOTUNE=0, the interpreter), the first config the prune keeps
    for this shape."""
    kernel, tables, tuned = _KERNELS[kind]
    cls = attention_head_class(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])
    if _tune.AUTOTUNE and len(tables[cls]) > 1:
        tuned[cls][grid](*args, **kwargs)
        return
    named = dict(zip(kernel.arg_names, args, strict=False))
    cfg = prune_attention_configs(tables[cls], named, kind=kind, **kwargs)[0]
    kernel[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages)  # fmt: skip


def _nan_where_q_is_nan(q, out, may_see_nothing: bool) -> None:
    """A query row holding a NaN gives NaN outputs (the reference's rule), also where it sees
    no key: the kernels give such a row zeros without reading q. Where every row sees a key,
    the kernels' own arithmetic carries the NaN, and no pass over q is spent."""
    if may_see_nothing:
        out.masked_fill_(q.isnan().any(dim=-1, keepdim=True), float("nan"))


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = -1,
    kv_lens: torch.Tensor | None = None,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused attention, the semantics of :func:`torchslim.reference.attention.attention`.

    Sq <= ATTN_DECODE_MAX_SQ (16) runs the decode kernel (the query heads of a GQA group
    packed into one program, split-KV when there are few programs for the key length);
    longer queries run the FlashAttention-2 forward. fp32 accumulation throughout; fp32 inputs
    follow ``torch.get_float32_matmul_precision()`` ("highest": IEEE fp32, else TF32).

    Args:
        q: (B, H, Sq, D) fp32/fp16/bf16, any strides.
        k: (B, Hkv, Sk, D) q's dtype, any strides; Hkv divides H (query head h reads kv head
            h // (H // Hkv)); never expanded in memory.
        v: (B, Hkv, Sk, Dv) q's dtype, any strides. D and Dv in [1, 256], any sizes (tiles
            are padded to the next power of two and masked).
        attn_mask: bool (True = attend) or float added to the scores, any dtype and strides,
            broadcastable to (B, H, Sq, Sk); read through zero strides, never materialised.
        causal: aligned bottom-right: query i sits at position i + L - Sq.
        scale: multiplies q k^T; default 1 / sqrt(D).
        window: with causal, key j visible when position - window < j <= position; -1 or
            None: no window.
        kv_lens: (B,) int32/int64, the valid keys of each sequence, in [0, Sk] (not checked
            here: that costs a device sync; the kernels clamp to [0, Sk]).
        return_lse: also return the row logsumexp.

    Returns:
        out: (B, H, Sq, Dv) in q's dtype, contiguous; zeros for a row with no visible key
            (NaN where its q holds a NaN).
        lse (with return_lse): (B, H, Sq) fp32, the natural-log logsumexp of the scaled,
            masked scores of each row; -inf for a row with no visible key.
    """
    window = _check_inputs(q, k, v, attn_mask, causal, scale, window, kv_lens)
    B, H, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((B, H, Sq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Sk == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        _nan_where_q_is_nan(q, out, True)
        return (out, lse) if return_lse else out
    may_see_nothing = attn_mask is not None or kv_lens is not None or (causal and Sq > Sk)

    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    mask, mask_strides, mask_kind = _mask_args(attn_mask, q, B, H, Sq, Sk)
    group = H // Hkv
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides)
    flags = {
        "HEAD_D": D, "HEAD_DV": Dv, "BLOCK_D": _block(D), "BLOCK_DV": _block(Dv),
        "CAUSAL": causal, "HAS_WINDOW": window != -1, "MASK_KIND": mask_kind,
        "HAS_LENS": kv_lens is not None, "STORE_LSE": return_lse,
        "DOT_PRECISION": dot_precision(q.dtype),
    }  # fmt: skip
    lens = kv_lens if kv_lens is not None else q
    window = max(window, 0)
    qk_scale = scale * 1.4426950408889634

    with device_guard(q):
        if Sq > _tune.ATTN_DECODE_MAX_SQ:
            args = (q, k, v, mask, lens, out, lse, H, group, Sq, Sk, _bucket(Sq), _bucket(Sk),
                    qk_scale, window, *strides)  # fmt: skip

            def grid(meta):
                return (triton.cdiv(Sq, meta["BLOCK_M"]) * B * H,)

            _launch("fwd", grid, args, flags)
            _nan_where_q_is_nan(q, out, may_see_nothing)
            return (out, lse) if return_lse else out

        block_m = _decode_rows(group, Sq, flags["BLOCK_D"], flags["BLOCK_DV"])
        row_blocks = triton.cdiv(group * Sq, block_m)
        splits = decode_splits(B * Hkv * row_blocks, Sk, _num_sms(q))
        if splits > 1:
            po = torch.empty((B * H * Sq, splits, Dv), dtype=torch.float32, device=q.device)
            pm = torch.empty((B * H * Sq, splits), dtype=torch.float32, device=q.device)
            pl = torch.empty_like(pm)
        else:
            po = pm = pl = lse
        args = (q, k, v, mask, lens, out, lse, po, pm, pl, H, group, Sq, Sk,
                _bucket(group * Sq), _bucket(Sk), splits, qk_scale, window, *strides)  # fmt: skip
        decode_flags = {**flags, "SPLIT": splits > 1, "BLOCK_M": block_m}
        _launch("decode", (splits * row_blocks * B * Hkv,), args, decode_flags)
        if splits > 1:
            _attn_merge_kernel[(B * H * Sq,)](
                po, pm, pl, out, lse, splits,
                HEAD_DV=Dv, BLOCK_DV=flags["BLOCK_DV"], BLOCK_S=triton.next_power_of_2(splits),
                STORE_LSE=return_lse,
            )  # fmt: skip
    _nan_where_q_is_nan(q, out, may_see_nothing)
    return (out, lse) if return_lse else out


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = -1,
    kv_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_forward` (FlashAttention-2 backward).

    Three launches: delta = rowsum(dO * O); dK and dV, one program per key block and kv head
    summing over the GQA group in registers; dQ, one program per query block (no atomics:
    deterministic). attn_mask gets no gradient (a float mask is treated as a constant).

    Args:
        grad_out: (B, H, Sq, Dv) q's dtype, any strides: the gradient of out.
        q, k, v, attn_mask, causal, scale, window, kv_lens: as given to attention_forward.
        out: (B, H, Sq, Dv) q's dtype, any strides: attention_forward's output.
        lse: (B, H, Sq) fp32: attention_forward's ``return_lse`` output.

    Returns:
        dq: (B, H, Sq, D), dk: (B, Hkv, Sk, D), dv: (B, Hkv, Sk, Dv), contiguous, in the
        inputs' dtype; rows with no visible key contribute nothing (zero dq rows).
    """
    window = _check_inputs(q, k, v, attn_mask, causal, scale, window, kv_lens)
    B, H, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    check_tensor("grad_out", grad_out, (q.dtype,), (B, H, Sq, Dv), "(B, H, Sq, Dv)",
                 " to match q and v")  # fmt: skip
    check_tensor("out", out, (q.dtype,), (B, H, Sq, Dv), "(B, H, Sq, Dv)", " to match q and v")
    check_tensor("lse", lse, (torch.float32,), (B, H, Sq), "(B, H, Sq)", " to match q")
    check_same_device(q=q, grad_out=grad_out, out=out, lse=lse)

    dq = torch.empty((B, H, Sq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Sk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Sk, Dv), dtype=v.dtype, device=q.device)
    if B * H * Sq == 0 or Sk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()

    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    mask, mask_strides, mask_kind = _mask_args(attn_mask, q, B, H, Sq, Sk)
    group = H // Hkv
    lse = lse.contiguous()
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    block_dv = _block(Dv)
    flags = {
        "HEAD_D": D, "HEAD_DV": Dv, "BLOCK_D": _block(D), "BLOCK_DV": block_dv,
        "CAUSAL": causal, "HAS_WINDOW": window != -1, "MASK_KIND": mask_kind,
        "HAS_LENS": kv_lens is not None, "DOT_PRECISION": dot_precision(q.dtype),
    }  # fmt: skip
    lens = kv_lens if kv_lens is not None else q
    args = (q, k, v, mask, lens, grad_out, lse, delta)
    sizes = (H, group, Sq, Sk, _bucket(Sq), _bucket(Sk), scale, scale * 1.4426950408889634,
             max(window, 0), *q.stride(), *k.stride(), *v.stride(), *mask_strides,
             *grad_out.stride())  # fmt: skip

    with device_guard(q):
        _attn_bwd_delta_kernel[(triton.cdiv(Sq, _DELTA_BLOCK_M) * B * H,)](
            out, grad_out, delta, H, Sq, *out.stride(), *grad_out.stride(),
            HEAD_DV=Dv, BLOCK_DV=block_dv, BLOCK_M=_DELTA_BLOCK_M,
        )  # fmt: skip

        def grid_kv(meta):
            return (triton.cdiv(Sk, meta["BLOCK_N"]) * B * Hkv,)

        def grid_q(meta):
            return (triton.cdiv(Sq, meta["BLOCK_M"]) * B * H,)

        _launch("bwd_kv", grid_kv, (*args, dk, dv, *sizes), flags)
        _launch("bwd_q", grid_q, (*args, dq, *sizes), flags)
    return dq, dk, dv
