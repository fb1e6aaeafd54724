"""Attention drop-ins: torchslim.nn.functional.scaled_dot_product_attention against PyTorch's
SDPA, and torchslim.nn.MultiheadAttention against nn.MultiheadAttention."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded
from torch import nn

import torchslim
from torchslim.nn import functional as TF
from torchslim.ops import _registry

# (L, S): square, fewer queries than keys (top-left causal cuts keys), more queries than keys.
LENGTHS = ((5, 5), (3, 11), (11, 3), (1, 17))


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each fallback warning logs again in this test."""
    monkeypatch.setattr(_registry, "_warned", set())


def _sdpa_inputs(gen, lead, heads, kv_heads, sq, sk, d=16, dv=12, dtype=torch.float32):
    q = torch.randn(*lead, heads, sq, d, generator=gen)
    k = torch.randn(*lead, kv_heads, sk, d, generator=gen)
    v = torch.randn(*lead, kv_heads, sk, dv, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _mask(kind, gen, lead, heads, sq, sk, dtype):
    if kind == "none":
        return None
    if kind == "bool":
        keep = torch.rand(*lead, heads, sq, sk, generator=gen) > 0.3
        keep[..., 0, :] = False  # a row that sees nothing: zeros in both
        return keep
    return torch.randn(sq, sk, generator=gen).to(dtype)  # broadcast over batch and heads


@pytest.mark.parametrize(("sq", "sk"), LENGTHS)
@pytest.mark.parametrize("heads", [(4, 4, False), (6, 2, True), (4, 1, False)])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_matches_pytorch(sq, sk, heads, mask, dtype):
    """Same results as F.scaled_dot_product_attention, top-left causal and GQA included."""
    h, hkv, gqa = heads
    gen = seeded("sdpa", sq, sk, heads, mask, dtype)
    q, k, v = _sdpa_inputs(gen, (2,), h, hkv, sq, sk, dtype=dtype)
    attn_mask = _mask(mask, gen, (2,), h, sq, sk, dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for causal in (False, True) if attn_mask is None else (False,):
        for scale in (None, 0.3):
            kwargs = {"is_causal": causal, "scale": scale, "enable_gqa": gqa}
            got = TF.scaled_dot_product_attention(q, k, v, attn_mask, **kwargs)
            want = F.scaled_dot_product_attention(q, k, v, attn_mask, **kwargs)
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("lead", [(), (2, 3)])
def test_sdpa_other_ranks(lead, gen):
    """3-D (N, L, E) and 5-D inputs, with a mask broadcast over the leading dims."""
    q, k, v = _sdpa_inputs(gen, lead, 4, 4, 7, 9)
    mask = torch.rand(7, 9, generator=gen) > 0.4
    for kwargs in ({}, {"attn_mask": mask}, {"is_causal": True}):
        got = TF.scaled_dot_product_attention(q, k, v, **kwargs)
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, **kwargs))


@pytest.mark.parametrize("lead", [(), (2, 3)])
def test_sdpa_empty_sequences(lead, gen):
    """No query or no key (an empty dim, whose batch cannot be inferred from -1): PyTorch's
    result, zeros where there is no key."""
    q, k, v = _sdpa_inputs(gen, lead, 4, 4, 7, 9)
    no_heads = (q[..., :0, :, :], k[..., :0, :, :], v[..., :0, :, :])
    for args in ((q[..., :0, :], k, v), (q, k[..., :0, :], v[..., :0, :]), no_heads):
        got = TF.scaled_dot_product_attention(*args)
        torch.testing.assert_close(got, F.scaled_dot_product_attention(*args))


def test_sdpa_gradients_match_pytorch(gen):
    q, k, v = _sdpa_inputs(gen, (2,), 4, 2, 9, 9)
    grad = torch.randn(2, 4, 9, 12, generator=gen)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(fn(*leaves, is_causal=True, enable_gqa=True), leaves, grad)

    for got, want in zip(
        grads(TF.scaled_dot_product_attention), grads(F.scaled_dot_product_attention), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sdpa_mask_with_is_causal_is_an_error(gen):
    q, k, v = _sdpa_inputs(gen, (1,), 2, 2, 3, 3)
    with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal"):
        TF.scaled_dot_product_attention(q, k, v, torch.ones(3, 3, dtype=torch.bool), is_causal=True)


@pytest.mark.parametrize(
    ("why", "call"),
    [
        ("dropout_p > 0", lambda q, k, v: dict(dropout_p=0.5)),
        ("dtypes", lambda q, k, v: dict(query=q.double(), key=k.double(), value=v.double())),
        ("batch dimensions that broadcast", lambda q, k, v: dict(key=k[:1], value=v[:1])),
        ("requires grad", lambda q, k, v: dict(attn_mask=torch.zeros(3, 5, requires_grad=True))),
    ],
)
def test_sdpa_falls_back_to_pytorch_and_says_so(why, call, gen, caplog, fresh_warnings):
    q, k, v = _sdpa_inputs(gen, (2,), 2, 2, 3, 5)
    kwargs = {"query": q, "key": k, "value": v, **call(q, k, v)}
    with caplog.at_level(logging.WARNING, logger="torchslim"):
        torch.manual_seed(0)
        got = TF.scaled_dot_product_attention(**kwargs)
    assert why in caplog.text and "using PyTorch's" in caplog.text
    torch.manual_seed(0)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(**kwargs))


def test_sdpa_errors_are_pytorch_errors(gen):
    """Inputs SDPA rejects are rejected the same way (they go to SDPA)."""
    q, k, v = _sdpa_inputs(gen, (1,), 4, 3, 3, 3)
    for args in ((q, k, v), (q, k[:, :2], v[:, :2, :2])):  # 4 heads against 3; K, V lengths
        with pytest.raises(RuntimeError) as ours:
            TF.scaled_dot_product_attention(*args)
        with pytest.raises(RuntimeError) as theirs:
            F.scaled_dot_product_attention(*args)
        assert str(ours.value) == str(theirs.value)


# --------------------------------------------------------------------------- MultiheadAttention
def _mha_pair(gen, **kwargs):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    theirs = nn.MultiheadAttention(24, 4, **kwargs).eval()
    return theirs, torchslim.nn.MultiheadAttention.from_module(theirs)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # PyTorch's
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layout", ["self", "cross kdim/vdim", "no bias"])
def test_mha_matches_pytorch(batch_first, layout):
    gen = seeded("mha", batch_first, layout)
    kw = {"batch_first": batch_first}
    if layout == "cross kdim/vdim":
        kw.update(kdim=10, vdim=14)
    if layout == "no bias":
        kw["bias"] = False
    theirs, ours = _mha_pair(gen, **kw)
    n, sq, sk = 3, 6, 6 if layout != "cross kdim/vdim" else 9
    x = torch.randn(n, sq, 24, generator=gen)
    key = torch.randn(n, sk, kw.get("kdim", 24), generator=gen)
    value = torch.randn(n, sk, kw.get("vdim", 24), generator=gen)
    if not batch_first:
        x, key, value = (t.transpose(0, 1) for t in (x, key, value))
    if layout == "self":
        key = value = x
    padding = torch.zeros(n, sk, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.ones(sq, sk, dtype=torch.bool).triu(1)
    per_head = torch.randn(n * 4, sq, sk, generator=gen)
    cases = [
        {},
        {"key_padding_mask": padding},
        {"key_padding_mask": padding.float().masked_fill(padding, -1e4)},
        {"attn_mask": causal},
        {"attn_mask": causal, "is_causal": sq == sk},
        {"attn_mask": per_head, "key_padding_mask": padding},
    ]
    for masks in cases:
        want, _ = theirs(x, key, value, need_weights=False, **masks)
        got, weights = ours(x, key, value, need_weights=False, **masks)
        assert weights is None
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=str(list(masks)))


def test_mha_unbatched_and_gradients(gen):
    theirs, ours = _mha_pair(gen, batch_first=True)
    x = torch.randn(5, 24, generator=gen)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x)[0])
    ours.train()
    loss = ours(x, x, x, need_weights=False)[0].square().sum()
    loss.backward()
    assert ours.in_proj_weight is theirs.in_proj_weight  # shared, not copied
    got = ours.in_proj_weight.grad.clone()
    ours.zero_grad()
    theirs.train()(x, x, x, need_weights=False)[0].square().sum().backward()
    torch.testing.assert_close(got, theirs.in_proj_weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("why", "build", "call"),
    [
        ("need_weights=True", {}, {}),
        ("add_bias_kv", {"add_bias_kv": True}, {"need_weights": False}),
        ("add_zero_attn", {"add_zero_attn": True}, {"need_weights": False}),
    ],
)
def test_mha_falls_back_and_says_so(why, build, call, gen, caplog, fresh_warnings):
    theirs, ours = _mha_pair(gen, batch_first=True, **build)
    x = torch.randn(2, 5, 24, generator=gen)
    with caplog.at_level(logging.WARNING, logger="torchslim"):
        got = ours(x, x, x, **call)
    assert why in caplog.text
    want = theirs(x, x, x, **call)
    torch.testing.assert_close(got[0], want[0])
    if call.get("need_weights", True):
        torch.testing.assert_close(got[1], want[1])


def test_mha_causal_hint_needs_a_mask(gen):
    _, ours = _mha_pair(gen, batch_first=True)
    x = torch.randn(2, 5, 24, generator=gen)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(x, x, x, need_weights=False, is_causal=True)
    with pytest.raises(TypeError, match=r"module must be an nn\.MultiheadAttention"):
        torchslim.nn.MultiheadAttention.from_module(nn.Linear(2, 2))


def test_mha_mask_of_a_wrong_shape_names_the_shape(gen):
    _, ours = _mha_pair(gen, batch_first=True)
    x = torch.randn(2, 5, 24, generator=gen)
    cases = [
        ({"attn_mask": torch.zeros(1, 5, 5)}, r"3D attn_mask is \(1, 5, 5\), but should be"),
        ({"attn_mask": torch.zeros(5, 4)}, r"2D attn_mask is \(5, 4\), but should be \(5, 5\)"),
        ({"key_padding_mask": torch.zeros(2, 4, dtype=torch.bool)}, r"\(N, S\) = \(2, 5\)"),
    ]
    for kwargs, match in cases:
        with pytest.raises(RuntimeError, match=match):
            ours(x, x, x, need_weights=False, **kwargs)


def test_mha_state_dict_is_pytorch_s(gen):
    theirs, ours = _mha_pair(gen, batch_first=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    fresh = torchslim.nn.MultiheadAttention(24, 4, batch_first=True)
    fresh.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 24, generator=gen)
    torch.testing.assert_close(fresh.eval()(x, x, x, need_weights=False)[0], theirs(x, x, x)[0])


def test_sdpa_without_a_kernel_uses_pytorch_s(gen, caplog, fresh_warnings):
    """fp16 on the CPU has no torchslim kernel: PyTorch's SDPA, not the reference."""
    q, k, v = _sdpa_inputs(gen, (2,), 4, 2, 5, 7, dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="torchslim"):
        got = TF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert "no kernel" in caplog.text and "reference implementation" not in caplog.text
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want)
