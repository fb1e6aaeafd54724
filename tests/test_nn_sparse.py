"""SparseLinear: compression of pruned nn.Linear layers, outputs, state_dict, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded
from torch import nn

from torchslim import reference as torchslim_ref
from torchslim import sparse
from torchslim.nn import SparseLinear
from torchslim.quant.int8 import dequantize_weight, quantize_weight_per_channel
from torchslim.testing import check_close, sqnr

CASES = [
    ("2:4", "2:4", None),
    ("unstructured", "bitmask", 0.75),
    ("2:4", "bitmask", None),
    ("unstructured", "csr", 0.75),
    ("unstructured", "csr", 0.95),
    ("unstructured", "sliced", 0.9),
    ("2:4", "sliced", None),
    ("16x16", "block", 0.75),
    ("4x8", "block", 0.5),
]


def _pruned_linear(k: int, n: int, pattern: str, amount: float | None, key) -> nn.Linear:
    torch.manual_seed(seeded(*key).initial_seed() % 2**31)
    linear = nn.Linear(k, n)
    sparse.prune_(linear, pattern, sparsity=amount, progress=False)
    return linear


@pytest.mark.parametrize(("pattern", "fmt", "amount"), CASES)
@pytest.mark.parametrize(("k", "n"), [(64, 48), (257, 65)])
def test_from_linear_matches_the_pruned_layer(pattern, fmt, amount, k, n):
    linear = _pruned_linear(k, n, pattern, amount, ("from", pattern, fmt, k))
    layer = SparseLinear.from_linear(linear, pattern, format=fmt)
    assert layer.format == fmt and torch.equal(layer.dense_weight(), linear.weight.detach())
    x = torch.randn(3, 5, k, generator=seeded("x", k))
    with torch.no_grad():
        out = layer(x)
        ref64 = linear.double()(x.double())
        check_close(out, ref64, linear.float()(x))
    expected = 0.5 if pattern == "2:4" else amount
    assert abs(layer.sparsity - expected) < 0.02


@pytest.mark.parametrize(("pattern", "fmt", "amount"), CASES)
def test_state_dict_round_trip_is_exact(pattern, fmt, amount):
    linear = _pruned_linear(100, 30, pattern, amount, ("sd", fmt))
    layer = SparseLinear.from_linear(linear, pattern, format=fmt, dtype=torch.bfloat16)
    block = layer.block  # a block layer is made with its block shape
    fresh = SparseLinear(100, 30, format=fmt, block=block)  # fp32 until it loads
    fresh.load_state_dict(layer.state_dict())
    for name, buf in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], buf), name
    x = torch.randn(4, 100, generator=seeded("sd-x"))
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


def test_bf16_values_under_fp32_activations_and_module_casts():
    linear = _pruned_linear(128, 32, "2:4", None, ("cast",))
    layer = SparseLinear.from_linear(linear, dtype=torch.bfloat16)
    assert layer.values.dtype == torch.bfloat16 and layer.values.nbytes == 32 * 64 * 2
    x = torch.randn(2, 128, generator=seeded("cast-x"))
    with torch.no_grad():
        assert layer(x).dtype == torch.float32
        half = layer.to(torch.float16)
    assert half.values.dtype == torch.float16 and half.meta.dtype == torch.uint8


def test_torch_prune_layer_is_read_through_its_mask():
    linear = nn.Linear(32, 8)
    torch.nn.utils.prune.l1_unstructured(linear, "weight", amount=0.6)
    layer = SparseLinear.from_linear(linear, "unstructured")
    assert torch.equal(layer.dense_weight(), linear.weight.detach())
    assert hasattr(linear, "weight_orig")  # left unchanged


@pytest.mark.parametrize(("pattern", "fmt", "amount"), CASES)
def test_x_of_another_width_is_refused(pattern, fmt, amount):
    """x whose last dim is not in_features is refused by name in every format, also where
    the arrays alone fix K only to a multiple of 4 (2:4) or of the block width (block)."""
    layer = SparseLinear.from_linear(
        _pruned_linear(64, 8, pattern, amount, ("width", fmt)), pattern, format=fmt
    )
    for shape in ((3, 61), (3, 63), (3, 65), (2, 3, 48), ()):
        with pytest.raises(ValueError, match=r"x must be \(\.\.\., in_features = 64\)"):
            layer(torch.randn(shape))
    assert layer(torch.randn(3, 64)).shape == (3, 8)


def test_errors_name_the_argument():
    dense = nn.Linear(16, 4)
    with pytest.raises(ValueError, match="does not satisfy the 2:4 pattern"):
        SparseLinear.from_linear(dense, "2:4")
    with pytest.raises(ValueError, match="pattern must be '2:4', 'unstructured' or blocks"):
        SparseLinear.from_linear(dense, "1:4")
    with pytest.raises(ValueError, match="format must be one of"):
        SparseLinear(16, 4, format="coo")
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear"):
        SparseLinear.from_linear(nn.Conv1d(1, 1, 1))
    layer = SparseLinear.from_linear(_pruned_linear(16, 4, "2:4", None, ("err",)))
    state = layer.state_dict()
    state["meta"] = torch.zeros_like(state["meta"])  # pairs (0, 0): not two columns
    with pytest.raises(ValueError, match="two increasing column indices"):
        SparseLinear(16, 4).load_state_dict(state)
    bm = SparseLinear.from_linear(
        _pruned_linear(16, 4, "unstructured", 0.5, ("e2",)), "unstructured"
    )
    state = bm.state_dict()
    state["row_offsets"] = state["row_offsets"].flip(0)
    with pytest.raises(ValueError, match="row_offsets must start at 0"):
        SparseLinear(16, 4, format="bitmask").load_state_dict(state)
    csr = SparseLinear.from_linear(
        _pruned_linear(300, 4, "unstructured", 0.5, ("e3",)), "unstructured", format="csr"
    )
    state = csr.state_dict()
    state["bases"] = torch.full_like(state["bases"], 40)  # columns from 320: past K = 300
    with pytest.raises(ValueError, match="csr row 0 points past K = 300"):
        SparseLinear(300, 4, format="csr").load_state_dict(state)


def test_the_default_unstructured_format_reads_the_fewer_bytes():
    for amount, fmt in ((0.5, "bitmask"), (0.8, "bitmask"), (0.95, "csr")):
        linear = _pruned_linear(4096, 4, "unstructured", amount, ("default", amount))
        layer = SparseLinear.from_linear(linear, "unstructured")
        assert layer.format == fmt, amount
        other = SparseLinear.from_linear(
            linear, "unstructured", format="csr" if fmt == "bitmask" else "bitmask"
        )
        mine = sum(b.nbytes for b in layer.buffers())
        assert mine < sum(b.nbytes for b in other.buffers()), amount


def test_compiles_without_graph_breaks():
    layer = SparseLinear.from_linear(_pruned_linear(64, 16, "2:4", None, ("compile",)))
    x = torch.randn(4, 64, generator=seeded("compile-x"))
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize(("pattern", "fmt", "amount"), CASES)
def test_int8_values_follow_the_quantized_weight(pattern, fmt, amount):
    linear = _pruned_linear(257, 65, pattern, amount, ("int8", pattern, fmt))
    layer = SparseLinear.from_linear(linear, pattern, format=fmt, dtype=torch.int8)
    assert layer.values.dtype == torch.int8 and layer.scales.dtype == torch.float32
    codes, scales = quantize_weight_per_channel(linear.weight.detach())
    assert torch.equal(layer.scales, scales)
    assert torch.equal(layer.dense_weight(), dequantize_weight(codes, scales))
    quantized = nn.Linear(257, 65)
    with torch.no_grad():
        quantized.weight.copy_(dequantize_weight(codes, scales))
        quantized.bias.copy_(linear.bias)
    x = torch.randn(3, 5, 257, generator=seeded("int8-x", fmt))
    with torch.no_grad():
        out = layer(x)
        check_close(out, quantized.double()(x.double()), quantized.float()(x))
        # against the float pruned layer: int8 per-channel rounding only
        assert sqnr(linear(x), out) > 35.0
    # a nonzero may round to a zero code: never more nonzeros
    assert layer.sparsity >= SparseLinear.from_linear(linear, pattern, format=fmt).sparsity


@pytest.mark.parametrize("fmt", ["2:4", "csr", "sliced"])
def test_int8_state_dict_round_trip_and_casts(fmt):
    pattern = "2:4" if fmt == "2:4" else "unstructured"
    linear = _pruned_linear(100, 30, pattern, None if fmt == "2:4" else 0.9, ("int8-sd", fmt))
    layer = SparseLinear.from_linear(linear, pattern, format=fmt, dtype=torch.int8)
    fresh = SparseLinear(100, 30, format=fmt, dtype=torch.int8)
    fresh.load_state_dict(layer.state_dict())
    for name, buf in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], buf), name
    x = torch.randn(4, 100, generator=seeded("int8-sd-x"))
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
        half = layer.to(torch.bfloat16)  # the bias follows; codes and scales stay
        assert half.values.dtype == torch.int8 and half.scales.dtype == torch.float32
        assert half.bias.dtype == torch.bfloat16
        assert half(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(
        RuntimeError, match=r"holds torch\.int8 values .* make it with dtype=torch\.int8"
    ):
        SparseLinear(100, 30, format=fmt).load_state_dict(layer.state_dict(), strict=False)
    floats = SparseLinear.from_linear(linear, pattern, format=fmt)
    with pytest.raises(RuntimeError, match=r"holds torch\.float32 values"):
        fresh.load_state_dict(floats.state_dict(), strict=False)
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16, float16 or int8"):
        SparseLinear.from_linear(linear, pattern, format=fmt, dtype=torch.int16)
    state = layer.state_dict()
    state["scales"] = -state["scales"]
    with pytest.raises(ValueError, match="scales must be finite and > 0"):
        fresh.load_state_dict(state)


def test_block_layers_check_their_shape_and_contents():
    linear = _pruned_linear(64, 32, "16x16", 0.5, ("block-check",))
    layer = SparseLinear.from_linear(linear, "16x16")
    assert layer.format == "block" and layer.block == (16, 16) and "block=16x16" in repr(layer)
    assert SparseLinear.from_linear(linear, "16x16", format="csr").format == "csr"
    with pytest.raises(ValueError, match="format='block' needs a block pattern"):
        SparseLinear.from_linear(linear, "unstructured", format="block")
    with pytest.raises(ValueError, match=r"block .* goes with format='block'"):
        SparseLinear(64, 32, format="block")
    with pytest.raises(ValueError, match=r"block .* goes with format='block'"):
        SparseLinear(64, 32, format="csr", block="4x4")
    state = layer.state_dict()
    with pytest.raises(ValueError, match=r"values must have shape \(B, 8, 16\)"):
        SparseLinear(64, 32, format="block", block="8x16").load_state_dict(state)
    state["col_blocks"] = state["col_blocks"] + 4  # past K = 64 for blocks of 16 columns
    with pytest.raises(ValueError, match="points past K = 64"):
        SparseLinear(64, 32, format="block", block="16x16").load_state_dict(state)


@pytest.mark.parametrize(
    ("pattern", "amount", "fmt"),
    [
        ("unstructured", 0.9, "bitmask"),
        ("unstructured", 0.9, "sliced"),
        ("2:4", None, "bitmask"),
        ("2:4", None, "sliced"),
        ("2:4", None, "2:4"),
        ("16x16", 0.5, "block"),
        ("4x8", 0.75, "block"),
    ],
)
def test_dynamic_mode_is_w8a8_on_the_codes(pattern, amount, fmt):
    linear = _pruned_linear(257, 65, pattern, amount, ("w8a8", pattern))
    layer = SparseLinear.from_linear(linear, pattern, format=fmt, dtype=torch.int8, mode="dynamic")
    assert layer.format == fmt and layer.mode == "dynamic" and "mode='dynamic'" in repr(layer)
    codes, scales = quantize_weight_per_channel(linear.weight.detach())
    assert torch.equal(layer.scales, scales)
    x = torch.randn(3, 5, 257, generator=seeded("w8a8-x", pattern))
    with torch.no_grad():
        out = layer(x)
        expected = torchslim_ref.int8_dynamic_linear(x, codes, scales, linear.bias.detach())
        assert torch.equal(out, expected)  # the dense W8A8 op's bits
        assert sqnr(linear(x), out) > 30.0  # int8 weights and tokens
    block = pattern if fmt == "block" else None
    fresh = SparseLinear(257, 65, format=fmt, dtype=torch.int8, mode="dynamic", block=block)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), out)


def test_dynamic_mode_needs_int8_values_in_a_w8a8_format():
    linear = _pruned_linear(64, 16, "unstructured", 0.9, ("w8a8-bad",))
    with pytest.raises(ValueError, match="mode must be one of"):
        SparseLinear.from_linear(linear, "unstructured", dtype=torch.int8, mode="w8a8")
    with pytest.raises(ValueError, match=r"mode='dynamic' \(W8A8\) takes int8 values"):
        SparseLinear.from_linear(linear, "unstructured", dtype=torch.bfloat16, mode="dynamic")
    with pytest.raises(ValueError, match=r"mode='dynamic' \(W8A8\) takes int8 values"):
        SparseLinear(64, 16, format="sliced", dtype=torch.float32, mode="dynamic")
    # no dtype: int8, the one W8A8 takes (by bytes: sliced at 90%)
    plain = SparseLinear.from_linear(linear, "unstructured", mode="dynamic")
    assert plain.values.dtype == torch.int8 and plain.format == "sliced"
    assert SparseLinear(64, 16, format="sliced", mode="dynamic").values.dtype == torch.int8
    with pytest.raises(ValueError, match="format='csr'"):
        SparseLinear.from_linear(
            linear, "unstructured", format="csr", dtype=torch.int8, mode="dynamic"
        )
    # by bytes: bitmask at 50%, sliced at 90%
    half = _pruned_linear(256, 16, "unstructured", 0.5, ("w8a8-half",))
    assert SparseLinear.from_linear(
        half, "unstructured", dtype=torch.int8, mode="dynamic"
    ).format == ("bitmask")
    with pytest.raises(ValueError, match=r"mode='dynamic' \(W8A8\) takes int8 values"):
        SparseLinear(64, 16, format="block", block="4x4", dtype=torch.bfloat16, mode="dynamic")
    # a block-pruned weight keeps the block format under mode="dynamic" (its own W8A8 kernel),
    # unless a format is given
    blocks = SparseLinear.from_linear(
        _pruned_linear(64, 16, "4x4", 0.5, ("w8a8-blocks",)),
        "4x4",
        dtype=torch.int8,
        mode="dynamic",
    )
    assert blocks.format == "block" and blocks.block == (4, 4) and blocks.mode == "dynamic"
    as_bitmask = SparseLinear.from_linear(
        _pruned_linear(64, 16, "4x4", 0.5, ("w8a8-blocks",)),
        "4x4",
        format="bitmask",
        mode="dynamic",
    )
    assert as_bitmask.format == "bitmask" and as_bitmask.mode == "dynamic"
    # a 2:4 weight keeps its format: 2:4 has a W8A8 kernel too
    pairs = _pruned_linear(64, 16, "2:4", None, ("w8a8-24",))
    layer = SparseLinear.from_linear(pairs, "2:4", dtype=torch.int8, mode="dynamic")
    assert layer.format == "2:4" and layer.mode == "dynamic"
