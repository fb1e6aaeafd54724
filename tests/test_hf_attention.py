"""torchslim.attention inside Hugging Face models: attn_implementation="torchslim" against
transformers' own SDPA attention on the same weights."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import torchslim
import torchslim.testing

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def registered():
    torchslim.hf_attention.register()


def _pair(model):
    """(model on SDPA, a copy on torchslim attention)."""
    model.set_attn_implementation("sdpa")
    ours = copy.deepcopy(model)
    ours.set_attn_implementation("torchslim")
    return model, ours


def test_llama_prefill_and_generate_match_sdpa(gen):
    sdpa, ours = _pair(torchslim.testing.tiny_llama())
    ids = torch.randint(0, 128, (2, 13), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, sdpa(ids).logits, rtol=1e-4, atol=1e-5)
        kwargs = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(ids)}
        assert torch.equal(ours.generate(ids, **kwargs), sdpa.generate(ids, **kwargs))


def test_llama_left_padded_batch_matches_sdpa(gen):
    """Batched generation with padding: transformers' mask reaches the kernel as attn_mask."""
    sdpa, ours = _pair(torchslim.testing.tiny_llama())
    ids = torch.randint(1, 128, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :7] = 0, 0  # left padding
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
        assert torch.equal(ours.generate(ids, **kwargs), sdpa.generate(ids, **kwargs))


def test_bert_with_padding_matches_sdpa(gen):
    sdpa, ours = _pair(torchslim.testing.tiny_bert())
    ids = torch.randint(1, 100, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 2:] = 0, 0  # right padding
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).last_hidden_state
        want = sdpa(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


def test_dropout_while_training_uses_sdpa_and_says_so(caplog):
    model = torchslim.testing.tiny_llama()
    model.config.attention_dropout = 0.5
    model.set_attn_implementation("torchslim")
    model.train()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    with caplog.at_level(logging.WARNING, logger="torchslim"):
        model(torch.randint(0, 128, (1, 5)))
    assert "dropout while training" in caplog.text


def _tiny(name: str):
    """Tiny random models whose attention changes the scores: Gemma 2 soft-caps them, GPT-OSS
    adds a learned sink per head (set far from 0, so that dropping it shows)."""
    torch.manual_seed(0)
    shape = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 64, "head_dim": 16,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 64, "sliding_window": 8}  # fmt: skip
    if name == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**shape)).eval()
    config = transformers.GptOssConfig(**shape, num_local_experts=4, num_experts_per_tok=2)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)
    return model


@pytest.mark.parametrize("name", ["gemma2", "gptoss"])
def test_scores_it_cannot_compute_go_to_the_models_eager_attention(name, gen, caplog):
    """Soft-capping and attention sinks go to the model's own eager function, with the
    boolean (or implied causal) mask as its additive mask: the same logits as eager, padded
    batch and cached generation included."""
    if not hasattr(transformers, "GptOssConfig" if name == "gptoss" else "Gemma2Config"):
        pytest.skip(f"this transformers has no {name}")
    eager = _tiny(name)
    eager.set_attn_implementation("eager")
    ours = copy.deepcopy(eager)
    torchslim.patch(ours, attention=True, progress=False)
    ids = torch.randint(1, 128, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="torchslim"):
        torch.testing.assert_close(ours(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-6)
        got = ours(ids, attention_mask=mask).logits[mask.bool()]
        torch.testing.assert_close(got, eager(ids, attention_mask=mask).logits[mask.bool()])
        kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False}
        assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))
    assert "eager attention" in caplog.text


def test_a_query_batch_that_broadcasts_goes_to_sdpa(gen):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torchslim.testing.tiny_llama().model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16, generator=gen)
    k, v = (torch.randn(2, 4, 5, 16, generator=gen) for _ in range(2))
    got, _ = torchslim.hf_attention.attention_forward(module, q, k, v, None)
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(got, want)
