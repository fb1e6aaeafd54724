"""Triton sparse linear (kernels/sparse_matmul.py: 2:4 and block-sparse) against
torchslim.reference.sparse.

Where there is no GPU, runs the kernel under the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1, set by conftest.py before triton is imported; fp16 and fp32 activations
only, as the interpreter's bf16 tl.dot is wrong); on a GPU machine it tests the compiled kernel
on CUDA tensors, bf16 included. Outputs follow the flash-attention rule against the reference in
float64.
"""

import pytest
import torch
from conftest import dense_from_24, seeded, triton_kernel_modules

import torchslim
from torchslim import ops
from torchslim.quant.int8 import quantize_weight_per_channel
from torchslim.reference import sparse as ref
from torchslim.sparse import compress_24, compress_block, prune_
from torchslim.testing import check_close

autotune, sm = triton_kernel_modules("sparse_matmul")

DEVICE = "cpu" if autotune.INTERPRET else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

X_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
VALUE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]
M_SIZES = [0, 1, 3, 17, 33]  # 1, 3: decode (split-K) path; 17, 33: tiled path
# (N, K): K a multiple of every tile; K = 70 (a short meta byte and a partial tile), 129 (a
# lone column in the last group), 30 (shorter than any tile); odd N.
NK = [(7, 64), (33, 70), (40, 129), (16, 30), (65, 256)]


def _weight(n, k, g):
    return prune_(torch.randn(n, k, generator=g) / k**0.5, "2:4", progress=False)


def _operands(w, value_dtype):
    """(values, meta, scales) on DEVICE: int8 values as per-row codes and their scales."""
    if value_dtype == torch.int8:
        codes, scales = quantize_weight_per_channel(w)
        values, meta = compress_24(codes)
        return values.to(DEVICE), meta.to(DEVICE), scales.to(DEVICE)
    values, meta = compress_24(w, value_dtype)
    return values.to(DEVICE), meta.to(DEVICE), None


def _check(out, x, values, meta, bias, scales):
    assert out.shape == (x.shape[0], values.shape[0]) and out.dtype == x.dtype
    args = (values, meta, bias, scales)
    ref64 = ref.sparse24_linear(x.double(), *args, compute_dtype=torch.float64)
    check_close(out, ref64, ref.sparse24_linear(x, *args))


@pytest.mark.parametrize(("N", "K"), NK)
@pytest.mark.parametrize("M", M_SIZES)
def test_against_reference(M, N, K, poisoned_empty):
    g = seeded("sp24-triton", M, N, K)
    w = _weight(N, K, g)
    for i, value_dtype in enumerate(VALUE_DTYPES):
        dtype = X_DTYPES[(M + i) % len(X_DTYPES)]
        values, meta, scales = _operands(w, value_dtype)
        x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
        bias = torch.randn(N, generator=g).to(DEVICE, dtype) if (M + i) % 2 else None
        _check(sm.sparse24_linear(x, values, meta, bias, scales), x, values, meta, bias, scales)


@pytest.mark.parametrize("M", [1, 33])
def test_indices_that_agree_add_up(M):
    """Meta that names one column twice in a group: both values meet x there, as in the
    reference and the CPU kernels; columns of the last group past K hold no weight."""
    g = seeded("sp24-triton-same-column", M)
    n, k = 9, 38
    values = torch.randn(n, 2 * -(-k // 4), generator=g)
    meta = torch.randint(0, 256, (n, -(-k // 8)), generator=g, dtype=torch.uint8)
    meta[:, 0] = 0b0101_0000  # group 0: indices 0, 0; group 1: indices 0, 1
    x = torch.randn(M, k, generator=g)
    out = sm.sparse24_linear(x.to(DEVICE), values.to(DEVICE), meta.to(DEVICE))
    expected = x.double() @ dense_from_24(values, meta, k).T
    check_close(out.cpu(), expected, ref.sparse24_linear(x, values, meta))


@pytest.mark.parametrize("M", [3, 33])
def test_strided_operands(M, poisoned_empty):
    """x column-major; values and meta row slices of wider buffers filled with junk."""
    g = seeded("sp24-strided", M)
    N, K = 24, 96
    values, meta, _ = _operands(_weight(N, K, g), torch.float32)
    x = torch.randn(M, K, generator=g).to(DEVICE)
    xt = x.t().contiguous().t()
    vbuf = torch.full((N, values.shape[1] + 5), float("nan"), device=DEVICE)
    vbuf[:, : values.shape[1]] = values
    mbuf = torch.full((N, meta.shape[1] + 3), 0xFF, dtype=torch.uint8, device=DEVICE)
    mbuf[:, : meta.shape[1]] = meta
    bias = torch.randn(N, generator=g).to(DEVICE)
    out = sm.sparse24_linear(xt, vbuf[:, : values.shape[1]], mbuf[:, : meta.shape[1]], bias)
    _check(out, x, values, meta, bias, None)


def test_empty_k_gives_the_bias():
    x = torch.randn(3, 0, device=DEVICE)
    values = torch.zeros(5, 0, device=DEVICE)
    meta = torch.zeros(5, 0, dtype=torch.uint8, device=DEVICE)
    bias = torch.randn(5, device=DEVICE)
    assert torch.equal(sm.sparse24_linear(x, values, meta, bias), bias.expand(3, 5))


def test_rejects_bad_input():
    x = torch.randn(2, 64, device=DEVICE)
    v = torch.zeros(8, 32, device=DEVICE)
    m = torch.zeros(8, 8, dtype=torch.uint8, device=DEVICE)
    f = sm.sparse24_linear
    with pytest.raises(ValueError, match=r"values must be \(N, 2 \* ceil\(K / 4\)\)"):
        f(x, v[:, :16], m)
    with pytest.raises(TypeError, match="values must be"):
        f(x, v.to(torch.int32), m)
    with pytest.raises(ValueError, match=r"meta must be \(N, ceil\(K / 8\)\)"):
        f(x, v, m[:4])
    with pytest.raises(TypeError, match="meta must be uint8"):
        f(x, v, m.to(torch.int8))
    with pytest.raises(ValueError, match="int8 values need scales"):
        f(x, v.to(torch.int8), m)
    with pytest.raises(ValueError, match=r"scales must be \(N,\)"):
        f(x, v, m, None, torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias must be \(N,\)"):
        f(x, v, m, torch.ones(9, device=DEVICE))


def test_the_op_runs_it():
    """torch.ops.torchslim.sparse24_linear on Triton: chosen for CUDA tensors by default, and
    for CPU tensors under the interpreter when the backend is forced."""
    g = seeded("sp24-op")
    values, meta, scales = _operands(_weight(32, 96, g), torch.int8)
    x = torch.randn(2, 5, 96, generator=g).to(DEVICE, torch.float16)
    with torchslim.backend("triton" if DEVICE == "cpu" else None, strict=DEVICE == "cpu"):
        assert torchslim.explain("sparse24_linear", x, values, meta)["backend"] == "triton"
        out = ops.sparse24_linear(x, values, meta, None, scales)
    assert out.shape == (2, 5, 32)
    _check(out.reshape(10, 32), x.reshape(10, 96), values, meta, None, scales)


# --------------------------------------------------------------------------- block-sparse
# (N, K, block): cut-off edge blocks, blocks of 16 x 16 and 32 x 64 (tensor-core sized), 1 x 16
# and 4 x 4 (padded to 16 in registers), a block taller than N.
BLOCK_CASES = [(10, 37, (4, 4)), (33, 64, (16, 16)), (40, 200, (32, 64)), (5, 40, (1, 16)),
               (3, 50, (8, 4))]  # fmt: skip


def _block_operands(w, block, value_dtype):
    if value_dtype == torch.int8:
        codes, scales = quantize_weight_per_channel(w)
        parts = compress_block(codes, block)
        return tuple(t.to(DEVICE) for t in parts), scales.to(DEVICE)
    return tuple(t.to(DEVICE) for t in compress_block(w, block, value_dtype)), None


def _check_block(out, x, parts, n, bias, scales):
    assert out.shape == (x.shape[0], n) and out.dtype == x.dtype
    args = (*parts, n, bias, scales)
    ref64 = ref.sparse_block_linear(x.double(), *args, compute_dtype=torch.float64)
    check_close(out, ref64, ref.sparse_block_linear(x, *args))


@pytest.mark.parametrize(("N", "K", "block"), BLOCK_CASES)
@pytest.mark.parametrize("M", [0, 1, 17, 33])
def test_block_against_reference(M, N, K, block, poisoned_empty):
    g = seeded("block-triton", M, N, K, block)
    w = prune_(torch.randn(N, K, generator=g) / K**0.5, block, sparsity=0.6, progress=False)
    for i, value_dtype in enumerate(VALUE_DTYPES):
        dtype = X_DTYPES[(M + i) % len(X_DTYPES)]
        parts, scales = _block_operands(w, block, value_dtype)
        x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
        bias = torch.randn(N, generator=g).to(DEVICE, dtype) if (M + i) % 2 else None
        out = sm.sparse_block_linear(x, *parts, N, bias, scales)
        _check_block(out, x, parts, N, bias, scales)


def test_block_empty_rows_and_strided_x(poisoned_empty):
    """A block row with no blocks gives the bias alone; x column-major."""
    g = seeded("block-empty")
    N, K, block = 48, 64, (16, 16)
    w = prune_(torch.randn(N, K, generator=g), block, sparsity=0.5, progress=False)
    w[16:32] = 0  # block row 1 stores nothing
    parts, _ = _block_operands(w, block, torch.float32)
    assert int(parts[2][2] - parts[2][1]) == 0
    x = torch.randn(5, K, generator=g).to(DEVICE)
    bias = torch.randn(N, generator=g).to(DEVICE)
    out = sm.sparse_block_linear(x.t().contiguous().t(), *parts, N, bias)
    _check_block(out, x, parts, N, bias, None)
    assert torch.equal(out[:, 16:32], bias[16:32].expand(5, 16))


def test_block_rejects_bad_input():
    x = torch.randn(2, 32, device=DEVICE)
    v = torch.zeros(3, 4, 8, device=DEVICE)
    c = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    o = torch.tensor([0, 1, 3], device=DEVICE)
    f = sm.sparse_block_linear
    with pytest.raises(ValueError, match=r"values must be 3-D \(B, R, C\)"):
        f(x, v[0], c, o, 8)
    with pytest.raises(TypeError, match="col_blocks must be int32"):
        f(x, v, c.long(), o, 8)
    with pytest.raises(ValueError, match=r"col_blocks must be \(B,\) = \(3,\)"):
        f(x, v, c[:2], o, 8)
    with pytest.raises(ValueError, match=r"row_offsets must be \(ceil\(N / R\) \+ 1,\) = \(4,\)"):
        f(x, v, c, o, 9)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        f(x, v, c, o, -2)
    with pytest.raises(ValueError, match="int8 values need scales"):
        f(x, v.to(torch.int8), c, o, 8)


def test_the_block_op_runs_it():
    g = seeded("block-op")
    w = prune_(torch.randn(32, 96, generator=g), "16x16", sparsity=0.5, progress=False)
    parts, scales = _block_operands(w, (16, 16), torch.int8)
    x = torch.randn(2, 3, 96, generator=g).to(DEVICE, torch.float16)
    with torchslim.backend("triton" if DEVICE == "cpu" else None, strict=DEVICE == "cpu"):
        assert torchslim.explain("sparse_block_linear", x, *parts, 32)["backend"] == "triton"
        out = ops.sparse_block_linear(x, *parts, 32, None, scales)
    assert out.shape == (2, 3, 32)
    _check_block(out.reshape(6, 32), x.reshape(6, 96), parts, 32, None, scales)


def test_blocks_past_the_triton_limit_go_to_the_reference_and_say_why():
    g = seeded("block-op-large")
    w = prune_(torch.randn(8, 160, generator=g), "1x80", sparsity=0.5, progress=False)
    parts, _ = _block_operands(w, (1, 80), torch.float16)
    x = torch.randn(3, 160, generator=g).to(DEVICE, torch.float16)
    with torchslim.backend("triton"):
        report = torchslim.explain("sparse_block_linear", x, *parts, 8)
        out = ops.sparse_block_linear(x, *parts, 8)
    assert report["backend"] == "reference"
    assert report["passed_over"] == [
        "triton: the Triton kernel takes blocks of at most 64 a side, got 1x80"
    ]
    _check_block(out, x, parts, 8, None, None)


_GPU_CONFIGS = [
    (name, i)
    for name in ("sp24_tiled", "sp24_decode")
    for i in range(len(autotune.GPU_TABLES[name]))
]


@pytest.mark.skipif(DEVICE != "cuda", reason="the GPU tables compile for a GPU only")
@pytest.mark.parametrize("table, index", _GPU_CONFIGS, ids=[f"{t}-{i}" for t, i in _GPU_CONFIGS])
def test_every_gpu_config(table, index, monkeypatch, poisoned_empty):
    """Each config on a shape that is a multiple of no tile, with float and int8 values; whatever
    autotuning picks must be correct."""
    kernel = sm._sp24_tiled if table == "sp24_tiled" else sm._sp24_decode
    monkeypatch.setattr(kernel, "configs", [autotune.GPU_TABLES[table][index]])
    M = 33 if table == "sp24_tiled" else 3
    N, K = 300, 1030
    w = _weight(N, K, seeded("sp24-config", table, index))
    for value_dtype in (torch.float16, torch.int8):
        values, meta, scales = _operands(w, value_dtype)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            g = seeded("sp24-config", table, index, str(value_dtype), str(dtype))
            x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
            bias = torch.randn(N, generator=g).to(DEVICE, dtype)
            out = sm.sparse24_linear(x, values, meta, bias, scales)
            _check(out, x, values, meta, bias, scales)
