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

Backend layouts: the op above takes the plain layout. The CUDA tensor-core kernel takes the codes
pre-shuffled into the tc layout (:func:`pack_int4_tc`), built for the B fragments of
mma.sync m16n8k16 so that each GPU lane loads its 16 bytes per tile and dequantizes in registers;
its op, ``int4_weight_only_linear_tc``, has the same math, scales and zeros.

The CPU kernel first rounds x to int8 per run of 32, 64 or 128 values along K
(:func:`cpu_activation_block`; llama.cpp's Q8 activations: scale = max |x| / 127 per run, codes
round half to even) so that weights and activations meet in integer dot products;
``activation_block=cpu_activation_block(group_size, K)`` gives that arithmetic here, the
yardstick its outputs are checked against. Its effect on the output (with two 20x outlier
channels a row, about 0.7% relative at runs of 32 and 1% at 128, against about 10% for rounding
the weights to 4 bits) is measured by the tests. On AMX CPUs at larger M (from
``torchslim._C.int4_bf16_tiles_from_m(run, N)``, by run and layer width) it rounds x and the
weight, dequantized in fp32, to bf16 instead (``operand_dtype=torch.bfloat16`` here): products
on bf16 tiles, summed in fp32, with 0.2-0.4x the error of the int8 rounding (0.4x on Gaussian
rows, 0.2-0.3x with the outlier channels above).
"""

from __future__ import annotations

import torch

from torchslim.reference._linear import linear
from torchslim.reference.int8 import _codes, _scale_from_amax

CODE_MAX = 15
Q8_BLOCK = 32


def resolve_group_size(group_size: int, k: int) -> int:
    """The group length along K: ``group_size``, or K for per-channel (-1)."""
    return k if group_size == -1 else group_size


def cpu_activation_block(group_size: int, k: int) -> int:
    """Values per activation scale in the CPU kernel: the longest of 128, 64 and 32 that divides
    the weight group (128 for one group per row, the last run then maybe shorter).

    A group is then whole runs, so the tile kernels convert a run's integer sums to float once
    rather than once per 32 values (llama.cpp's k-quants round activations per 256).
    """
    g = resolve_group_size(group_size, k)
    if g <= 0 or k % g or (g % Q8_BLOCK and g != k):
        raise ValueError(
            f"group_size must be -1 or a multiple of {Q8_BLOCK} that divides K={k} (the CPU "
            f"kernel's groups), got {group_size}"
        )
    if g == k or g % 128 == 0:
        return 128
    return 64 if g % 64 == 0 else Q8_BLOCK


def _check_codes(codes: torch.Tensor) -> None:
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    if codes.shape[1] % 2:
        raise ValueError(f"codes must have an even K (two codes per byte), got K={codes.shape[1]}")
    if codes.numel() and int(codes.max()) > CODE_MAX:
        raise ValueError(f"codes must be in [0, 15], got a maximum of {int(codes.max())}")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15] -> (N, K // 2) uint8, low nibble = even k."""
    _check_codes(codes)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 codes; the exact inverse of :func:`pack_int4`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D (N, K // 2), got shape {tuple(packed.shape)}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(
        packed.shape[0], 2 * packed.shape[1]
    )


# The tc layout's tile: 64 output channels x 16 k = 512 bytes, 16 per lane of a warp.
TC_TILE_N = 64
TC_TILE_K = 16
TC_TILE_BYTES = TC_TILE_N * TC_TILE_K // 2


def pack_int4_tc(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes -> (N // 64, K // 16 * 512) uint8 in the tc layout.

    Tile (c, t) holds columns 64c .. 64c + 63 and k = 16t .. 16t + 15 as 512 contiguous bytes at
    ``out[c, 512 t:]``; lane l of a warp reads bytes 16l .. 16l + 15 of it. With r = l // 4 and
    q = l % 4, the lane's 32-bit word i (little endian, i = 0..3) holds at nibble s + 4e
    (s = 0..3, e = 0..1) the code of column 64c + 8(2i + s % 2) + r at k = 16t + 8(s // 2) + 2q + e:
    ``(word >> 4s) & 0x000f000f`` is then the (k, k + 1) pair of register s // 2 of the
    m16n8k16 B fragment of n8 tile 2i + s % 2. Needs N % 64 == 0 and K % 16 == 0.
    """
    _check_codes(codes)
    n, k = codes.shape
    if n % TC_TILE_N or k % TC_TILE_K:
        raise ValueError(
            f"codes must have N divisible by {TC_TILE_N} and K by {TC_TILE_K} for the tc layout, "
            f"got shape {tuple(codes.shape)}"
        )
    # codes[n, k] with n = 64c + 16i + 8jj + r and k = 16t + 8h + 2q + e
    x = codes.reshape(n // TC_TILE_N, 4, 2, 8, k // TC_TILE_K, 2, 4, 2)
    x = x.permute(
        0, 4, 3, 6, 1, 7, 5, 2
    )  # (c, t, r, q, i, e, h, jj): byte 4i + 2e + h of lane 4r + q
    return (x[..., 0] | (x[..., 1] << 4)).reshape(n // TC_TILE_N, k // TC_TILE_K * TC_TILE_BYTES)


def unpack_int4_tc(packed_tc: torch.Tensor) -> torch.Tensor:
    """(N // 64, K // 16 * 512) uint8 in the tc layout -> (N, K) uint8 codes; the exact inverse
    of :func:`pack_int4_tc`."""
    if packed_tc.dtype != torch.uint8:
        raise TypeError(f"packed_tc must be uint8, got {packed_tc.dtype}")
    if packed_tc.dim() != 2 or packed_tc.shape[1] % TC_TILE_BYTES:
        raise ValueError(
            f"packed_tc must be 2-D (N // 64, K // 16 * 512), got shape {tuple(packed_tc.shape)}"
        )
    tiles_n, tiles_k = packed_tc.shape[0], packed_tc.shape[1] // TC_TILE_BYTES
    b = packed_tc.reshape(tiles_n, tiles_k, 8, 4, 4, 2, 2)  # (c, t, r, q, i, e, h)
    x = torch.stack((b & 0x0F, b >> 4), dim=-1)  # (..., jj)
    x = x.permute(0, 4, 7, 2, 1, 6, 3, 5)  # (c, i, jj, r, t, h, q, e)
    return x.reshape(tiles_n * TC_TILE_N, tiles_k * TC_TILE_K)


def plain_to_tc(packed_w: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) plain packed codes -> the tc layout."""
    return pack_int4_tc(unpack_int4(packed_w))


def tc_to_plain(packed_tc: torch.Tensor) -> torch.Tensor:
    """The tc layout -> (N, K // 2) plain packed codes."""
    return pack_int4(unpack_int4_tc(packed_tc))


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
    if g * scales.shape[-1] != codes.shape[1] or scales.shape != zeros.shape:
        raise ValueError(
            f"group_size={group_size} does not fit: K={codes.shape[1]} in groups of it needs "
            f"scales and zeros of shape ({codes.shape[0]}, K // group_size), got "
            f"{tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
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
        codes.append(_codes(part, scale.unsqueeze(-1)))
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
    operand_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W4A16 linear: ``x @ dequantize_int4(...).T + bias`` (see the module docstring).

    Args:
        x: (..., K) fp32/bf16/fp16. packed_w: (N, K // 2) uint8. scales, zeros: (N, K // G).
        group_size: G, or -1 for one group per output channel. bias: (N,) or None.
        compute_dtype: dtype of the matmul; defaults to ``x.dtype`` (what PyTorch would do),
            float64 for the test yardstick.
        activation_block: if set, x is first rounded to int8 per run of this many values (the
            CPU kernel's arithmetic, with :func:`cpu_activation_block`).
        operand_dtype: if set, x and the weight, dequantized in fp32, are first rounded to this
            dtype: the CPU kernel's arithmetic on bf16 tiles, which it takes for M from
            ``torchslim._C.int4_bf16_tiles_from_m(cpu_activation_block, N)``.

    Returns:
        (..., N) in ``x.dtype``.
    """
    cd = compute_dtype or x.dtype
    if activation_block is not None and operand_dtype is not None:
        raise ValueError("activation_block and operand_dtype are two arithmetics: give one")
    if operand_dtype is not None:
        xc = x.to(operand_dtype).to(x.dtype)
        w = dequantize_int4(packed_w, scales, zeros, group_size, dtype=torch.float32)
        return linear(xc, w.to(operand_dtype).to(cd), bias, cd)
    xc = x if activation_block is None else _block_round(x, activation_block)
    w = dequantize_int4(packed_w, scales, zeros, group_size, dtype=cd)
    return linear(xc, w, bias, cd).to(x.dtype)


def int4_weight_only_linear_tc(
    x: torch.Tensor,
    packed_tc: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`int4_weight_only_linear` on codes in the tc layout (:func:`pack_int4_tc`)."""
    return int4_weight_only_linear(
        x, tc_to_plain(packed_tc), scales, zeros, group_size, bias, compute_dtype=compute_dtype
    )
