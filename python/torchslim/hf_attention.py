"""torchslim.attention inside Hugging Face transformers models.

    import torchslim
    torchslim.hf_attention.register()            # once: AttentionInterface gains "torchslim"
    model.set_attn_implementation("torchslim")   # or load with attn_implementation="torchslim"

The function below follows transformers' own SDPA integration (masks, causal flag, the slice of
an empty static cache at prefill) and calls torchslim.attention instead of
F.scaled_dot_product_attention, with the key/value heads left unexpanded (GQA is native). What
it does not take goes elsewhere, logged once: what changes the scores (soft-capping, attention
sinks, a position bias) to the model's own eager attention function, which computes them (else
transformers' SDPA function); dropout while training, and a query batch that broadcasts against
the keys', to transformers' SDPA function.
"""

from __future__ import annotations

import sys

import torch

from torchslim.ops._registry import warn_once
from torchslim.ops.attention import attention

NAME = "torchslim"


# Keyword arguments of transformers' attention calls that change the scores.
_SCORE_CHANGES = ("softcap", "s_aux", "sinks", "position_bias", "cache")


def _sdpa_fallback(why: str, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    warn_once(f"torchslim attention: {why}; using transformers' SDPA attention")
    return sdpa_attention_forward(*args, **kwargs)


def _eager_fallback(why: str, module, query, key, value, mask, causal: bool, **kwargs):
    """The model's own eager attention (``eager_attention_forward`` of its modeling module),
    which computes what its SDPA path may not (soft-capping, sinks); else transformers' SDPA.
    The eager functions add their mask to the scores: the boolean mask (or the causal rule it
    stood for) goes to them as zeros and the dtype's lowest value."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        return _sdpa_fallback(why, module, query, key, value, mask, **kwargs)
    warn_once(f"torchslim attention: {why}; using {type(module).__name__}'s eager attention")
    if causal:
        q_len, k_len = query.shape[2], key.shape[2]
        ones = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
        mask = ones.tril(k_len - q_len)[None, None]
    if mask is not None and mask.dtype == torch.bool:
        lowest = torch.finfo(query.dtype).min
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
            ~mask, lowest
        )
    return eager(module, query, key, value, mask, **kwargs)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (B, H, Sq, D), key / value (B, Hkv, Sk, D) ->
    ((B, Sq, H, Dv), None)."""
    args = (module, query, key, value, attention_mask)
    options = {"dropout": dropout, "scaling": scaling, "is_causal": is_causal, **kwargs}
    if dropout and module.training:
        return _sdpa_fallback("dropout while training", *args, **options)
    if query.shape[0] != key.shape[0]:
        return _sdpa_fallback("the query's batch broadcasts against the keys'", *args, **options)
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: the mask, when there is one, says everything; without one a
    # causal model's prefill is plainly causal, and an empty static cache (keys beyond the
    # query) is cut to the query's length.
    causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    for name in _SCORE_CHANGES:
        if kwargs.get(name) is not None:
            why = f"{name} is not supported"
            return _eager_fallback(
                why, module, query, key, value, attention_mask, causal, dropout=dropout,
                scaling=scaling, **kwargs,
            )  # fmt: skip
    if scaling is not None:
        scaling = float(scaling)
    out = attention(query, key, value, causal=causal, scale=scaling, attn_mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Adds "torchslim" to transformers' AttentionInterface, with the masks transformers builds
    for SDPA (boolean, True = attend; none for a plainly causal batch). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
