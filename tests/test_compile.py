"""torchslim ops under torch.compile: one graph, no graph break, no recompile per layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.nn import Int4Linear, Int8Linear

MODES = ["dynamic", "weight_only", "int4", "int4-tc"]


def _model(mode: str, gen: torch.Generator) -> nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    widths = (64, 128, 128, 64) if mode == "int4-tc" else (64, 96, 96, 48)  # tc: N % 64 == 0
    layers = [nn.Linear(widths[0], widths[1]), nn.GELU(), nn.Linear(widths[1], widths[2])]
    model = nn.Sequential(*layers, nn.GELU(), nn.Linear(widths[2], widths[3]))
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            if mode == "int4":
                model[i] = Int4Linear.from_linear(layer, group_size=32)
            elif mode == "int4-tc":
                model[i] = Int4Linear.from_linear(layer, group_size=32).repack("tc")
            else:
                model[i] = Int8Linear.from_linear(layer, mode=mode)
    return model.eval()


@pytest.mark.parametrize("mode", MODES)
def test_whole_model_is_one_graph(mode, gen):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _model(mode, gen)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(5, 64, generator=gen)
    with torch.no_grad():
        want = model(x)
        got = compiled(x)
        compiled(torch.randn(5, 64, generator=gen))  # same shapes: no recompile
    assert counter.frame_count == 1
    assert counter.op_count > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_inductor_matches_eager(mode, gen):
    torch._dynamo.reset()
    model = _model(mode, gen)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 7, 64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("drop_in", ["functional", "multihead", "multihead-fallback"])
def test_attention_drop_ins_are_one_graph(drop_in, gen):
    """The SDPA drop-in and torchslim.nn.MultiheadAttention trace without a graph break, the
    choice of backend included (and a fallback, need_weights=True, with its log left to eager
    calls)."""
    from torch._dynamo.testing import CompileCounter

    import torchslim

    torch._dynamo.reset()
    if drop_in == "functional":
        q, k, v = (torch.randn(2, 4, 6, 8, generator=gen) for _ in range(3))
        args = (q, k, v)

        def fn(q, k, v):
            return torchslim.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    else:
        x = torch.randn(2, 5, 16, generator=gen)
        args = (x, x, x)
        mha = torchslim.nn.MultiheadAttention(16, 2, batch_first=True).eval()
        need_weights = drop_in == "multihead-fallback"

        def fn(q, k, v):
            return mha(q, k, v, need_weights=need_weights)[0]

    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    with torch.no_grad():  # nn's path may take other kernels when traced: rounding
        torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
