"""Group-wise int4 weight quantization (pure PyTorch); the format is in
:mod:`torchslim.reference.int4`.

Round to nearest per group of ``group_size`` weights along K, all arithmetic in fp32:

    asymmetric (default): the group's range [lo, hi] = [min w, max w] maps onto the codes
        0..15:  scale = (hi - lo) / 15,  zero = -lo / scale  (a float: code 0 is exactly lo and
        code 15 exactly hi, so a group already on a 16-level grid, such as llama.cpp's Q4_1,
        comes back exactly; GPTQ/AWQ checkpoints with integer zeros load as they are)
    symmetric: zero = 8,  scale = max |w| / 7.5   (codes 0..15 stand for -8..7; +max|w| rounds
        to 8 and clips to 7, as in GPTQ's symmetric mode)
    code = clamp(round(w / scale + zero), 0, 15)        round = half to even

A constant group gets scale 1. With ``clip_search`` the range is also tried shrunk by each
ratio r in ``clip_ratios``: about its centre when asymmetric (mid -/+ r * (hi - lo) / 2, so a
group that does not span zero is clipped too), max |w| * r when symmetric; per group the ratio
with the least squared reconstruction error wins. Clipping trades a few large outliers for finer
steps on the rest, which lowers the error of most groups.
"""

from __future__ import annotations

import torch

from torchslim.reference.int4 import (
    CODE_MAX,
    dequantize_int4,
    pack_int4,
    resolve_group_size,
    unpack_int4,
)

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0, 0.975, ..., 0.5


def _range_params(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool):
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = amax / torch.full_like(amax, 7.5)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.full_like(scale, 8.0)
    scale = (hi - lo) / torch.full_like(lo, CODE_MAX)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, -lo / scale  # a constant group: scale 1, its value at code 0


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.round(w / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp_(0, CODE_MAX)


def quantize_int4(
    weight: torch.Tensor,
    group_size: int = 128,
    *,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    clip_search: bool = False,
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantizes a linear weight to group-wise int4 (see the module docstring).

    Args:
        weight: (N, K) float, one row per output channel; K even.
        group_size: weights per group along K (32, 64, 128, ...), or -1 for one group per row.
        symmetric: zero point fixed at 8 instead of fitted to each group's range.
        scale_dtype: dtype of the returned scales and zeros (fp32, bf16 or fp16).
        clip_search: choose a clipping ratio per group that minimises the squared error.
        clip_ratios: the ratios tried by ``clip_search``.

    Returns:
        (packed (N, K // 2) uint8, scales (N, K // G), zeros (N, K // G)). Codes are rounded,
        and errors measured, against the scales and zeros as stored (in ``scale_dtype``).
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"weight must be a floating-point tensor, got {got}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k == 0:
        raise ValueError(f"weight must have K >= 2 columns, got shape {tuple(weight.shape)}")
    check_group_size(group_size, k)
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight must be finite; it contains inf or NaN")
    if clip_search:
        _check_clip_ratios(clip_ratios)

    g = resolve_group_size(group_size, k)
    w = weight.detach().to(torch.float32).reshape(n, k // g, g)
    lo = w.amin(dim=-1)
    hi = w.amax(dim=-1)
    ratios = clip_ratios if clip_search else (1.0,)
    best = None
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    for r in ratios:
        if symmetric:
            scale, exact_zero = _range_params(lo * r, hi * r, symmetric)
        else:
            scale, exact_zero = _range_params(mid - half * r, mid + half * r, symmetric)
        # Codes and errors against the parameters as stored (rounded to scale_dtype).
        scale = scale.to(scale_dtype).to(torch.float32)
        zero = exact_zero.to(scale_dtype).to(torch.float32)
        codes = _codes(w, scale, zero)
        err = ((codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - w).square_().sum(dim=-1)
        # A zero point the stored dtype moves by more than half a code shifts the whole group
        # (bf16 holds 8 bits: a group 17x its own range away from 0, say).
        held = (scale > 0) & scale.isfinite() & ((zero - exact_zero).abs() <= 0.5)
        if best is None:
            best = [err, codes, scale, zero, held]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better.unsqueeze(-1), codes, best[1])
        best[2] = torch.where(better, scale, best[2])
        best[3] = torch.where(better, zero, best[3])
        best[4] = torch.where(better, held, best[4])
    _, codes, scale, zero, held = best
    if not held.all():
        row, group = (int(i) for i in (~held).nonzero()[0])
        raise ValueError(
            f"scale_dtype={scale_dtype} cannot hold the scale and zero point of row {row}, group "
            f"{group} (its weights span [{float(lo[row, group]):.6g}, "
            f"{float(hi[row, group]):.6g}]): use scale_dtype=torch.float32"
        )
    packed = pack_int4(codes.reshape(n, k).to(torch.uint8))
    return packed, scale.to(scale_dtype), zero.to(scale_dtype)


def _check_clip_ratios(clip_ratios: object) -> None:
    if not isinstance(clip_ratios, (tuple, list)) or not clip_ratios:
        raise TypeError(f"clip_ratios must be a non-empty tuple of ratios, got {clip_ratios!r}")
    for r in clip_ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            raise ValueError(f"clip_ratios must each be in (0, 1], got {r!r}")


def check_group_size(group_size: int, k: int) -> None:
    """Raises unless ``group_size`` is -1 or a positive even number that divides ``k``."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if k % 2:
        raise ValueError(f"K must be even to pack two int4 codes per byte, got K={k}")
    if group_size == -1:
        return
    if group_size < 2 or group_size % 2 or k % group_size:
        raise ValueError(
            f"group_size must be -1 (per channel) or an even size that divides K={k}, "
            f"got {group_size}"
        )


__all__ = ["check_group_size", "dequantize_int4", "pack_int4", "quantize_int4", "unpack_int4"]
