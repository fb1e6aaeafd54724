"""MultiheadAttention: nn.MultiheadAttention with its attention on torchslim's fused kernel."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.nn.functional import scaled_dot_product_attention
from torchslim.ops._registry import warn_once


def _allowed(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An nn.MultiheadAttention mask (bool True = masked out, or float added) in SDPA's
    convention (bool True = attend, or float added)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    return mask.to(dtype)


def _merge(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype):
    """Two SDPA-convention masks as one."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    as_float = [
        torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, -math.inf)
        if m.dtype == torch.bool
        else m
        for m in (a, b)
    ]
    return as_float[0] + as_float[1]


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (same constructor, parameters, state_dict and forward) whose
    attention runs ``torchslim.nn.functional.scaled_dot_product_attention``.

    Build one as nn.MultiheadAttention, or from an existing module with :meth:`from_module`
    (which shares its parameters). ``forward`` returns ``(output, None)`` on torchslim's path.
    What that path does not do goes to nn.MultiheadAttention's own forward, with a warning
    logged once per reason: ``need_weights=True`` (the weights are the score matrix this
    kernel never forms; note that nn.MultiheadAttention's default is True), ``add_bias_kv``,
    ``add_zero_attn``, and dropout while training.

    Inside ``nn.TransformerEncoderLayer`` in inference mode, PyTorch's fused fast path
    (``torch._transformer_encoder_layer_fwd``) may run instead of this forward; turn it off with
    ``torch.backends.mha.set_fastpath_enabled(False)``.
    """

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """A torchslim MultiheadAttention sharing ``module``'s parameters (no copy)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be an nn.MultiheadAttention, got {type(module).__name__}")
        new = cls(
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.out_proj.bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            device="meta",
        )
        for name, param in module.named_parameters(recurse=False):
            setattr(new, name, param)
        new.out_proj = module.out_proj
        return new.train(module.training)

    def _why_not(self, query, need_weights) -> str | None:
        if need_weights:
            return "need_weights=True (pass need_weights=False for the fused kernel)"
        if self.bias_k is not None:
            return "add_bias_kv"
        if self.add_zero_attn:
            return "add_zero_attn"
        if self.training and self.dropout > 0.0:
            return "dropout while training"
        if not isinstance(query, torch.Tensor) or query.is_nested or query.dim() not in (2, 3):
            return "inputs that are not 2-D or 3-D dense tensors"
        return None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        why = self._why_not(query, need_weights)
        if why is not None:
            warn_once(f"torchslim MultiheadAttention: {why}; using nn.MultiheadAttention's path")
            return super().forward(
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
            )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)"
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # (L, N, E) from here, as nn.MultiheadAttention computes.
        sq, batch, _ = query.shape
        sk = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads_first(x, w, b, s):  # (S, N, E) -> (N, H, S, head_dim)
            return F.linear(x, w, b).view(s, batch, heads, head_dim).permute(1, 2, 0, 3)

        q = heads_first(query, w_q, b_q, sq)
        k = heads_first(key, w_k, b_k, sk)
        v = heads_first(value, w_v, b_v, sk)

        _check_mask_shapes(attn_mask, key_padding_mask, batch * heads, batch, sq, sk)
        causal = is_causal and key_padding_mask is None
        mask = None
        if not causal:
            mask = _allowed(attn_mask, q.dtype)
            if mask is not None and mask.dim() == 3:  # (N * H, L, S)
                mask = mask.view(batch, heads, sq, sk)
            padding = _allowed(key_padding_mask, q.dtype)
            if padding is not None:
                padding = padding.view(batch, 1, 1, sk)
            mask = _merge(mask, padding, q.dtype)
        out = scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
        out = out.permute(2, 0, 1, 3).reshape(sq, batch, self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _check_mask_shapes(attn_mask, key_padding_mask, batch_heads, batch, sq, sk) -> None:
    """nn.MultiheadAttention's shapes: attn_mask (L, S) or (N * H, L, S), key_padding_mask
    (N, S); a RuntimeError names the expected shape, as nn's does."""
    if attn_mask is not None:
        want = {2: (sq, sk), 3: (batch_heads, sq, sk)}.get(attn_mask.dim())
        if want is None:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if tuple(attn_mask.shape) != want:
            raise RuntimeError(
                f"The shape of the {attn_mask.dim()}D attn_mask is {tuple(attn_mask.shape)}, "
                f"but should be {want}."
            )
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, sk):
        raise RuntimeError(
            f"key_padding_mask must be (N, S) = {(batch, sk)}, got {tuple(key_padding_mask.shape)}"
        )
