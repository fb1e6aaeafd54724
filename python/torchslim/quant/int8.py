"""int8 quantization primitives (pure PyTorch): weights, activations, SmoothQuant factors.

All symmetric with codes in [-127, 127]; the formulas are in :mod:`torchslim.reference.int8`.
"""

from __future__ import annotations

import torch

from torchslim.reference.int8 import dequantize_int8, quantize_per_token


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 quantization of a linear weight.

    Args:
        weight: (N, K) float, one row per output channel.

    Returns:
        w_q: (N, K) int8; w_scale: (N,) fp32, weight ≈ w_q * w_scale[:, None]. An all-zero row
        gets scale 1 (its codes are 0), so every scale is finite and positive.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {_describe(weight)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight.to(torch.float32)).all():  # fp64 past fp32's range too
        raise ValueError("weight must be finite in fp32, where it is quantized; it is not")
    # The per-channel rule on the rows of W is the per-token rule on the rows of x.
    return quantize_per_token(weight)


def dequantize_weight(w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 codes and (N,) scales -> (N, K) fp32 weight."""
    return dequantize_int8(w_q, w_scale)


def smoothquant_factors(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5, eps: float = 1e-5
) -> torch.Tensor:
    """Per-input-channel smoothing factors s (SmoothQuant, Xiao et al. 2023).

    s[k] = max|X[:, k]| ** alpha / max|W[:, k]| ** (1 - alpha). The layer computes
    (x / s) @ (W * s).T, the same product, with activation outliers moved into the weights,
    where per-channel quantization absorbs them.

    Args:
        act_absmax: (K,) max |x| per input channel over calibration data.
        weight: (N, K) float weight.
        alpha: migration strength in [0, 1].

    Returns:
        (K,) fp32, all finite and positive.
    """
    for name, value in (("alpha", alpha), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if tuple(act_absmax.shape) != (weight.shape[1],):
        raise ValueError(
            f"act_absmax must have shape (K,) = ({weight.shape[1]},) to match weight "
            f"{tuple(weight.shape)}, got {tuple(act_absmax.shape)}"
        )
    for name, t in (("act_absmax", act_absmax), ("weight", weight)):
        if not torch.isfinite(t.to(torch.float32)).all():
            raise ValueError(f"{name} must be finite in fp32; it contains inf or NaN")
    a = act_absmax.detach().to(torch.float32).abs().clamp_min(eps)
    w = weight.detach().to(torch.float32).abs().amax(dim=0).clamp_min(eps)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(eps)


def _describe(x: object) -> str:
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
