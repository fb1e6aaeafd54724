"""Fused attention: softmax(q k^T * scale) v without the score matrix in memory.

Schema (``torch.ops.torchslim.*``); the math in :mod:`torchslim.reference.attention`:

    attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, bool causal=False,
              float? scale=None, int window=-1, Tensor? kv_lens=None) -> Tensor
        q: (B, H, Sq, D), k: (B, Hkv, Sk, D), v: (B, Hkv, Sk, Dv), one float dtype, Hkv
        dividing H (GQA); attn_mask: bool (True = attend) or float added to the scores,
        broadcastable to (B, H, Sq, Sk); causal: aligned bottom-right; window: the sliding
        window with causal (-1: none); kv_lens: (B,) int32/int64 valid keys per sequence
        ->  (B, H, Sq, Dv) in q.dtype; a row with no visible key is zeros.

    attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,
                       Tensor? attn_mask=None, bool causal=False, float? scale=None,
                       int window=-1, Tensor? kv_lens=None) -> (Tensor, Tensor, Tensor)
        the gradients (dq, dk, dv) of attention for grad_out (B, H, Sq, Dv); out is attention's
        output. No gradient flows to attn_mask: attention refuses a mask that requires one.

Backends: the CPU kernel (fp32/bf16, computing in fp32: csrc/cpu/attention.h), the Triton
kernels on CUDA (fp32/fp16/bf16, head dims up to 256: kernels/attention.py); anything else runs
the reference. float64 is accepted (the reference, for gradcheck). The backward is Triton's
FlashAttention-2 backward on CUDA; elsewhere the reference recomputes the attention weights.
The forward op keeps no logsumexp for it, so the Triton backward first recomputes it with one
forward pass.
"""

from __future__ import annotations

import math

import torch

from torchslim import _ext
from torchslim import reference as ref
from torchslim.ops._registry import _LIB, Kernel, OpBackends, define_op, extension_kernel
from torchslim.ops.int8 import (
    _FLOATS,
    _call_op,
    _check_same_device,
    _supports_floats,
    _triton_available,
    _triton_float_devices,
)


def broadcasts_to(shape, target) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target`` (a mask to the scores)."""
    try:
        return torch.broadcast_shapes(shape, target) == tuple(target)
    except RuntimeError:
        return False


# float64 runs the reference: it is there for gradcheck, not for speed.
_ATTENTION_FLOATS = (*_FLOATS, torch.float64)


def _check_attention(q, k, v, attn_mask, causal, scale, window, kv_lens) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq, head_dim), got {t.dim()}-D shape "
                f"{tuple(t.shape)}"
            )
        if t.dtype not in _ATTENTION_FLOATS:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    b, h, sq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(
            f"q, k and v must have one batch size, got {b}, {k.shape[0]} and {v.shape[0]}"
        )
    if k.shape[3] != d:
        raise ValueError(f"k must have q's head_dim {d}, got shape {tuple(k.shape)}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v must have k's heads and sequence length {tuple(k.shape[1:3])}, got shape "
            f"{tuple(v.shape)}"
        )
    hkv, sk = k.shape[1], k.shape[2]
    if hkv == 0 or h % hkv:
        raise ValueError(f"k's heads ({hkv}) must divide q's heads ({h}) (grouped-query attention)")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in _ATTENTION_FLOATS:
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        if not broadcasts_to(attn_mask.shape, (b, h, sq, sk)):
            raise ValueError(
                f"attn_mask must broadcast to (B, H, Sq, Sk) = {(b, h, sq, sk)}, got shape "
                f"{tuple(attn_mask.shape)}"
            )
    # (The schema makes causal a bool, scale a float and window an int.)
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if window != -1 and window < 1:
        raise ValueError(f"window must be a positive int or -1 (none), got {window!r}")
    if window != -1 and not causal:
        raise ValueError("window (a sliding window over past keys) needs causal=True")
    if kv_lens is not None:
        if kv_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"kv_lens must be int32 or int64, got {kv_lens.dtype}")
        if tuple(kv_lens.shape) != (b,):
            raise ValueError(f"kv_lens must have shape (B,) = ({b},), got {tuple(kv_lens.shape)}")
    _check_same_device(q, "q", k=k, v=v, attn_mask=attn_mask, kv_lens=kv_lens)


def _check_kv_lens_values(kv_lens, sk) -> None:
    """Eager only: the values, which a fake tensor does not have."""
    if kv_lens is not None and kv_lens.numel() and (kv_lens.min() < 0 or kv_lens.max() > sk):
        raise ValueError(f"kv_lens must be in [0, Sk={sk}], got {kv_lens.tolist()}")


def _reference(q, k, v, attn_mask, causal, scale, window, kv_lens):
    return ref.attention(
        q, k, v, attn_mask, causal, scale, None if window == -1 else window, kv_lens
    )


_cpu_supports = _supports_floats({"cpu": (torch.float32, torch.bfloat16)})
_cpu_available, _cpu_fn = extension_kernel("attention_cpu", _ext.cpu_available)
TRITON_MAX_HEAD_DIM = 256


def _triton_supports(q, k, v, *_args) -> str | None:
    why = _supports_floats(_triton_float_devices())(q)
    if why is None and max(q.shape[3], v.shape[3]) > TRITON_MAX_HEAD_DIM:
        why = (
            f"triton kernel takes head dims up to {TRITON_MAX_HEAD_DIM}, got D={q.shape[3]}, "
            f"Dv={v.shape[3]}"
        )
    return why


def _triton_kernels():
    from torchslim.kernels import attention as kernels

    return kernels


def _triton_forward(q, k, v, attn_mask, causal, scale, window, kv_lens):
    return _triton_kernels().attention_forward(q, k, v, attn_mask, causal, scale, window, kv_lens)


def _triton_backward(grad_out, q, k, v, out, attn_mask, causal, scale, window, kv_lens):
    kernels = _triton_kernels()
    args = (attn_mask, causal, scale, window, kv_lens)
    _, lse = kernels.attention_forward(q, k, v, *args, return_lse=True)  # the op keeps no lse
    return kernels.attention_backward(grad_out.to(q.dtype), q, k, v, out.to(q.dtype), lse, *args)


_ATTENTION = OpBackends(
    name="attention", reference=_reference, preference={"cpu": ("cpu",), "cuda": ("triton",)}
)
_ATTENTION.register(Kernel("cpu", _cpu_fn, _cpu_available, _cpu_supports))
_ATTENTION.register(Kernel("triton", _triton_forward, _triton_available, _triton_supports))


def why_no_kernel(q, k, v, attn_mask=None, causal=False, scale=None) -> str | None:
    """None when torchslim.attention runs these inputs (fake tensors will do) on a kernel, or on
    the reference because the user forced it; else why it would fall back to the reference."""
    backend, reasons = _ATTENTION.select(q.device, (q, k, v, attn_mask, causal, scale, -1, None))
    return "; ".join(reasons) if backend == "reference" and reasons else None


def _impl(q, k, v, attn_mask=None, causal=False, scale=None, window=-1, kv_lens=None):
    _check_attention(q, k, v, attn_mask, causal, scale, window, kv_lens)
    _check_kv_lens_values(kv_lens, k.shape[2])
    return _ATTENTION(q, k, v, attn_mask, causal, scale, window, kv_lens)


def _fake(q, k, v, attn_mask=None, causal=False, scale=None, window=-1, kv_lens=None):
    _check_attention(q, k, v, attn_mask, causal, scale, window, kv_lens)
    return q.new_empty((*q.shape[:3], v.shape[3]))


define_op(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, bool causal=False, "
    "float? scale=None, int window=-1, Tensor? kv_lens=None) -> Tensor",
    impl=_impl,
    fake=_fake,
    backends=_ATTENTION,
)


def _check_backward(grad_out, q, k, v, out, attn_mask, causal, scale, window, kv_lens) -> None:
    _check_attention(q, k, v, attn_mask, causal, scale, window, kv_lens)
    want = (*q.shape[:3], v.shape[3])
    for name, t in (("grad_out", grad_out), ("out", out)):
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name} must have attention's output shape (B, H, Sq, Dv) = {want}, got "
                f"{tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    _check_same_device(q, "q", grad_out=grad_out, out=out)


def _reference_backward(grad_out, q, k, v, out, attn_mask, causal, scale, window, kv_lens):
    window = None if window == -1 else window
    return ref.attention_backward(grad_out, q, k, v, attn_mask, causal, scale, window, kv_lens)


def _triton_backward_supports(grad_out, q, k, v, *_args) -> str | None:
    return _triton_supports(q, k, v)


_ATTENTION_BACKWARD = OpBackends(
    name="attention_backward",
    reference=_reference_backward,
    preference={"cuda": ("triton",)},
)
_ATTENTION_BACKWARD.register(
    Kernel("triton", _triton_backward, _triton_available, _triton_backward_supports)
)


def _backward_impl(
    grad_out, q, k, v, out, attn_mask=None, causal=False, scale=None, window=-1, kv_lens=None
):
    _check_backward(grad_out, q, k, v, out, attn_mask, causal, scale, window, kv_lens)
    _check_kv_lens_values(kv_lens, k.shape[2])
    args = (grad_out, q, k, v, out, attn_mask, causal, scale, window, kv_lens)
    return tuple(g.contiguous() for g in _ATTENTION_BACKWARD(*args))


def _backward_fake(
    grad_out, q, k, v, out, attn_mask=None, causal=False, scale=None, window=-1, kv_lens=None
):
    _check_backward(grad_out, q, k, v, out, attn_mask, causal, scale, window, kv_lens)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous


define_op(
    "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
    "Tensor? attn_mask=None, bool causal=False, float? scale=None, int window=-1, "
    "Tensor? kv_lens=None) -> (Tensor, Tensor, Tensor)",
    impl=_backward_impl,
    fake=_backward_fake,
    backends=_ATTENTION_BACKWARD,
)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, attn_mask, causal, scale, window, kv_lens = inputs
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError(
            "attn_mask requires grad, but torchslim attention computes no gradient for it; "
            "pass attn_mask.detach(), or use F.scaled_dot_product_attention for a learned mask"
        )
    ctx.save_for_backward(q, k, v, output, attn_mask, kv_lens)
    ctx.options = (causal, scale, window)


def _backward(ctx, grad_out):
    q, k, v, out, attn_mask, kv_lens = ctx.saved_tensors
    causal, scale, window = ctx.options
    d_q, d_k, d_v = torch.ops.torchslim.attention_backward(
        grad_out, q, k, v, out, attn_mask, causal, scale, window, kv_lens
    )
    return d_q, d_k, d_v, None, None, None, None, None


torch.library.register_autograd(
    "torchslim::attention", _backward, setup_context=_setup_context, lib=_LIB
)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    window: int | None = None,
    kv_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention in the layout of ``F.scaled_dot_product_attention``, (B, H, S, D), with the
    score matrix never in memory on the kernels' paths.

    Args:
        q: (B, H, Sq, D) queries; k: (B, Hkv, Sk, D) keys; v: (B, Hkv, Sk, Dv) values, all one
            float dtype. Hkv divides H: query head h reads key/value head h // (H // Hkv).
        causal: each query sees the keys at or before its position, aligned bottom-right
            (the last query is the last key), as in FlashAttention: KV-cache decode and
            chunked prefill pass the new queries against the whole cache. Note that
            ``F.scaled_dot_product_attention(is_causal=True)`` aligns top-left instead; the
            two agree when Sq == Sk.
        scale: multiplies q k^T; default 1 / sqrt(D).
        attn_mask: bool (True = attend) or float added to the scores, broadcastable to
            (B, H, Sq, Sk); a Hugging Face padding mask fits here.
        window: with causal, a sliding window: the last ``window`` positions up to the
            query's own.
        kv_lens: (B,) int: sequence b has keys 0 .. kv_lens[b] - 1, the rest is padding;
            causal alignment then ends at kv_lens[b].

    Returns:
        (B, H, Sq, Dv) in q's dtype. A query row with no visible key gets zeros.

    Differentiable in q, k and v (``torch.ops.torchslim.attention_backward``); a mask that
    requires grad is refused.
    """
    if not isinstance(causal, bool):  # the dispatcher would take 1 for True
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is None:
        window = -1
    elif isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if isinstance(scale, int) and not isinstance(scale, bool):
        scale = float(scale)
    return _call_op(
        torch.ops.torchslim.attention, q, k, v, attn_mask, causal, scale, window, kv_lens
    )
