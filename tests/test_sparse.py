"""Sparse formats (2:4, bitmask, csr, sliced) and the sparse linear ops against the reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import KERNEL_BACKENDS, dense_from_24, run_on, seeded

import torchslim
from torchslim import _ext, ops
from torchslim import reference as ref
from torchslim.quant.int8 import quantize_weight_per_channel
from torchslim.sparse import (
    compress_24,
    compress_bitmask,
    compress_block,
    compress_csr,
    compress_sliced,
    format_bytes,
    prune_,
)
from torchslim.testing import M_QUICK, check_close, nan_padded

# Tests that compare an op with its reference run the kernels only (the reference backend
# would compare the reference with itself); tests of errors and hand-computed results run the
# reference too.
CPU_BACKENDS = [b for b in KERNEL_BACKENDS if b.startswith("cpu")]
SPARSE_BACKENDS = [*CPU_BACKENDS, "reference"]
# (N, K): K not a multiple of the 16 / 32 columns of a vector step, of 8 (a mask byte) or of 4
# (a 2:4 group); K = 1..3 are a lone short group.
NK = ((1, 1), (3, 2), (7, 13), (5, 36), (65, 257), (33, 1030), (17, 4099))


def _weight_24(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=g)
    return prune_(w, "2:4", progress=False)


def _weight_unstructured(n: int, k: int, sparsity: float, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=g)
    return prune_(w, "unstructured", sparsity=sparsity, progress=False) if k > 1 else w


# --------------------------------------------------------------------------- formats
@pytest.mark.parametrize(("n", "k"), NK)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_24_round_trip_is_exact(n, k, dtype):
    w = _weight_24(n, k, seeded("24", n, k)).to(dtype)
    values, meta = compress_24(w)
    groups = -(-k // 4)
    assert values.shape == (n, 2 * groups) and values.dtype == dtype
    assert meta.shape == (n, -(-k // 8)) and meta.dtype == torch.uint8
    assert torch.equal(ref.decompress_24(values, meta, k), w)
    # the two indices of a group are distinct and increasing
    index = ref.sparse.meta_indices(meta, groups).reshape(n, groups, 2)
    assert (index[..., 0] < index[..., 1]).all()


@pytest.mark.parametrize("fmt", ["2:4", "bitmask", "csr", "sliced"])
def test_a_weight_with_no_rows_round_trips(fmt):
    """(0, K) compresses to empty arrays and back, in every unstructured format and 2:4."""
    w = torch.zeros(0, 40)
    parts = _COMPRESS[fmt](w)
    assert torch.equal(_DECOMPRESS[fmt](*parts, 40), w)


def test_24_layout_by_hand():
    # group 0 keeps columns 1 and 3, group 1 columns 0 and 2; group 2 (K = 10: columns 8, 9)
    # keeps column 9 and pads with column 8 (a zero)
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0, 0.0, 5.0]])
    values, meta = compress_24(w)
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0, 0.0, 5.0]]
    assert meta.tolist() == [[1 | 3 << 2 | 0 << 4 | 2 << 6, 0 | 1 << 2]]


def test_24_every_meta_byte_decodes():
    # any byte whose two nibbles hold increasing pairs is a valid pair of groups
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    nibbles = [a | b << 2 for a, b in pairs]
    meta = torch.tensor([[lo | hi << 4 for lo in nibbles for hi in nibbles]], dtype=torch.uint8)
    k = 8 * meta.shape[1]
    values = torch.arange(1, 2 * k // 4 + 1, dtype=torch.float32).reshape(1, -1)
    dense = ref.decompress_24(values, meta, k)
    assert torch.equal(ref.compress_24(dense)[1], meta)


@pytest.mark.parametrize(("n", "k"), NK)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_bitmask_round_trip_is_exact(n, k, sparsity):
    w = _weight_unstructured(n, k, sparsity, seeded("bm", n, k, sparsity))
    values, mask, row_offsets = compress_bitmask(w, torch.bfloat16)
    assert values.dtype == torch.bfloat16 and values.shape == (int((w != 0).sum()),)
    assert mask.shape == (n, -(-k // 8)) and row_offsets.shape == (n + 1,)
    assert torch.equal(ref.decompress_bitmask(values, mask, row_offsets, k), w.bfloat16())
    # bit j of byte b is column 8b + j
    assert torch.equal(ref.sparse.mask_bits(mask, k), w != 0)


@pytest.mark.parametrize(("n", "k"), NK)
@pytest.mark.parametrize("sparsity", [0.5, 0.97])
def test_csr_round_trip_is_exact(n, k, sparsity):
    w = _weight_unstructured(n, k, sparsity, seeded("csr", n, k, sparsity))
    if n > 2:
        w[1] = 0.0  # an empty row: no groups
    values, columns, bases, offsets = compress_csr(w, torch.bfloat16)
    groups = values.shape[0]
    assert values.shape == columns.shape == (groups, 8) and values.dtype == torch.bfloat16
    assert columns.dtype == torch.uint8 and bases.shape == (groups,) and bases.dtype == torch.int16
    assert offsets.shape == (n + 1,) and int(offsets[-1]) == groups
    assert torch.equal(ref.decompress_csr(values, columns, bases, offsets, k), w.bfloat16())
    # every nonzero stored once; runs of 8 where no window is exceeded
    assert int((values != 0).sum()) == int((w != 0).sum())
    rows = (w != 0).sum(dim=1)
    assert groups >= int((-(-rows // 8)).sum())


def test_csr_layout_by_hand():
    # row 0: 10 nonzeros in columns 3..12 -> a group of 8 from base column 0 (offsets 3..10)
    # and one of 2 from base column 8 (offsets 3, 4); row 1: columns 5 and 700 are 695 apart,
    # more than a group's window of 256 -> two groups of one, bases 0 and 696 (700 // 8 * 8)
    w = torch.zeros(2, 800)
    w[0, 3:13] = torch.arange(1.0, 11.0)
    w[1, 5], w[1, 700] = -1.0, -2.0
    values, columns, bases, offsets = compress_csr(w)
    assert offsets.tolist() == [0, 2, 4]
    assert bases.tolist() == [0, 1, 0, 87]
    assert columns.tolist() == [
        [3, 4, 5, 6, 7, 8, 9, 10],
        [3, 4, 0, 0, 0, 0, 0, 0],
        [5, 0, 0, 0, 0, 0, 0, 0],
        [4, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert values[:, 0].tolist() == [1.0, 9.0, -1.0, -2.0]
    assert values[1:, 2:].abs().sum() == 0 and values[2:, 1:].abs().sum() == 0
    with pytest.raises(ValueError, match="K <= 262144"):
        compress_csr(torch.ones(1, 262145))


@pytest.mark.parametrize(("n", "k"), (*NK, (130, 300)))  # 130: a short last block of rows
@pytest.mark.parametrize("sparsity", [0.5, 0.97])
def test_sliced_round_trip_is_exact(n, k, sparsity):
    w = _weight_unstructured(n, k, sparsity, seeded("sliced", n, k, sparsity))
    values, columns, groups, group_offsets, value_offsets = compress_sliced(w, torch.bfloat16)
    nnz = int((w != 0).sum())
    assert values.shape == columns.shape == (nnz + 16,) and values.dtype == torch.bfloat16
    assert not values[nnz:].any() and not columns[nnz:].any()  # the slots past the last value
    assert groups.shape[1] == 2 and groups.dtype == torch.uint8
    assert ((groups[:, 1] >= 1) & (groups[:, 1] <= 16)).all()
    blocks, slices = ref.sparse.sliced_shape(n, k)
    assert group_offsets.shape == (blocks * slices + 1,) and value_offsets.shape == (blocks + 1,)
    parts = (values, columns, groups, group_offsets, value_offsets)
    assert torch.equal(ref.decompress_sliced(*parts, n, k), w.bfloat16())


def test_sliced_layout_by_hand():
    # rows 0 and 2 in slice 0, row 0 with 18 nonzeros (a group of 16 and one of 2), row 2 with
    # one at column 5, and row 1 one at column 130 (slice 1). Slice 0's groups by round: row 0's
    # first, row 2's, then row 0's second.
    w = torch.zeros(3, 200)
    w[0, 10:28] = torch.arange(1.0, 19.0)
    w[2, 5] = -1.0
    w[1, 130] = 7.0
    values, columns, groups, group_offsets, value_offsets = compress_sliced(w)
    assert groups.tolist() == [[0, 16], [2, 1], [0, 2], [1, 1]]
    assert group_offsets.tolist() == [0, 3, 4] and value_offsets.tolist() == [0, 20]
    assert values[:20].tolist() == [*range(1, 17), -1.0, 17.0, 18.0, 7.0]
    assert columns[:20].tolist() == [*range(10, 26), 5, 26, 27, 2]


# (N, K, block): blocks that divide neither N nor K (cut-off edge blocks), 1 x 16 rows, a block
# taller than N, one wider than K.
BLOCK_CASES = ((10, 37, (4, 4)), (33, 64, (16, 16)), (5, 40, (1, 16)), (17, 30, (2, 8)),
               (3, 50, (8, 4)), (6, 9, (2, 16)))  # fmt: skip


def _weight_block(n: int, k: int, block: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=g)
    return prune_(w, block, sparsity=0.5, progress=False)


@pytest.mark.parametrize(("n", "k", "block"), BLOCK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_round_trip_is_exact(n, k, block, dtype):
    w = _weight_block(n, k, block, seeded("block", n, k, block)).to(dtype)
    values, col_blocks, row_offsets = compress_block(w, block)
    rows, cols = block
    tiles = torch.nn.functional.pad(w, (0, -k % cols, 0, -n % rows))
    tiles = tiles.reshape(-(-n // rows), rows, -(-k // cols), cols).transpose(1, 2)
    kept = (tiles != 0).flatten(2).any(2)
    assert values.shape == (int(kept.sum()), rows, cols) and values.dtype == dtype
    assert col_blocks.dtype == torch.int32 and row_offsets.tolist() == [
        0,
        *kept.sum(1).cumsum(0).tolist(),
    ]
    assert torch.equal(ref.decompress_block(values, col_blocks, row_offsets, n, k), w)
    assert torch.equal(values, tiles[kept])  # block rows in order, columns in order


def test_block_layout_by_hand():
    # 2 x 2 blocks of a 3 x 5 weight: block row 0 keeps block columns 0 and 2 (the cut-off
    # column 4), block row 1 (the cut-off row 2) keeps block column 1
    w = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0, 0.0]]
    )
    values, col_blocks, row_offsets = compress_block(w, "2x2")
    assert values.tolist() == [
        [[1.0, 0.0], [0.0, 3.0]],
        [[2.0, 0.0], [0.0, 0.0]],
        [[4.0, 0.0], [0.0, 0.0]],
    ]
    assert col_blocks.tolist() == [0, 2, 1] and row_offsets.tolist() == [0, 2, 3]


def test_compress_block_takes_only_blocks():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="block must be 'RxC'"):
        compress_block(w, "2:4")
    with pytest.raises(ValueError, match="R, C >= 1"):
        compress_block(w, (0, 4))
    with pytest.raises(TypeError, match=r"dtype=torch\.int8 would truncate"):
        compress_block(w, "2x2", torch.int8)


def test_format_bytes_match_the_tensors():
    g = seeded("bytes")
    w24 = _weight_24(64, 256, g)
    values, meta = compress_24(w24, torch.bfloat16)
    assert format_bytes("2:4", 64, 256, dtype=torch.bfloat16) == values.nbytes + meta.nbytes
    w = _weight_unstructured(64, 256, 0.75, g)
    parts = compress_bitmask(w)
    assert format_bytes("bitmask", 64, 256, sparsity=0.75) == sum(t.nbytes for t in parts)
    w = _weight_unstructured(4, 10, 0.25, g)  # 2.5 weights a row: prune_ rounds halves up
    parts = compress_bitmask(w)
    assert format_bytes("bitmask", 4, 10, sparsity=0.25) == sum(t.nbytes for t in parts)
    w = _weight_unstructured(64, 256, 0.9, g)
    parts = compress_csr(w, torch.bfloat16)
    csr = format_bytes("csr", 64, 256, sparsity=0.9, dtype=torch.bfloat16)
    assert csr == sum(t.nbytes for t in parts)
    # sliced: the groups expected of a random pattern (binomial counts per row and slice)
    w = _weight_unstructured(512, 1000, 0.9, g)
    parts = compress_sliced(w, torch.bfloat16)
    sliced = format_bytes("sliced", 512, 1000, sparsity=0.9, dtype=torch.bfloat16)
    assert abs(sliced / sum(t.nbytes for t in parts) - 1) < 0.01
    assert format_bytes("2:4", 4096, 4096) / 4096**2 == 2.125  # bytes per weight, fp32
    with pytest.raises(ValueError, match="fmt must be one of"):
        format_bytes("coo", 4, 4)


def test_compress_24_rejects_a_weight_off_the_pattern():
    w = _weight_24(8, 16, seeded("reject"))
    w[3, 5] = w[3, 4] = w[3, 6] = 1.0  # three nonzeros in row 3, columns 4..7
    with pytest.raises(ValueError, match=r"2:4 pattern.*row 3, columns 4\.\.7 have 3"):
        compress_24(w)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        compress_24(torch.zeros(4))
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16 or float16"):
        compress_bitmask(w, torch.int16)
    with pytest.raises(TypeError, match=r"dtype=torch\.int8 would truncate a float weight"):
        compress_csr(w, torch.int8)
    with pytest.raises(TypeError, match=r"dtype must be None or torch\.int8 for an int8 weight"):
        compress_24(w.to(torch.int8), torch.float32)
    with pytest.raises(TypeError, match="weight must be a floating-point or int8 tensor"):
        compress_bitmask(w.to(torch.int32))


# --------------------------------------------------------------------------- ops
def _inputs(m, k, dtype, g):
    return (
        nan_padded(torch.randn(m, k, generator=g).to(dtype))
        if m
        else torch.randn(0, k, dtype=dtype)
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("n", "k"), NK)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse24_linear_matches_reference(backend, n, k, dtype, poisoned_empty):
    g = seeded("op24", backend, n, k, dtype)
    w = _weight_24(n, k, g)
    values, meta = compress_24(w, dtype)
    bias = torch.randn(n, generator=g)
    for m in (*M_QUICK, 64, 300):  # 2:4 SpMM: 4 panels, and several blocks of rows
        x = _inputs(m, k, dtype, g)
        with run_on(backend):
            out = ops.sparse24_linear(x, values, meta, bias)
        ref64 = ref.sparse24_linear(x, values, meta, bias, compute_dtype=torch.float64)
        check_close(out, ref64, ref.sparse24_linear(x, values, meta, bias), name=f"M={m}")
        assert out.dtype == dtype


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse24_long_rows_match_reference(backend, poisoned_empty):
    # Long rows (fp32 x past L1, the prefetch 128 steps ahead inside each row) and a tail of
    # K % 32 columns for the scalar loop
    n, k = 37, 9000
    g = seeded("op24-long", backend)
    w = _weight_24(n, k, g)
    codes, scales = quantize_weight_per_channel(w)
    bias = torch.randn(n, generator=g)
    for parts, s in (
        (compress_24(w), None),
        (compress_24(w, torch.bfloat16), None),
        (compress_24(codes), scales),
    ):
        for m in (*M_QUICK, 2, 4):
            x = _inputs(m, k, torch.float32, g)
            with run_on(backend):
                out = ops.sparse24_linear(x, *parts, bias, s)
            ref64 = ref.sparse24_linear(x, *parts, bias, s, compute_dtype=torch.float64)
            expected = ref.sparse24_linear(x, *parts, bias, s)
            check_close(out, ref64, expected, name=f"{parts[0].dtype} M={m}")


def _compress_sliced(w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple:
    """compress_sliced's tensors and N, as the op and the reference take them after x."""
    return (*compress_sliced(w, dtype), w.shape[0])


def _compress_block_n(w: torch.Tensor, block: tuple[int, int]) -> tuple:
    """compress_block's tensors and N, as the op and the reference take them after x."""
    return (*compress_block(w, block), w.shape[0])


W8A8_BLOCK = (16, 16)  # the block W8A8 op's shape in the tests shared by the W8A8 formats


_UNSTRUCTURED = {  # format -> (compression, op, reference)
    "bitmask": (compress_bitmask, ops.sparse_bitmask_linear, ref.sparse_bitmask_linear),
    "csr": (compress_csr, ops.sparse_csr_linear, ref.sparse_csr_linear),
    "sliced": (_compress_sliced, ops.sparse_sliced_linear, ref.sparse_sliced_linear),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("n", "k"), NK)
@pytest.mark.parametrize("sparsity", [0.5, 0.97])  # bitmask: expanded rows; walked rows
@pytest.mark.parametrize("fmt", sorted(_UNSTRUCTURED))
def test_unstructured_linear_matches_reference(backend, n, k, sparsity, fmt, poisoned_empty):
    compress, op, reference = _UNSTRUCTURED[fmt]
    g = seeded("op", fmt, backend, n, k, sparsity)
    w = _weight_unstructured(n, k, sparsity, g)
    if n > 2:
        w[1] = 0.0  # an empty row
        w[2] = torch.randn(k, generator=g)  # a dense one
    bias = torch.randn(n, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        parts = compress(w, dtype)
        # up to 4 rows: the dot kernels; more: the SpMM on panels, from 64 rows (4 panels) in
        # slices of K where dense enough, past 256 rows in several blocks
        for m in (*M_QUICK, 5, *((64, 300) if n * k < 100_000 else ())):
            x = nan_padded(_inputs(m, k, dtype, g)) if m else _inputs(m, k, dtype, g)
            with run_on(backend):
                out = op(x, *parts, bias)
            ref64 = reference(x, *parts, bias, compute_dtype=torch.float64)
            check_close(out, ref64, reference(x, *parts, bias), name=f"{dtype} M={m}")


_COMPRESS = {
    "2:4": compress_24,
    "bitmask": compress_bitmask,
    "csr": compress_csr,
    "sliced": _compress_sliced,
}
_DECOMPRESS = {
    "2:4": ref.decompress_24,
    "bitmask": ref.decompress_bitmask,
    "csr": ref.decompress_csr,
    "sliced": ref.decompress_sliced,
}
_OPS = {
    "2:4": (ops.sparse24_linear, ref.sparse24_linear),
    "bitmask": (ops.sparse_bitmask_linear, ref.sparse_bitmask_linear),
    "csr": (ops.sparse_csr_linear, ref.sparse_csr_linear),
    "sliced": (ops.sparse_sliced_linear, ref.sparse_sliced_linear),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("n", "k"), NK)
@pytest.mark.parametrize("fmt", sorted(_COMPRESS))
def test_int8_values_match_reference(backend, n, k, fmt, poisoned_empty):
    # int8 codes with a scale per row: W = codes * scales[:, None] (the W8A16 rule)
    g = seeded("int8-values", fmt, backend, n, k)
    w = _weight_24(n, k, g) if fmt == "2:4" else _weight_unstructured(n, k, 0.8, g)
    codes, scales = quantize_weight_per_channel(w)
    parts = _COMPRESS[fmt](codes)
    assert parts[0].dtype == torch.int8
    op, reference = _OPS[fmt]
    bias = torch.randn(n, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        for m in (*M_QUICK, 5, 17, 64):  # the dot kernels, then the SpMM on panels
            x = _inputs(m, k, dtype, g)
            with run_on(backend):
                out = op(x, *parts, bias, scales)
            ref64 = reference(x, *parts, bias, scales, compute_dtype=torch.float64)
            check_close(out, ref64, reference(x, *parts, bias, scales), name=f"{dtype} M={m}")
            assert out.dtype == dtype
    assert torch.equal(_DECOMPRESS[fmt](*parts, k), codes)  # the codes, exactly


_W8A8 = {  # format -> (compression, op, reference): op(x, *compression(codes), scales, bias)
    "2:4": (compress_24, ops.sparse24_dynamic_linear, ref.sparse24_dynamic_linear),
    "bitmask": (
        compress_bitmask,
        ops.sparse_bitmask_dynamic_linear,
        ref.sparse_bitmask_dynamic_linear,
    ),
    "sliced": (
        _compress_sliced,
        ops.sparse_sliced_dynamic_linear,
        ref.sparse_sliced_dynamic_linear,
    ),
    "block": (
        lambda w: _compress_block_n(w, W8A8_BLOCK),
        ops.sparse_block_dynamic_linear,
        ref.sparse_block_dynamic_linear,
    ),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("n", "k"), NK)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("fmt", sorted(_W8A8))
def test_w8a8_is_the_reference_bit_for_bit(backend, n, k, sparsity, fmt, poisoned_empty):
    # x quantized per token, codes times codes summed exactly, then the reference's fp32
    # epilogue in its order: the same bits as the fp32 reference, whatever the sums' order
    # (2:4: 128 columns a vector step, the rest of the row one value at a time)
    if fmt == "2:4" and sparsity != 0.5:
        pytest.skip("2:4 is 50% sparse")
    compress, op, reference = _W8A8[fmt]
    g = seeded("w8a8", fmt, backend, n, k, sparsity)
    w = _w8a8_weight(fmt, n, k, sparsity, g)
    if n > 2:
        w[1] = 0.0  # an empty row
        if fmt != "2:4":
            w[2] = torch.randn(k, generator=g)  # a dense one: 8 groups in each slice
    codes, scales = quantize_weight_per_channel(w)
    parts = compress(codes)
    bias = torch.randn(n, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        for m in (*M_QUICK, 2, 4, 5):  # tiles of 1-4 rows of x
            x = _inputs(m, k, dtype, g)
            if m > 1:
                x[1] = 0.0  # a zero row: scale 1, codes 0
            if m > 3:  # rows holding a NaN and an inf: no scale, NaN outputs
                x[2, k // 2] = float("nan")
                x[3, k - 1] = float("inf")
            with run_on(backend):
                out = op(x, *parts, scales, bias)
            expected = reference(x, *parts, scales, bias)
            assert out.dtype == dtype and out.shape == (m, n)
            torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
            if m > 3:
                assert out[2:4].isnan().all(), f"{dtype} M={m}"
    # the rule is the dense W8A8 op's on the decompressed codes
    x = torch.randn(3, k, generator=g)
    dense = ref.int8_dynamic_linear(x, codes, scales, bias, compute_dtype=torch.float64)
    sparse = reference(x, *parts, scales, bias, compute_dtype=torch.float64)
    assert torch.equal(sparse, dense)


def _w8a8_weight(fmt: str, n: int, k: int, sparsity: float, g: torch.Generator) -> torch.Tensor:
    if fmt == "block":
        return prune_(torch.randn(n, k, generator=g), W8A8_BLOCK, sparsity=sparsity, progress=False)
    return _weight_24(n, k, g) if fmt == "2:4" else _weight_unstructured(n, k, sparsity, g)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [200, 1100, 2000])
def test_bitmask_w8a8_odd_step_counts(backend, k, poisoned_empty):
    # 3, 17 and 31 steps of 64 columns: the kernel takes them in pairs, checked per step below
    # 16 and unchecked from 16 (the row's mask counted first); the odd last step and the scalar
    # tail of each path
    g = seeded("w8a8-odd", backend, k)
    codes, scales = quantize_weight_per_channel(_weight_unstructured(19, k, 0.6, g))
    parts = compress_bitmask(codes)
    bias = torch.randn(19, generator=g)
    for m in (1, 2, 5):
        x = _inputs(m, k, torch.float32, g)
        with run_on(backend):
            out = ops.sparse_bitmask_dynamic_linear(x, *parts, scales, bias)
        expected = ref.sparse_bitmask_dynamic_linear(x, *parts, scales, bias)
        assert torch.equal(out, expected), f"M={m}"


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("fmt", sorted(_W8A8))
def test_w8a8_takes_leading_dims_and_strides(backend, fmt):
    compress, op, reference = _W8A8[fmt]
    g = seeded("w8a8-lead", fmt, backend)
    w = _w8a8_weight(fmt, 70, 300, 0.9, g)
    codes, scales = quantize_weight_per_channel(w)
    parts = compress(codes)
    if fmt == "bitmask":  # a mask with no unit stride in its last dim
        values, mask, offsets = parts
        parts = (values, mask.t().contiguous().t(), offsets)
        assert parts[1].stride(1) != 1
    if fmt == "2:4":  # values and meta as row slices of wider arrays
        values, meta = parts
        parts = (torch.cat([values, values], 1)[:, : values.shape[1]], meta.t().contiguous().t())
        assert parts[0].stride(0) != parts[0].shape[1] and parts[1].stride(1) != 1
    x = torch.randn(5, 2, 300, generator=g).transpose(0, 1)  # (2, 5, 300), not contiguous
    with run_on(backend):
        out = op(x, *parts, scales)
    assert out.shape == (2, 5, 70)
    assert torch.equal(out, reference(x.contiguous(), *parts, scales))


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("fmt", sorted(_W8A8))
def test_w8a8_sums_stay_exact_at_the_largest_k(backend, fmt):
    # codes of -128 against x's -127 at K = MAX_DYNAMIC_K: the largest sum the op admits (2:4:
    # the largest of a 2:4 row, half of it)
    compress, op, _ = _W8A8[fmt]
    k = ops.int8.MAX_DYNAMIC_K
    codes = torch.full((1, k), -128, dtype=torch.int8)
    if fmt == "2:4":
        codes[:, 2::4] = codes[:, 3::4] = 0
    parts = compress(codes)
    total = int(codes.count_nonzero()) * 128 * 127
    assert k * 128 * 127 < 2**31 <= (k + 1) * 128 * 127
    for m in (2, 9):  # 9: 2:4's strips on the avx512 level
        x = -torch.ones(m, k)
        with run_on(backend):
            out = op(x, *parts, torch.ones(1))
        assert torch.equal(out, torch.full((m, 1), total / 127, dtype=torch.float32)), m


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("n", "k"), [(7, 3), (33, 13), (40, 70), (64, 136), (100, 1000), (47, 2051)]
)
@pytest.mark.parametrize(
    ("fmt", "sparsity"),
    [
        ("2:4", 0.5),
        ("bitmask", 0.5),
        ("bitmask", 0.9),
        ("sliced", 0.5),
        ("sliced", 0.9),
        ("block", 0.5),
    ],
)
def test_w8a8_many_rows_bit_for_bit(backend, n, k, fmt, sparsity, poisoned_empty):
    # Past one tile of the dot kernels the avx512 level meets the weights as strips
    # (sparse_gemm.h, "2:4 W8A8 strips" and "bitmask W8A8 strips"; sliced_gemm.h): 8- and 6-row
    # tiles of x and their edges, 128-row blocks, a strip's second vector of 16 weight rows
    # partial or empty (N % 32); 2:4: a row's last pair of 8 columns holding one group (K % 8 in
    # 1..4), its 16-pair loads masked at the row's end; bitmask and sliced: the last 64 columns
    # cut by K; sliced: blocks of 64 weight rows, the last one short; an all-zero weight row, a
    # zero row of x, and codes of -128 (each side of vpdpbusd's signs)
    compress, op, reference = _W8A8[fmt]
    g = seeded("w8a8-rows", backend, n, k, fmt, sparsity)
    w = _w8a8_weight(fmt, n, k, sparsity, g)
    w[n // 2] = 0.0
    codes, scales = quantize_weight_per_channel(w)
    codes[0, :4] = torch.tensor([-128, -128, 0, 0], dtype=torch.int8)[: min(4, k)]
    parts = compress(codes)
    bias = torch.randn(n, generator=g)
    for dtype, b in ((torch.float32, bias), (torch.bfloat16, None), (torch.float32, None)):
        # bitmask: strips from 5 (K <= 1024) or 16, sliced from 48
        for m in (5, 8, 9, 16, 23, 48, 61, 131):
            x = _inputs(m, k, dtype, g)
            x[2] = 0.0
            with run_on(backend):
                out = op(x, *parts, scales, b)
            assert torch.equal(out, reference(x, *parts, scales, b)), f"{dtype} M={m}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "block",
    # C dividing 64 (64 / C rows a load on the avx512 level: R a multiple of it, or not, or less),
    # C a multiple of 64 (a row in loads of 64), and C of neither kind (one code at a time)
    [(16, 16), (4, 4), (1, 16), (3, 8), (8, 32), (2, 64), (5, 4), (3, 128), (4, 12), (2, 5)],
)
@pytest.mark.parametrize(("n", "k"), [(1, 3), (37, 70), (70, 301)])
def test_block_w8a8_every_block_shape_bit_for_bit(backend, block, n, k, poisoned_empty):
    # the block W8A8 op on blocks of every kind of width: K cut inside the last column of
    # blocks, N inside the last block row, a load's partial rows past R, several loads a block
    # row, 1-9 rows of x (tiles of 1-4), codes of -128, an empty block row and a zero row of x
    g = seeded("w8a8-block", backend, block, n, k)
    w = prune_(torch.randn(n, k, generator=g), block, sparsity=0.5, progress=False)
    if n > block[0]:
        w[: block[0]] = 0.0  # block row 0 keeps no block
    codes, scales = quantize_weight_per_channel(w)
    codes[-1, -min(3, k) :] = -128
    parts = _compress_block_n(codes, block)
    bias = torch.randn(n, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 2, 3, 4, 5, 9):
            x = _inputs(m, k, dtype, g)
            x[0, : min(2, k)] = -x[0].abs().max()  # x's code -127 against the -128s
            if m > 1:
                x[1] = 0.0
            with run_on(backend):
                out = ops.sparse_block_dynamic_linear(x, *parts, scales, bias)
            expected = ref.sparse_block_dynamic_linear(x, *parts, scales, bias)
            assert torch.equal(out, expected), f"{dtype} M={m}"
    x = torch.randn(2, k, generator=g)
    dense = ref.int8_dynamic_linear(x, codes, scales, bias, compute_dtype=torch.float64)
    assert torch.equal(
        ref.sparse_block_dynamic_linear(x, *parts, scales, bias, compute_dtype=torch.float64),
        dense,
    )


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("m", [1, 6])
def test_block_w8a8_columns_past_k_raise(backend, m):
    # as the float op: a column of blocks outside [0, ceil(K / C)) names itself; no read of x
    g = seeded("w8a8-block-past-k", backend, m)
    codes, scales = quantize_weight_per_channel(_weight_block(16, 40, (8, 8), g))
    values, col_blocks, row_offsets = compress_block(codes, (8, 8))
    x = nan_padded(torch.randn(m, 40, generator=g))
    for bad in (5, -1):
        cols = col_blocks.clone()
        cols[-1] = bad
        with (
            run_on(backend),
            pytest.raises(
                ValueError, match=rf"col_blocks\[{cols.numel() - 1}\] = {bad} points past K = 40"
            ),
        ):
            ops.sparse_block_dynamic_linear(x, values, cols, row_offsets, 16, scales)


def test_block_w8a8_bad_input_names_the_argument():
    g = seeded("w8a8-block-bad")
    w = _weight_block(20, 64, (4, 16), g)
    codes, scales = quantize_weight_per_channel(w)
    parts = _compress_block_n(codes, (4, 16))
    x = torch.randn(3, 64, generator=g)
    f = ops.sparse_block_dynamic_linear
    with pytest.raises(TypeError, match="values must be int8 codes for a W8A8 linear"):
        f(x, *_compress_block_n(w, (4, 16)), scales)
    with pytest.raises(ValueError, match=r"scales \(N,\) float32 is required"):
        torch.ops.torchslim.sparse_block_dynamic_linear(x, *parts, None)
    with pytest.raises(ValueError, match=r"scales must have shape \(N,\) = \(20,\)"):
        f(x, *parts, scales[:5])
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\) = \(20,\)"):
        f(x, *parts, scales, torch.zeros(3))
    with pytest.raises(TypeError, match="n must be an int"):
        f(x, *parts[:-1], 20.0, scales)
    with pytest.raises(
        ValueError, match=r"row_offsets must have shape \(ceil\(N / R\) \+ 1,\) = \(8,\)"
    ):
        f(x, *parts[:-1], 25, torch.ones(25))
    with pytest.raises(TypeError, match="col_blocks must be int32"):
        f(x, parts[0], parts[1].long(), *parts[2:], scales)
    big = ops.int8.MAX_DYNAMIC_K + 1
    wide = _compress_block_n(torch.zeros(1, big, dtype=torch.int8), (1, 16))
    with pytest.raises(ValueError, match=f"K must be at most {big - 1}"):
        f(torch.zeros(1, big), *wide, torch.ones(1))


@pytest.mark.skipif(
    _ext._C is None or "avx512" not in _ext._C.supported_isas(), reason="no AVX-512 on this CPU"
)
def test_w8a8_strips_from_their_threshold():
    # the avx512 level (and amx, which keeps its sparse kernels) takes the strips from one tile
    # of the dot kernels on (bitmask: at K <= 1024, else from 16; sliced from 48), bitmask's
    # where the CPU has VBMI2 (vpexpandb); no other level has them
    with run_on("cpu-avx512"):
        paths = _ext._C.cpu_kernel_paths()
    assert paths["sparse24_w8a8_strips_from_m"] == 5
    vbmi2 = _ext._C.cpu_features()["avx512vbmi2"]
    assert paths["bitmask_w8a8_strips_from_m"] == ({1024: 5, 65536: 16} if vbmi2 else None)
    assert paths["sliced_w8a8_strips_from_m"] == {1024: 48, 65536: 48}
    for other in ("avx2", "portable"):
        with run_on(f"cpu-{other}"):
            paths = _ext._C.cpu_kernel_paths()
        for fmt in ("sparse24", "bitmask", "sliced"):
            assert paths[f"{fmt}_w8a8_strips_from_m"] is None


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("k", [4, 300])  # the scalar loop; a vector step, then the scalar loop
def test_24_w8a8_values_naming_one_column_add_up(backend, k):
    # a group's two values at one column add there (decompress_24): 100 + 100 meets x once,
    # not an int8 200 that wraps
    values = torch.zeros(1, 2 * (-(-k // 4)), dtype=torch.int8)
    values[0, -2] = values[0, -1] = -100  # the last group (in the scalar loop at K = 300)
    values[0, 0] = values[0, 1] = 100  # group 0, both at column 0 (meta 0)
    meta = torch.zeros(1, -(-k // 8), dtype=torch.uint8)
    x = torch.zeros(1, k)
    x[0, 4 * ((k - 1) // 4)] = -127.0
    x[0, 0] = 127.0
    for m in (1, 9):  # the dot kernels; the avx512 level's strips
        with run_on(backend):
            out = ops.sparse24_dynamic_linear(x.expand(m, k), values, meta, torch.ones(1))
        assert torch.equal(out, torch.full((m, 1), (200 if k == 4 else 400) * 127.0)), m


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_sliced_w8a8_repeated_entries_add_up(backend):
    # two values at one (row, column) add, as every decompression does: 100 + 100, not an
    # int8 200 that wraps
    values = torch.zeros(18, dtype=torch.int8)
    values[:2] = 100
    columns = torch.zeros(18, dtype=torch.uint8)
    groups = torch.tensor([[0, 2]], dtype=torch.uint8)
    offsets = torch.tensor([0, 1]), torch.tensor([0, 2])
    for m in (1, 48):  # 48: the avx512 level's strips, whose int8 block cannot hold 200
        x = torch.full((m, 1), 127.0)
        with run_on(backend):
            out = ops.sparse_sliced_dynamic_linear(
                x, values, columns, groups, *offsets, 1, torch.ones(1)
            )
        assert torch.equal(out, torch.full((m, 1), 200 * 127.0)), m


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 3])
def test_sliced_w8a8_rows_of_uneven_density_match_the_reference(backend, m):
    # A dense row among sparse ones: its groups fill the later rounds of each slice alone, so
    # a step's four groups add into one row in turn (the kernel's 16-byte adds into a row's
    # partial sums, one after another); N and K cut inside a block and a slice
    g = seeded("sliced-uneven", backend, m)
    n, k = 70, 300
    w = _weight_unstructured(n, k, 0.95, g)
    w[5] = torch.randn(k, generator=g)
    w[66, :200] = torch.randn(200, generator=g)
    _check_sliced_w8a8(backend, w, torch.randn(m, k, generator=g))


def _check_sliced_w8a8(backend: str, w: torch.Tensor, x: torch.Tensor) -> None:
    """Sliced W8A8 on w's codes, bit for bit the reference's."""
    codes, scales = quantize_weight_per_channel(w)
    parts = compress_sliced(codes)
    with run_on(backend):
        out = ops.sparse_sliced_dynamic_linear(x, *parts, w.shape[0], scales)
    assert torch.equal(out, ref.sparse_sliced_dynamic_linear(x, *parts, w.shape[0], scales))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 2, 4, 5])
def test_sliced_w8a8_rounds_in_row_order_match_the_reference(backend, m):
    # A slice's first round is the block's rows in order where none is empty in the slice: the
    # kernel adds those steps by rows 4j .. 4j + 3 with no row byte. Here block 0's first slice
    # has every row, its second misses row 37 (rows in order up to 36), its last (44 columns)
    # misses row 2; the last block has 37 rows (in order up to 36, then one step of one group)
    g = seeded("sliced-in-order", backend, m)
    n, k = 101, 300
    w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.3)
    w[:, 0] = 1.0 + torch.rand(n, generator=g)  # no row empty in slice 0
    w[:, 128] = 1.0
    w[:, 256] = 1.0
    w[37, 128:256] = 0.0
    w[2, 256:] = 0.0
    _check_sliced_w8a8(backend, w, torch.randn(m, k, generator=g))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt", sorted(_W8A8))
def test_w8a8_with_no_rows_gives_an_empty_output(backend, fmt):
    # N = 0: the scales are an empty (0,) tensor, whose data pointer may be null
    compress, op, reference = _W8A8[fmt]
    parts = compress(torch.zeros(0, 64, dtype=torch.int8))
    x = torch.randn(3, 64)
    with run_on(backend):
        out = op(x, *parts, torch.ones(0))
    assert out.shape == (3, 0)
    assert torch.equal(out, reference(x, *parts, torch.ones(0)))


def test_sliced_w8a8_bad_input_names_the_argument():
    g = seeded("w8a8-bad")
    w = _weight_unstructured(20, 200, 0.8, g)
    codes, scales = quantize_weight_per_channel(w)
    parts = _compress_sliced(codes)
    x = torch.randn(2, 200, generator=g)
    f = ops.sparse_sliced_dynamic_linear
    with pytest.raises(TypeError, match="values must be int8 codes for a W8A8 linear"):
        f(x, *_compress_sliced(w), scales)
    with pytest.raises(ValueError, match=r"scales \(N,\) float32 is required"):
        torch.ops.torchslim.sparse_sliced_dynamic_linear(x, *parts, None)
    with pytest.raises(ValueError, match=r"scales must have shape \(N,\) = \(20,\)"):
        f(x, *parts, scales[:5])
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\) = \(20,\)"):
        f(x, *parts, scales, torch.zeros(3))
    with pytest.raises(TypeError, match="n must be an int"):
        f(x, *parts[:-1], 20.0, scales)
    with pytest.raises(TypeError, match=r"scales must be a torch\.Tensor"):
        f(x, *parts, scales.tolist())
    big = ops.int8.MAX_DYNAMIC_K + 1
    wide = _compress_sliced(torch.zeros(1, big, dtype=torch.int8))
    with pytest.raises(ValueError, match=f"K must be at most {big - 1}"):
        f(torch.zeros(1, big), *wide, torch.ones(1))
    # the bitmask op: the same rules, and its own arrays checked
    b = ops.sparse_bitmask_dynamic_linear
    values, mask, offsets = compress_bitmask(codes)
    with pytest.raises(TypeError, match="values must be int8 codes for a W8A8 linear"):
        b(x, *compress_bitmask(w), scales)
    with pytest.raises(ValueError, match=r"scales \(N,\) float32 is required"):
        torch.ops.torchslim.sparse_bitmask_dynamic_linear(x, values, mask, offsets, None)
    with pytest.raises(ValueError, match=r"scales must have shape \(N,\) = \(20,\)"):
        b(x, values, mask, offsets, scales[:5])
    with pytest.raises(ValueError, match=r"mask must have shape \(N, ceil\(K / 8\)\)"):
        b(x, values, mask[:, :3], offsets, scales)
    with pytest.raises(ValueError, match=r"row_offsets must have shape \(N \+ 1,\)"):
        b(x, values, mask, offsets[:-1], scales)
    wide = compress_bitmask(torch.zeros(1, big, dtype=torch.int8))
    with pytest.raises(ValueError, match=f"K must be at most {big - 1}"):
        b(torch.zeros(1, big), *wide, torch.ones(1))
    # the 2:4 op: the same rules, and its own arrays checked
    s = ops.sparse24_dynamic_linear
    codes24, scales24 = quantize_weight_per_channel(_weight_24(20, 200, g))
    values, meta = compress_24(codes24)
    with pytest.raises(TypeError, match="values must be int8 codes for a W8A8 linear"):
        s(x, *compress_24(_weight_24(20, 200, g)), scales24)
    with pytest.raises(ValueError, match=r"scales \(N,\) float32 is required"):
        torch.ops.torchslim.sparse24_dynamic_linear(x, values, meta, None)
    with pytest.raises(ValueError, match=r"scales must have shape \(N,\) = \(20,\)"):
        s(x, values, meta, scales24[:5])
    with pytest.raises(ValueError, match=r"values must have shape \(N, 2 \* ceil\(K / 4\)\)"):
        s(x, values[:, :-2], meta, scales24)
    with pytest.raises(ValueError, match=r"meta must have shape \(N, ceil\(K / 8\)\)"):
        s(x, values, meta[:, :3], scales24)
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\) = \(20,\)"):
        s(x, values, meta, scales24, torch.zeros(3))
    wide = compress_24(torch.zeros(1, big, dtype=torch.int8))
    with pytest.raises(ValueError, match=f"K must be at most {big - 1}"):
        s(torch.zeros(1, big), *wide, torch.ones(1))


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize(
    ("k", "missing"), [(200, 1), (1000, 1), (1000, 40), (1000, 70), (2000, 1), (2000, 70)]
)
def test_bitmask_w8a8_mask_and_offsets_must_agree(backend, m, k, missing):
    # the kernel's steps go two at a time: a row that runs out is caught at either of them; from
    # 16 steps (K = 2000) a row whose steps fit runs them unchecked and its scalar tail runs out;
    # M = 17: the avx512 level's strips count each row's mask before they read its values
    g = seeded("w8a8-disagree", backend, m, k, missing)
    codes, scales = quantize_weight_per_channel(_weight_unstructured(9, k, 0.5, g))
    values, mask, offsets = compress_bitmask(codes)
    x = torch.randn(m, k, generator=g)
    short = offsets.clone()
    short[4:] -= missing  # row 3 has fewer values than its mask's bits
    says = "mask and row_offsets disagree: row 3" if backend != "reference" else "row_offsets"
    with run_on(backend), pytest.raises(ValueError, match=says):
        ops.sparse_bitmask_dynamic_linear(x, values, mask, short, scales)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("m", [1, 3, 20, 64])  # the dot kernels; the SpMM; in slices
def test_csr_columns_past_k_raise(backend, m):
    g = seeded("csr-past", backend, m)
    w = _weight_unstructured(6, 300, 0.5, g)
    values, columns, bases, offsets = compress_csr(w)
    x = torch.randn(m, 300, generator=g)
    late = bases.clone()
    row3 = int(offsets[3])
    late[row3] = 300 // 8  # row 3's first group starts at column 296: offsets >= 4 are past K
    with run_on(backend), pytest.raises(ValueError, match="csr row 3 points past K = 300"):
        ops.sparse_csr_linear(x, values, columns, late, offsets)
    negative = bases.clone()
    negative[int(offsets[5])] = -1
    with run_on(backend), pytest.raises(ValueError, match="csr row 5 points past K = 300"):
        ops.sparse_csr_linear(x, values, columns, negative, offsets)
    shifted = offsets.clone()
    shifted[2] = shifted[3] + 1  # decreasing
    with run_on(backend), pytest.raises(ValueError, match="group_offsets must be non-decreasing"):
        ops.sparse_csr_linear(x, values, columns, bases, shifted)
    beyond = offsets.clone()
    beyond[-1] += 1
    with run_on(backend), pytest.raises(ValueError, match="group_offsets must be non-decreasing"):
        ops.sparse_csr_linear(x, values, columns, bases, beyond)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("m", [1, 5])  # the dot kernels; the SpMM
def test_csr_x_wider_than_the_format_raises(backend, m):
    """The int16 bases reach K = CSR_MAX_K; a wider x is refused before any kernel reads a
    negative base as a column past 2**18 (it crashed the SpMM)."""
    k = ref.sparse.CSR_MAX_K + 256
    x = torch.randn(m, k)
    values, columns = torch.ones(1, 8), torch.arange(8, dtype=torch.uint8).view(1, 8)
    bases, offsets = torch.tensor([-(2**15)], dtype=torch.int16), torch.tensor([0, 1])
    match = rf"x must have K <= {ref.sparse.CSR_MAX_K} for the csr format, got K = {k}"
    with run_on(backend), pytest.raises(ValueError, match=match):
        ops.sparse_csr_linear(x, values, columns, bases, offsets)
    if backend != "reference":
        with pytest.raises(ValueError, match=match):
            _ext._C.sparse_csr_linear_cpu(x, values, columns, bases, offsets, None, None)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 3])  # the dot kernels, which read x padded with NaN
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_csr_infinite_x_is_not_a_bad_column(backend, m, poison):
    # A row whose sum comes out NaN is summed again with every group checked: an infinity or a
    # NaN of x must give the row its non-finite sum, not an error, and leave the other rows be.
    g = seeded("csr-poison", backend, m, str(poison))
    k = 300
    w = _weight_unstructured(12, k, 0.8, g)
    values, columns, bases, offsets = compress_csr(w)
    slot_cols = 8 * bases.long()[:, None] + columns.long()  # padded slots included
    rows = torch.repeat_interleave(torch.arange(12), offsets.diff())
    col = int(slot_cols[int(offsets[4])][0])  # a column row 4 reads
    touched = torch.zeros(12, dtype=torch.bool)
    touched[rows[(slot_cols == col).any(dim=1)]] = True
    assert 0 < int(touched.sum()) < 12
    x = torch.randn(m, k, generator=g)
    clean = x.clone()
    clean[:, col] = 0.0
    x[:, col] = poison
    with run_on(backend):
        out = ops.sparse_csr_linear(x, values, columns, bases, offsets)
    assert not torch.isfinite(out[:, touched]).any()
    ref64 = ref.sparse_csr_linear(
        clean, values, columns, bases, offsets, compute_dtype=torch.float64
    )
    expected = ref.sparse_csr_linear(clean, values, columns, bases, offsets)
    check_close(out[:, ~touched], ref64[:, ~touched], expected[:, ~touched], name="untouched rows")


def _sliced_case(tag: str, dtype: torch.dtype = torch.float32):
    g = seeded("sliced-bad", tag)
    n, k = 70, 300  # two blocks of rows (the second of 6), three slices (the last of 44)
    w = _weight_unstructured(n, k, 0.7, g)
    if dtype == torch.int8:
        return g, n, k, compress_sliced(quantize_weight_per_channel(w)[0])
    return g, n, k, compress_sliced(w, dtype)


# bf16 x against bf16 values takes the bf16 dot kernel where the CPU has AVX512_BF16 and VBMI2
_SLICED_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])


def _sliced_op(variant: str, n: int):
    """The sliced op for a test's variant: values of x's dtype, or (w8a8) int8 codes with
    scales against x quantized per token."""
    if variant == "w8a8":
        return lambda x, *arrays: ops.sparse_sliced_dynamic_linear(x, *arrays, n, torch.ones(n))
    return lambda x, *arrays: ops.sparse_sliced_linear(x, *arrays, n)


@pytest.mark.parametrize("variant", ["fp32", "bf16", "w8a8"])
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("m", [1, 3, 20, 48])  # the dot kernels; the SpMM; W8A8's strips
def test_sliced_malformed_weights_raise(backend, m, variant):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "w8a8": torch.int8}[variant]
    g, n, k, (values, columns, groups, goff, voff) = _sliced_case(f"{backend}{m}", dtype)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16 if variant == "bf16" else torch.float32)
    second = int(goff[3])  # block 1's first group (slice 0)
    kernel = backend != "reference"
    op = _sliced_op(variant, n)

    def raises(reference_says, values=values, columns=columns, groups=groups, voff=voff):
        says = "block of rows from 64 is malformed" if kernel else reference_says
        with run_on(backend), pytest.raises(ValueError, match=says):
            op(x, values, columns, groups, goff, voff)

    bad = groups.clone()
    bad[second, 0] = 6  # block 1 has rows 64..69: row byte 6 is past N
    raises(r"is not \(a row of its block of 6", groups=bad)
    bad = groups.clone()
    bad[second, 1] = 0  # an empty group
    raises("a count in", groups=bad)
    bad = groups.clone()
    bad[second, 1] = 17
    raises("a count in", groups=bad)
    bad = columns.clone()
    bad[int(voff[1])] = 128  # past its slice
    raises("points past its slice", columns=bad)
    last = int(goff[5])  # block 1's last slice: columns 256..299
    at = int(voff[2]) - int(groups[last:, 1].long().sum())
    bad = columns.clone()
    bad[at] = 44 + int(torch.randint(0, 84, (1,), generator=g))  # past K, inside the slice
    raises("points past its slice or K = 300", columns=bad)
    bad[at] = 127  # the slice's last column: past K, and past a row of W8A8's dense codes (320)
    raises("points past its slice or K = 300", columns=bad)
    bad = voff.clone()
    bad[1] += 1  # block 0 takes one value of block 1
    says = "block of rows from 0 is malformed" if kernel else "block 0's groups count"
    with run_on(backend), pytest.raises(ValueError, match=says):
        op(x, values, columns, groups, goff, bad)
    with run_on(backend), pytest.raises(ValueError, match="values must have shape"):
        op(x, values[:8], columns[:8], groups, goff, voff)
    with run_on(backend), pytest.raises(ValueError, match=r"group_offsets must have shape \(7,\)"):
        op(x, values, columns, groups, goff[:-1], voff)
    with run_on(backend), pytest.raises(ValueError, match="value_offsets must be non-decreasing"):
        beyond = voff.clone()
        beyond[-1] = values.numel()  # into the 16 slots past the last value
        op(x, values, columns, groups, goff, beyond)


@pytest.mark.parametrize("variant", ["fp32", "bf16", "w8a8"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("at", [3, 300, 511])
def test_sliced_kernel_checks_every_group_of_a_full_slice(backend, variant, at):
    # A dense block of 64 rows takes 512 groups in a slice: the checks go 32 (and the W8A8
    # kernel 4) groups a step, and a bad row byte in any of them stops the block
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "w8a8": torch.int8}[variant]
    g = seeded("sliced-full", backend, variant, at)
    w = torch.randint(1, 100, (64, 128), generator=g).to(dtype)
    values, columns, groups, goff, voff = compress_sliced(w)
    assert groups.shape[0] == 512
    x = torch.randn(1, 128, generator=g).to(torch.bfloat16 if variant == "bf16" else torch.float32)
    op = _sliced_op(variant, 64)
    with run_on(backend):
        op(x, values, columns, groups, goff, voff)  # well formed
    bad = groups.clone()
    bad[at, 0] = 64 + at % 100  # past the block's rows
    with run_on(backend), pytest.raises(ValueError, match="block of rows from 0 is malformed"):
        op(x, values, columns, bad, goff, voff)
    bad = columns.clone()
    bad[16 * at + 5] = 128 + at % 128  # past the slice
    with run_on(backend), pytest.raises(ValueError, match="block of rows from 0 is malformed"):
        op(x, values, bad, groups, goff, voff)


@pytest.mark.skipif(not CPU_BACKENDS, reason="no torchslim CPU extension")
def test_sliced_kernel_with_no_columns_gives_the_bias():
    # K = 0: no slice and no group; every output is the bias (the dot kernels and the SpMM)
    parts = compress_sliced(torch.zeros(70, 0))
    bias = torch.randn(70, generator=seeded("sliced-k0"))
    for m in (1, 3, 20):
        out = _ext._C.sparse_sliced_linear_cpu(torch.zeros(m, 0), *parts, 70, bias, None)
        assert torch.equal(out, bias.expand(m, 70))


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("fmt", sorted(_OPS))
def test_ops_with_no_columns_give_the_bias(backend, fmt):
    # K = 0 through torch.ops, with leading dims and M = 0: every output is the bias
    n = 70
    parts = _COMPRESS[fmt](torch.zeros(n, 0))
    bias = torch.randn(n, generator=seeded("k0", fmt))
    op, _ = _OPS[fmt]
    for shape in ((1, 0), (2, 3, 0), (0, 0)):
        with run_on(backend):
            out = op(torch.zeros(shape), *parts, bias)
        assert torch.equal(out, bias.expand(*shape[:-1], n)), shape


@_SLICED_DTYPES
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 3])  # the dot kernels, which read x padded with NaN
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_sliced_infinite_x_is_not_a_bad_column(backend, m, poison, dtype):
    # A row whose sum comes out NaN has its last slice's columns checked: an infinity or NaN of
    # x in that slice gives the rows that read it non-finite sums, not an error.
    g, n, k, parts = _sliced_case(f"poison{backend}{m}{poison}", dtype)
    w = ref.decompress_sliced(*parts, n, k)
    col = 290  # in the last slice
    touched = w[:, col] != 0
    assert 0 < int(touched.sum()) < n
    x = torch.randn(m, k, generator=g).to(dtype)
    clean = x.clone()
    clean[:, col] = 0.0
    x[:, col] = poison
    with run_on(backend):
        out = ops.sparse_sliced_linear(x, *parts, n)
    assert not torch.isfinite(out[:, touched]).any()
    ref64 = ref.sparse_sliced_linear(clean, *parts, n, compute_dtype=torch.float64)
    expected = ref.sparse_sliced_linear(clean, *parts, n)
    check_close(out[:, ~touched], ref64[:, ~touched], expected[:, ~touched], name="untouched")


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_values_in_another_dtype_than_x(backend):
    g = seeded("mixed", backend)
    w = _weight_24(33, 100, g)
    x = torch.randn(2, 5, 100, generator=g)  # leading dims
    for vdtype in (torch.bfloat16, torch.float16):
        values, meta = compress_24(w, vdtype)
        with run_on(backend):
            out = ops.sparse24_linear(x, values, meta)
        assert out.shape == (2, 5, 33) and out.dtype == torch.float32
        ref64 = ref.sparse24_linear(x, values, meta, compute_dtype=torch.float64)
        check_close(out, ref64, ref.sparse24_linear(x, values, meta))
        parts = compress_bitmask(w, vdtype)
        with run_on(backend):
            out = ops.sparse_bitmask_linear(x.transpose(0, 1), *parts)  # non-contiguous
        ref64 = ref.sparse_bitmask_linear(x.transpose(0, 1), *parts, compute_dtype=torch.float64)
        check_close(out, ref64, ref.sparse_bitmask_linear(x.transpose(0, 1), *parts))
        parts = compress_csr(w, vdtype)
        for rows in (x[:1, :3], x):  # the dot kernel, the SpMM
            with run_on(backend):
                out = ops.sparse_csr_linear(rows, *parts)
            ref64 = ref.sparse_csr_linear(rows, *parts, compute_dtype=torch.float64)
            check_close(out, ref64, ref.sparse_csr_linear(rows, *parts))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("n", "k", "block"), (*BLOCK_CASES, (40, 300, (8, 24))))
def test_block_linear_matches_reference(backend, n, k, block, poisoned_empty):
    g = seeded("op-block", backend, n, k, block)
    w = _weight_block(n, k, block, g)
    bias = torch.randn(n, generator=g)
    codes, scales = quantize_weight_per_channel(w)
    floats = (torch.float32, torch.bfloat16)
    for m, dtype in itertools.product((*M_QUICK, 64, 300), floats):  # dot kernels; SpMM
        x = _inputs(m, k, dtype, g)
        for vdtype in floats:
            parts = compress_block(w, block, vdtype)
            with run_on(backend):
                out = ops.sparse_block_linear(x, *parts, n, bias)
            ref64 = ref.sparse_block_linear(x, *parts, n, bias, compute_dtype=torch.float64)
            lowp = ref.sparse_block_linear(x, *parts, n, bias)
            check_close(out, ref64, lowp, name=f"M={m} x {dtype} values {vdtype}")
            assert out.dtype == dtype
        with run_on(backend):  # int8 values
            out8 = ops.sparse_block_linear(x, *compress_block(codes, block), n, None, scales)
        parts8 = (*compress_block(codes, block), n, None, scales)
        ref64 = ref.sparse_block_linear(x, *parts8, compute_dtype=torch.float64)
        check_close(out8, ref64, ref.sparse_block_linear(x, *parts8), name=f"int8 M={m} {dtype}")


def test_block_linear_takes_leading_dims():
    g = seeded("op-block-dims")
    w = _weight_block(12, 40, (4, 8), g)
    x = torch.randn(2, 3, 40, generator=g)
    out = ops.sparse_block_linear(x, *compress_block(w, "4x8"), 12)
    assert out.shape == (2, 3, 12)
    check_close(out, x.double() @ w.double().T, x @ w.T)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("m", [1, 3, 20, 64])  # the dot kernels; the SpMM
@pytest.mark.parametrize("block", [(2, 8), (8, 8)])  # one row at a time; 8 rows together
def test_block_columns_past_k_raise(backend, m, block):
    """A column of blocks outside [0, ceil(K / C)) is an error naming it, in every backend; no
    kernel reads x there (the NaN padding would show in the output if it did)."""
    g = seeded("block-past-k", backend, m, block)
    values, col_blocks, row_offsets = compress_block(_weight_block(16, 40, block, g), block)
    x = nan_padded(torch.randn(m, 40, generator=g))
    for bad in (5, -1, 2**20):
        cols = col_blocks.clone()
        cols[-1] = bad
        with (
            run_on(backend),
            pytest.raises(
                ValueError, match=rf"col_blocks\[{cols.numel() - 1}\] = {bad} points past K = 40"
            ),
        ):
            ops.sparse_block_linear(x, values, cols, row_offsets, 16)


def test_block_contents_are_checked():
    g = seeded("block-bad")
    x = torch.randn(2, 20, generator=g)
    values, col_blocks, row_offsets = compress_block(_weight_block(8, 20, (4, 4), g), "4x4")
    f = ops.sparse_block_linear
    with pytest.raises(ValueError, match=r"col_blocks\[\d+\] = 5 points past K = 20"):
        f(x, values, torch.full_like(col_blocks, 5), row_offsets, 8)
    with pytest.raises(ValueError, match=r"col_blocks.* points past K"):
        f(x, values, torch.full_like(col_blocks, -1), row_offsets, 8)
    with pytest.raises(ValueError, match="row_offsets must be non-decreasing"):
        f(x, values, col_blocks, torch.tensor([0, values.shape[0] + 1, values.shape[0]]), 8)
    with pytest.raises(ValueError, match="row_offsets must start at 0"):
        f(x, values, col_blocks, row_offsets + 1, 8)
    with pytest.raises(
        ValueError, match=r"row_offsets must have shape \(ceil\(N / R\) \+ 1,\) = \(4,\)"
    ):
        f(x, values, col_blocks, row_offsets, 9)
    with pytest.raises(TypeError, match="col_blocks must be int32"):
        f(x, values, col_blocks.long(), row_offsets, 8)
    with pytest.raises(ValueError, match=r"values must have shape \(B, R, C\)"):
        f(x, values[:, 0], col_blocks, row_offsets, 8)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        f(x, values, col_blocks, row_offsets, -1)
    with pytest.raises(TypeError, match="n must be an int"):
        f(x, values, col_blocks, row_offsets, 8.0)
    with pytest.raises(ValueError, match="int8 values need scales"):
        f(x, values.to(torch.int8), col_blocks, row_offsets, 8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ops_pass_opcheck(backend):
    with run_on(backend):
        _opcheck_every_op()


def _opcheck_every_op():
    g = seeded("opcheck")
    w = _weight_unstructured(9, 40, 0.75, g)
    x, bias = torch.randn(3, 40, generator=g), torch.randn(9, generator=g)
    torch.library.opcheck(torch.ops.torchslim.sparse_sliced_linear, (x, *_compress_sliced(w), bias))
    values, meta = compress_24(_weight_24(9, 40, g))
    torch.library.opcheck(torch.ops.torchslim.sparse24_linear, (x, values, meta, bias))
    torch.library.opcheck(torch.ops.torchslim.sparse_bitmask_linear, (x, *compress_bitmask(w)))
    torch.library.opcheck(torch.ops.torchslim.sparse_csr_linear, (x, *compress_csr(w), bias))
    codes, scales = quantize_weight_per_channel(w)  # int8 values
    torch.library.opcheck(
        torch.ops.torchslim.sparse_csr_linear, (x, *compress_csr(codes), bias, scales)
    )
    codes, scales = quantize_weight_per_channel(_weight_24(9, 40, g))
    torch.library.opcheck(
        torch.ops.torchslim.sparse24_linear, (x, *compress_24(codes), None, scales)
    )
    block = compress_block(_weight_block(9, 40, (4, 8), g), "4x8")
    torch.library.opcheck(torch.ops.torchslim.sparse_block_linear, (x, *block, 9, bias))
    codes, scales = quantize_weight_per_channel(w)
    torch.library.opcheck(
        torch.ops.torchslim.sparse_sliced_linear, (x, *_compress_sliced(codes), None, scales)
    )
    torch.library.opcheck(
        torch.ops.torchslim.sparse_sliced_dynamic_linear,
        (x, *_compress_sliced(codes), scales, bias),
    )
    torch.library.opcheck(
        torch.ops.torchslim.sparse_bitmask_dynamic_linear, (x, *compress_bitmask(codes), scales)
    )
    codes, scales = quantize_weight_per_channel(_weight_24(9, 40, g))
    torch.library.opcheck(
        torch.ops.torchslim.sparse24_dynamic_linear, (x, *compress_24(codes), scales, bias)
    )
    codes, scales = quantize_weight_per_channel(_weight_block(9, 40, (4, 8), g))
    torch.library.opcheck(
        torch.ops.torchslim.sparse_block_dynamic_linear,
        (x, *_compress_block_n(codes, (4, 8)), scales, bias),
    )


def test_ops_compile_without_graph_breaks():
    g = seeded("compile")
    values, meta = compress_24(_weight_24(16, 64, g))
    w = _weight_unstructured(16, 64, 0.9, g)
    parts, csr = compress_bitmask(w), compress_csr(w)

    codes, scales = quantize_weight_per_channel(w)
    csr8, sliced8, bitmask8 = compress_csr(codes), _compress_sliced(codes), compress_bitmask(codes)
    block = compress_block(_weight_block(16, 64, (4, 16), g), "4x16")
    codes_b, scales_b = quantize_weight_per_channel(_weight_block(16, 64, (4, 16), g))
    block8 = _compress_block_n(codes_b, (4, 16))
    codes24, scales24 = quantize_weight_per_channel(_weight_24(16, 64, g))
    parts24 = compress_24(codes24)

    def f(x):
        return (
            ops.sparse24_linear(x, values, meta)
            + ops.sparse_bitmask_linear(x, *parts)
            + ops.sparse_csr_linear(x, *csr)
            + ops.sparse_csr_linear(x, *csr8, None, scales)
            + ops.sparse_block_linear(x, *block, 16)
            + ops.sparse_sliced_dynamic_linear(x, *sliced8, scales)
            + ops.sparse_bitmask_dynamic_linear(x, *bitmask8, scales)
            + ops.sparse24_dynamic_linear(x, *parts24, scales24)
            + ops.sparse_block_dynamic_linear(x, *block8, scales_b)
        )

    x = torch.randn(4, 64, generator=g)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x), f(x))


# --------------------------------------------------------------------------- bad input
def test_bad_arguments_name_themselves():
    g = seeded("bad")
    x = torch.randn(2, 16, generator=g)
    values, meta = compress_24(_weight_24(4, 16, g))
    with pytest.raises(ValueError, match=r"meta must have shape \(N, ceil\(K / 8\)\) = \(4, 2\)"):
        ops.sparse24_linear(x, values, meta[:, :1])
    with pytest.raises(TypeError, match="meta must be uint8"):
        ops.sparse24_linear(x, values, meta.to(torch.int8))
    with pytest.raises(ValueError, match=r"values must have shape \(N, 2 \* ceil\(K / 4\)\)"):
        ops.sparse24_linear(x, values[:, :4], meta)
    with pytest.raises(TypeError, match="values must be float32, bfloat16, float16 or int8"):
        ops.sparse24_linear(x, values.double(), meta)
    codes = values.round().clamp(-127, 127).to(torch.int8)
    with pytest.raises(ValueError, match="int8 values need scales"):
        ops.sparse24_linear(x, codes, meta)
    with pytest.raises(TypeError, match=r"scales must be float32, got torch\.float16"):
        ops.sparse24_linear(x, codes, meta, None, torch.ones(4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"scales must have shape \(N,\) = \(4,\), got \(3,\)"):
        ops.sparse24_linear(x, codes, meta, None, torch.ones(3))
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\) = \(4,\)"):
        ops.sparse24_linear(x, values, meta, torch.zeros(5))
    with pytest.raises(TypeError, match=r"meta must be a torch\.Tensor"):
        ops.sparse24_linear(x, values, meta.tolist())

    w = _weight_unstructured(4, 16, 0.5, g)
    vals, mask, offsets = compress_bitmask(w)
    with pytest.raises(TypeError, match="row_offsets must be int64"):
        ops.sparse_bitmask_linear(x, vals, mask, offsets.int())
    with pytest.raises(ValueError, match=r"row_offsets must have shape \(N \+ 1,\) = \(5,\)"):
        ops.sparse_bitmask_linear(x, vals, mask, offsets[:-1])
    with pytest.raises(ValueError, match=r"values must be 1-D \(nnz,\)"):
        ops.sparse_bitmask_linear(x, vals.reshape(4, -1), mask, offsets)
    with pytest.raises(ValueError, match="int8 values need scales"):
        ops.sparse_bitmask_linear(x, vals.to(torch.int8), mask, offsets)

    vals, cols, bases, offsets = compress_csr(w)
    with pytest.raises(TypeError, match="columns must be uint8"):
        ops.sparse_csr_linear(x, vals, cols.to(torch.int8), bases, offsets)
    with pytest.raises(ValueError, match="columns must have the shape of values"):
        ops.sparse_csr_linear(x, vals, cols[:, :4], bases, offsets)
    with pytest.raises(ValueError, match=r"values must have shape \(G, 8\)"):
        ops.sparse_csr_linear(x, vals.reshape(-1, 4), cols, bases, offsets)
    with pytest.raises(TypeError, match="bases must be int16"):
        ops.sparse_csr_linear(x, vals, cols, bases.int(), offsets)
    with pytest.raises(ValueError, match=r"bases must have shape \(G,\)"):
        ops.sparse_csr_linear(x, vals, cols, bases[:-1], offsets)
    with pytest.raises(TypeError, match="group_offsets must be int64"):
        ops.sparse_csr_linear(x, vals, cols, bases, offsets.int())
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\) = \(4,\)"):
        ops.sparse_csr_linear(x, vals, cols, bases, offsets, torch.zeros(3))
    with pytest.raises(ValueError, match=r"scales must have shape \(N,\) = \(4,\)"):
        ops.sparse_csr_linear(x, vals.to(torch.int8), cols, bases, offsets, None, torch.ones(5))


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("m", [1, 20, 64])  # the dot kernel; the SpMM; in slices
def test_bitmask_offsets_that_disagree_with_the_mask_raise(backend, m):
    g = seeded("offsets", backend, m)
    w = _weight_unstructured(6, 64, 0.5, g)
    vals, mask, offsets = compress_bitmask(w)
    x = torch.randn(m, 64, generator=g)
    shifted = offsets.clone()
    shifted[3] += 1  # row 2 one value longer, row 3 one shorter: total unchanged
    with run_on(backend), pytest.raises(ValueError, match="mask and row_offsets disagree: row 2"):
        ops.sparse_bitmask_linear(x, vals, mask, shifted)
    beyond = offsets.clone()
    beyond[-1] += 100  # past the values
    with run_on(backend), pytest.raises(ValueError, match="row_offsets must"):
        ops.sparse_bitmask_linear(x, vals, mask, beyond)
    dense_mask = torch.full_like(mask, 255)  # more set bits than values
    with run_on(backend), pytest.raises(ValueError, match="disagree"):
        ops.sparse_bitmask_linear(x, vals, dense_mask, offsets)
    # no values at all (an empty tensor, whose data pointer may be null), set bits in row 0
    empty, zero_mask, zero_offsets = compress_bitmask(torch.zeros(6, 64))
    bits = zero_mask.clone()
    bits[0, 0] = 0b101
    with run_on(backend), pytest.raises(ValueError, match="disagree"):
        ops.sparse_bitmask_linear(x, empty, bits, zero_offsets)


def test_backend_choice_is_explained():
    g = seeded("explain")
    values, meta = compress_24(_weight_24(4, 16, g))
    x = torch.randn(2, 16, generator=g)
    chosen = torchslim.explain("sparse24_linear", x, values, meta)["backend"]
    assert chosen == ("cpu" if CPU_BACKENDS else "reference")
    half = torchslim.explain("sparse24_linear", x.half(), values, meta)
    assert half["backend"] == "reference"  # fp16 activations: no CPU kernel


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("m", [3, 20, 64])  # the dot kernel; the SpMM; in slices
def test_bitmask_bits_past_k_are_ignored(backend, m):
    g = seeded("pad-bits", backend, m)
    w = _weight_unstructured(5, 13, 0.5, g)  # K = 13: bits 5..7 of the last byte are padding
    vals, mask, offsets = compress_bitmask(w)
    x = nan_padded(torch.randn(m, 13, generator=g))  # a read past K meets NaN
    with run_on(backend):
        padded = mask | torch.tensor([0, 0xE0], dtype=torch.uint8)
        out = ops.sparse_bitmask_linear(x, vals, padded, offsets)
    ref64 = ref.sparse_bitmask_linear(x, vals, mask, offsets, compute_dtype=torch.float64)
    check_close(out, ref64, ref.sparse_bitmask_linear(x, vals, mask, offsets))


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("m", [1, 3, 20, 64])  # the dot kernel; the SpMM; in slices
def test_24_indices_that_agree_add_up(backend, m):
    """Meta that names one column twice in a group (compress_24 never writes it): both values
    meet x there, in the reference and every kernel. K = 38: the last group's columns 38, 39
    are past K and hold no weight."""
    g = seeded("24-same-column", backend, m)
    n, k = 6, 38
    values = torch.randn(n, 2 * -(-k // 4), generator=g)
    meta = torch.randint(0, 256, (n, -(-k // 8)), generator=g, dtype=torch.uint8)
    meta[:, 0] = 0b0101_0000  # group 0: indices 0, 0; group 1: indices 0, 1
    dense = dense_from_24(values, meta, k)
    assert torch.equal(ref.decompress_24(values, meta, k, dtype=torch.float64), dense)
    x = nan_padded(torch.randn(m, k, generator=g))  # a read past K meets NaN
    with run_on(backend):
        out = ops.sparse24_linear(x, values, meta)
    check_close(out, x.double() @ dense.T, ref.sparse24_linear(x, values, meta))


@pytest.mark.skipif(not CPU_BACKENDS, reason="no torchslim CPU extension")
def test_the_binding_names_bad_values_and_scales():
    # torchslim._C directly: the C++ checks, not the Python ones in front of them
    from torchslim import _ext

    g = seeded("binding")
    x = torch.randn(1, 16, generator=g)
    values, meta = compress_24(_weight_24(4, 16, g))
    with pytest.raises(TypeError, match="values must be float32, bfloat16, float16 or int8"):
        _ext._C.sparse24_linear_cpu(x, values.double(), meta)
    codes = values.round().clamp(-127, 127).to(torch.int8)
    with pytest.raises(ValueError, match="int8 values need scales"):
        _ext._C.sparse24_linear_cpu(x, codes, meta)
    with pytest.raises(ValueError, match=r"scales must have shape \(N,\) = \(4,\)"):
        _ext._C.sparse24_linear_cpu(x, codes, meta, None, torch.ones(3))
    with pytest.raises(TypeError, match="scales must be float32"):
        _ext._C.sparse24_linear_cpu(x, codes, meta, None, torch.ones(4, dtype=torch.float64))


def test_decompress_checks_k_against_the_stored_width():
    """2:4 and bitmask store K only to a multiple (4, 8): a k outside that range raised nothing
    and returned the stored width instead."""
    w = torch.randn(4, 8, generator=seeded("decompress-k"))
    sp_24 = ref.compress_24(torchslim.sparse.prune_(w.clone(), "2:4"))
    bitmask = ref.compress_bitmask(w)
    for k in (5, 8):
        assert ref.decompress_24(*sp_24, k).shape == (4, k)
    assert ref.decompress_bitmask(*bitmask, 8).shape == (4, 8)
    for k, match in ((100, r"5\.\.8 for 2 groups of 4, got 100"), (4, "got 4"), (-1, ">= 0")):
        with pytest.raises(ValueError, match=match):
            ref.decompress_24(*sp_24, k)
    with pytest.raises(ValueError, match=r"1\.\.8 for 1 mask bytes, got 100"):
        ref.decompress_bitmask(*bitmask, 100)


def test_format_bytes_checks_its_arguments():
    for kwargs, error, match in (
        ({"sparsity": 1.5}, ValueError, r"sparsity must be a float in \[0, 1\], got 1.5"),
        ({"sparsity": "50%"}, TypeError, "sparsity must be a float"),
        ({"n": -4}, ValueError, "n must be an int >= 0, got -4"),
    ):
        args = {"n": 64, "k": 64, **kwargs}
        n, k = args.pop("n"), args.pop("k")
        with pytest.raises(error, match=match):
            format_bytes("csr", n, k, **args)
