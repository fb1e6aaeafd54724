"""Int8Linear as a drop-in for nn.Linear: accuracy (SQNR), state_dict, dtype/device moves."""

from __future__ import annotations

import copy
import io

import pytest
import test_grad
import torch
from conftest import seeded
from torch import nn

import torchslim
from torchslim.nn import Int8Linear
from torchslim.quant import smoothquant_factors
from torchslim.testing import sqnr

IN, OUT = 512, 384


def _layer(gen, outlier_rows: bool = True) -> nn.Linear:
    linear = nn.Linear(IN, OUT)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(OUT, IN, generator=gen) / IN**0.5)
        if outlier_rows:  # a few output channels with 30x larger weights
            linear.weight[torch.randperm(OUT, generator=gen)[:4]] *= 30
        linear.bias.copy_(torch.randn(OUT, generator=gen) * 0.1)
    return linear


def _inputs(gen, outlier_channels: bool) -> torch.Tensor:
    x = torch.randn(8, 16, IN, generator=gen)
    if outlier_channels:  # LLM-style: a few input channels carry 20x larger activations
        x[..., torch.randperm(IN, generator=gen)[:4]] *= 20
    return x


# What the math allows, for Gaussian data quantized symmetrically to 8 bits: the quantization
# step of a row of K Gaussians is about 2 * 3.3 sigma / 254, so SQNR ≈ 10 log10(12 * 127^2 /
# 3.3^2) ≈ 42.5 dB for the weights alone (per-channel: outlier rows only scale their own step).
# W8A8 adds the same noise again on the activations (≈ 39.5 dB together); activation outlier
# channels widen every token's step, which SmoothQuant moves back into the weights.
@pytest.mark.parametrize(
    ("mode", "outliers", "smooth", "min_db"),
    [
        ("weight_only", True, False, 40.0),
        ("dynamic", False, False, 37.0),
        ("dynamic", True, True, 35.0),
    ],
)
def test_sqnr_against_float_layer(mode, outliers, smooth, min_db, gen):
    linear = _layer(gen)
    x = _inputs(gen, outlier_channels=outliers)
    factors = None
    if smooth:
        factors = smoothquant_factors(x.abs().amax(dim=(0, 1)), linear.weight, alpha=0.5)
    layer = Int8Linear.from_linear(linear, mode=mode, smooth=factors)
    with torch.no_grad():
        db = sqnr(linear(x), layer(x))
    assert db >= min_db, f"{mode}: SQNR {db:.1f} dB < {min_db} dB"


def test_smoothquant_helps_with_outlier_channels(gen):
    linear = _layer(gen, outlier_rows=False)
    x = _inputs(gen, outlier_channels=True)
    plain = Int8Linear.from_linear(linear, mode="dynamic")
    factors = smoothquant_factors(x.abs().amax(dim=(0, 1)), linear.weight)
    smoothed = Int8Linear.from_linear(linear, mode="dynamic", smooth=factors)
    with torch.no_grad():
        want = linear(x)
        assert sqnr(want, smoothed(x)) > sqnr(want, plain(x)) + 3.0


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_drop_in_for_linear(mode, gen):
    linear = _layer(gen)
    layer = Int8Linear.from_linear(linear, mode=mode)
    assert (layer.in_features, layer.out_features) == (linear.in_features, linear.out_features)
    x = torch.randn(2, 3, 5, IN, generator=gen)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (2, 3, 5, OUT) and out.dtype == x.dtype
    assert "mode=" in repr(layer)
    no_bias = nn.Linear(IN, OUT, bias=False)
    assert Int8Linear.from_linear(no_bias, mode=mode).bias is None


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_state_dict_round_trip_is_bit_identical(mode, gen):
    linear = _layer(gen)
    x = _inputs(gen, outlier_channels=True)
    factors = smoothquant_factors(x.abs().amax(dim=(0, 1)), linear.weight)
    layer = Int8Linear.from_linear(linear, mode=mode, smooth=factors)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = Int8Linear(IN, OUT, mode=mode)
    fresh.register_buffer("smooth", torch.ones(IN))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name
        assert tensor.dtype == fresh.state_dict()[name].dtype, name
    with torch.no_grad():
        assert torch.equal(layer(x), fresh(x))


def test_cast_keeps_scales_fp32(gen):
    layer = Int8Linear.from_linear(_layer(gen), mode="weight_only").to(torch.bfloat16)
    assert layer.weight.dtype == torch.int8
    assert layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    x = torch.randn(4, IN, generator=gen, dtype=torch.bfloat16)
    with torch.no_grad():
        assert layer(x).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda(gen):
    linear = _layer(gen)
    layer = Int8Linear.from_linear(linear, mode="weight_only").to("cuda")
    assert layer.weight.is_cuda and layer.weight_scale.is_cuda
    x = torch.randn(4, IN, generator=gen)
    with torch.no_grad():
        db = sqnr(linear(x), layer(x.cuda().half()).float().cpu())
    assert db >= 35.0


def test_bad_input(gen):
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear"):
        Int8Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        Int8Linear.from_linear(nn.Linear(4, 4), mode="int4")
    with pytest.raises(ValueError, match="smooth must have shape"):
        Int8Linear.from_linear(nn.Linear(4, 4), smooth=torch.ones(5))
    bad = nn.Linear(4, 4)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight must be finite"):
        Int8Linear.from_linear(bad)
    past_fp32 = torch.tensor([[1e300, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="weight must be finite in fp32"):  # was a NaN scale
        torchslim.quant.quantize_weight_per_channel(past_fp32)
    ones = torch.ones(3, 2)
    for args, kwargs, error, match in (
        ((torch.tensor([1.0, float("nan")]), ones), {}, ValueError, "act_absmax must be finite"),
        ((torch.ones(2), torch.ones(6)), {}, ValueError, r"weight must be 2-D"),
        ((torch.ones(2), ones), {"alpha": "0.5"}, TypeError, "alpha must be a float"),
        ((torch.ones(2), ones), {"eps": 0.0}, ValueError, "eps must be > 0"),
    ):
        with pytest.raises(error, match=match):
            smoothquant_factors(*args, **kwargs)
    layer = Int8Linear.from_linear(_layer(gen))
    state = layer.state_dict()
    state["weight_scale"] = state["weight_scale"].clone()
    state["weight_scale"][3] = 0.0
    with pytest.raises(ValueError, match="weight_scale must be finite and > 0"):
        Int8Linear(IN, OUT).load_state_dict(state)
    state["weight_scale"][3] = float("inf")
    with pytest.raises(ValueError, match="weight_scale must be finite and > 0"):
        Int8Linear(IN, OUT).load_state_dict(state)
    state["weight_scale"][3] = 1.0
    # codes of another dtype would be cast (float weights truncated, wider integers wrapped)
    for weight in (state["weight"].float() / 127, state["weight"].to(torch.int32) + 200):
        with pytest.raises(
            ValueError, match=f"weight must hold torch.int8 codes, got {weight.dtype}"
        ):
            Int8Linear(IN, OUT).load_state_dict({**state, "weight": weight})
    for layer in (Int8Linear(IN, OUT), torchslim.nn.Int4Linear(IN, OUT, group_size=32)):
        with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got list"):
            layer([1.0] * IN)


def test_public_api():
    assert torchslim.nn.Int8Linear is Int8Linear
    assert {"cpu", "reference"} <= set(torchslim.ops.BACKENDS)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(test_grad.LAYERS))
def test_a_bias_of_any_float_dtype_or_stride_adds_its_fp32_values(name, x_dtype):
    """The CPU kernels add the bias in fp32: one held in bf16, fp16 or float64, or a strided
    view, gives exactly what its values as a contiguous fp32 tensor give (the kernels widen it
    without a torch op, into a per-thread workspace)."""
    g = seeded("bias-dtype", name, str(x_dtype))
    layer = test_grad.LAYERS[name][0](test_grad._pruned_linear(g))
    n, k = test_grad.N, test_grad.K
    x = torch.randn(2, 3, k, generator=g).to(x_dtype)
    wide = torch.randn(2 * n, generator=g)
    variants = [wide[:n].to(d) for d in (torch.bfloat16, torch.float16, torch.float64)]
    variants.append(wide[::2])  # stride 2
    for bias in variants:
        layer._buffers["bias"] = bias.float().contiguous()
        want = layer(x)
        layer._buffers["bias"] = bias
        assert torch.equal(layer(x), want), (bias.dtype, bias.stride())


@pytest.mark.parametrize("name", sorted(test_grad.LAYERS))
def test_layers_move_copy_and_pickle_as_nn_linear_does(name):
    """torch.save of the whole module (pickling), to_empty() from the meta device and .double()
    work as for nn.Linear; the scales and codes keep their dtypes, and a layer cast to a dtype
    its kernels lack (fp64) keeps its own and gives the same result."""
    g = seeded("move-copy-pickle", name)
    layer = test_grad.LAYERS[name][0](test_grad._pruned_linear(g))
    x = torch.randn(3, test_grad.K, generator=g)
    want = layer(x)
    dtypes = {k: v.dtype for k, v in layer.state_dict().items()}

    buffer = io.BytesIO()
    torch.save(nn.Sequential(layer), buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), want)

    empty = copy.deepcopy(layer).to("meta").to_empty(device="cpu")
    assert {k: v.dtype for k, v in empty.state_dict().items()} == dtypes
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty(x), want)

    double = copy.deepcopy(layer).double()
    assert torch.equal(double(x), want)
    kept = {k: v.dtype for k, v in double.state_dict().items() if not k.endswith("bias")}
    assert kept == {k: d for k, d in dtypes.items() if not k.endswith("bias")}


@pytest.mark.parametrize("name", sorted(test_grad.LAYERS))
def test_autocast_casts_x_as_for_nn_linear(name):
    """Under torch.autocast an fp32 x is cast to the autocast dtype, as F.linear's is: the
    output is in that dtype and equal to the layer's output for x cast by hand."""
    g = seeded("autocast", name)
    layer = test_grad.LAYERS[name][0](test_grad._pruned_linear(g))
    x = torch.randn(2, 3, test_grad.K, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert nn.functional.linear(x, torch.ones(1, test_grad.K)).dtype == y.dtype
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, layer(x.detach().bfloat16()))
    y.float().sum().backward()  # the cast is on the tape
    assert x.grad.dtype == torch.float32 and x.grad.shape == x.shape
