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


def _snapshot(model: nn.Module) -> tuple[list, dict]:
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, snapshot: tuple[list, dict]) -> None:
    types, state = snapshot
    assert [type(m) for m in model.modules()] == types
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def _rewrite(path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "torchslim"})


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        # the weights: a float tensor of the wrong shape, after the layers that load fine
        (
            lambda d: _rewrite(
                d / "model.safetensors", lambda s: s.update({"3.bias": s["3.bias"][:5]})
            ),
            r"model\.safetensors: 3\.bias has shape \(5,\), the model's \(10,\)",
        ),
        # a patched layer's codes in another dtype (refused by the layer itself)
        (
            lambda d: _rewrite(
                d / "model.safetensors", lambda s: s.update({"2.weight": s["2.weight"].float()})
            ),
            r"model\.safetensors: layer '2': .*2?weight must hold torch\.int8 codes",
        ),
        # a patched layer's tensor missing, and a tensor the model lacks
        (
            lambda d: _rewrite(d / "model.safetensors", lambda s: s.pop("2.weight_scale")),
            r"model\.safetensors: layer '2': .*Missing key.*weight_scale",
        ),
        (
            lambda d: _rewrite(
                d / "model.safetensors", lambda s: s.update({"9.weight": torch.ones(1)})
            ),
            r"model\.safetensors has tensors the model lacks: \['9\.weight'\]",
        ),
        # a file that is not safetensors, and recipes that are not what save writes
        (
            lambda d: (d / "model.safetensors").write_bytes(b"not safetensors"),
            r"model\.safetensors is not a readable safetensors file",
        ),
        (
            lambda d: _edit_recipe(d, lambda r: r["layers"]["2"]["config"].pop("mode")),
            r"torchslim\.json: layer '2': the config lacks 'mode'",
        ),
        (
            lambda d: _edit_recipe(d, lambda r: r.update({"layers": ["0"]})),
            r"torchslim\.json: 'layers' must be an object, got list",
        ),
        (
            lambda d: _edit_recipe(
                d, lambda r: r["layers"].update({"7": {"method": "int8", "config": {}}})
            ),
            r"torchslim\.json: the recipe names layer '7', which the model does not have",
        ),
    ],
)
def test_a_failed_load_names_the_file_and_leaves_the_model_unchanged(tmp_path, damage, match):
    model = torchslim.patch(_model(), quant="int8", exclude="3", progress=False)
    torchslim.save(model, tmp_path)
    damage(tmp_path)
    fresh = _model(seed=1)
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        torchslim.load(fresh, tmp_path)
    _assert_unchanged(fresh, before)


def _edit_recipe(directory, edit) -> None:
    recipe = json.loads((directory / "torchslim.json").read_text())
    edit(recipe)
    (directory / "torchslim.json").write_text(json.dumps(recipe))
