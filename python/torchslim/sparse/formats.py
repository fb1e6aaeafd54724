"""Compression of pruned weights into the formats the sparse kernels read.

The formats are specified in :mod:`torchslim.reference.sparse`; these are their checked entry
points. A weight that breaks the declared pattern is rejected (never silently re-pruned):
prune it first with :func:`torchslim.sparse.prune_`.

    values, meta = compress_24(w)                     # w: (N, K), <= 2 nonzeros per 4
    values, mask, row_offsets = compress_bitmask(w)   # any w
    values, columns, bases, group_offsets = compress_csr(w)  # any w, K <= 262144
    values, columns, groups, group_offsets, value_offsets = compress_sliced(w)  # any w
    format_bytes("2:4", N, K, dtype=torch.bfloat16)   # what the compressed weight takes

Quantized values: compress int8 codes, and pass their per-row scales to the op:

    codes, scales = quantize_weight_per_channel(w)    # torchslim.quant: zeros stay zeros
    values, meta = compress_24(codes)                 # int8 values
    y = torchslim.ops.sparse24_linear(x, values, meta, bias, scales)
"""

from __future__ import annotations

import math

import torch

from torchslim.reference import sparse as ref
from torchslim.sparse.patterns import check_pattern, parse_pattern

FORMATS = ("2:4", "bitmask", "csr", "sliced")
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_weight(weight: torch.Tensor, dtype: torch.dtype | None) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if weight.dtype == torch.int8:  # quantized codes: the values stay int8
        if dtype not in (None, torch.int8):
            raise TypeError(f"dtype must be None or torch.int8 for an int8 weight, got {dtype}")
        return
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point or int8 tensor, got {weight.dtype}")
    if dtype == torch.int8:
        raise TypeError(
            "dtype=torch.int8 would truncate a float weight: quantize it first "
            "(torchslim.quant.quantize_weight_per_channel) and compress the int8 codes"
        )
    if dtype is not None and dtype not in VALUE_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")


def compress_24(
    weight: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight with at most 2 nonzeros in every group of 4 columns -> (values (N, 2G),
    meta (N, ceil(G / 2)) uint8), G = ceil(K / 4); values in ``dtype`` (default weight's).

    The weight is float, or int8 codes (their values stay int8)."""
    _check_weight(weight, dtype)
    check_pattern(weight, "2:4")
    with torch.no_grad():
        return ref.compress_24(weight.detach(), dtype)


def compress_bitmask(
    weight: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (values (nnz,), mask (N, ceil(K / 8)) uint8, row_offsets (N + 1,))."""
    _check_weight(weight, dtype)
    with torch.no_grad():
        return ref.compress_bitmask(weight.detach(), dtype)


def compress_csr(
    weight: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (values (G, 8), columns (G, 8) uint8, bases (G,) int16,
    group_offsets (N + 1,) int64): the nonzeros in groups of 8 with 8-bit columns."""
    _check_weight(weight, dtype)
    with torch.no_grad():
        return ref.compress_csr(weight.detach(), dtype)


def compress_sliced(
    weight: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (values (V,), columns (V,) uint8, groups (G, 2) uint8, group_offsets
    (B * S + 1,) int64, value_offsets (B + 1,) int64): blocks of 64 rows, slices of 128
    columns, groups of up to 16 nonzeros of one row (torchslim.reference.sparse)."""
    _check_weight(weight, dtype)
    with torch.no_grad():
        return ref.compress_sliced(weight.detach(), dtype)


def _sliced_groups(width: int, density: float) -> float:
    """Expected groups of a row's slice of ``width`` columns, each kept with ``density``."""
    return sum(
        math.comb(width, j) * density**j * (1 - density) ** (width - j) * -(-j // ref.SLICED_GROUP)
        for j in range(1, width + 1)
    )


def compress_block(
    weight: torch.Tensor, block: str | tuple[int, int], dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (values (B, R, C), col_blocks (B,) int32, row_offsets (ceil(N / R) + 1,)
    int64): every R x C block that holds a nonzero, whole. ``block`` as prune_ takes it: "16x16"
    or (16, 16). Holds for any weight; pruned in the same blocks, it stores only the kept ones."""
    _check_weight(weight, dtype)
    pattern = parse_pattern(block)
    if pattern.kind != "block":
        raise ValueError(f"block must be 'RxC' such as '16x16' or (R, C), got {block!r}")
    with torch.no_grad():
        return ref.compress_block(weight.detach(), pattern.block, dtype)


decompress_24 = ref.decompress_24
decompress_bitmask = ref.decompress_bitmask
decompress_block = ref.decompress_block
decompress_csr = ref.decompress_csr
decompress_sliced = ref.decompress_sliced
check_sliced = ref.check_sliced


def format_bytes(
    fmt: str, n: int, k: int, *, sparsity: float = 0.5, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes of an (N, K) weight in format ``fmt`` ("2:4", "bitmask", "csr" or "sliced" at
    ``sparsity``, or "dense") with values in ``dtype``: what a decode step must read. For
    "csr" it counts ceil(nnz / 8) groups per row, exact unless 8 nonzeros of a row span more
    than 256 columns (rare below ~95% sparsity, where a few more groups follow); for "sliced" the
    groups expected when each weight is kept independently (a row's 128 columns of a slice
    hold a binomial count of nonzeros). int8 values add their (N,) fp32 scales."""
    for name, value in (("n", n), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1], got {sparsity!r}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a float in [0, 1], got {sparsity!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    item = torch.empty((), dtype=dtype).element_size()
    if fmt == "dense":
        return n * k * item
    if fmt in FORMATS and dtype == torch.int8:
        return format_bytes(fmt, n, k, sparsity=sparsity, dtype=torch.uint8) + 4 * n
    if fmt == "2:4":
        (_, kept), (_, meta) = ref.sparse24_shapes(n, k)
        return n * (kept * item + meta)
    kept = k - int(sparsity * k + 0.5)  # per row, as prune_ rounds (halves up)
    if fmt == "bitmask":
        return n * kept * item + n * -(-k // ref.MASK_BITS) + 8 * (n + 1)
    if fmt == "csr":
        groups = n * -(-kept // ref.CSR_GROUP)
        return groups * (ref.CSR_GROUP * (item + 1) + 2) + 8 * (n + 1)
    if fmt == "sliced":
        blocks, slices = ref.sliced_shape(n, k)
        density = kept / k if k else 0.0
        last = k - (slices - 1) * ref.SLICED_COLS
        per_row = (slices - 1) * _sliced_groups(ref.SLICED_COLS, density)
        groups = n * (per_row + _sliced_groups(last, density)) if k else 0.0
        nnz = n * kept
        return (
            (nnz + ref.SLICED_GROUP) * (item + 1)
            + 2 * round(groups)
            + 8 * (blocks * slices + blocks + 2)
        )
    raise ValueError(f"fmt must be one of {('dense', *FORMATS)}, got {fmt!r}")
