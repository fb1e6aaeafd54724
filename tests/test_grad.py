"""Gradients through the quantized and sparse linear layers: x and bias, the weights frozen."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded
from torch import nn

import torchslim
from torchslim import reference as ref
from torchslim.nn import Int4Linear, Int8Linear, SparseLinear
from torchslim.testing import check_close

K, N = 96, 40
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _pruned_linear(g: torch.Generator) -> nn.Linear:
    """A 2:4-pruned layer: it holds every sparse pattern, so every format can store it."""
    linear = nn.Linear(K, N)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=g) / K**0.5)
        linear.bias.copy_(torch.randn(N, generator=g))
    torchslim.sparse.prune_(linear, "2:4", progress=False)
    return linear


def _int8_weight(layer: Int8Linear) -> torch.Tensor:
    return ref.dequantize_int8(layer.weight, layer.weight_scale)


def _int4_weight(layer: Int4Linear) -> torch.Tensor:
    return ref.dequantize_int4(
        layer.weight, layer.weight_scales, layer.weight_zeros, layer.group_size
    )


# name -> (layer from a pruned nn.Linear, its dense (N, K) weight in fp32)
LAYERS = {
    "int8 dynamic": (lambda lin: Int8Linear.from_linear(lin, mode="dynamic"), _int8_weight),
    "int8 weight-only": (lambda lin: Int8Linear.from_linear(lin, mode="weight_only"), _int8_weight),
    "int4": (lambda lin: Int4Linear.from_linear(lin, group_size=32), _int4_weight),
    **{
        f"sparse {fmt}": (
            lambda lin, fmt=fmt: SparseLinear.from_linear(lin, "2:4", format=fmt),
            SparseLinear.dense_weight,
        )
        for fmt in ("2:4", "bitmask", "csr", "sliced")
    },
    "sparse block": (
        lambda lin: SparseLinear.from_linear(lin, "4x4", format="block"),
        SparseLinear.dense_weight,
    ),
    "sparse 2:4 int8": (
        lambda lin: SparseLinear.from_linear(lin, "2:4", dtype=torch.int8),
        SparseLinear.dense_weight,
    ),
    **{
        f"sparse {fmt} W8A8": (
            lambda lin, fmt=fmt: SparseLinear.from_linear(
                lin, "unstructured", format=fmt, dtype=torch.int8, mode="dynamic"
            ),
            SparseLinear.dense_weight,
        )
        for fmt in ("bitmask", "sliced")
    },
    "sparse 2:4 W8A8": (
        lambda lin: SparseLinear.from_linear(lin, "2:4", dtype=torch.int8, mode="dynamic"),
        SparseLinear.dense_weight,
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gradients_of_x_and_bias(name, dtype, device):
    """grad_x = grad_out @ W and grad_bias = grad_out summed over the leading dims, W being
    the layer's dense weight: what nn.Linear gives with that weight frozen (a quantizing op
    passes the gradient straight through its rounding of x)."""
    g = seeded("grad", name, str(dtype), device)
    make, dense = LAYERS[name]
    layer = make(_pruned_linear(g)).to(device)
    bias = torch.randn(N, generator=g).to(device).requires_grad_()
    layer._buffers["bias"] = bias  # a trainable bias, as a layer fine-tuned with frozen weights
    x = torch.randn(2, 3, K, generator=g).to(device=device, dtype=dtype).requires_grad_()
    grad_out = torch.randn(2, 3, N, generator=g).to(device=device, dtype=dtype)

    out = layer(x)
    assert out.requires_grad and out.grad_fn is not None
    out.backward(grad_out)

    w = dense(layer).float()
    if device == "cpu":  # the weight the forward kernel applies, read through it: rows of I
        with torch.no_grad():
            w_forward = (layer(torch.eye(K)) - bias).T
        torch.testing.assert_close(w_forward, w, rtol=1e-5, atol=1e-5)
    ref64 = grad_out.double() @ w.double()
    check_close(x.grad, ref64, grad_out @ w.to(dtype), name=f"{name} grad_x")
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    torch.testing.assert_close(bias.grad, grad_out.float().sum((0, 1)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_training_compiles_as_one_graph(name):
    """torch.compile(fullgraph=True) of a training step: the backward's dense weight is one op
    (a sparse format's decompression reads its offsets, which the compiler cannot trace)."""
    torch._dynamo.reset()
    g = seeded("grad-compiled", name)
    layer = LAYERS[name][0](_pruned_linear(g))
    x = torch.randn(2, 3, K, generator=g, requires_grad=True)
    grad_out = torch.randn(2, 3, N, generator=g)
    (want,) = torch.autograd.grad(layer(x), x, grad_out)
    try:
        (got,) = torch.autograd.grad(torch.compile(layer, fullgraph=True)(x), x, grad_out)
    finally:
        torch._dynamo.reset()  # one compiled forward per layer: leave no cache to later tests
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_no_graph_without_grad(name):
    layer = LAYERS[name][0](_pruned_linear(seeded("no-graph", name)))
    x = torch.randn(3, K)
    assert layer(x).grad_fn is None
    with torch.no_grad():
        assert layer(x.requires_grad_()).grad_fn is None
    with torch.inference_mode():
        assert not layer(torch.randn(3, K)).requires_grad


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_weight_that_requires_grad_is_an_error(name):
    layer = LAYERS[name][0](_pruned_linear(seeded("frozen", name)))
    buffer = next(
        n
        for n, b in layer.named_buffers()
        if n != "bias" and b is not None and b.is_floating_point()
    )
    getattr(layer, buffer).requires_grad_()
    with pytest.raises(ValueError, match="requires grad, but torchslim's quantized and sparse"):
        layer(torch.randn(3, K, requires_grad=True))
    with torch.no_grad():  # no gradient asked: the layer runs
        assert layer(torch.randn(3, K)).shape == (3, N)


def test_trainable_layers_around_a_quantized_one_match_the_dense_model():
    """An adapter before a frozen W8A8 layer gets the gradient it gets before an nn.Linear
    holding the dequantized weight, eager and under torch.compile."""
    g = seeded("adapter")
    adapter = nn.Linear(K, K)
    frozen = Int8Linear.from_linear(_pruned_linear(g), mode="weight_only")
    dense = nn.Linear(K, N).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(_int8_weight(frozen))
        dense.bias.copy_(frozen.bias)
    x = torch.randn(4, K, generator=g)

    def grads(model: nn.Module) -> list[torch.Tensor]:
        adapter.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        return [p.grad.clone() for p in adapter.parameters()]

    want = grads(nn.Sequential(adapter, dense))
    for model in (nn.Sequential(adapter, frozen), torch.compile(nn.Sequential(adapter, frozen))):
        for got, expected in zip(grads(model), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_op_gradients_without_a_bias_for_the_bias_alone_and_for_no_outputs():
    g = seeded("op-edges")
    x = torch.randn(3, K, generator=g)
    w_q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    w_scale = torch.rand(N, generator=g) / 100
    w = w_q.float() * w_scale.unsqueeze(1)
    grad_out = torch.randn(3, N, generator=g)
    for op in (torchslim.ops.int8_dynamic_linear, torchslim.ops.int8_weight_only_linear):
        xr = x.clone().requires_grad_()
        op(xr, w_q, w_scale).backward(grad_out)  # no bias
        torch.testing.assert_close(xr.grad, grad_out @ w, rtol=1e-5, atol=1e-5)
        bias = torch.zeros(N, requires_grad=True)
        out = op(x, w_q, w_scale, bias)  # the bias alone: x needs no gradient
        out.backward(grad_out)
        torch.testing.assert_close(bias.grad, grad_out.sum(0))
        xr = x.clone().requires_grad_()
        empty = op(xr, w_q[:0], w_scale[:0])  # N = 0
        empty.sum().backward()
        assert empty.shape == (3, 0) and torch.equal(xr.grad, torch.zeros_like(x))


def test_the_autograd_kernel_of_every_device_on_meta_tensors():
    """The formula as torch.library.register_autograd carries it (the Autograd kernel of every
    device but the CPU, whose C++ kernel comes first): shapes and dtypes on meta tensors."""
    layer = Int4Linear.from_linear(_pruned_linear(seeded("meta")), group_size=32).to("meta")
    x = torch.empty(2, 3, K, device="meta", requires_grad=True)
    bias = torch.empty(N, device="meta", requires_grad=True)
    layer._buffers["bias"] = bias
    out = layer(x)
    assert out.shape == (2, 3, N) and out.grad_fn is not None
    out.backward(torch.empty_like(out))
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"
    assert bias.grad.shape == (N,)
