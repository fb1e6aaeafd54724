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
