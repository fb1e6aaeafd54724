"""Triton fused attention (kernels/attention.py) against torchslim.reference.attention.

Where there is no GPU, runs the kernels under the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1, set by conftest.py before triton is imported; fp16 and fp32 only, as the
interpreter's bf16 tl.dot is wrong) with small tiles (16 keys, 32 query rows), so that short
sequences still cross diagonal, window and kv_lens edges and fully visible blocks; on a GPU
machine it tests the compiled kernels on CUDA tensors, bf16 included. Outputs and gradients
follow the flash-attention rule against the reference in float64.
"""

import math

import pytest
import torch
from conftest import seeded, triton_kernel_modules

from torchslim import reference as ref
from torchslim.testing import check_close

autotune, am = triton_kernel_modules("attention")

DEVICE = "cpu" if autotune.INTERPRET else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
NAN = float("nan")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN, so an unwritten output element fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(NAN) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


# --------------------------------------------------------------------------------- inputs
def _padded(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (B, H, S, D) as a view of a bigger NaN-filled buffer: "pad" puts NaN around every
    dim, "bshd" stores it (B, S, H, D) with NaN between rows; "plain" returns x."""
    if layout == "plain":
        return x
    B, H, S, D = x.shape
    if layout == "pad":
        buf = torch.full((B + 1, H + 1, S + 3, D + 5), NAN, dtype=x.dtype, device=x.device)
        view = buf[1:, :H, 2 : S + 2, 3 : D + 3]
    else:  # "bshd": heads interleaved per token, as a fused QKV projection leaves them
        buf = torch.full((B, S, H, D + 7), NAN, dtype=x.dtype, device=x.device)
        view = buf[..., :D].transpose(1, 2)
    view.copy_(x)
    return view


def _inputs(g, B, H, Hkv, Sq, Sk, D, Dv, dtype, layout="plain"):
    q = torch.randn(B, H, Sq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Sk, Dv, generator=g).to(DEVICE, dtype)
    return tuple(_padded(t, layout) for t in (q, k, v))


def _mask(g, kind, B, H, Sq, Sk):
    """attn_mask of ``kind`` ("bool", "float"), broadcast over some dims, with rows that see
    no key at all (bool False / float -inf everywhere)."""
    if kind is None:
        return None
    if kind == "bool":
        keep = torch.rand(B, 1, Sq, Sk, generator=g) > 0.3
        keep[:, :, Sq // 2] = False  # a row with no visible key
        return keep.to(DEVICE)
    bias = torch.randn(1, H, Sq, Sk, generator=g)
    bias[torch.rand(1, H, Sq, Sk, generator=g) > 0.7] = -math.inf
    bias[:, 0, Sq // 2] = -math.inf
    return bias.to(DEVICE)


def _opts(attn_mask=None, causal=False, scale=None, window=-1, kv_lens=None):
    return {"attn_mask": attn_mask, "causal": causal, "scale": scale, "window": window,
            "kv_lens": kv_lens}  # fmt: skip


def _ref_args(o):
    window = None if o["window"] == -1 else o["window"]
    return (o["attn_mask"], o["causal"], o["scale"], window, o["kv_lens"])


def _check_out(out, q, k, v, o):
    assert out.shape == (*q.shape[:3], v.shape[3]) and out.dtype == q.dtype
    ref64 = ref.attention(q.double(), k.double(), v.double(), *_ref_args(o),
                          compute_dtype=torch.float64)  # fmt: skip
    check_close(out, ref64, ref.attention(q, k, v, *_ref_args(o), compute_dtype=q.dtype))


def _ref_lse(q, k, o):
    """The row logsumexp of the scaled, masked scores in float64 (-inf for empty rows)."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    kk = k.double().repeat_interleave(H // k.shape[1], dim=1)
    scale = 1 / math.sqrt(D) if o["scale"] is None else o["scale"]
    scores = q.double() @ kk.transpose(-1, -2) * scale
    window = None if o["window"] == -1 else o["window"]
    visible = ref.visible_keys(B, Sq, Sk, q.device, causal=o["causal"], window=window,
                               kv_lens=o["kv_lens"])  # fmt: skip
    mask = o["attn_mask"]
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    elif mask is not None:
        scores = scores + mask.double()
    return torch.logsumexp(scores.masked_fill(~visible, -math.inf), dim=-1)


# --------------------------------------------------------------------------------- forward
# (B, H, Hkv, Sq, Sk, D, Dv, options): every head dim class, GQA 1/3/8, Sq = Sk, Sq < Sk,
# Sq > Sk, Sq = 1..16 (the decode kernel, split over the keys), odd lengths, Dv != D.
FWD_CASES = [
    (2, 2, 2, 1, 1, 32, 32, {}),
    (1, 3, 3, 17, 17, 64, 64, {"causal": True}),
    (2, 6, 2, 59, 59, 80, 80, {"causal": True}),
    (1, 8, 1, 17, 59, 96, 96, {"causal": True}),
    (2, 3, 1, 59, 17, 128, 64, {"scale": 4.0}),  # a sharp softmax
    (1, 2, 2, 59, 17, 32, 32, {"causal": True}),  # the first 42 rows see no key
    (1, 2, 2, 59, 59, 32, 48, {"causal": True, "window": 7}),
    (2, 4, 4, 40, 59, 64, 64, {"causal": True, "kv_lens": [0, 41]}),
    (2, 4, 2, 33, 47, 32, 32, {"attn_mask": "bool", "scale": 0.3}),
    (1, 3, 3, 20, 37, 64, 64, {"attn_mask": "float", "causal": True}),
    (1, 1, 1, 17, 33, 256, 256, {"causal": True}),
    # decode kernel
    (2, 8, 1, 1, 111, 64, 64, {}),
    (2, 6, 2, 3, 75, 96, 96, {"causal": True, "kv_lens": [75, 30]}),
    (1, 3, 1, 2, 59, 128, 80, {"causal": True, "window": 20}),
    (3, 4, 4, 1, 59, 32, 32, {"attn_mask": "bool"}),
    (1, 6, 3, 5, 64, 32, 32, {"attn_mask": "float", "kv_lens": [50]}),
    (2, 2, 2, 16, 40, 64, 64, {"causal": True}),
    (1, 24, 8, 16, 33, 32, 32, {}),  # 3 heads x 16 rows: two row blocks per kv head
]


def _build(g, case, dtype, layout="plain"):
    B, H, Hkv, Sq, Sk, D, Dv, raw = case
    q, k, v = _inputs(g, B, H, Hkv, Sq, Sk, D, Dv, dtype, layout)
    o = _opts(**{key: val for key, val in raw.items() if key not in ("attn_mask", "kv_lens")})
    o["attn_mask"] = _mask(g, raw.get("attn_mask"), B, H, Sq, Sk)
    if "kv_lens" in raw:
        o["kv_lens"] = torch.tensor(raw["kv_lens"], dtype=torch.int32, device=DEVICE)
    return q, k, v, o


def _case_id(case):
    B, H, Hkv, Sq, Sk, D, Dv, raw = case
    opts = "-".join(f"{k}={v}" if not isinstance(v, bool) else k for k, v in raw.items())
    return f"{B}x{H}/{Hkv}x{Sq}x{Sk}-d{D}" + (f"-dv{Dv}" if Dv != D else "") + f"-{opts}"


@pytest.mark.parametrize("case", FWD_CASES, ids=[_case_id(c) for c in FWD_CASES])
def test_forward_against_reference(case, poisoned_empty):
    for dtype in DTYPES:
        g = seeded("fwd", case[:7], str(case[7]), str(dtype))
        q, k, v, o = _build(g, case, dtype)
        out, lse = am.attention_forward(q, k, v, **o, return_lse=True)
        _check_out(out, q, k, v, o)
        want = _ref_lse(q, k, o)
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        assert torch.equal(torch.isinf(lse), torch.isinf(want)), "rows with no visible key"
        torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=1e-5)
        # return_lse=False returns the same output
        torch.testing.assert_close(am.attention_forward(q, k, v, **o), out, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["pad", "bshd"])
@pytest.mark.parametrize("Sq", [3, 40])
def test_strided_nan_padded_inputs(layout, Sq, poisoned_empty):
    """q, k, v as views into NaN-filled buffers, and the keys past kv_lens NaN too: a read
    outside the visible keys poisons the output."""
    g = seeded("padded", layout, Sq)
    B, H, Hkv, Sk, D = 2, 4, 2, 50, 80
    for dtype in DTYPES:
        q, k, v = _inputs(g, B, H, Hkv, Sq, Sk, D, D, dtype, layout)
        lens = torch.tensor([50, 23], dtype=torch.int64, device=DEVICE)
        kn, vn = k.clone(), v.clone()
        kn[1, :, 23:] = NAN
        vn[1, :, 23:] = NAN
        kp, vp = _padded(kn, layout), _padded(vn, layout)
        for o in (_opts(causal=True, kv_lens=lens), _opts(kv_lens=lens, scale=0.2)):
            out = am.attention_forward(q, kp, vp, **o)
            _check_out(out, q, k, v, o)
        mask = _mask(g, "float", B, H, Sq, Sk)
        mp = torch.full((B, H, Sq, Sk + 3), NAN, device=DEVICE)[..., :Sk]
        mp.copy_(mask.expand(B, H, Sq, Sk))
        o = _opts(attn_mask=mp, causal=True, window=9, kv_lens=lens)
        _check_out(am.attention_forward(q, kp, vp, **o), q, k, v, o)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_split_kv(splits, monkeypatch, poisoned_empty):
    """The decode kernel with a forced number of key slices (1: output written directly;
    5: more slices than key blocks, so some slices see no key) against the reference."""
    monkeypatch.setattr(am, "decode_splits", lambda programs, Sk, num_sms: splits)
    g = seeded("split", splits)
    for dtype in DTYPES:
        q, k, v = _inputs(g, 2, 6, 2, 2, 40, 64, 64, dtype)
        lens = torch.tensor([40, 9], device=DEVICE)
        keep = _mask(g, "bool", 2, 6, 2, 40)
        for o in (_opts(), _opts(causal=True, kv_lens=lens), _opts(attn_mask=keep)):
            out, lse = am.attention_forward(q, k, v, **o, return_lse=True)
            _check_out(out, q, k, v, o)
            torch.testing.assert_close(lse.double(), _ref_lse(q, k, o), rtol=1e-5, atol=1e-5)


def test_decode_splits_heuristic():
    f, min_keys = am.decode_splits, autotune.ATTN_SPLIT_MIN_KEYS
    assert f(programs=1, Sk=min_keys - 1, num_sms=132) == 1  # too short to split
    assert f(programs=10_000, Sk=1 << 20, num_sms=132) == 1  # enough programs already
    assert f(programs=1, Sk=1 << 20, num_sms=132) == autotune.ATTN_MAX_SPLITS
    many, few = f(programs=8, Sk=8192, num_sms=132), f(programs=64, Sk=8192, num_sms=132)
    assert many >= few > 1
    assert f(programs=1, Sk=3 * min_keys, num_sms=132) == 3  # each slice >= min_keys
    # a batch of 2 against a long cache splits with the real constants too
    assert f(programs=2, Sk=4096, num_sms=132) > 1


def test_rows_with_no_visible_key_are_zero():
    """Zeros (not NaN) and lse = -inf, from the prefill (Sq = 20) and decode (Sq = 2) kernels."""
    g = seeded("empty rows")
    q, k, v = _inputs(g, 2, 2, 2, 20, 24, 32, 32, torch.float32)
    keep = torch.ones(2, 2, 20, 24, dtype=torch.bool, device=DEVICE)
    keep[0, 1, 5] = keep[0, 1, 1] = False
    bias = torch.zeros(2, 2, 20, 24, device=DEVICE)
    bias[1, 0, 7] = bias[1, 0, 0] = -math.inf
    lens = torch.tensor([0, 24], device=DEVICE)
    for Sq in (20, 2):
        for o, rows in (
            (_opts(attn_mask=keep[:, :, :Sq]), [(0, 1, 5), (0, 1, 1)]),
            (_opts(attn_mask=bias[:, :, :Sq]), [(1, 0, 7), (1, 0, 0)]),
            (_opts(kv_lens=lens, causal=True), [(0,)]),
        ):
            out, lse = am.attention_forward(q[:, :, :Sq], k, v, **o, return_lse=True)
            assert torch.isfinite(out).all()
            for r in rows:
                if len(r) < 3 or r[2] < Sq:
                    assert (out[r] == 0).all() and (lse[r] == -math.inf).all(), (Sq, r)
    # causal with more queries than keys: the first rows see nothing
    out = am.attention_forward(q, k[:, :, :3], v[:, :, :3], causal=True)
    assert (out[:, :, :17] == 0).all() and (out[:, :, 17:] != 0).all()
    out = am.attention_forward(q[:, :, :5], k[:, :, :3], v[:, :, :3], causal=True)
    assert (out[:, :, :2] == 0).all() and (out[:, :, 2:] != 0).all()


def test_empty_sizes():
    g = seeded("empty")
    q, k, v = _inputs(g, 2, 2, 1, 5, 0, 32, 16, torch.float32)
    out, lse = am.attention_forward(q, k, v, return_lse=True)
    assert out.shape == (2, 2, 5, 16) and (out == 0).all() and (lse == -math.inf).all()
    q, k, v = _inputs(g, 2, 2, 1, 0, 7, 32, 16, torch.float32)
    assert am.attention_forward(q, k, v).shape == (2, 2, 0, 16)
    dq, dk, dv = am.attention_backward(torch.empty(2, 2, 0, 16, device=DEVICE), q, k, v,
                                       torch.empty(2, 2, 0, 16, device=DEVICE),
                                       torch.empty(2, 2, 0, device=DEVICE))  # fmt: skip
    assert dq.shape == q.shape and (dk == 0).all() and (dv == 0).all() and dv.shape == v.shape


def test_rejects_bad_input():
    q = torch.randn(1, 4, 8, 32, device=DEVICE)
    k = torch.randn(1, 2, 9, 32, device=DEVICE)
    v = torch.randn(1, 2, 9, 16, device=DEVICE)
    f = am.attention_forward
    with pytest.raises(ValueError, match="q must be 4-D"):
        f(q[0], k, v)
    with pytest.raises(TypeError, match="q must be"):
        f(q.to(torch.int32), k, v)
    with pytest.raises(TypeError, match="k must be"):
        f(q, k.half(), v)
    with pytest.raises(ValueError, match="k must be"):
        f(q, k[..., :16], v)
    with pytest.raises(ValueError, match="v must be"):
        f(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="k's heads"):
        f(q, torch.randn(1, 3, 9, 32, device=DEVICE), torch.randn(1, 3, 9, 16, device=DEVICE))
    with pytest.raises(ValueError, match="q must have a head dim"):
        big = torch.randn(1, 1, 2, 320, device=DEVICE)
        f(big, big, big)
    with pytest.raises(ValueError, match="attn_mask must broadcast"):
        f(q, k, v, attn_mask=torch.ones(1, 4, 8, 8, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="attn_mask must be bool or floating"):
        f(q, k, v, attn_mask=torch.ones(8, 9, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="causal must be a bool"):
        f(q, k, v, causal=1)
    with pytest.raises(ValueError, match="scale must be"):
        f(q, k, v, scale=math.inf)
    with pytest.raises(ValueError, match="window must be"):
        f(q, k, v, causal=True, window=0)
    with pytest.raises(ValueError, match="needs causal"):
        f(q, k, v, window=4)
    with pytest.raises(ValueError, match="kv_lens must be"):
        f(q, k, v, kv_lens=torch.tensor([3, 4], device=DEVICE))
    with pytest.raises(TypeError, match="kv_lens must be"):
        f(q, k, v, kv_lens=torch.tensor([3.0], device=DEVICE))
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="k must be on the same device"):
            f(q, k.cpu(), v)
    out, lse = f(q, k, v, return_lse=True)
    b = am.attention_backward
    with pytest.raises(ValueError, match="grad_out must be"):
        b(out[..., :8], q, k, v, out, lse)
    with pytest.raises(TypeError, match="out must be"):
        b(out, q, k, v, out.double(), lse)
    with pytest.raises(TypeError, match="lse must be"):
        b(out, q, k, v, out, lse.half())
    with pytest.raises(ValueError, match="lse must be"):
        b(out, q, k, v, out, lse[..., :3])


def test_prune_and_tables():
    """Every table has the three head-dim classes; the prune clamps the tiles to the sizes
    and keeps at least one config; the class picks by the wider head dim."""
    assert autotune.attention_head_class(32, 16) == 64
    assert autotune.attention_head_class(64, 128) == 128
    assert autotune.attention_head_class(256, 64) == 256
    for name in ("fwd", "decode", "bwd_kv", "bwd_q"):
        for cls in autotune.ATTN_HEAD_CLASSES:
            table = autotune.GPU_TABLES[f"attn_{name}_{cls}"]
            args = {"q_ptr": torch.empty(0, dtype=torch.float16), "BLOCK_D": cls,
                    "BLOCK_DV": cls, "SQ_BUCKET": 16, "SK_BUCKET": 32, "BLOCK_M": 16}  # fmt: skip
            kept = autotune.prune_attention_configs(table, args, kind=name)
            assert kept
            for cfg in kept:
                assert cfg.kwargs.get("BLOCK_M", 16) == 16 and cfg.kwargs["BLOCK_N"] <= 32


# --------------------------------------------------------------------------------- backward
def _ref_grads(q, k, v, do, o, compute_dtype):
    """torch.autograd.grad of the reference. A row that a float mask leaves with no visible
    key (-inf at every key the row could see) gives NaN gradients in the reference (0 * inf in
    its softmax); its true gradient is zero, so it gets a zero mask row and a zero output
    gradient, which contribute nothing."""
    mask = o["attn_mask"]
    if mask is not None and mask.is_floating_point():
        B, _, Sq, _ = q.shape
        window = None if o["window"] == -1 else o["window"]
        visible = ref.visible_keys(B, Sq, k.shape[2], q.device, causal=o["causal"],
                                   window=window, kv_lens=o["kv_lens"])  # fmt: skip
        empty = ~(visible & ~torch.isneginf(mask)).any(-1, keepdim=True)
        mask = mask.masked_fill(empty, 0.0)
        do = do.masked_fill(empty, 0.0)
    args = (mask, *_ref_args(o)[1:])
    xs = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    out = ref.attention(*xs, *args, compute_dtype=compute_dtype)
    return torch.autograd.grad(out, xs, do.to(compute_dtype))


def _check_grads(grads, q, k, v, do, o):
    g64 = _ref_grads(q, k, v, do, o, torch.float64)
    glp = _ref_grads(q, k, v, do, o, q.dtype)
    for name, got, want, lowp, x in zip(("dq", "dk", "dv"), grads, g64, glp, (q, k, v),
                                        strict=True):  # fmt: skip
        assert got.dtype == x.dtype and got.shape == x.shape, name
        check_close(got, want, lowp, name=name)


BWD_CASES = [
    (1, 2, 2, 59, 59, 32, 32, {}),
    (2, 6, 2, 40, 40, 64, 64, {"causal": True}),
    (1, 8, 1, 17, 59, 80, 48, {"causal": True}),
    (2, 3, 3, 17, 40, 32, 32, {"causal": True, "window": 9, "kv_lens": [0, 33]}),
    (2, 4, 2, 20, 33, 96, 96, {"attn_mask": "bool"}),
    (1, 3, 3, 20, 37, 64, 64, {"attn_mask": "float", "causal": True}),
    (2, 4, 1, 1, 50, 32, 32, {"kv_lens": [50, 7]}),
]


@pytest.mark.parametrize("case", BWD_CASES, ids=[_case_id(c) for c in BWD_CASES])
def test_backward_against_reference(case, poisoned_empty):
    for dtype in DTYPES:
        g = seeded("bwd", case[:7], str(case[7]), str(dtype))
        q, k, v, o = _build(g, case, dtype)
        out, lse = am.attention_forward(q, k, v, **o, return_lse=True)
        do = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
        _check_grads(am.attention_backward(do, q, k, v, out, lse, **o), q, k, v, do, o)


def test_backward_strided_nan_padded(poisoned_empty):
    """All inputs of the backward as views into NaN buffers, keys past kv_lens NaN: dk and dv
    of those keys are zero, and nothing reads outside the views."""
    g = seeded("bwd padded")
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 33, 40, 64
    for dtype in DTYPES:
        q, k, v = _inputs(g, B, H, Hkv, Sq, Sk, D, D, dtype, "bshd")
        lens = torch.tensor([40, 18], device=DEVICE)
        kn, vn = k.clone(), v.clone()
        kn[1, :, 18:] = NAN
        vn[1, :, 18:] = NAN
        kp, vp = _padded(kn, "pad"), _padded(vn, "pad")
        o = _opts(causal=True, kv_lens=lens)
        out, lse = am.attention_forward(q, kp, vp, **o, return_lse=True)
        do = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
        grads = am.attention_backward(_padded(do, "bshd"), q, kp, vp, _padded(out, "pad"),
                                      lse, **o)  # fmt: skip
        assert (grads[1][1, :, 18:] == 0).all() and (grads[2][1, :, 18:] == 0).all()
        _check_grads(grads, q, k, v, do, o)


# --------------------------------------------------------------------------------- GPU only
_GPU_CONFIGS = [
    (name, cls, i)
    for name in ("fwd", "decode", "bwd_kv", "bwd_q")
    for cls in autotune.ATTN_HEAD_CLASSES
    for i in range(len(autotune.GPU_TABLES[f"attn_{name}_{cls}"]))
]


@pytest.mark.skipif(DEVICE != "cuda", reason="the GPU tables compile for a GPU only")
@pytest.mark.parametrize("name, cls, index", _GPU_CONFIGS,
                         ids=[f"{n}-{c}-{i}" for n, c, i in _GPU_CONFIGS])  # fmt: skip
def test_every_gpu_config(name, cls, index, monkeypatch, poisoned_empty):
    """Each config on lengths that are multiples of no tile, causal with kv_lens (every kind
    of key block): whatever autotuning picks must be correct."""
    kernel, tables, tuned = am._KERNELS[name]
    cfg = autotune.GPU_TABLES[f"attn_{name}_{cls}"][index]
    monkeypatch.setitem(am._KERNELS, name, (kernel, {**tables, cls: [cfg]}, tuned))
    D = {64: 64, 128: 96, 256: 256}[cls]
    Sq = 3 if name == "decode" else 300
    dtype = (torch.float16, torch.bfloat16)[index % 2]
    g = seeded("config", name, cls, index)
    q, k, v = _inputs(g, 2, 4, 2, Sq, 333, D, D, dtype)
    o = _opts(causal=True, kv_lens=torch.tensor([333, 170], device=DEVICE))
    out, lse = am.attention_forward(q, k, v, **o, return_lse=True)
    _check_out(out, q, k, v, o)
    if name.startswith("bwd"):
        do = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
        _check_grads(am.attention_backward(do, q, k, v, out, lse, **o), q, k, v, do, o)


# --------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_on_the_triton_backend_with_autograd(dtype):
    """torch.ops.torchslim.attention on the Triton backend (strict: no fallback), forward and
    the Triton backward through autograd, against float64 autograd through the reference."""
    import torchslim

    g = seeded("op", dtype)
    q, k, v = _inputs(g, 2, 6, 2, 20, 37, 32, 24, dtype)
    keep = (torch.rand(2, 1, 20, 37, generator=g) > 0.2).to(DEVICE)
    grad = torch.randn(2, 6, 20, 24, generator=g).to(DEVICE, dtype)
    for opts in ({"causal": True}, {"attn_mask": keep}, {"causal": True, "window": 9}):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with torchslim.backend("triton", strict=True):
            out = torchslim.attention(*leaves, **opts)
            grads = torch.autograd.grad(out, leaves, grad)
        args = (opts.get("attn_mask"), opts.get("causal", False), None, opts.get("window"))
        exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
        out64 = ref.attention(*exact, *args, compute_dtype=torch.float64)
        grads64 = torch.autograd.grad(out64, exact, grad.double())
        check_close(out, out64, ref.attention(q, k, v, *args, compute_dtype=dtype))
        low = ref.attention_backward(grad, q, k, v, *args, compute_dtype=dtype)
        for got, want, same_dtype in zip(grads, grads64, low, strict=True):
            check_close(got, want, same_dtype)
