"""Sparse weight formats and the sparse linear ops, in pure PyTorch: the specification.

A pruned weight W is (N, K), one row per output feature. Two formats:

2:4 (semi-structured): K is cut into G = ceil(K / 4) groups of 4 columns (the last one short
when K % 4 != 0; its missing columns count as zeros), and each group keeps 2 values:

    values  (N, 2G)          the kept values of each group, in column order (fp32/bf16/fp16)
    meta    (N, ceil(G / 2)) uint8: 2 bits per kept value, its column within the group; byte b
                             holds groups 2b and 2b + 1: bits 0-1, 2-3 the first group's two
                             indices, bits 4-5, 6-7 the second's (high nibble 0 past the end)

    W[n, 4g + meta_index(n, 2g + i)] = values[n, 2g + i],  i = 0, 1; every other W[n, k] = 0.

Within a group the two indices are distinct and increasing. A group with fewer than two
nonzeros keeps its lowest zero columns as explicit zeros, and a short last group may point past
K (at a zero value): kernels skip columns >= K. Bytes per weight: half the values plus 1/8.

Bitmask (unstructured, any sparsity): one bit per weight, and the nonzeros packed row by row:

    mask         (N, ceil(K / 8)) uint8: bit j of byte b is set when W[n, 8b + j] != 0
                 (bits past K are ignored)
    values       (nnz,) the nonzeros in row-major order (fp32/bf16/fp16)
    row_offsets  (N + 1,) int64: row n's values are values[row_offsets[n] : row_offsets[n + 1]]

Bytes per weight at sparsity s: (1 - s) * itemsize + 1/8 (+ 8 per row): for fp32 values 2.125
at 50% and 0.525 at 90%, for bf16 1.125 and 0.325.

CSR (unstructured, for high sparsity): the nonzeros of each row in groups of 8, each with an
8-bit column relative to its group's base column, so a kernel's work follows the nonzeros:

    values         (G, 8) the nonzeros row by row, in column order (fp32/bf16/fp16)
    columns        (G, 8) uint8: each value's column minus its group's base column
    bases          (G,) int16: the group's base column / 8
    group_offsets  (N + 1,) int64: row n's groups are [group_offsets[n], group_offsets[n + 1])

    W[n, 8 * bases[g] + columns[g, i]] += values[g, i]  for every group g of row n, i < 8.

A group starts at a row's next nonzero c0 (base c0 // 8) and takes up to 8 of the row's
following nonzeros in its window of 256 columns [8 * base, 8 * base + 256); a short group's
unused slots hold zero values at column offset 0. Every column must be < K; K at most
CSR_MAX_K. Bytes per nonzero: itemsize + 1.25 (+ the short groups' slots, + 8 per row): per
weight for bf16 values 0.325 at 90% (as the bitmask) and 0.16 at 95% (bitmask 0.225).

Sliced (unstructured, for decode at high sparsity): W cut into blocks of 64 rows and slices of
128 columns; each block's slice holds its rows' nonzeros in groups of up to 16 from one row:

    values         (V,) the nonzeros, group by group (fp32/bf16/fp16), then 16 zero slots
    columns        (V,) uint8: each value's column within its slice (0..127), then 16 zeros
    groups         (G, 2) uint8: each group's row within its block (0..63) and its count (1..16)
    group_offsets  (B * S + 1,) int64: block b's slice s's groups are [group_offsets[b * S + s],
                   group_offsets[b * S + s + 1]), B = ceil(N / 64), S = ceil(K / 128)
    value_offsets  (B + 1,) int64: block b's values are [value_offsets[b], value_offsets[b + 1]),
                   its groups' counts in order

    W[64 b + groups[g, 0], 128 s + columns[v]] = values[v]  for the counts[g] values v of each
    group g of block b's slice s.

A row's nonzeros in a slice are cut into groups of 16 in column order, and a slice's groups go
by round: every row's first group (rows in order), then the second groups, and so on (see
csrc/cpu/sliced_gemm.h: two groups in a row then add to different rows). The 16 slots past the
last value let a kernel read a whole group at any group. Bytes per nonzero: itemsize + 1 +
about 2 / 11 at 90% (a group's two bytes), + 8 per block and slice: per weight for bf16 values
0.32 at 90%, int8 0.22.

Block (block-sparse, R x C blocks, for weights pruned in blocks such as "16x16"): W is tiled
into R x C blocks from (0, 0), the blocks at the bottom and right edges cut off by N and K, and
every block that holds a nonzero is stored whole, block row by block row in column order:

    values       (B, R, C) the stored blocks (an edge block's rows >= N and columns >= K zero)
    col_blocks   (B,) int32: each block's column of blocks (its first column / C)
    row_offsets  (ceil(N / R) + 1,) int64: block row r's blocks are [row_offsets[r],
                 row_offsets[r + 1])

    W[R r + i, C col_blocks[b] + j] += values[b, i, j]  for every block b of block row r, i < R,
    j < C, inside (N, K).

N is not implied by the tensors when R does not divide it: the op takes it. Bytes per weight at
block sparsity s: (1 - s) * itemsize + 4 / (R C) (+ 8 per block row): a kernel reads whole
blocks of x and W, with no index per value.

Quantized values: in every format the values may be int8 codes with a scale per row, (N,)
fp32 ``scales``: W[n] = codes[n] * scales[n] (the int8 weight-only rule of
:func:`torchslim.reference.int8.int8_weight_only_linear`, on the pruned weight). A value byte
per nonzero: 2:4 with int8 values takes 0.625 bytes per weight, a third of dense bf16.
Bitmask, sliced and block int8 codes may also meet x quantized per token
(:func:`sparse_bitmask_dynamic_linear`, :func:`sparse_sliced_dynamic_linear`,
:func:`sparse_block_dynamic_linear`: the W8A8 rule of
:func:`torchslim.reference.int8_dynamic_linear`): codes times codes, summed exactly.

The linear ops compute ``x @ W.T + bias`` on the decompressed W. The kernels visit only the
stored values, so their sums run in a different order than a dense matmul: they are judged
against the float64 reference (testing.check_close), not bit for bit.
"""

from __future__ import annotations

import torch

from torchslim.reference._linear import linear
from torchslim.reference.int8 import int8_dynamic_linear

GROUP = 4  # 2:4: columns per group
KEPT = 2  # 2:4: values kept per group
MASK_BITS = 8  # bitmask: columns per mask byte
CSR_GROUP = 8  # csr: values per group
CSR_WINDOW = 256  # csr: columns a group spans from its base (8-bit offsets)
CSR_BASE_UNIT = 8  # csr: a base counts columns in units of 8
CSR_MAX_K = CSR_BASE_UNIT * (2**15)  # int16 bases
SLICED_ROWS = 64  # sliced: weight rows per block
SLICED_COLS = 128  # sliced: columns per slice
SLICED_GROUP = 16  # sliced: the most values per group, and the slots past the last value


# --------------------------------------------------------------------------- 2:4
def sparse24_shapes(n: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((N, 2G), (N, ceil(G / 2))): the values and meta shapes of an (N, K) weight."""
    groups = -(-k // GROUP)
    return (n, KEPT * groups), (n, -(-groups // 2))


def compress_24(
    weight: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight with at most 2 nonzeros per group of 4 -> (values, meta).

    The pattern is not checked here (torchslim.sparse.compress_24 checks it): a group with more
    than two nonzeros keeps its first two nonzero columns. ``dtype`` converts the values
    (default: the weight's dtype).
    """
    n, k = weight.shape
    groups = -(-k // GROUP)
    w = torch.nn.functional.pad(weight, (0, groups * GROUP - k)).reshape(n, groups, GROUP)
    # Nonzero columns first, then the lowest zero ones; the two chosen, in column order.
    key = (w == 0).to(torch.int64) * GROUP + torch.arange(GROUP, device=w.device)
    index = key.argsort(dim=-1)[..., :KEPT].sort(dim=-1).values  # (N, G, 2)
    values = w.gather(-1, index).reshape(n, KEPT * groups)
    codes = index.reshape(n, KEPT * groups).to(torch.uint8)  # (N, 2G), 2 bits each
    codes = torch.nn.functional.pad(codes, (0, -codes.shape[1] % 4))
    codes = codes.reshape(n, codes.shape[1] // 4, 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=w.device)
    meta = (codes << shifts).sum(dim=-1, dtype=torch.uint8)
    return values.to(dtype or weight.dtype), meta


def meta_indices(meta: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, ceil(G / 2)) uint8 meta -> (N, 2G) int64 column index of each kept value in its group."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=meta.device)
    codes = (meta.unsqueeze(-1) >> shifts) & 3
    return codes.reshape(meta.shape[0], 4 * meta.shape[1])[:, : KEPT * groups].to(torch.int64)


def _check_k(k: object, units: int, per_unit: int, what: str) -> None:
    """Raises unless ``k`` is a K whose ceil(K / per_unit) is ``units`` (the weight's own)."""
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)) or k < 0:
        raise ValueError(f"k must be the weight's K, an int >= 0, got {k!r}")
    if -(-k // per_unit) != units:
        low, high = max(per_unit * (units - 1) + 1, 0), per_unit * units
        raise ValueError(f"k must be the weight's K, {low}..{high} for {what}, got {k}")


def decompress_24(
    values: torch.Tensor, meta: torch.Tensor, k: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(values (N, 2G), meta) -> the dense (N, K) weight (in ``dtype``, default the values').
    Two values of a group that name one column add up there, as they do in the kernels (each
    kept value meets x at its column); compress_24 never writes such meta."""
    n, kept = values.shape
    groups = kept // KEPT
    _check_k(k, groups, GROUP, f"{groups} groups of {GROUP}")
    column = meta_indices(meta, groups) + GROUP * torch.arange(
        groups, device=values.device
    ).repeat_interleave(KEPT)
    dense = values.new_zeros((n, groups * GROUP), dtype=dtype or values.dtype)
    dense.scatter_add_(1, column, values.to(dense.dtype))
    return dense[:, :k]


def sparse24_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ (decompress_24(values, meta) * scales[:, None]).T + bias``.

    Args:
        x: (..., K) fp32/bf16/fp16. values: (N, 2 * ceil(K / 4)). meta: (N, ceil(K / 8)) uint8.
        bias: (N,) or None.
        scales: (N,) fp32 or None: row n of W times scales[n] (needed for int8 values).
        compute_dtype: dtype of the matmul; defaults to ``x.dtype`` (what PyTorch would do),
            float64 for the test yardstick.

    Returns:
        (..., N) in ``x.dtype``.
    """
    cd = compute_dtype or x.dtype
    w = decompress_24(values, meta, x.shape[-1], dtype=cd)
    return _linear(x, w, bias, cd, scales)


def _require_codes(values: torch.Tensor) -> None:
    """The W8A8 ops' values: int8 codes."""
    if values.dtype != torch.int8:
        raise TypeError(f"values must be int8 codes for a W8A8 linear, got {values.dtype}")


def sparse24_dynamic_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8 on a 2:4 weight of int8 codes: :func:`torchslim.reference.int8_dynamic_linear`'s
    rule on the decompressed codes (see :func:`sparse_sliced_dynamic_linear`).

    Args:
        x: (..., K) fp32/bf16/fp16. values: (N, 2 * ceil(K / 4)) int8 codes. meta: as
        :func:`sparse24_linear`. scales: (N,) fp32. bias: (N,) or None.
        compute_dtype: dtype of the epilogue arithmetic (float64 for the test yardstick).

    Returns:
        (..., N) in ``x.dtype``.
    """
    _require_codes(values)
    # int32: two codes of a group that name one column add up there without wrapping at 8 bits
    codes = decompress_24(values, meta, x.shape[-1], dtype=torch.int32)
    return int8_dynamic_linear(x, codes, scales, bias, compute_dtype=compute_dtype)


# --------------------------------------------------------------------------- bitmask
def compress_bitmask(
    weight: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (values (nnz,), mask (N, ceil(K / 8)) uint8, row_offsets (N + 1,) int64).

    ``dtype`` converts the values (default: the weight's dtype).
    """
    n, k = weight.shape
    nonzero = weight != 0
    bits = torch.nn.functional.pad(nonzero, (0, -k % MASK_BITS))
    bits = bits.reshape(n, bits.shape[1] // MASK_BITS, MASK_BITS)
    weights = torch.tensor([1 << j for j in range(MASK_BITS)], device=weight.device)
    mask = (bits.to(torch.int64) * weights).sum(dim=-1).to(torch.uint8)
    row_offsets = torch.zeros(n + 1, dtype=torch.int64, device=weight.device)
    row_offsets[1:] = nonzero.sum(dim=1).cumsum(0)
    return weight[nonzero].to(dtype or weight.dtype), mask, row_offsets


def mask_bits(mask: torch.Tensor, k: int) -> torch.Tensor:
    """(N, ceil(K / 8)) uint8 -> (N, K) bool."""
    _check_k(k, mask.shape[1], MASK_BITS, f"{mask.shape[1]} mask bytes")
    shifts = torch.arange(MASK_BITS, dtype=torch.uint8, device=mask.device)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(mask.shape[0], MASK_BITS * mask.shape[1])[:, :k].bool()


def check_bitmask(
    values: torch.Tensor, mask: torch.Tensor, row_offsets: torch.Tensor, k: int
) -> None:
    """Raises ValueError unless row_offsets starts at 0, stays within values and gives every
    row as many values as its mask has set bits (reads the data: a device sync on a GPU)."""
    _bitmask_nonzero(values, mask, row_offsets, k)


def _bitmask_nonzero(
    values: torch.Tensor, mask: torch.Tensor, row_offsets: torch.Tensor, k: int
) -> torch.Tensor:
    """check_bitmask's checks; returns the (N, K) bool nonzero pattern it read."""
    nonzero = mask_bits(mask, k)
    counts = nonzero.sum(dim=1)
    offsets = row_offsets.to(torch.int64)
    if offsets.numel() and int(offsets[0]) != 0:
        raise ValueError(f"row_offsets must start at 0, got {int(offsets[0])}")
    if int(offsets[-1]) > values.numel():
        raise ValueError(
            f"row_offsets must end at most at values.numel() = {values.numel()}, "
            f"got {int(offsets[-1])}"
        )
    bad = (offsets.diff() != counts).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(
            f"mask and row_offsets disagree: row {row} has {int(offsets[row + 1] - offsets[row])} "
            f"values by row_offsets and {int(counts[row])} set bits in mask"
        )
    return nonzero


def decompress_bitmask(
    values: torch.Tensor,
    mask: torch.Tensor,
    row_offsets: torch.Tensor,
    k: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(values, mask, row_offsets) -> the dense (N, K) weight (``dtype``, default the values')."""
    nonzero = _bitmask_nonzero(values, mask, row_offsets, k)
    dense = values.new_zeros(nonzero.shape, dtype=dtype or values.dtype)
    dense[nonzero] = values[: int(row_offsets[-1])].to(dense.dtype)
    return dense


def sparse_bitmask_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    row_offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ (decompress_bitmask(values, mask, row_offsets) * scales[:, None]).T + bias``.

    Args:
        x: (..., K) fp32/bf16/fp16. values: (nnz,). mask: (N, ceil(K / 8)) uint8.
        row_offsets: (N + 1,) int64. bias: (N,) or None.
        scales: (N,) fp32 or None: row n of W times scales[n] (needed for int8 values).
        compute_dtype: dtype of the matmul; defaults to ``x.dtype``, float64 for the yardstick.

    Returns:
        (..., N) in ``x.dtype``.
    """
    cd = compute_dtype or x.dtype
    w = decompress_bitmask(values, mask, row_offsets, x.shape[-1], dtype=cd)
    return _linear(x, w, bias, cd, scales)


# --------------------------------------------------------------------------- csr
def sparse_bitmask_dynamic_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    row_offsets: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8 on a bitmask weight of int8 codes: :func:`torchslim.reference.int8_dynamic_linear`'s
    rule on the decompressed codes (see :func:`sparse_sliced_dynamic_linear`).

    Args:
        x: (..., K) fp32/bf16/fp16. values: (nnz,) int8 codes. mask, row_offsets: as
        :func:`sparse_bitmask_linear`. scales: (N,) fp32. bias: (N,) or None.
        compute_dtype: dtype of the epilogue arithmetic (float64 for the test yardstick).

    Returns:
        (..., N) in ``x.dtype``.
    """
    _require_codes(values)
    codes = decompress_bitmask(values, mask, row_offsets, x.shape[-1])
    return int8_dynamic_linear(x, codes, scales, bias, compute_dtype=compute_dtype)


def _csr_assign(
    cols: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(group within its row, slot in the group) of each nonzero, grouped as the format says:
    runs of 8, except in rows where a run spans more than a window, which are grouped greedily
    (a loop over the groups of those rows only: rare below ~95% sparsity)."""
    nnz = cols.numel()
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=cols.device), counts)
    pos = torch.arange(nnz, device=cols.device) - starts[rows]
    group, slot = pos // CSR_GROUP, pos % CSR_GROUP
    first = cols[(starts[rows] + group * CSR_GROUP)]
    too_far = cols - first // CSR_BASE_UNIT * CSR_BASE_UNIT >= CSR_WINDOW
    bad = torch.unique(rows[too_far])
    if bad.numel():
        ptr, end = starts[bad].clone(), starts[bad] + counts[bad]
        lanes = torch.arange(CSR_GROUP, device=cols.device)
        for it in range(int(counts[bad].max())):
            live = ptr < end
            if not bool(live.any()):
                break
            index = ptr[live, None] + lanes
            inside = index < end[live, None]
            c = cols[index.clamp(max=nnz - 1)]
            base = c[:, :1] // CSR_BASE_UNIT * CSR_BASE_UNIT
            take = inside & (c - base < CSR_WINDOW)  # a prefix: columns increase
            group[index[take]] = it
            slot[index[take]] = lanes.expand_as(index)[take]
            ptr[live] += take.sum(dim=1)
    return group, slot


def compress_csr(
    weight: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (values (G, 8), columns (G, 8) uint8, bases (G,) int16,
    group_offsets (N + 1,) int64); ``dtype`` converts the values (default the weight's)."""
    n, k = weight.shape
    if k > CSR_MAX_K:
        raise ValueError(f"the csr format takes K <= {CSR_MAX_K}, got K = {k}")
    nonzero = weight != 0
    counts = nonzero.sum(dim=1)
    starts = counts.cumsum(0) - counts
    cols = nonzero.nonzero()[:, 1]  # row-major: each row's columns in order
    group, slot = _csr_assign(cols, starts, counts)
    rows = torch.repeat_interleave(torch.arange(n, device=weight.device), counts)
    per_row = torch.zeros(n, dtype=torch.int64, device=weight.device)
    per_row.scatter_reduce_(0, rows, group + 1, reduce="amax")
    group_offsets = torch.zeros(n + 1, dtype=torch.int64, device=weight.device)
    group_offsets[1:] = per_row.cumsum(0)
    g = group_offsets[rows] + group
    total = int(group_offsets[-1])
    base = torch.zeros(total, dtype=torch.int64, device=weight.device)
    base[g[slot == 0]] = cols[slot == 0] // CSR_BASE_UNIT
    values = weight.new_zeros((total, CSR_GROUP), dtype=dtype or weight.dtype)
    values[g, slot] = weight[nonzero].to(values.dtype)
    columns = torch.zeros((total, CSR_GROUP), dtype=torch.uint8, device=weight.device)
    columns[g, slot] = (cols - CSR_BASE_UNIT * base[g]).to(torch.uint8)
    return values, columns, base.to(torch.int16), group_offsets


def _check_offsets(offsets: torch.Tensor, limit: int, name: str) -> torch.Tensor:
    """``offsets`` as int64 after checking that they start at 0, never decrease and stay at
    most ``limit`` (the entries of values.shape[0] they index); ValueError naming the first
    one that does not."""
    offsets = offsets.to(torch.int64)
    if offsets.numel() and int(offsets[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(offsets[0])}")
    bad = ((offsets.diff() < 0) | (offsets[1:] > limit)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(
            f"{name} must be non-decreasing and at most values.shape[0] = {limit}, "
            f"got {name}[{i}] = {int(offsets[i])}, {name}[{i + 1}] = {int(offsets[i + 1])}"
        )
    return offsets


def _csr_columns(
    values: torch.Tensor,
    columns: torch.Tensor,
    bases: torch.Tensor,
    group_offsets: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """check_csr's checks; returns (row, column) of every slot, (G, 8) int64 each."""
    offsets = _check_offsets(group_offsets, values.shape[0], "group_offsets")
    used = int(offsets[-1])
    rows = torch.repeat_interleave(
        torch.arange(offsets.numel() - 1, device=values.device), offsets.diff()
    )
    col = CSR_BASE_UNIT * bases[:used].to(torch.int64)[:, None] + columns[:used].to(torch.int64)
    past = (col >= k) | (col < 0)
    if bool(past.any()):
        g = int(past.any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"csr row {int(rows[g])} points past K = {k}: column {int(col[g][past[g]][0])}"
        )
    return rows[:, None].expand(-1, CSR_GROUP), col


def check_csr(
    values: torch.Tensor,
    columns: torch.Tensor,
    bases: torch.Tensor,
    group_offsets: torch.Tensor,
    k: int,
) -> None:
    """Raises ValueError unless group_offsets starts at 0, is non-decreasing, stays within the
    groups, and every used group's columns are in [0, K) (a device sync on a GPU)."""
    _csr_columns(values, columns, bases, group_offsets, k)


def decompress_csr(
    values: torch.Tensor,
    columns: torch.Tensor,
    bases: torch.Tensor,
    group_offsets: torch.Tensor,
    k: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(values, columns, bases, group_offsets) -> the dense (N, K) weight (``dtype``, default
    the values')."""
    rows, col = _csr_columns(values, columns, bases, group_offsets, k)
    dense = values.new_zeros((group_offsets.numel() - 1, k), dtype=dtype or values.dtype)
    used = rows.shape[0]
    dense.index_put_((rows, col), values[:used].to(dense.dtype), accumulate=True)
    return dense


def sparse_csr_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    bases: torch.Tensor,
    group_offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ (decompress_csr(...) * scales[:, None]).T + bias`` (scales: 1 when None).

    Args:
        x: (..., K) fp32/bf16/fp16. values: (G, 8). columns: (G, 8) uint8. bases: (G,) int16.
        group_offsets: (N + 1,) int64. bias: (N,) or None.
        scales: (N,) fp32 or None: row n of W times scales[n] (needed for int8 values).
        compute_dtype: dtype of the matmul; defaults to ``x.dtype``, float64 for the yardstick.

    Returns:
        (..., N) in ``x.dtype``.
    """
    cd = compute_dtype or x.dtype
    w = decompress_csr(values, columns, bases, group_offsets, x.shape[-1], dtype=cd)
    return _linear(x, w, bias, cd, scales)


# --------------------------------------------------------------------------- sliced
def sliced_shape(n: int, k: int) -> tuple[int, int]:
    """(B, S): blocks of rows and slices of columns of an (N, K) weight in the sliced format."""
    return -(-n // SLICED_ROWS), -(-k // SLICED_COLS)


def compress_sliced(
    weight: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (values (V,), columns (V,) uint8, groups (G, 2) uint8, group_offsets
    (B * S + 1,) int64, value_offsets (B + 1,) int64); ``dtype`` converts the values (default
    the weight's)."""
    n, k = weight.shape
    nb, ns = sliced_shape(n, k)
    dev = weight.device
    row, col = (weight != 0).nonzero().unbind(1)  # row-major: each row's columns in order
    block, within, sl = row // SLICED_ROWS, row % SLICED_ROWS, col // SLICED_COLS
    # Rank of each nonzero among its row's in its slice -> its group's round.
    cell = row * ns + sl  # (row, slice), increasing with the nonzeros' order
    first = torch.searchsorted(cell, cell, right=False)
    rnd = (torch.arange(cell.numel(), device=dev) - first) // SLICED_GROUP
    # Order: block, slice, round, row, column (a stable sort keeps the columns in order).
    rounds = SLICED_COLS // SLICED_GROUP
    key = ((block * ns + sl) * rounds + rnd) * SLICED_ROWS + within
    key, order = torch.sort(key, stable=True)
    group_key, counts = torch.unique_consecutive(key, return_counts=True)
    cell_of_group = group_key // SLICED_ROWS // rounds  # b * S + s
    per_cell = torch.bincount(cell_of_group, minlength=nb * ns)
    group_offsets = torch.zeros(nb * ns + 1, dtype=torch.int64, device=dev)
    group_offsets[1:] = per_cell.cumsum(0)
    per_block = torch.bincount(block, minlength=nb)
    value_offsets = torch.zeros(nb + 1, dtype=torch.int64, device=dev)
    value_offsets[1:] = per_block.cumsum(0)
    groups = torch.stack([group_key % SLICED_ROWS, counts], dim=1).to(torch.uint8)
    pad = SLICED_GROUP
    values = weight.new_zeros(row.numel() + pad, dtype=dtype or weight.dtype)
    values[: row.numel()] = weight[row[order], col[order]].to(values.dtype)
    columns = torch.zeros(row.numel() + pad, dtype=torch.uint8, device=dev)
    columns[: row.numel()] = (col[order] % SLICED_COLS).to(torch.uint8)
    return values, columns, groups.contiguous(), group_offsets, value_offsets


def _sliced_entries(
    values: torch.Tensor,
    columns: torch.Tensor,
    groups: torch.Tensor,
    group_offsets: torch.Tensor,
    value_offsets: torch.Tensor,
    n: int,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """check_sliced's checks; returns the (row, column) of each value, (nnz,) int64 each."""
    nb, ns = sliced_shape(n, k)
    if values.dim() != 1 or columns.shape != values.shape:
        raise ValueError(
            f"values and columns must be (V,) of one shape, got {tuple(values.shape)} and "
            f"{tuple(columns.shape)}"
        )
    if groups.dim() != 2 or groups.shape[1] != 2:
        raise ValueError(f"groups must have shape (G, 2), got {tuple(groups.shape)}")
    for t, name, size in (
        (group_offsets, "group_offsets", nb * ns + 1),
        (value_offsets, "value_offsets", nb + 1),
    ):
        if tuple(t.shape) != (size,):
            raise ValueError(
                f"{name} must have shape ({size},) for N = {n} and K = {k}, got {tuple(t.shape)}"
            )
    goff = _check_offsets(group_offsets, groups.shape[0], "group_offsets")
    voff = _check_offsets(value_offsets, values.numel() - SLICED_GROUP, "value_offsets")
    g = groups[: int(goff[-1])].to(torch.int64)
    within, counts = g[:, 0], g[:, 1]
    cell = torch.repeat_interleave(torch.arange(nb * ns, device=groups.device), goff.diff())
    block = cell // ns
    rows_in_block = (n - block * SLICED_ROWS).clamp(max=SLICED_ROWS)
    bad = (within >= rows_in_block) | (counts < 1) | (counts > SLICED_GROUP)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"groups[{i}] = ({int(within[i])}, {int(counts[i])}) is not (a row of its block of "
            f"{int(rows_in_block[i])}, a count in [1, {SLICED_GROUP}])"
        )
    per_block = torch.zeros(nb, dtype=torch.int64, device=groups.device)
    per_block.index_add_(0, block, counts)
    wrong = (per_block != voff.diff()).nonzero()
    if wrong.numel():
        b = int(wrong[0, 0])
        raise ValueError(
            f"block {b}'s groups count {int(per_block[b])} values, value_offsets "
            f"{int(voff[b + 1] - voff[b])}"
        )
    nnz = int(voff[-1])
    row = torch.repeat_interleave(block * SLICED_ROWS + within, counts)
    col = torch.repeat_interleave(cell % ns * SLICED_COLS, counts) + columns[:nnz].to(torch.int64)
    past = ((col >= k) | (columns[:nnz] >= SLICED_COLS)).nonzero()
    if past.numel():
        i = int(past[0, 0])
        raise ValueError(
            f"sliced row {int(row[i])} points past its slice or K = {k}: columns[{i}] = "
            f"{int(columns[i])}"
        )
    return row, col


def check_sliced(
    values: torch.Tensor,
    columns: torch.Tensor,
    groups: torch.Tensor,
    group_offsets: torch.Tensor,
    value_offsets: torch.Tensor,
    n: int,
    k: int,
) -> None:
    """Raises ValueError unless the offsets have their shapes, start at 0, never decrease and
    stay within groups and values (less the 16 slots past the last), every group's row and count
    are in range, each block's counts add up to its values, and every column is inside its slice
    and below K (reads the data: a device sync on a GPU)."""
    _sliced_entries(values, columns, groups, group_offsets, value_offsets, n, k)


def decompress_sliced(
    values: torch.Tensor,
    columns: torch.Tensor,
    groups: torch.Tensor,
    group_offsets: torch.Tensor,
    value_offsets: torch.Tensor,
    n: int,
    k: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The sliced format -> the dense (N, K) weight (``dtype``, default the values')."""
    row, col = _sliced_entries(values, columns, groups, group_offsets, value_offsets, n, k)
    dense = values.new_zeros((n, k), dtype=dtype or values.dtype)
    dense.index_put_((row, col), values[: row.numel()].to(dense.dtype), accumulate=True)
    return dense


def sparse_sliced_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    groups: torch.Tensor,
    group_offsets: torch.Tensor,
    value_offsets: torch.Tensor,
    n: int,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ (decompress_sliced(...) * scales[:, None]).T + bias`` (scales: 1 when None).

    Args:
        x: (..., K) fp32/bf16/fp16. values: (V,). columns: (V,) uint8. groups: (G, 2) uint8.
        group_offsets: (B * S + 1,) int64. value_offsets: (B + 1,) int64. n: N.
        bias: (N,) or None. scales: (N,) fp32 or None (needed for int8 values).
        compute_dtype: dtype of the matmul; defaults to ``x.dtype``, float64 for the yardstick.

    Returns:
        (..., N) in ``x.dtype``.
    """
    cd = compute_dtype or x.dtype
    w = decompress_sliced(
        values, columns, groups, group_offsets, value_offsets, n, x.shape[-1], dtype=cd
    )
    return _linear(x, w, bias, cd, scales)


def sparse_sliced_dynamic_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    groups: torch.Tensor,
    group_offsets: torch.Tensor,
    value_offsets: torch.Tensor,
    n: int,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8 on a sliced weight of int8 codes: the rule of
    :func:`torchslim.reference.int8_dynamic_linear` on the decompressed codes, x quantized per
    token inside the op (:func:`torchslim.reference.quantize_per_token`)::

        x_q, x_scale = quantize_per_token(x)
        out = (x_q @ codes.T) * x_scale[:, None] * scales[None, :] + bias   (the sum exact)

    Args:
        x: (..., K) fp32/bf16/fp16. values: (V,) int8 codes. columns, groups, group_offsets,
        value_offsets, n: as :func:`sparse_sliced_linear`. scales: (N,) fp32. bias: (N,) or None.
        compute_dtype: dtype of the epilogue arithmetic (float64 for the test yardstick).

    Returns:
        (..., N) in ``x.dtype``.
    """
    _require_codes(values)
    # int32: repeated entries add up, as in every other decompression, without wrapping at 8 bits
    k = x.shape[-1]
    codes = decompress_sliced(
        values, columns, groups, group_offsets, value_offsets, n, k, dtype=torch.int32
    )
    return int8_dynamic_linear(x, codes, scales, bias, compute_dtype=compute_dtype)


# --------------------------------------------------------------------------- block
def block_rows(n: int, block: tuple[int, int]) -> int:
    """Block rows of an N-row weight in R x C blocks: ceil(N / R)."""
    return -(-n // block[0])


def compress_block(
    weight: torch.Tensor, block: tuple[int, int], dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (values (B, R, C), col_blocks (B,) int32, row_offsets (ceil(N / R) + 1,)
    int64): every R x C block with a nonzero; ``dtype`` converts the values (default the
    weight's)."""
    rows, cols = block
    n, k = weight.shape
    nb, kb = block_rows(n, block), -(-k // cols)
    padded = torch.nn.functional.pad(weight, (0, kb * cols - k, 0, nb * rows - n))
    tiles = padded.reshape(nb, rows, kb, cols).transpose(1, 2)  # (nb, kb, R, C)
    kept = (tiles != 0).flatten(2).any(dim=2)  # (nb, kb)
    row_offsets = torch.zeros(nb + 1, dtype=torch.int64, device=weight.device)
    row_offsets[1:] = kept.sum(dim=1).cumsum(0)
    where = kept.nonzero()  # block row major, columns in order
    values = tiles[where[:, 0], where[:, 1]].to(dtype or weight.dtype)
    return values.contiguous(), where[:, 1].to(torch.int32), row_offsets


def check_block(
    values: torch.Tensor, col_blocks: torch.Tensor, row_offsets: torch.Tensor, n: int, k: int
) -> None:
    """Raises ValueError unless row_offsets has ceil(N / R) + 1 entries, starts at 0, is
    non-decreasing and stays within the blocks, and every used block's column of blocks is in
    [0, ceil(K / C)) (a device sync on a GPU)."""
    blocks, rows, cols = values.shape
    if row_offsets.numel() != block_rows(n, (rows, cols)) + 1:
        raise ValueError(
            f"row_offsets must have ceil(N / R) + 1 = {block_rows(n, (rows, cols)) + 1} entries "
            f"for N = {n} and R = {rows}, got {row_offsets.numel()}"
        )
    offsets = _check_offsets(row_offsets, blocks, "row_offsets")
    used = col_blocks[: int(offsets[-1])].to(torch.int64)
    past = ((used < 0) | (used * cols >= k)).nonzero()
    if past.numel():
        b = int(past[0, 0])
        raise ValueError(
            f"col_blocks[{b}] = {int(used[b])} points past K = {k} (blocks of {cols} columns)"
        )


def decompress_block(
    values: torch.Tensor,
    col_blocks: torch.Tensor,
    row_offsets: torch.Tensor,
    n: int,
    k: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(values, col_blocks, row_offsets) -> the dense (N, K) weight (``dtype``, default the
    values')."""
    check_block(values, col_blocks, row_offsets, n, k)
    _, rows, cols = values.shape
    nb, kb = block_rows(n, (rows, cols)), -(-k // cols)
    used = int(row_offsets[-1])
    block_row = torch.repeat_interleave(
        torch.arange(nb, device=values.device), row_offsets.to(torch.int64).diff()
    )
    tiles = values.new_zeros((nb, kb, rows, cols), dtype=dtype or values.dtype)
    tiles.index_put_(
        (block_row, col_blocks[:used].to(torch.int64)),
        values[:used].to(tiles.dtype),
        accumulate=True,
    )
    return tiles.transpose(1, 2).reshape(nb * rows, kb * cols)[:n, :k]


def sparse_block_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    col_blocks: torch.Tensor,
    row_offsets: torch.Tensor,
    n: int,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ (decompress_block(...) * scales[:, None]).T + bias`` (scales: 1 when None).

    Args:
        x: (..., K) fp32/bf16/fp16. values: (B, R, C). col_blocks: (B,) int32.
        row_offsets: (ceil(N / R) + 1,) int64. n: N, the output features. bias: (N,) or None.
        scales: (N,) fp32 or None: row n of W times scales[n] (needed for int8 values).
        compute_dtype: dtype of the matmul; defaults to ``x.dtype``, float64 for the yardstick.

    Returns:
        (..., N) in ``x.dtype``.
    """
    cd = compute_dtype or x.dtype
    w = decompress_block(values, col_blocks, row_offsets, n, x.shape[-1], dtype=cd)
    return _linear(x, w, bias, cd, scales)


def sparse_block_dynamic_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    col_blocks: torch.Tensor,
    row_offsets: torch.Tensor,
    n: int,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8 on a block weight of int8 codes: the rule of
    :func:`torchslim.reference.int8_dynamic_linear` on the decompressed codes, x quantized per
    token inside the op (as :func:`sparse_sliced_dynamic_linear`).

    Args:
        x: (..., K) fp32/bf16/fp16. values: (B, R, C) int8 codes. col_blocks, row_offsets, n: as
        :func:`sparse_block_linear`. scales: (N,) fp32. bias: (N,) or None.
        compute_dtype: dtype of the epilogue arithmetic (float64 for the test yardstick).

    Returns:
        (..., N) in ``x.dtype``.
    """
    _require_codes(values)
    codes = decompress_block(values, col_blocks, row_offsets, n, x.shape[-1], dtype=torch.int32)
    return int8_dynamic_linear(x, codes, scales, bias, compute_dtype=compute_dtype)


def scale_rows(w: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """w (N, K) with row n times scales[n] in ``dtype`` (int8 values' scales), or w itself."""
    return w if scales is None else w * scales.to(dtype).unsqueeze(1)


def _linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    cd: torch.dtype,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    return linear(x, scale_rows(w, scales, cd), bias, cd)
