"""Functional drop-ins: torch.nn.functional's signatures and semantics, torchslim's kernels.

    from torchslim.nn import functional as TF
    out = TF.scaled_dot_product_attention(q, k, v, is_causal=True)  # as F.'s, same result

Swapping one in never changes a result beyond rounding. What the kernels do not take goes to
PyTorch's own function, with a warning logged once per reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchslim.ops._registry import warn_once
from torchslim.ops.attention import attention, broadcasts_to, why_no_kernel

__all__ = ["scaled_dot_product_attention"]

_SDPA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _why_not_sdpa(query, key, value, attn_mask, dropout_p, enable_gqa) -> str | None:
    """None when torchslim attention computes exactly what SDPA would, else the reason not."""
    tensors = (query, key, value) + ((attn_mask,) if attn_mask is not None else ())
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "an argument is not a tensor"
    if any(t.is_nested for t in tensors):
        return "nested tensors"
    if dropout_p > 0.0:
        return "dropout_p > 0"
    if query.dim() < 3 or key.dim() != query.dim() or value.dim() != query.dim():
        return f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D query, key and value"
    if query.dtype not in _SDPA_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes {query.dtype}, {key.dtype}, {value.dtype}"
    if key.device != query.device or value.device != query.device:
        return "query, key and value on different devices"
    if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        return "batch dimensions that broadcast"
    if key.shape[-1] != query.shape[-1] or key.shape[-3:-1] != value.shape[-3:-1]:
        return "mismatched head dims or key/value shapes"
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if heads == 0 or kv_heads == 0:
        return "no heads"
    if kv_heads != heads and not (kv_heads == 1 or (enable_gqa and heads % kv_heads == 0)):
        return f"{heads} query heads and {kv_heads} key/value heads (enable_gqa={enable_gqa})"
    if attn_mask is not None:
        if attn_mask.requires_grad:
            return "an attn_mask that requires grad"
        if attn_mask.dtype not in (torch.bool, query.dtype):
            return f"attn_mask dtype {attn_mask.dtype} with {query.dtype} query"
        scores = (*query.shape[:-1], key.shape[-2])
        if not broadcasts_to(attn_mask.shape, scores):
            return f"attn_mask shape {tuple(attn_mask.shape)} for scores {scores}"
    return None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on torchslim attention: the same signature, shapes
    (..., L, E) and (..., S, E) -> (..., L, Ev), and results.

    Semantics kept from PyTorch: ``is_causal`` aligns top-left (query i sees keys j <= i, also
    when L != S) and excludes ``attn_mask`` (RuntimeError, as documented); a boolean mask is
    True where attention is allowed; ``enable_gqa`` lets dim -3 of key/value divide query's; a
    row with no allowed key is zeros (as PyTorch's CPU kernels give). Dropout, inputs whose
    batch dims broadcast, other dtypes than fp32/bf16/fp16, a mask that requires grad, and
    inputs no torchslim kernel runs here (fp16 on the CPU, say) go to
    ``F.scaled_dot_product_attention``, with a warning logged once per reason.
    Differentiable in query, key and value.
    """
    if is_causal and attn_mask is not None:
        raise RuntimeError(
            "scaled_dot_product_attention: attn_mask should not be set when is_causal=True"
        )
    why = _why_not_sdpa(query, key, value, attn_mask, dropout_p, enable_gqa)
    if why is not None:
        warn_once(f"torchslim scaled_dot_product_attention: {why}; using PyTorch's")
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    lead = query.shape[:-3]
    heads, sq, d = query.shape[-3:]
    kv_heads, sk = key.shape[-3], key.shape[-2]
    batch = lead.numel()  # (not -1: a tensor with an empty dim cannot infer it)
    q = query.reshape(batch, heads, sq, d)
    k = key.reshape(batch, kv_heads, sk, d)
    v = value.reshape(batch, kv_heads, sk, value.shape[-1])
    mask = attn_mask
    if mask is not None and query.dim() != 4:
        mask = mask.expand(*lead, heads, sq, sk).reshape(batch, heads, sq, sk)
    causal = False
    if is_causal and sq <= sk:
        # No query sees past key sq - 1: cut the keys there and top-left is bottom-right.
        k, v = k[:, :, :sq], v[:, :, :sq]
        causal = True
    elif is_causal:  # more queries than keys: the lower triangle, top-left, as a mask
        mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril()
    why = why_no_kernel(q, k, v, mask, causal, scale)
    if why is not None:
        warn_once(f"torchslim scaled_dot_product_attention: no kernel ({why}); using PyTorch's")
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    out = attention(q, k, v, causal=causal, scale=scale, attn_mask=mask)
    return out.reshape(*lead, heads, sq, value.shape[-1])
