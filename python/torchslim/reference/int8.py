"""Pure-PyTorch specification of the int8 ops.

Every kernel (C++, Triton, CUDA) is tested against these functions. They run on any device and
take the same arguments as the ops in :mod:`torchslim.ops`.

Quantization conventions (symmetric, no zero point, codes in [-127, 127] so that negation is
closed and products of two codes never saturate an int16 pair sum):

    scale = amax / 127            (amax = max |v| over the quantization group; 1.0 if amax == 0)
    code  = clamp(round(v / scale), -127, 127)        round = half to even, in fp32

A group holding an inf or a NaN has no scale: its scale is NaN and its codes 0, so every output
it reaches is NaN (int8 codes cannot stand for it; a float max that skipped the NaN would return
a finite, plausible and wrong result).

W8A8 dynamic linear, for x: (M, K) float, w_q: (N, K) int8, w_scale: (N,) fp32:

    x_q, x_scale = quantize_per_token(x)              per row of x, in fp32
    acc[m, n]    = sum_k x_q[m, k] * w_q[n, k]        exact int32
    out[m, n]    = acc[m, n] * x_scale[m] * w_scale[n] + bias[n]

W8A16 weight-only linear:

    out[m, n]    = sum_k x[m, k] * (w_q[n, k] * w_scale[n]) + bias[n]
"""

from __future__ import annotations

import torch

from torchslim.reference._linear import linear

QMAX = 127


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    amax = amax.to(torch.float32)
    # A tensor divisor: dividing by a Python scalar is done as a multiply by its reciprocal on
    # CUDA (not on the CPU), which would make the reference device-dependent by an ulp.
    scale = amax / torch.full_like(amax, QMAX)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(amax.isfinite(), scale, torch.full_like(scale, float("nan")))


def _codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """clamp(round(x / scale)) in fp32, 0 where the scale (broadcast over x) is NaN."""
    q = torch.round(x / scale).clamp_(-QMAX, QMAX)
    return q.masked_fill_(scale.isnan().expand_as(q), 0)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row (last dim) of ``x``.

    Args:
        x: (..., K) float tensor.

    Returns:
        x_q: (..., K) int8 codes in [-127, 127]; x_scale: (...,) fp32 with x ≈ x_q * x_scale.
    """
    xf = x.to(torch.float32)
    scale = _scale_from_amax(xf.abs().amax(dim=-1)) if xf.shape[-1] else xf.new_ones(xf.shape[:-1])
    return _codes(xf, scale.unsqueeze(-1)).to(torch.int8), scale


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 GEMM with int32 output.

    Args:
        a: (M, K) int8. b: (N, K) int8 (one row per output column).

    Returns:
        (M, N) int32, ``a @ b.T`` computed exactly (float64 holds every partial sum exactly for
        K < 2**31 / 127**2).
    """
    return (a.to(torch.float64) @ b.to(torch.float64).T).to(torch.int32)


def dequantize_int8(
    w_q: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(N, K) weight = w_q * w_scale[:, None] (per-output-channel codes), computed in ``dtype``."""
    return w_q.to(dtype) * w_scale.to(dtype).unsqueeze(1)


def int8_dynamic_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8 linear with per-token dynamic activation quantization (see module docstring).

    Args:
        x: (..., K) fp32/bf16/fp16. w_q: (N, K) int8. w_scale: (N,) fp32. bias: (N,) or None.
        compute_dtype: dtype of the epilogue arithmetic (float64 for the test yardstick).

    Returns:
        (..., N) in ``x.dtype``.
    """
    x_q, x_scale = quantize_per_token(x.reshape(x.shape[:-1].numel(), x.shape[-1]))
    acc = int8_mm(x_q, w_q).to(compute_dtype)
    out = acc * x_scale.to(compute_dtype).unsqueeze(1) * w_scale.to(compute_dtype).unsqueeze(0)
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])


def int8_weight_only_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W8A16 linear: int8 weights dequantized per output channel, activations in float.

    Args:
        x: (..., K) fp32/bf16/fp16. w_q: (N, K) int8. w_scale: (N,) fp32. bias: (N,) or None.
        compute_dtype: dtype of the matmul; defaults to ``x.dtype`` (what PyTorch would do),
            float64 for the test yardstick.

    Returns:
        (..., N) in ``x.dtype``.
    """
    cd = compute_dtype or x.dtype
    return linear(x, dequantize_int8(w_q, w_scale, cd), bias, cd)
