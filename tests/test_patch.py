"""torchslim.patch on plain module stacks and Hugging Face models: accuracy, report, filters."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import torchslim
import torchslim.testing
from torchslim.nn import Int4Linear, Int8Linear
from torchslim.testing import sqnr

# int8 per-channel weights on Gaussian data allow ~40 dB per layer (test_nn.py); through a
# stack of layers and nonlinearities the noise adds up, so a few dB less.
MIN_DB = {"int8-weight": 34.0, "int8": 30.0}


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, d: int = 64, n: int = 3, vocab: int = 50) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def _stack(gen) -> Stack:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return Stack().eval()


@pytest.mark.parametrize("quant", ["int8", "int8-weight"])
def test_plain_stack_matches_float(quant, gen):
    model = _stack(gen)
    x = torch.randn(4, 9, 64, generator=gen)
    with torch.no_grad():
        want = model(x)
        patched = torchslim.patch(model, quant=quant, progress=False)
        got = patched(x)
    assert patched is model
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 7
    assert sqnr(want, got) >= MIN_DB[quant]
    report = model.torchslim_report
    assert len(report.replaced) == 7 and not report.kept
    # fp32 weights -> int8 codes + fp32 per-channel scales: a little under 4x smaller.
    assert 3.5 < report.bytes_before() / report.bytes_after() < 4.0
    text = str(report)
    assert "blocks.0.up" in text and "7 replaced, 0 kept" in text


@pytest.mark.parametrize(
    ("kwargs", "kept"),
    [
        ({"exclude": "lm_head"}, {"lm_head"}),  # exact name
        ({"exclude": "blocks.*.down"}, {"blocks.0.down", "blocks.1.down", "blocks.2.down"}),  # glob
        ({"exclude": [r"blocks\.[01]\.up", "lm_head"]}, {"blocks.0.up", "blocks.1.up", "lm_head"}),
        (
            {"include": "blocks.2.*"},
            {"blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "lm_head"},
        ),
        ({"filter_fn": lambda name, m: m.out_features != 50}, {"lm_head"}),
    ],
)
def test_name_filters(kwargs, kept, gen):
    model = torchslim.patch(_stack(gen), quant="int8-weight", progress=False, **kwargs)
    report = model.torchslim_report
    assert {r.name for r in report.kept} == kept
    for name, module in model.named_modules():
        if name in kept:
            assert type(module) is nn.Linear
    assert all(r.reason for r in report.kept)


def test_unmatched_pattern_warns(gen):
    with pytest.warns(UserWarning, match=r"exclude pattern 'decoder\.\*' matches no Linear"):
        torchslim.patch(_stack(gen), quant="int8", exclude="decoder.*", progress=False)


def test_unsupported_layers_are_kept_with_the_reason(gen):
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(8, 8), MyLinear(8, 8))
    torchslim.patch(model, quant="int8", progress=False)
    assert isinstance(model[0], Int8Linear) and type(model[1]) is MyLinear
    (kept,) = model.torchslim_report.kept
    assert kept.name == "1" and "MyLinear subclasses nn.Linear" in kept.reason


def test_shared_layer_is_replaced_everywhere_once():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    torchslim.patch(model, quant="int8-weight", progress=False)
    assert isinstance(model[0], Int8Linear) and model[0] is model[2]


def test_a_shared_layer_kept_under_one_name_is_kept_under_all_and_counted_once():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(8, 8))
    torchslim.patch(model, quant="int8", exclude="2", progress=False)
    assert model[0] is model[2] is shared and isinstance(model[3], Int8Linear)
    report = model.torchslim_report
    rows = {r.name: r for r in report.rows}
    assert rows["0"].reason == "the same module as '2', which is excluded"
    assert rows["2"].alias_of == "0" and "the same module as '0'" in str(report)
    assert report.bytes_before() == 2 * (8 * 8 + 8) * 4  # shared counted once, and layer 3


def test_the_model_itself_and_layers_without_weights_are_kept_with_the_reason():
    model = nn.Linear(8, 8)
    torchslim.patch(model, quant="int8", progress=False)
    (row,) = model.torchslim_report.rows
    assert row.name == "(model)" and "wrap it, e.g. nn.Sequential(model)" in row.reason
    model = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 8), nn.Linear(8, 8))
    torchslim.patch(model, quant="int8", progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear, Int8Linear]
    assert [r.reason.startswith("no weights") for r in model.torchslim_report.kept] == [True] * 2


@pytest.mark.parametrize("sparsity", [None, 0.5])
def test_a_layer_that_fails_is_named_and_the_model_keeps_its_layers(sparsity):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[2].weight[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"layer '2'.* finite"):  # int8 cannot hold a NaN
        torchslim.patch(model, quant="int8-weight", sparsity=sparsity, progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.Linear]


def test_calibration_is_checked_and_empty_batches_are_skipped(gen):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    batch = torch.randn(4, 8, generator=gen)
    with pytest.raises(TypeError, match=r"calibration must be an iterable .* got int"):
        torchslim.patch(model(), quant="int8", calibration=5, progress=False)
    with pytest.raises(TypeError, match=r"calibration must be .* got a Tensor"):
        torchslim.patch(model(), quant="int8", calibration=batch, progress=False)
    nan = batch.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration gave layer '0' an input holding NaN"):
        torchslim.patch(model(), quant="int8", calibration=[nan], progress=False)
    with pytest.raises(ValueError, match="calibration ran no data"):
        torchslim.patch(model(), quant="int8", calibration=[batch[:0]], progress=False)
    with pytest.raises(ValueError, match="layer '0' saw no calibration data"):
        torchslim.patch(
            model(), sparsity=0.5, sparsity_method="wanda", calibration=[batch[:0]], progress=False
        )
    want = torchslim.patch(model(), quant="int8", calibration=[batch], progress=False)
    got = torchslim.patch(model(), quant="int8", calibration=[batch[:0], batch], progress=False)
    assert torch.equal(got[0].smooth, want[0].smooth)


def test_options_that_are_flags_must_be_bools():
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        torchslim.patch(model, "int4", symmetric="yes")
    with pytest.raises(TypeError, match="clip_search must be a bool"):
        torchslim.patch(model, "int4", clip_search=1)
    with pytest.raises(TypeError, match="progress must be a bool"):
        torchslim.patch(model, "int8", progress="no")


def test_sparsity_with_every_layer_excluded_keeps_them_all():
    model = nn.Sequential(nn.Linear(8, 8))
    torchslim.patch(model, sparsity=0.5, exclude="*", progress=False)
    assert type(model[0]) is nn.Linear and model.torchslim_report.kept[0].reason == "excluded"


def test_quant_none_changes_nothing(gen):
    model = _stack(gen)
    torchslim.patch(model, quant=None, progress=False)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert model.torchslim_report.rows == []


def test_bad_input():
    with pytest.raises(ValueError, match="quant must be one of"):
        torchslim.patch(nn.Linear(4, 4), quant="int3")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        torchslim.patch({"w": torch.ones(2)}, quant="int8")
    with pytest.raises(TypeError, match="exclude must be a name pattern"):
        torchslim.patch(nn.Sequential(nn.Linear(4, 4)), quant="int8", exclude=[3])
    with pytest.raises(TypeError, match="filter_fn must be callable"):
        torchslim.patch(nn.Sequential(nn.Linear(4, 4)), quant="int8", filter_fn="yes")


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("quant", ["int8", "int8-weight"])
def test_hf_bert_with_padding(quant, gen):
    model = torchslim.testing.tiny_bert()
    ids = torch.randint(0, 120, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded sequence
    mask[2, 3:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        torchslim.patch(model, quant=quant, progress=False)
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    # 2 layers x (q, k, v, attention output, intermediate, output) + the pooler
    assert len(model.torchslim_report.replaced) == 13
    valid = mask.bool()
    assert sqnr(want[valid], got[valid]) >= MIN_DB[quant]


@pytest.mark.parametrize("quant", ["int8", "int8-weight"])
def test_hf_llama_excluding_lm_head(quant, gen, tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 128, (2, 10), generator=gen)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torchslim.patch(model, quant=quant, exclude="lm_head", progress=False)
        got = model(input_ids=ids).logits
    report = model.torchslim_report
    assert [r.name for r in report.kept] == ["lm_head"]
    assert len(report.replaced) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert type(model.lm_head) is nn.Linear
    assert sqnr(want, got) >= MIN_DB[quant]


def test_calibration_applies_smoothquant_to_w8a8(gen):
    """With activation outlier channels, calibrated W8A8 beats uncalibrated by a wide margin."""
    model = _stack(gen)
    x = torch.randn(4, 9, 64, generator=gen)
    x[..., :3] *= 30  # outlier channels entering blocks.0.up
    calib = [torch.randn(4, 9, 64, generator=gen) * (x.abs().amax((0, 1)) / 3) for _ in range(2)]
    with torch.no_grad():
        want = model(x)
        plain = torchslim.patch(copy.deepcopy(model), quant="int8", progress=False)(x)
        smoothed_model = torchslim.patch(model, quant="int8", calibration=calib, progress=False)
        smoothed = smoothed_model(x)
    assert model.blocks[0].up.smooth is not None
    assert sqnr(want, smoothed) > sqnr(want, plain) + 3.0
    with pytest.raises(TypeError, match="calibration must yield tensors or dicts"):
        torchslim.patch(_stack(gen), quant="int8", calibration=[1, 2], progress=False)


def test_weight_only_ignores_calibration(gen):
    model = torchslim.patch(_stack(gen), quant="int8-weight", calibration=[1], progress=False)
    assert all(m.smooth is None for m in model.modules() if isinstance(m, Int8Linear))


# int4 on Gaussian weights allows ~20 dB per layer at group 32 (test_int4.py), less through a
# stack of layers.
def test_int4_options_and_report(gen):
    model = _stack(gen)
    x = torch.randn(4, 9, 64, generator=gen)
    with torch.no_grad():
        want = model(x)
        torchslim.patch(model, "int4", group_size=32, symmetric=True, progress=False)
        got = model(x)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 7
    assert all(m.group_size == 32 and m.symmetric for m in layers)
    assert sqnr(want, got) >= 14.0
    # 4-bit codes + bf16 scale and zero per 32 weights (fp32 before): about 6.4x smaller
    report = model.torchslim_report
    assert 5.5 < report.bytes_before() / report.bytes_after() < 7.0


def test_int4_keeps_layers_the_group_size_does_not_fit(gen):
    model = nn.Sequential(nn.Linear(96, 64), nn.Linear(64, 33), nn.Linear(33, 8))
    torchslim.patch(model, "int4", group_size=64, progress=False)
    kept = {r.name: r.reason for r in model.torchslim_report.kept}
    assert isinstance(model[1], Int4Linear)
    assert kept == {
        "0": "in_features=96 is not a multiple of group_size=64",
        "2": "in_features=33 is odd (two int4 codes per byte)",
    }


def test_int4_bad_options():
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(TypeError, match=r"unknown options \['group'\]"):
        torchslim.patch(model, "int4", group=32)
    with pytest.raises(TypeError, match="unknown options"):
        torchslim.patch(model, "int8", group_size=32)  # int8 takes no options
    with pytest.raises(ValueError, match=r"group_size must be -1 .*, got 0"):
        torchslim.patch(model, "int4", group_size=0)
    with pytest.raises(TypeError, match="scale_dtype must be one of"):
        torchslim.patch(model, "int4", scale_dtype="bf16")


def test_hf_llama_int4(gen, tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 128, (2, 10), generator=gen)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torchslim.patch(model, "int4", group_size=32, exclude="lm_head", progress=False)
        got = model(input_ids=ids).logits
    assert len(model.torchslim_report.replaced) == 2 * 7
    assert sqnr(want, got) >= 12.0


# --------------------------------------------------------------------------- attention=True
@contextlib.contextmanager
def _no_mha_fastpath():
    """nn.TransformerEncoderLayer's inference fast path bypasses self_attn.forward."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def test_attention_swaps_multihead_attention(gen):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True).eval()
    model = nn.Sequential(layer, nn.Linear(32, 8))
    x = torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad(), _no_mha_fastpath():
        want = model(x)
        torchslim.patch(model, "int8-weight", attention=True, progress=False)
        got = model(x)
    assert type(layer.self_attn) is torchslim.nn.MultiheadAttention
    report = model.torchslim_report
    assert [(r.name, r.after) for r in report.attention] == [
        ("0.self_attn", "torchslim.nn.MultiheadAttention")
    ]
    assert "attention: 1 of 1 on torchslim's kernel" in str(report)
    assert sqnr(want, got) >= MIN_DB["int8-weight"]


def test_attention_alone_is_exact(gen, monkeypatch):
    calls = []
    fused = torchslim.nn.attention.scaled_dot_product_attention
    monkeypatch.setattr(
        torchslim.nn.attention,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append(k) or fused(*a, **k),
    )
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True).eval()
    x = torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad(), _no_mha_fastpath():
        want = layer(x, src_mask=nn.Transformer.generate_square_subsequent_mask(7), is_causal=True)
        torchslim.patch(layer, attention=True, progress=False)
        got = layer(x, src_mask=nn.Transformer.generate_square_subsequent_mask(7), is_causal=True)
    assert type(layer.self_attn) is torchslim.nn.MultiheadAttention
    assert not layer.torchslim_report.rows
    assert calls == [{"is_causal": True}]  # the causal hint reached the kernel
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_hf_llama(gen, tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 128, (2, 10), generator=gen)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torchslim.patch(model, attention=True, progress=False)
        got = model(input_ids=ids).logits
    assert model.config._attn_implementation == "torchslim"
    [row] = model.torchslim_report.attention
    assert (row.before, row.after) == ("sdpa", "torchslim")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_attention_keeps_what_it_cannot_replace(gen):
    class Custom(nn.MultiheadAttention):
        pass

    model = nn.ModuleDict({"custom": Custom(16, 2)})
    torchslim.patch(model, attention=True, progress=False)
    [row] = model.torchslim_report.attention
    assert row.after is None and "subclasses nn.MultiheadAttention" in row.reason
    alone = nn.MultiheadAttention(16, 2)
    torchslim.patch(alone, attention=True, progress=False)
    [row] = alone.torchslim_report.attention
    assert row.after is None and "the model itself" in row.reason
    assert type(alone) is nn.MultiheadAttention


def test_attention_must_be_a_bool():
    with pytest.raises(TypeError, match="attention must be a bool"):
        torchslim.patch(nn.Linear(2, 2), attention="yes")
