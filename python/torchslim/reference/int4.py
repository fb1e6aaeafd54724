"""Pure-PyTorch specification of the int4 weight format and the W4A16 linear op.

Format, shared by every backend's op input (the "plain" layout):

    codes   (N, K) uint8 in [0, 15], one row per output channel
    packed  (N, K // 2) uint8, two codes per byte, low nibble first:
            packed[n, j] = codes[n, 2j] | codes[n, 2j + 1] << 4
    scales  (N, K // G) fp32, bf16 or fp16; G = group_size (K when group_size == -1)
    zeros   (N, K // G), same dtype as scales: the zero point of each group, in code units
    weight[n, k] = (codes[n, k] - zeros[n, k // G]) * scales[n, k // G]

This is the orientation of GPTQ/AWQ checkpoints (unsigned codes, a scale and a zero point per
group). Zero points may be any float: GPTQ/AWQ checkpoints carry integers; the asymmetric
quantizer here produces -min / scale, which also holds llama.cpp's Q4_1 (min + code * step).

W4A16 linear, x: (..., K) float:

    out = x @ dequantize(packed, scales, zeros, group_size).T + bias

The CPU kernel first rounds x to int8 per block of 32 along K (llama.cpp's Q8_0 activations:
scale = max |x| / 127 per block, codes round half to even) so that weights and activations meet
in integer dot products; ``activation_block=32`` gives that arithmetic here, the yardstick its
outputs are checked against. Its effect on the output (about 0.5% relative, against about 10%
for rounding the weights to 4 bits) is measured by the tests.
"""

from __future__ import annotations

import torch

from torchslim.reference.int8 import QMAX, _scale_from_amax

CODE_MAX = 15
Q8_BLOCK = 32


def resolve_group_size(group_size: int, k: int) -> int:
    """The group length along K: ``group_size``, or K for per-channel (-1)."""
    return k if group_size == -1 else group_size


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15] -> (N, K // 2) uint8, low nibble = even k."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    if codes.shape[1] % 2:
        raise ValueError(f"codes must have an even K (two codes per byte), got K={codes.shape[1]}")
    if codes.numel() and int(codes.max()) > CODE_MAX:
        raise ValueError(f"codes must be in [0, 15], got a maximum of {int(codes.max())}")
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 codes; the exact inverse of :func:`pack_int4`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D (N, K // 2), got shape {tuple(packed.shape)}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, K) weight = (codes - zeros) * scales per group, computed in ``dtype``."""
    codes = unpack_int4(packed)
    g = resolve_group_size(group_size, codes.shape[1])
    s = scales.to(dtype).repeat_interleave(g, dim=1)
    z = zeros.to(dtype).repeat_interleave(g, dim=1)
    return (codes.to(dtype) - z) * s


def quantize_per_block(x: torch.Tensor, block: int = Q8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each run of ``block`` values along the last dim.

    Returns:
        x_q: (..., K) int8 in [-127, 127]; x_scale: (..., ceil(K / block)) fp32 (a last partial
        run gets its own scale), with x ≈ x_q * x_scale repeated over each run.
    """
    xf = x.to(torch.float32)
    k = xf.shape[-1]
    codes, scales = [], []
    for k0 in range(0, k, block):
        part = xf[..., k0 : k0 + block]
        scale = _scale_from_amax(part.abs().amax(dim=-1))
        codes.append(torch.round(part / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX))
        scales.append(scale)
    if not codes:
        return xf.to(torch.int8), xf.new_empty((*xf.shape[:-1], 0))
    return torch.cat(codes, dim=-1).to(torch.int8), torch.stack(scales, dim=-1)


def _block_round(x: torch.Tensor, block: int) -> torch.Tensor:
    x_q, x_scale = quantize_per_block(x, block)
    return x_q.to(torch.float32) * x_scale.repeat_interleave(block, dim=-1)[..., : x.shape[-1]]


def int4_weight_only_linear(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    activation_block: int | None = None,
) -> torch.Tensor:
    """W4A16 linear: ``x @ dequantize_int4(...).T + bias`` (see the module docstring).

    Args:
        x: (..., K) fp32/bf16/fp16. packed_w: (N, K // 2) uint8. scales, zeros: (N, K // G).
        group_size: G, or -1 for one group per output channel. bias: (N,) or None.
        compute_dtype: dtype of the matmul; defaults to ``x.dtype`` (what PyTorch would do),
            float64 for the test yardstick.
        activation_block: if set, x is first rounded to int8 per run of this many values (the
            CPU kernel's arithmetic, with 32).

    Returns:
        (..., N) in ``x.dtype``.
    """
    cd = compute_dtype or x.dtype
    xc = x if activation_block is None else _block_round(x, activation_block)
    w = dequantize_int4(packed_w, scales, zeros, group_size, dtype=cd)
    out = xc.to(cd) @ w.T
    if bias is not None:
        out = out + bias.to(cd)
    return out.to(x.dtype)
