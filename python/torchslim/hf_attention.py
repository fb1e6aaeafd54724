"""torchslim.attention inside Hugging Face transformers models.

    import torchslim
    torchslim.hf_attention.register()            # once: AttentionInterface gains "torchslim"
    model.set_attn_implementation("torchslim")   # or load with attn_implementation="torchslim"

The function below follows transformers' own SDPA integration (masks, causal flag, the slice of
an empty static cache at prefill) and calls torchslim.attention instead of
F.scaled_dot_product_attention, with the key/value heads left unexpanded (GQA is native). What
it does not take (dropout while training, soft-capping, a position bias) goes to transformers'
SDPA function, logged once.
"""

from __future__ import annotations

import torch

from torchslim.ops._registry import warn_once
from torchslim.ops.attention import attention

NAME = "torchslim"


def _sdpa_fallback(why: str, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    warn_once(f"torchslim attention: {why}; using transformers' SDPA attention")
    return sdpa_attention_forward(*args, **kwargs)


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
    for name in ("softcap", "position_bias", "cache"):
        if kwargs.get(name) is not None:
            return _sdpa_fallback(f"{name} is not supported", *args, **options)
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: the mask, when there is one, says everything; without one a
    # causal model's prefill is plainly causal, and an empty static cache (keys beyond the
    # query) is cut to the query's length.
    causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
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
