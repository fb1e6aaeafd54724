"""torchslim.aot_compile: a Hugging Face causal LM as two AOTInductor programs over a static KV
cache, against the eager model it came from."""

from __future__ import annotations

import json
import os

import pytest
import torch

import torchslim
import torchslim.testing
from torchslim import compiler
from torchslim.aot import AOTCausalLM, aot_compile

transformers = pytest.importorskip("transformers")
if not hasattr(transformers.StaticCache, "early_initialization"):
    pytest.skip("aot_compile needs transformers >= 5", allow_module_level=True)

MAX_CACHE_LEN = 48


def tiny_llama() -> torch.nn.Module:
    """torchslim.testing's 2-block Llama (grouped KV heads) with int4 linears."""
    model = torchslim.testing.tiny_llama()
    return torchslim.patch(model, quant="int4", group_size=32, progress=False)


@pytest.fixture(scope="module")
def compiled():
    model = tiny_llama().train()  # compiled for inference; left in the mode it was in
    attention = model.config._attn_implementation
    compiler.counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit skips the passes
        lm = aot_compile(model, max_cache_len=MAX_CACHE_LEN, progress=False)
    assert model.config._attn_implementation == attention  # the model is left as it was
    assert model.training
    model.eval()
    # torchslim's passes ran on both programs: per layer, q/k/v -> 1 op and gate/up -> 1 op.
    assert compiler.counters["fuse_siblings"] == 2 * 2 * (2 + 1)
    return model, lm


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (1, length), generator=torch.Generator().manual_seed(seed))


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    # The same kernels in the same order; Inductor may only fuse float ops differently.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_prefill_logits_match_eager(compiled):
    model, lm = compiled
    ids = prompt(11)
    assert_close(lm(ids), model(ids).logits)


@torch.no_grad()
def test_chunked_prefill_and_decode_match_eager(compiled):
    """The cache written by one call is the context of the next, at any position."""
    model, lm = compiled
    ids = prompt(13, seed=2)
    want = model(ids).logits
    got = torch.cat([lm(ids[:, :5], 0), lm(ids[:, 5:9], 5), lm(ids[:, 9:10], 9)], dim=1)
    got = torch.cat([got, *(lm(ids[:, i : i + 1], i) for i in range(10, 13))], dim=1)
    assert_close(got, want)
    # A new prompt starts again at position 0: the stale cache past it is not read.
    assert_close(lm(ids[:, :4], 0), want[:, :4])


@pytest.mark.parametrize("length", [1, 7])
@torch.no_grad()
def test_generate_matches_transformers_greedy(compiled, length):
    model, lm = compiled
    ids = prompt(length, seed=3)
    want = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
    )
    assert lm.eos_token_id == [model.generation_config.eos_token_id]
    assert torch.equal(lm.generate(ids, 20, min_new_tokens=20), want)
    assert torch.equal(lm.generate(ids, 20, eos_token_id=[]), want)  # no end token


@torch.no_grad()
def test_generate_stops_at_end_token(compiled):
    _, lm = compiled
    ids = prompt(5, seed=4)
    free = lm.generate(ids, 12, eos_token_id=[])[0, 5:].tolist()
    stop = free[6]
    first = free.index(stop)  # the first time greedy produces it
    got = lm.generate(ids, 12, eos_token_id=[stop])
    assert got[0, 5:].tolist() == free[: first + 1]
    # Not before min_new_tokens: the end token is not chosen until then.
    later = lm.generate(ids, 12, eos_token_id=stop, min_new_tokens=first + 2)
    assert later.shape[1] > 5 + first + 1 and stop not in later[0, 5 : 5 + first + 2].tolist()


@torch.no_grad()
def test_save_load_round_trip(compiled, tmp_path):
    _, lm = compiled
    lm.save(tmp_path / "lm")
    again = AOTCausalLM.load(tmp_path / "lm")
    assert (again.batch_size, again.max_cache_len) == (1, MAX_CACHE_LEN)
    ids = prompt(9, seed=5)
    assert again.eos_token_id == lm.eos_token_id
    assert torch.equal(again.generate(ids, 10), lm.generate(ids, 10))
    again.save(tmp_path / "lm")  # where it was loaded from: nothing to copy
    assert torch.equal(AOTCausalLM.load(tmp_path / "lm").generate(ids, 10), lm.generate(ids, 10))


def test_load_errors(compiled, tmp_path):
    _, lm = compiled
    with pytest.raises(FileNotFoundError, match=r"torchslim_aot\.json"):
        AOTCausalLM.load(tmp_path)
    lm.save(tmp_path / "lm")
    manifest = tmp_path / "lm" / "torchslim_aot.json"
    good = json.loads(manifest.read_text())
    sizes = {p: (tmp_path / "lm" / f"{p}.pt2").stat().st_size for p in ("prefill", "decode")}
    assert good["bytes"] == sizes
    assert not list((tmp_path / "lm").glob(".*partial"))
    manifest.write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="format="):
        AOTCausalLM.load(tmp_path / "lm")
    manifest.write_text("{not json")
    with pytest.raises(ValueError, match=r"torchslim_aot\.json is not valid JSON"):
        AOTCausalLM.load(tmp_path / "lm")
    manifest.write_text(json.dumps({k: v for k, v in good.items() if k != "kv"}))
    with pytest.raises(ValueError, match=r"lacks \['kv'\]"):
        AOTCausalLM.load(tmp_path / "lm")
    manifest.write_text(json.dumps({**good, "torch": "1.0.0"}))
    with pytest.raises(ValueError, match=r"compiled by torch 1\.0\.0"):
        AOTCausalLM.load(tmp_path / "lm")
    # The two programs swapped by hand: their sizes no longer match the manifest.
    manifest.write_text(json.dumps(good))
    folder = tmp_path / "lm"
    (folder / "prefill.pt2").rename(folder / "tmp.pt2")
    (folder / "decode.pt2").rename(folder / "prefill.pt2")
    (folder / "tmp.pt2").rename(folder / "decode.pt2")
    with pytest.raises(ValueError, match=r"prefill\.pt2 has \d+ bytes, but the manifest recorded"):
        AOTCausalLM.load(folder)


def test_call_errors(compiled):
    _, lm = compiled
    ids = prompt(4)
    with pytest.raises(TypeError, match="input_ids"):
        lm([[1, 2]])
    with pytest.raises(ValueError, match="input_ids must be a 2-D int64"):
        lm(ids[0])
    with pytest.raises(ValueError, match="input_ids must be a 2-D int64"):
        lm(ids.int())
    with pytest.raises(ValueError, match="batch_size=1"):
        lm(ids.expand(2, -1))
    with pytest.raises(ValueError, match="position"):
        lm(ids, -1)
    with pytest.raises(ValueError, match="does not fit the cache"):
        lm(ids, MAX_CACHE_LEN - 3)
    with pytest.raises(ValueError, match="does not fit the cache"):
        lm(ids[:, :0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(ids, MAX_CACHE_LEN)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(ids, 0)
    with pytest.raises(ValueError, match="eos_token_id must be an int or a list"):
        lm.generate(ids, 2, eos_token_id="</s>")
    with pytest.raises(ValueError, match="eos_token_id must be an int or a list of ints >= 0"):
        lm.generate(ids, 2, eos_token_id=[-20])
    with pytest.raises(ValueError, match="input_ids must be on the programs' device cpu"):
        lm(ids.to("meta"))
    for bad in (-1, lm.vocab_size):
        with pytest.raises(ValueError, match=rf"token ids in \[0, 128\), got {bad}"):
            lm(torch.tensor([[1, bad]]))
    lm(ids, 0)  # 4 positions written
    with pytest.raises(ValueError, match="position 6 is past the 4 cache positions written"):
        lm(ids[:, :1], 6)
    lm(ids[:, :1], 4)  # continues the cache
    lm(ids[:, :2], 1)  # rewinds it


@torch.no_grad()
def test_an_end_token_outside_the_vocabulary_is_never_produced(compiled):
    _, lm = compiled
    ids = prompt(5, seed=4)
    free = lm.generate(ids, 6, eos_token_id=[])
    assert torch.equal(lm.generate(ids, 6, eos_token_id=[999], min_new_tokens=3), free)


def test_compile_errors():
    with pytest.raises(TypeError, match="model must be a Hugging Face causal LM"):
        aot_compile(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        aot_compile("model")
    model = tiny_llama()
    for short in (1, 3):
        with pytest.raises(ValueError, match=f"max_cache_len must be >= 4, got {short}"):
            aot_compile(model, max_cache_len=short)
    with pytest.raises(ValueError, match="batch_size"):
        aot_compile(model, batch_size=0)
    with pytest.raises(TypeError, match="passes must be a list"):
        aot_compile(model, passes="fuse_bias")
    config = transformers.MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    windowed = transformers.MistralForCausalLM(config).eval()
    with pytest.raises(NotImplementedError, match="StaticSlidingWindowLayer"):
        aot_compile(windowed, max_cache_len=16)


def test_a_failed_compile_leaves_no_folder_behind(monkeypatch):
    import tempfile

    from torchslim import aot

    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(real(**kw)) or made[-1])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(aot, "_export_and_compile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        aot_compile(tiny_llama(), max_cache_len=8, progress=False)
    assert len(made) == 1 and not os.path.exists(made[0])


@torch.no_grad()
def test_fused_attention_stays_in_the_programs(monkeypatch):
    """A model patched with attention=True is exported with torchslim's attention op, and its
    programs match it, prefill and decode."""
    targets = []
    package = torch._inductor.aoti_compile_and_package

    def recording(program, **kwargs):
        targets.append({str(n.target) for n in program.graph.nodes})
        return package(program, **kwargs)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", recording)
    model = torchslim.patch(tiny_llama(), attention=True, progress=False)
    lm = aot_compile(model, max_cache_len=MAX_CACHE_LEN, progress=False)
    assert model.config._attn_implementation == "torchslim"
    assert len(targets) == 2  # prefill, decode
    for found in targets:
        assert "torchslim.attention.default" in found
        assert not [t for t in found if "scaled_dot_product" in t]
    ids = prompt(9, seed=3)
    want = model(ids).logits
    got = torch.cat([lm(ids[:, :6], 0), *(lm(ids[:, i : i + 1], i) for i in range(6, 9))], dim=1)
    assert_close(got, want)
