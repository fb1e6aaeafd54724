"""torchslim.save / torchslim.load: bit-identical round trips, meta-device models, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchslim
from torchslim.nn import Int4Linear, Int8Linear


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.Linear(48, 10))
    return model.eval()


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("quant", ["int8", "int8-weight", "int4"])
def test_round_trip_is_bit_identical(quant, tmp_path, gen):
    options = {"group_size": 32, "scale_dtype": torch.float16} if quant == "int4" else {}
    model = torchslim.patch(_model(), quant=quant, exclude="3", progress=False, **options)
    torchslim.save(model, tmp_path)
    recipe = json.loads((tmp_path / "torchslim.json").read_text())
    assert set(recipe["layers"]) == {"0", "2"}
    assert recipe["layers"]["0"]["method"] == quant

    fresh = torchslim.load(_model(seed=1), tmp_path)  # other float weights: all overwritten
    assert isinstance(fresh[0], Int4Linear if quant == "int4" else Int8Linear)
    assert type(fresh[3]) is nn.Linear
    _assert_same_state(model, fresh)
    x = torch.randn(5, 32, generator=gen)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_smoothquant_layers_round_trip(tmp_path, gen):
    linear = _model()[0]
    layer = Int8Linear.from_linear(linear, smooth=torch.rand(32, generator=gen) + 0.5)
    model = nn.Sequential(layer)
    torchslim.save(model, tmp_path)
    fresh = torchslim.load(nn.Sequential(nn.Linear(32, 64)), tmp_path)
    _assert_same_state(model, fresh)


def test_load_onto_meta_device_model(tmp_path, gen):
    model = torchslim.patch(_model(), quant="int8-weight", progress=False)
    torchslim.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = _model()
    fresh = torchslim.load(skeleton, tmp_path)
    assert not any(t.is_meta for t in [*fresh.parameters(), *fresh.buffers()])
    _assert_same_state(model, fresh)
    x = torch.randn(3, 32, generator=gen)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_tied_weights_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    torchslim.patch(model, quant="int8", exclude="lm_head", progress=False)
    torchslim.save(model, tmp_path)
    torch.manual_seed(1)
    fresh = torchslim.load(transformers.LlamaForCausalLM(config).eval(), tmp_path)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    _assert_same_state(model, fresh)


def test_errors_name_the_problem(tmp_path):
    model = torchslim.patch(_model(), quant="int8", progress=False)
    torchslim.save(model, tmp_path)
    with pytest.raises(ValueError, match="recipe names layer '2', which the model does not have"):
        torchslim.load(nn.Sequential(nn.Linear(32, 64)), tmp_path)
    wrong = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 40), nn.Linear(48, 10))
    with pytest.raises(ValueError, match=r"layer '2'.*out=40.*out=48"):
        torchslim.load(wrong, tmp_path)
    not_linear = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.ReLU(), nn.Linear(48, 10))
    with pytest.raises(ValueError, match="layer '2' must be a Linear"):
        torchslim.load(not_linear, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not found: was it written by torchslim\.save"):
        torchslim.load(_model(), tmp_path / "nowhere")
    recipe = json.loads((tmp_path / "torchslim.json").read_text())
    recipe["version"] = 99
    (tmp_path / "torchslim.json").write_text(json.dumps(recipe))
    with pytest.raises(ValueError, match="version=1"):
        torchslim.load(_model(), tmp_path)
    with pytest.raises(TypeError, match="model must be"):
        torchslim.save("model", tmp_path)
