"""Attention: the specification of torchslim's fused attention.

    out = softmax(q @ k.T * scale + bias, masked to the visible keys) @ v

in the layout of ``F.scaled_dot_product_attention``: q (B, H, Sq, D), k (B, Hkv, Sk, D),
v (B, Hkv, Sk, Dv) -> (B, H, Sq, Dv) in q's dtype. What a query row sees:

- GQA / MQA: Hkv divides H; query head h reads key/value head h // (H // Hkv).
- kv_lens (B,): sequence b has kv_lens[b] valid keys (0 .. kv_lens[b] - 1); the rest are
  padding. Without it every sequence has Sk keys.
- causal: aligned bottom-right, as FlashAttention does: query i of sequence b sits at
  position i + L - Sq with L = kv_lens[b] (or Sk), and sees the keys at or before it. A query
  shorter than the keys is the end of the sequence (KV-cache decode, chunked prefill).
- window (with causal): only the last ``window`` positions up to the query's own:
  key j is visible when position - window < j <= position.
- attn_mask: boolean (True = attend) or additive float, broadcastable to (B, H, Sq, Sk).

A row with no visible key (everything masked) produces zeros, not NaN. A NaN reaches the
output as in PyTorch's softmax: a query row holding a NaN gives a NaN row (visible keys or
not), a NaN score or value one that the row sees spreads over the row. (Here a NaN value
behind a mask reaches the rows that cannot see it too, as 0 * NaN in the last matmul; the
kernels skip such keys.)

:func:`attention_backward` gives the gradients for q, k and v (the FlashAttention-2 backward
written densely); float64 inputs compute in float64 throughout, for gradcheck.
"""

from __future__ import annotations

import math

import torch


def visible_keys(
    b: int,
    sq: int,
    sk: int,
    device: torch.device,
    *,
    causal: bool = False,
    window: int | None = None,
    kv_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """(b or 1, 1, sq, sk) bool: the keys each query row may see before attn_mask."""
    keys = torch.arange(sk, device=device)
    if kv_lens is None:
        lens = torch.full((1, 1, 1, 1), sk, device=device, dtype=torch.long)
    else:
        lens = kv_lens.to(device=device, dtype=torch.long).reshape(b, 1, 1, 1)
    visible = keys < lens
    if causal:
        position = torch.arange(sq, device=device).reshape(sq, 1) + lens - sq
        visible = visible & (keys <= position)
        if window is not None:
            visible = visible & (keys > position - window)
    return visible.expand(lens.shape[0], 1, sq, sk)


def _probabilities(
    q, k, attn_mask, causal, scale, window, kv_lens, compute_dtype
) -> tuple[torch.Tensor, float]:
    """(softmax weights (B, H, Sq, Sk) in compute_dtype with k's heads expanded, scale)."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)
    scores = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-1, -2)) * scale
    visible = visible_keys(b, sq, sk, q.device, causal=causal, window=window, kv_lens=kv_lens)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask.to(compute_dtype)
    scores = scores.masked_fill(~visible, -math.inf)
    # Softmax that leaves a row with no visible key (all -inf, or no key at all) at zero instead
    # of NaN, and a NaN as softmax does.
    top = scores.amax(dim=-1, keepdim=True) if sk else scores.new_zeros((*scores.shape[:-1], 1))
    top = torch.where(top == -math.inf, torch.zeros_like(top), top)
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    weights = torch.where(total == 0, torch.zeros_like(weights), weights / total)
    nan_rows = q.isnan().any(dim=-1, keepdim=True)
    return weights.masked_fill(nan_rows, math.nan), scale


def _expand_heads(t: torch.Tensor, h: int) -> torch.Tensor:
    return t if t.shape[1] == h else t.repeat_interleave(h // t.shape[1], dim=1)


def _sum_groups(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, H, S, X) summed over the query heads of each key/value head -> (B, Hkv, S, X)."""
    b, h, s, x = t.shape
    return t if h == hkv else t.reshape(b, hkv, h // hkv, s, x).sum(dim=2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    kv_lens: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The attention of the module docstring, computed in ``compute_dtype`` (float64 for the
    yardstick in tests); returns q's dtype unless compute_dtype is float64."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else compute_dtype
    weights, _ = _probabilities(q, k, attn_mask, causal, scale, window, kv_lens, compute_dtype)
    out = weights @ _expand_heads(v, q.shape[1]).to(compute_dtype)
    return out if compute_dtype == torch.float64 else out.to(q.dtype)


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    kv_lens: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention` for q, k, v (none for attn_mask), recomputing the weights
    P in ``compute_dtype``; each in its input's dtype. With dO = grad_out:

        dV = P^T dO                      (summed over the query heads sharing a key/value head)
        dS = P * (dO V^T - rowsum(P * dO V^T))
        dQ = dS K * scale,   dK = dS^T Q * scale (summed likewise)

    A row with no visible key has P = 0, so it passes no gradient.
    """
    compute_dtype = torch.float64 if q.dtype == torch.float64 else compute_dtype
    h, hkv = q.shape[1], k.shape[1]
    p, scale = _probabilities(q, k, attn_mask, causal, scale, window, kv_lens, compute_dtype)
    d_out = grad_out.to(compute_dtype)
    d_v = _sum_groups(p.transpose(-1, -2) @ d_out, hkv)
    d_p = d_out @ _expand_heads(v, h).to(compute_dtype).transpose(-1, -2)
    d_s = p * (d_p - (p * d_p).sum(dim=-1, keepdim=True))
    d_q = (d_s @ _expand_heads(k, h).to(compute_dtype)) * scale
    d_k = _sum_groups(d_s.transpose(-1, -2) @ q.to(compute_dtype), hkv) * scale
    return d_q.to(q.dtype), d_k.to(k.dtype), d_v.to(v.dtype)
