"""patch(model, sparsity=...): prune, compress into SparseLinear, save and load."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import seeded

import torchslim
from torchslim import sparse
from torchslim.nn import SparseLinear
from torchslim.quant.int8 import dequantize_weight, quantize_weight_per_channel


def _batches(n: int, g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(n)]


def _check_against(model, reference, ids, tmp_path) -> None:
    """Every SparseLinear holds its reference layer's weight, the logits match, and a save and
    load gives the same logits."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            assert torch.equal(module.dense_weight(), reference.get_submodule(name).weight)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    torchslim.save(model, tmp_path)
    fresh = torchslim.load(torchslim.testing.tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    ("amount", "method"), [("2:4", "wanda"), (0.75, "magnitude"), (0.95, "magnitude")]
)
def test_patch_prunes_and_compresses_a_hugging_face_model(tiny_llama, amount, method, tmp_path):
    g = seeded("patch-sparse", amount)
    calibration = _batches(2, g) if method == "wanda" else None
    reference = copy.deepcopy(tiny_llama)
    pattern = "2:4" if amount == "2:4" else "unstructured"
    sparse.prune_(
        reference,
        pattern,
        sparsity=None if amount == "2:4" else amount,
        method=method,
        calibration=calibration,
        exclude="lm_head",
        progress=False,
    )
    model = torchslim.patch(
        tiny_llama,
        sparsity=amount,
        sparsity_method=method,
        calibration=calibration,
        exclude="lm_head",
        progress=False,
    )
    report = model.torchslim_report
    assert len(report.replaced) == 2 * 7 and report.bytes_after() < report.bytes_before()
    assert [r.name for r in report.kept] == ["lm_head"]
    _check_against(model, reference, _batches(1, g)[0], tmp_path)  # the weights prune_ gives


def test_a_head_tied_to_the_embeddings_is_kept_and_the_embeddings_are_not_pruned():
    model = torchslim.testing.tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embeddings = model.model.embed_tokens.weight.detach().clone()
    torchslim.patch(model, sparsity=0.5, progress=False)
    report = model.torchslim_report
    assert [r.name for r in report.kept] == ["lm_head"]
    assert "'model.embed_tokens.weight', which pruning would change too" in report.kept[0].reason
    assert len(report.replaced) == 2 * 7
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_quant_sparse_takes_a_pruned_model_and_refuses_an_unpruned_one():
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"2\.weight does not satisfy the 2:4 pattern"):
        torchslim.patch(copy.deepcopy(model), quant="sparse", include="2", progress=False)
    sparse.prune_(model, "2:4", progress=False)
    torchslim.patch(model, quant="sparse", dtype=torch.bfloat16, progress=False)
    assert isinstance(model[0], SparseLinear) and model[0].values.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["csr", "sliced"])
def test_the_format_is_an_option_and_survives_save_and_load(tmp_path, fmt):
    model = torch.nn.Sequential(torch.nn.Linear(300, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    torchslim.patch(model, sparsity=0.5, format=fmt, progress=False)
    assert [m.format for m in model if isinstance(m, SparseLinear)] == [fmt, fmt]
    torchslim.save(model, tmp_path)
    fresh = torch.nn.Sequential(torch.nn.Linear(300, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    torchslim.load(fresh, tmp_path)
    x = torch.randn(20, 300, generator=seeded("csr-save"))
    with torch.no_grad():
        assert fresh[0].format == fmt and torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="format must be None or one of"):
        torchslim.patch(torch.nn.Linear(8, 8), sparsity=0.5, format="coo", progress=False)


def _block_mlp() -> torch.nn.Sequential:
    """A two-layer MLP whose widths are whole 16x16 blocks, the same weights on every call."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))


def test_block_sparsity_patches_block_layers_that_survive_save_and_load(tmp_path):
    model = _block_mlp()
    torchslim.patch(model, sparsity=0.75, pattern="16x16", progress=False)
    layers = [m for m in model if isinstance(m, SparseLinear)]
    assert [(m.format, m.block) for m in layers] == [("block", (16, 16))] * 2
    assert all(abs(m.sparsity - 0.75) < 0.1 for m in layers)
    torchslim.save(model, tmp_path)
    fresh = _block_mlp()
    torchslim.load(fresh, tmp_path)
    x = torch.randn(5, 96, generator=seeded("block-save"))
    with torch.no_grad():
        assert fresh[0].block == (16, 16) and torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="pattern must be one of"):
        torchslim.patch(_block_mlp(), "sparse", pattern="16x0", progress=False)


def test_block_sparsity_with_int8_is_block_w8a8(tmp_path):
    model = _block_mlp()
    reference = _block_mlp()
    sparse.prune_(reference, "16x16", sparsity=0.75, progress=False)
    torchslim.patch(model, "int8", sparsity=0.75, pattern="16x16", progress=False)
    layers = [m for m in model if isinstance(m, SparseLinear)]
    assert [(m.format, m.block, m.mode) for m in layers] == [("block", (16, 16), "dynamic")] * 2
    x = torch.randn(5, 96, generator=seeded("block-w8a8"))
    with torch.no_grad():
        codes, scales = quantize_weight_per_channel(reference[0].weight.detach())
        # the first layer: the dense W8A8 op on its pruned codes, to the bit
        expected = torchslim.reference.int8_dynamic_linear(x, codes, scales, reference[0].bias)
        assert torch.equal(model[0](x), expected)
        assert torchslim.testing.sqnr(reference(x), model(x)) > 25.0
    torchslim.save(model, tmp_path)
    fresh = _block_mlp()
    torchslim.load(fresh, tmp_path)
    with torch.no_grad():
        assert fresh[0].mode == "dynamic" and torch.equal(fresh(x), model(x))


def test_sparsity_arguments_are_checked():
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    weight = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="does not combine with quant='int4'"):
        torchslim.patch(model, "int4", sparsity="2:4")
    with pytest.raises(ValueError, match=r"mode='dynamic' \(W8A8\) takes int8 values .*'csr'"):
        torchslim.patch(model, "int8", sparsity=0.5, format="csr")
    with pytest.raises(ValueError, match="mode='weight_only' contradicts quant='int8'"):
        torchslim.patch(model, "int8", sparsity=0.5, mode="weight_only")
    with pytest.raises(ValueError, match="mode='dynamic' contradicts quant='int8-weight'"):
        torchslim.patch(model, "int8-weight", sparsity=0.5, mode="dynamic")
    with pytest.raises(ValueError, match="mode must be one of"):
        torchslim.patch(model, sparsity=0.5, mode="w8a8")
    with pytest.raises(ValueError, match=r"mode='dynamic' \(W8A8\) takes int8 values"):
        torchslim.patch(model, sparsity=0.5, mode="dynamic")  # float values
    with pytest.raises(ValueError, match="sparsity must be '2:4' or a float"):
        torchslim.patch(model, sparsity="3:4")
    with pytest.raises(ValueError, match="contradicts sparsity"):
        torchslim.patch(model, sparsity=0.5, pattern="2:4")
    with pytest.raises(ValueError, match="sparsity must be in"):
        torchslim.patch(model, sparsity=1.5, progress=False)
    with pytest.raises(ValueError, match="calibration"):
        torchslim.patch(model, sparsity="2:4", sparsity_method="wanda", progress=False)
    assert type(model[0]) is torch.nn.Linear  # nothing changed, nothing pruned
    assert torch.equal(model[0].weight, weight)


def test_sparsity_with_int8_weight_stores_int8_codes(tiny_llama, tmp_path):
    g = seeded("patch-sparse-int8")
    reference = copy.deepcopy(tiny_llama)
    sparse.prune_(reference, "2:4", exclude="lm_head", progress=False)
    for name, module in reference.named_modules():  # the W8A16 rule on the pruned weights
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            codes, scales = quantize_weight_per_channel(module.weight.detach())
            with torch.no_grad():
                module.weight.copy_(dequantize_weight(codes, scales))
    model = torchslim.patch(
        tiny_llama, "int8-weight", sparsity="2:4", exclude="lm_head", progress=False
    )
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 2 * 7 and all(m.values.dtype == torch.int8 for m in layers)
    _check_against(model, reference, _batches(1, g)[0], tmp_path)
    with pytest.raises(ValueError, match="contradicts quant='int8-weight'"):
        torchslim.patch(model, "int8-weight", sparsity=0.5, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not combine with quant='int4'"):
        torchslim.patch(model, "int4", sparsity=0.5)


# 90%: sliced, the W8A8 format with the fewer bytes there; 2:4 keeps its own format
@pytest.mark.parametrize(("sparsity", "fmt"), [(0.9, "sliced"), ("2:4", "2:4")])
def test_sparsity_with_int8_is_w8a8_on_the_codes(tiny_llama, tmp_path, sparsity, fmt):
    g = seeded("patch-sparse-w8a8", str(sparsity))
    reference = copy.deepcopy(tiny_llama)
    pattern, amount = ("2:4", None) if sparsity == "2:4" else ("unstructured", sparsity)
    sparse.prune_(reference, pattern, sparsity=amount, exclude="lm_head", progress=False)
    model = torchslim.patch(
        tiny_llama, "int8", sparsity=sparsity, exclude="lm_head", progress=False
    )
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 2 * 7
    assert all(m.format == fmt and m.mode == "dynamic" for m in layers)
    ids = _batches(1, g)[0]
    for name, module in model.named_modules():  # each layer: the dense W8A8 op on its codes
        if isinstance(module, SparseLinear):
            pruned = reference.get_submodule(name)
            codes, scales = quantize_weight_per_channel(pruned.weight.detach())
            assert torch.equal(module.dense_weight(), dequantize_weight(codes, scales))
    with torch.no_grad():
        logits, expected = model(ids).logits, reference(ids).logits
    assert torchslim.testing.sqnr(expected, logits) > 20.0  # int8 weights and tokens
    torchslim.save(model, tmp_path)
    fresh = torchslim.load(torchslim.testing.tiny_llama(), tmp_path)
    assert all(m.mode == "dynamic" for m in fresh.modules() if isinstance(m, SparseLinear))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits)
