"""The "torchslim" torch.compile backend: registration, its graph passes, its options."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim import compiler
from torchslim.nn import Int4Linear, Int8Linear
from torchslim.testing import check_close

MODES = ["dynamic", "weight_only", "int4"]


def _layer(linear: nn.Linear, mode: str) -> nn.Module:
    if mode == "int4":
        return Int4Linear.from_linear(linear, group_size=32)
    return Int8Linear.from_linear(linear, mode=mode)


@pytest.fixture(autouse=True)
def fresh_compile():
    """Every test compiles anew and runs the passes (an FX-graph-cache hit would skip them)."""
    torch._dynamo.reset()
    compiler.counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()


class Projections(nn.Module):
    """q / k / v on one input (v with a bias, q with one added after the layer), combined."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.q = _layer(nn.Linear(64, 96, bias=False), mode)
        self.k = _layer(nn.Linear(64, 32, bias=False), mode)
        self.v = _layer(nn.Linear(64, 32), mode)
        self.q_bias = nn.Parameter(torch.randn(96))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x) + self.q_bias
        mixed = q[..., :32] * self.k(x) + self.v(x)
        return mixed.view(*x.shape[:-1], 4, 8).transpose(-2, -3)  # a view of the slices


def _projections(mode: str) -> Projections:
    torch.manual_seed(0)
    return Projections(mode).eval()


def test_backend_is_registered():
    assert "torchslim" in torch._dynamo.list_backends()
    (entry_point,) = entry_points(group="torch_dynamo_backends", name="torchslim")
    assert entry_point.load() is compiler.backend


def test_backend_is_found_without_importing_torchslim():
    code = (
        "import sys, torch\n"
        "fn = torch._dynamo.lookup_backend('torchslim')\n"
        "assert 'torchslim' in sys.modules\n"
        "print(fn.__module__, fn.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torchslim.compiler", "backend"]


@pytest.mark.parametrize("mode", MODES)
def test_fuse_bias_moves_the_add_into_the_op(mode, gen):
    model = _projections(mode)
    x = torch.randn(2, 5, 64, generator=gen)
    with torch.no_grad():
        got = torch.compile(model, backend="torchslim", fullgraph=True)(x)
        want = model(x)
        q = model.q
        if mode == "int4":  # what the rewrite calls
            fused_q = torchslim.ops.int4_weight_only_linear(
                x, q.weight, q.weight_scales, q.weight_zeros, q.group_size, model.q_bias
            )
        else:
            op = {"dynamic": torchslim.ops.int8_dynamic_linear}.get(
                mode, torchslim.ops.int8_weight_only_linear
            )
            fused_q = op(x, q.weight, q.weight_scale, model.q_bias)
    assert compiler.counters == {"fuse_bias": 1}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The fused epilogue rounds once: got's q part equals the op with the bias passed in.
    mixed = fused_q[..., :32] * model.k(x) + model.v(x)
    torch.testing.assert_close(got, mixed.view(2, 5, 4, 8).transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_fuse_siblings_with_frozen_weights(mode, gen):
    model = _projections(mode)
    x = torch.randn(3, 7, 64, generator=gen)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        got = torch.compile(model, backend="torchslim", fullgraph=True)(x)
        want = model(x)
    # q (its bias fused first), k (zeros for its missing bias) and v become one op.
    assert compiler.counters == {"fuse_bias": 1, "fuse_siblings": 2}
    # x is quantized per row either way and each column's dot product is the same: exact
    # for W8A8; W8A16 and W4A16 may differ by an fp32 rounding of the bias add.
    tol = 0 if mode == "dynamic" else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_no_sibling_fusion_without_freezing(gen):
    model = _projections("dynamic")
    with torch.no_grad():
        torch.compile(model, backend="torchslim")(torch.randn(4, 64, generator=gen))
    assert "fuse_siblings" not in compiler.counters


@pytest.mark.parametrize("quant", ["int8", "int8-weight", "int4"])
def test_patched_llama_compiles_once_and_matches_eager(quant, gen, tiny_llama):
    from torch._dynamo.testing import CompileCounterWithBackend

    options = {"group_size": 32} if quant == "int4" else {}
    model = torchslim.patch(tiny_llama, quant=quant, exclude="lm_head", progress=False, **options)
    ids = torch.randint(0, 128, (2, 10), generator=gen)
    counter = CompileCounterWithBackend("torchslim")
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        want = model(input_ids=ids).logits
        got = torch.compile(model, backend=counter, fullgraph=True)(input_ids=ids).logits
    assert counter.frame_count == 1
    # Per layer: q/k/v -> 1 op and gate/up -> 1 op.
    assert compiler.counters["fuse_siblings"] == 2 * (2 + 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"passes": "fuse_bias"}, TypeError, "options\\['passes'\\] must be a list"),
        ({"passes": ["fuse_everything"]}, ValueError, "unknown pass \\['fuse_everything'\\]"),
        ({"no_such_option": 1}, ValueError, "'no_such_option' is neither"),
        ({"freezing": True}, ValueError, "torch._inductor.config.freezing = True"),
    ],
)
def test_bad_options(options, error, match, gen):
    compiled = torch.compile(_projections("dynamic"), backend="torchslim", options=options)
    with pytest.raises(Exception, match=match) as info, torch.no_grad():
        compiled(torch.randn(2, 64, generator=gen))
    # Dynamo wraps a backend's exception (BackendCompilerFailed) and names it in the message.
    assert isinstance(info.value, error) or f"{error.__name__}: " in str(info.value)


def test_passes_can_be_turned_off(gen):
    model = _projections("weight_only")
    x = torch.randn(2, 64, generator=gen)
    with torch.no_grad():
        got = torch.compile(model, backend="torchslim", options={"passes": []})(x)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    assert not compiler.counters


# --------------------------------------------------------------------------- attention
# The pass rewrites only what a torchslim kernel runs: on CPU tensors, the C++ extension's.
needs_cpu_kernel = pytest.mark.skipif(
    torchslim._ext.cpu_available() is not None, reason="the C++ extension is not built"
)


def _explicit(q, k, v, mask):
    """The softmax(q k^T) v spellings the attention pass rewrites."""
    d = q.shape[-1]
    return (
        torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1) @ v,
        (torch.matmul(q, k.transpose(-1, -2)) * 0.125 + mask).softmax(dim=-1) @ v,
        F.softmax(0.2 * (q @ k.mT), dim=-1, dtype=torch.float32).to(q.dtype) @ v,
        torch.softmax(q @ k.transpose(2, 3), -1) @ v,
        # Hugging Face's eager attention: dropout on the weights, not training
        F.dropout(torch.softmax(q @ k.transpose(2, 3) * 0.2 + mask, -1), 0.1, False) @ v,
    )


def _sdpa(q, k, v, mask):
    return (
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask > 0, scale=0.3),
        F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True),
    )


def _post_grad_targets():
    """A post-grad pass (run after torchslim's) that records the graph's call targets."""
    seen = []
    pass_ = lambda graph: seen.extend(n.target for n in graph.nodes)  # noqa: E731
    return seen, torch._inductor.config.patch(post_grad_custom_pre_pass=pass_)


@needs_cpu_kernel
@pytest.mark.parametrize("fn", [_explicit, _sdpa])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_pass_rewrites_to_torchslim(fn, dtype, gen):
    q, k, v = (torch.randn(2, 4, 24, 32, generator=gen).to(dtype) for _ in range(3))
    mask = torch.randn(2, 1, 24, 24, generator=gen).to(dtype)
    seen, recording = _post_grad_targets()
    with torch.no_grad(), recording:
        got = torch.compile(fn, backend="torchslim")(q, k, v, mask)
    want = fn(q, k, v, mask)
    assert compiler.counters["attention"] == len(want)
    ours = [t for t in seen if t is torch.ops.torchslim.attention.default]
    assert len(ours) == len(want)
    assert not [t for t in seen if "scaled_dot_product" in str(t)]
    # The flash rule: against float64, at most 2x the error of eager in the same dtype.
    exact = fn(*(t.double() for t in (q, k, v, mask)))
    for a, b, c in zip(got, exact, want, strict=True):
        check_close(a, b, c)


@needs_cpu_kernel
def test_attention_pass_in_training_graphs(gen):
    q, k, v = (torch.randn(2, 4, 16, 32, generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 1, 16, 16, generator=gen)

    def loss(fn, compiled):
        out = (torch.compile(fn, backend="torchslim") if compiled else fn)(q, k, v, mask)
        return torch.autograd.grad(sum(o.square().sum() for o in out), (q, k, v))

    for fn in (_explicit, _sdpa):
        for got, want in zip(loss(fn, True), loss(fn, False), strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert compiler.counters["attention"] == 8


def test_attention_pass_leaves_what_it_cannot_take(gen):
    q, k, v = (torch.randn(2, 4, 16, 32, generator=gen) for _ in range(3))

    def scores_used_twice(q, k, v):
        scores = q @ k.transpose(-2, -1) * 0.1
        return torch.softmax(scores, dim=-1) @ v, scores

    def dropout_and_fp16(q, k, v):
        return (
            F.scaled_dot_product_attention(q, k, v, dropout_p=0.3),
            F.scaled_dot_product_attention(q.half(), k.half(), v.half()),  # no CPU kernel
            torch.softmax(q.half() @ k.half().transpose(-2, -1), dim=-1) @ v.half(),
        )

    mask = torch.randn(2, 1, 16, 16, generator=gen)

    def more_than_the_op_computes(q, k, v):
        return (
            torch.softmax(torch.add(q @ k.mT, mask, alpha=-2.0), -1) @ v,
            torch.softmax(torch.div(q @ k.mT, 0.5, rounding_mode="floor"), -1) @ v,
        )

    def what_the_op_refuses(q, k, v):
        return (
            torch.softmax(q @ k[:1].mT, -1) @ v[:1],  # a batch that broadcasts
            torch.softmax(q @ k.mT, -1) @ v[:, :1],  # v with other heads than k
            torch.softmax(q[:, :1] @ k[:, :3].mT, -1) @ v[:, :3],  # heads that do not divide
            torch.softmax(q @ k.mT + mask[None], -1) @ v,  # a 5-D mask
            torch.softmax(q @ k.mT, -1).bfloat16() @ v.bfloat16(),  # v in another dtype
            F.dropout(torch.softmax(q @ k.mT, -1), 0.1, True) @ v,  # dropout, training
        )

    with torch.no_grad():
        for fn in (scores_used_twice, more_than_the_op_computes):
            got = torch.compile(fn, backend="torchslim")(q, k, v)
            for a, b in zip(got, fn(q, k, v), strict=True):
                torch.testing.assert_close(a, b)
        for fn in (dropout_and_fp16, what_the_op_refuses):  # random, or no kernel: runs
            torch.compile(fn, backend="torchslim")(q, k, v)
    assert compiler.counters["attention"] == 0


@needs_cpu_kernel
def test_attention_pass_leaves_a_learned_bias_to_pytorch(gen):
    """A mask that needs a gradient (a learned bias): the op gives none, so eager's graph."""
    bias = torch.randn(1, 4, 16, 16, generator=gen, requires_grad=True)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=gen) for _ in range(3))

    def fn(q, k, v):
        return torch.softmax(q @ k.mT * 0.3 + bias, -1) @ v

    (grad,) = torch.autograd.grad(torch.compile(fn, backend="torchslim")(q, k, v).sum(), bias)
    torch.testing.assert_close(grad, torch.autograd.grad(fn(q, k, v).sum(), bias)[0])
    assert compiler.counters["attention"] == 0
