"""Fused attention: the reference's semantics against PyTorch's SDPA, the op and its checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_BACKENDS, run_on, seeded

import torchslim
from torchslim import _ext
from torchslim import reference as ref
from torchslim.testing import check_close

CPU_BACKENDS = [b for b in KERNEL_BACKENDS if b.startswith("cpu")]
# (Sq, Sk): decode, square, query shorter than the keys (cache), longer than a key tile.
SEQS = ((1, 1), (17, 17), (59, 59), (1, 111), (17, 111), (111, 111), (3, 1025), (40, 1025))
HEAD_DIMS = (32, 64, 80, 96, 128, 256)
GQA = (1, 3, 8)
OPTIONS = ("plain", "causal", "bool mask, empty rows", "additive mask + causal", "window + lens")


def _qkv(b, h, hkv, sq, sk, d, gen, dtype=torch.float32, dv=None):
    q = torch.randn(b, h, sq, d, generator=gen)
    k = torch.randn(b, hkv, sk, d, generator=gen)
    v = torch.randn(b, hkv, sk, dv or d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _bottom_right(sq, sk, window=None):
    """The causal mask aligned bottom-right, spelled out for SDPA."""
    position = torch.arange(sq).reshape(sq, 1) + sk - sq
    keys = torch.arange(sk)
    mask = keys <= position
    if window is not None:
        mask &= keys > position - window
    return mask


# --------------------------------------------------------------------------- reference
@pytest.mark.parametrize(("sq", "sk"), [(1, 1), (5, 5), (17, 17), (1, 59), (7, 59)])
@pytest.mark.parametrize("hkv", [6, 2, 1])
def test_reference_is_sdpa(sq, sk, hkv, gen):
    """Plain, causal (bottom-right), GQA and scaled: PyTorch's SDPA with the same mask."""
    q, k, v = _qkv(2, 6, hkv, sq, sk, 32, gen)
    gqa = hkv != 6
    torch.testing.assert_close(
        ref.attention(q, k, v), F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    )
    mask = _bottom_right(sq, sk)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=0.3)
    torch.testing.assert_close(ref.attention(q, k, v, causal=True, scale=0.3), want)
    if sq == sk:  # top-left and bottom-right alignment agree
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        torch.testing.assert_close(ref.attention(q, k, v, causal=True), want)


def test_reference_masks_and_value_dim(gen):
    q, k, v = _qkv(2, 4, 4, 9, 13, 16, gen, dv=24)
    keep = torch.rand(2, 1, 9, 13, generator=gen) > 0.3
    keep[..., 0] = True  # SDPA gives NaN for rows with no key; those are tested below
    torch.testing.assert_close(
        ref.attention(q, k, v, attn_mask=keep),
        F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
    )
    bias = torch.randn(1, 4, 9, 13, generator=gen)
    torch.testing.assert_close(
        ref.attention(q, k, v, attn_mask=bias),
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
    )
    assert ref.attention(q, k, v).shape == (2, 4, 9, 24)


def test_reference_window(gen):
    q, k, v = _qkv(1, 2, 2, 6, 20, 16, gen)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=_bottom_right(6, 20, window=4))
    torch.testing.assert_close(ref.attention(q, k, v, causal=True, window=4), want)


def test_reference_kv_lens_is_each_sequence_alone(gen):
    """A right-padded batch: sequence b is its first kv_lens[b] keys, causal at its own end."""
    q, k, v = _qkv(3, 4, 2, 3, 10, 16, gen)
    lens = torch.tensor([10, 4, 7])
    out = ref.attention(q, k, v, causal=True, kv_lens=lens)
    for b, n in enumerate(lens.tolist()):
        alone = ref.attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], causal=True)
        torch.testing.assert_close(out[b : b + 1], alone)


def test_rows_with_no_visible_key_are_zero(gen):
    q, k, v = _qkv(2, 2, 2, 4, 6, 8, gen)
    keep = torch.ones(2, 2, 4, 6, dtype=torch.bool)
    keep[0, 1, 2] = False
    out = ref.attention(q, k, v, attn_mask=keep)
    assert torch.isfinite(out).all() and (out[0, 1, 2] == 0).all()
    assert out[0, 1, 1].abs().sum() > 0
    bias = torch.zeros(2, 2, 4, 6)
    bias[1, 0, 3] = -math.inf
    out = ref.attention(q, k, v, attn_mask=bias)
    assert torch.isfinite(out).all() and (out[1, 0, 3] == 0).all()
    out = ref.attention(q, k, v, kv_lens=torch.tensor([0, 6]))
    assert (out[0] == 0).all() and torch.isfinite(out).all()
    # causal with more queries than keys: the first rows see nothing
    out = ref.attention(q, k[:, :, :2], v[:, :, :2], causal=True)
    assert (out[:, :, :2] == 0).all() and (out[:, :, 2:] != 0).any()


# --------------------------------------------------------------------------- the op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_matches_the_reference_by_the_flash_rule(dtype, gen):
    q, k, v = _qkv(2, 6, 2, 17, 59, 64, gen, dtype)
    keep = torch.rand(2, 1, 17, 59, generator=gen) > 0.2
    for kwargs in ({}, {"causal": True}, {"attn_mask": keep}, {"causal": True, "window": 8}):
        out = torchslim.attention(q, k, v, **kwargs)
        assert out.dtype == dtype and out.shape == (2, 6, 17, 64)
        window = kwargs.get("window")
        args = (kwargs.get("attn_mask"), kwargs.get("causal", False), None, window)
        ref64 = ref.attention(
            q.double(), k.double(), v.double(), *args, compute_dtype=torch.float64
        )
        check_close(out, ref64, ref.attention(q, k, v, *args, compute_dtype=dtype))


def test_op_compiles_without_graph_breaks(gen):
    q, k, v = _qkv(1, 4, 2, 5, 9, 16, gen)

    def fn(q, k, v):
        return torchslim.attention(q, k, v, causal=True).relu()

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend, gen):
    with run_on(backend):
        _opcheck_forward(gen)


def _opcheck_forward(gen):
    q, k, v = _qkv(2, 4, 2, 3, 7, 16, gen)
    keep = torch.rand(2, 1, 3, 7, generator=gen) > 0.2
    for args in (
        (q, k, v),
        (q, k, v, keep, True, 0.5, 3, torch.tensor([7, 5])),
        (q, k, v, torch.randn(3, 7, generator=gen), False, None, -1, None),
    ):
        torch.library.opcheck(torch.ops.torchslim.attention.default, args)


def test_strict_cpu_without_a_kernel_raises(gen):
    q, k, v = _qkv(1, 2, 2, 3, 3, 8, gen, torch.float16)
    with (
        torchslim.backend("cpu", strict=True),
        pytest.raises(torchslim.BackendUnavailableError, match="cpu"),
    ):
        torchslim.attention(q, k, v)


# --------------------------------------------------------------------------- kernels
def _nan_padded(x: torch.Tensor) -> torch.Tensor:
    """x as a view into a NaN-filled buffer padded along the sequence and the head dim, so a
    kernel that reads outside the rows it was given, or assumes contiguous rows, fails."""
    b, h, s, d = x.shape
    buf = torch.full((b, h, s + 2, d + 5), math.nan, dtype=x.dtype)
    view = buf[:, :, 1 : s + 1, 2 : d + 2]
    view.copy_(x)
    return view


def _kernel_cases():
    cases = []
    for backend in CPU_BACKENDS:
        full = backend == CPU_BACKENDS[0]
        for n, (sq, sk) in enumerate(SEQS if full else SEQS[::3]):
            for m, d in enumerate(HEAD_DIMS):  # every head dim on every level
                t = n + m
                cases.append((backend, sq, sk, d, GQA[t % 3], OPTIONS[t % len(OPTIONS)]))
    return cases


def _options(option, b, h, sq, sk, gen):
    if option == "plain":
        return {}
    if option == "causal":
        return {"causal": True}
    if option == "bool mask, empty rows":
        keep = torch.rand(b, h, sq, sk, generator=gen) > 0.3
        keep[:, 0, sq // 2] = False  # a row that sees no key
        return {"attn_mask": keep}
    if option == "additive mask + causal":
        return {"attn_mask": torch.randn(1, 1, sq, sk, generator=gen), "causal": True}
    lens = torch.randint(0, sk + 1, (b,), generator=gen)
    lens[0] = sk
    return {"causal": True, "window": 7, "kv_lens": lens}


@pytest.mark.parametrize(("backend", "sq", "sk", "d", "gqa", "option"), _kernel_cases())
def test_kernel_meets_the_flash_rule(backend, sq, sk, d, gqa, option, poisoned_empty):
    """Against the float64 reference, at most 2x the error of PyTorch computing the same in
    the same dtype; NaN-padded inputs; strict backend (no fallback)."""
    gen = seeded(backend, sq, sk, d, gqa, option)
    hkv = 2 if gqa < 8 else 1
    h = hkv * gqa
    opts = _options(option, 2, h, sq, sk, gen)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (_nan_padded(t) for t in _qkv(2, h, hkv, sq, sk, d, gen, dtype))
        with run_on(backend):
            out = torchslim.attention(q, k, v, **opts)
        args = (
            opts.get("attn_mask"),
            opts.get("causal", False),
            None,
            opts.get("window"),
            opts.get("kv_lens"),
        )
        ref64 = ref.attention(
            q.double(), k.double(), v.double(), *args, compute_dtype=torch.float64
        )
        check_close(out, ref64, ref.attention(q, k, v, *args, compute_dtype=dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_fp32_error_at_a_long_head_dim(backend):
    """d = 256 over 1025 keys in fp32: the scores' dot products must not sum along d in one
    chain (that erred 4x the reference's error on these inputs, past the flash rule)."""
    gen = seeded("cpu-avx512", 40, 1025, 256, 1, "bool mask, empty rows")
    opts = _options("bool mask, empty rows", 2, 2, 40, 1025, gen)
    q, k, v = _qkv(2, 2, 2, 40, 1025, 256, gen)
    with run_on(backend):
        out = torchslim.attention(q, k, v, **opts)
    mask = opts["attn_mask"]
    ref64 = ref.attention(q.double(), k.double(), v.double(), mask, compute_dtype=torch.float64)
    check_close(out, ref64, ref.attention(q, k, v, mask, compute_dtype=torch.float32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_value_dim_scale_threads_and_empty(backend, gen):
    q, k, v = _qkv(2, 4, 2, 9, 70, 64, gen, dv=24)
    threads = torch.get_num_threads()
    with run_on(backend):
        out = torchslim.attention(q, k, v, causal=True, scale=0.2)
        try:
            torch.set_num_threads(1)
            one = torchslim.attention(q, k, v, causal=True, scale=0.2)
        finally:
            torch.set_num_threads(threads)
        nothing = torchslim.attention(q, k, v, kv_lens=torch.tensor([0, 0]))
        empty = torchslim.attention(q[:, :, :0], k, v)
    torch.testing.assert_close(out, ref.attention(q, k, v, causal=True, scale=0.2))
    assert torch.equal(out, one)
    assert (nothing == 0).all()
    assert empty.shape == (2, 4, 0, 24)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_kernel_without_keys_gives_zeros(backend, dtype, gen):
    # Sk = 0: every row is a row with no visible key. 3 threads and 2 key/value heads take the
    # tile kernel's wave schedule at Sq = 130 (its items of 128 rows too), which once divided
    # by the size of an empty head.
    q, k, v = _qkv(1, 4, 2, 130, 0, 64, gen, dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with run_on(backend):
            out = torchslim.attention(q, k, v)
            causal = torchslim.attention(q[:, :, :5], k, v, causal=True)
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (1, 4, 130, 64) and causal.shape == (1, 4, 5, 64)
    assert (out == 0).all() and (causal == 0).all()
    assert (ref.attention(q, k, v) == 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(("sq", "sk"), [(1, 300), (70, 70)])  # split-KV decode, prefill
def test_a_nan_spreads_as_in_sdpa(backend, sq, sk):
    """A NaN in q's row gives that row NaN (even with no visible key); one in a key or a value
    the rows see spreads over them; the other rows are untouched: where SDPA gives NaN, the op
    and the reference give NaN, never zeros, and a row that sees no key gives zeros unless its
    own q holds a NaN."""
    g = seeded("nan", backend, sq, sk)
    dtypes = (torch.float32,) if backend == "triton" else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        for which in ("q", "k", "v"):
            q, k, v = _qkv(1, 2, 2, sq, sk, 32, g, dtype)
            row = min(3, (sq if which == "q" else sk) - 1)
            {"q": q, "k": k, "v": v}[which][0, 0, row, 5] = float("nan")
            mask = torch.ones(sq, sk, dtype=torch.bool)
            mask[-1] = False  # the last row sees no key: zeros, or NaN where its q holds a NaN
            with run_on(backend):
                out = torchslim.attention(q, k, v)
                masked = torchslim.attention(q, k, v, attn_mask=mask)
            want = F.scaled_dot_product_attention(q, k, v).isnan()
            assert want.any(), which
            assert torch.equal(out.isnan(), want), (dtype, which)
            assert torch.equal(ref.attention(q, k, v).isnan(), want), (dtype, which)
            if which == "v":  # (the reference's matmul takes 0 * NaN from keys a row cannot see)
                continue
            expected = ref.attention(q, k, v, attn_mask=mask)
            assert torch.equal(masked.isnan(), expected.isnan()), (dtype, which)
            last = expected[0, 0, -1]
            assert last.isnan().all() if which == "q" and sq == 1 else (last == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_kernel_masks_of_the_lowest_finite_value(backend, dtype):
    """Hugging Face masks with finfo(dtype).min, finite: a row whose keys are all at that value
    averages v (its scores are equal), as the reference does; with -inf it would see no key.
    16 rows and D = 32: the bf16 kernel's items, where the mask is scaled to log2 units."""
    g = seeded("finfo-min", backend, dtype)
    q, k, v = _qkv(1, 1, 1, 16, 32, 32, g, dtype)
    for fill in (torch.finfo(torch.bfloat16).min, torch.finfo(torch.float32).min, -1e38):
        mask = torch.zeros(1, 1, 16, 32, dtype=dtype)
        mask[..., 3, :] = fill  # row 3: every key at fill
        mask[..., 5, 7:] = fill  # row 5: keys from 7 at fill
        with run_on(backend):
            out = torchslim.attention(q, k, v, attn_mask=mask)
        f64 = [t.double() for t in (q, k, v, mask)]
        ref64 = ref.attention(*f64[:3], f64[3], compute_dtype=torch.float64)
        check_close(out, ref64, ref.attention(q, k, v, mask), name=f"fill={fill}")


def _bad_inputs():
    q = torch.randn(2, 4, 3, 8)
    k = torch.randn(2, 2, 5, 8)
    v = torch.randn(2, 2, 5, 8)
    a = torchslim.attention
    return [
        ("3-D q", lambda: a(q[0], k, v), ValueError, "q must be 4-D"),
        ("int q", lambda: a(q.int(), k, v), TypeError, "q must be float32"),
        ("mixed dtypes", lambda: a(q, k.half(), v), TypeError, "k and v must have q's dtype"),
        ("batch", lambda: a(q, k[:1], v[:1]), ValueError, "one batch size"),
        ("head dim", lambda: a(q, k[..., :4], v), ValueError, "k must have q's head_dim"),
        ("v length", lambda: a(q, k, v[:, :, :4]), ValueError, "v must have k's heads"),
        ("heads", lambda: a(torch.randn(2, 3, 3, 8), k, v), ValueError, "must divide q's heads"),
        ("mask shape", lambda: a(q, k, v, attn_mask=torch.ones(3, 4, dtype=torch.bool)),
         ValueError, "attn_mask must broadcast"),
        ("mask dtype", lambda: a(q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.int32)),
         TypeError, "attn_mask must be bool or floating"),
        ("window without causal", lambda: a(q, k, v, window=2), ValueError, "needs causal"),
        ("window 0", lambda: a(q, k, v, causal=True, window=0), ValueError, "window must be"),
        ("scale", lambda: a(q, k, v, scale=math.nan), ValueError, "scale must be"),
        ("causal", lambda: a(q, k, v, causal=1), TypeError, "causal must be a bool"),
        ("kv_lens dtype", lambda: a(q, k, v, kv_lens=torch.tensor([1.0, 2.0])),
         TypeError, "kv_lens must be int32"),
        ("kv_lens shape", lambda: a(q, k, v, kv_lens=torch.tensor([1])), ValueError,
         r"kv_lens must have shape \(B,\)"),
        ("kv_lens values", lambda: a(q, k, v, kv_lens=torch.tensor([1, 6])), ValueError,
         r"kv_lens must be in \[0, Sk=5\]"),
        ("not a tensor", lambda: a(q, k, [1.0]), TypeError, "v must be a torch.Tensor"),
    ]  # fmt: skip


@pytest.mark.parametrize(("what", "call", "exc", "match"), _bad_inputs(), ids=lambda v: None)
def test_bad_input_names_the_argument(what, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("sq", "heads"), [(1, 1), (4, 1), (16, 1), (1, 4), (5, 4)])
def test_kernel_split_kv_decode(backend, sq, heads):
    """Few queries against a long cache (one k/v head, 1 or 4 query heads sharing it): the keys
    are split across threads and the partial softmax results merged, including splits that
    see no key (window, kv_lens)."""
    gen = seeded(backend, sq, heads)
    q, k, v = (_nan_padded(t) for t in _qkv(2, heads, 1, sq, 2100, 64, gen))
    lens = torch.tensor([2100, 0])
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        for opts in ({}, {"causal": True, "window": 7}, {"causal": True, "kv_lens": lens}):
            with run_on(backend):
                out = torchslim.attention(q, k, v, **opts)
            args = (None, opts.get("causal", False), None, opts.get("window"), opts.get("kv_lens"))
            ref64 = ref.attention(
                q.double(), k.double(), v.double(), *args, compute_dtype=torch.float64
            )
            check_close(out, ref64, ref.attention(q, k, v, *args, compute_dtype=dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [2**62, 2**63 - 1])
def test_kernel_window_past_any_position_is_no_window(backend, window):
    """A window as large as an int64 holds (sys.maxsize as "no limit") with queries at negative
    positions (more queries than keys, kv_lens shorter than the queries): no overflow."""
    gen = seeded("huge-window", backend, window)
    q, k, v = _qkv(2, 2, 1, 10, 5, 64, gen)
    lens = torch.tensor([5, 3])
    for extra in ({}, {"kv_lens": lens}):
        with run_on(backend):
            out = torchslim.attention(q, k, v, causal=True, window=window, **extra)
        args = (None, True, None, window, extra.get("kv_lens"))
        ref64 = ref.attention(q.double(), k.double(), v.double(), *args)
        check_close(out, ref64, ref.attention(q, k, v, *args))
        without = ref.attention(
            q.double(), k.double(), v.double(), None, True, None, None, extra.get("kv_lens")
        )
        assert torch.equal(ref64, without) and ref64.abs().sum() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("slope", (0.05, 0.3, 1.5))
@pytest.mark.parametrize("through", ("scores", "mask"))
def test_kernel_scores_that_rise_along_the_keys(backend, slope, through):
    """Scores that grow by `slope` a key (a 64-key tile's max past the last one's by 4.6 to 140
    log2 units): each row's reference point moves, and what it has summed is rescaled, again
    and again along the row; the rise made by q . k (the unmasked path) or by an additive mask.
    Rows of 4 query heads to a key/value head, causal or not; the few-row (decode) path too.
    q and k hold multiples of 1/4 and the scale is 1/8, so every score is exact in fp32 and the
    comparison sees the online softmax alone, not the order of the dot products' sums."""
    gen = seeded(backend, slope, through)
    sk = 300
    ramp = torch.round(4 * slope * (torch.arange(sk) - sk / 2)) / 4
    for dtype in (torch.float32, torch.bfloat16):
        for sq, causal in ((70, False), (70, True), (1, False)):
            q, k, v = _qkv(1, 8, 2, sq, sk, 64, gen)
            q, k = torch.round(2 * q) / 4, torch.round(2 * k) / 4
            mask = None
            if through == "scores":  # q[.., 0] = 8 and k[j, 0] = ramp_j: s_j = ramp_j + ...
                q[..., 0] = 8.0
                k[..., 0] = ramp
            else:
                mask = ramp.expand(sq, sk)
            q, k, v = (_nan_padded(t.to(dtype)) for t in (q, k, v))
            with run_on(backend):
                out = torchslim.attention(q, k, v, attn_mask=mask, causal=causal, scale=0.125)
            args = (mask, causal, 0.125)
            ref64 = ref.attention(
                q.double(), k.double(), v.double(), *args, compute_dtype=torch.float64
            )
            check_close(out, ref64, ref.attention(q, k, v, *args, compute_dtype=dtype))


# (B, H, Hkv, Sq, Sk, D, Dv, options): blocks of 16 query rows on bf16 pairs (the AMX level's
# tiles; bf16 on VDPBF16PS at the avx512 level on a CPU with AVX512_BF16)
# (an odd number of them, a last item of 6 rows that stays on AVX-512, query heads of a GQA
# group as one item's rows), key blocks cut by the sequence's end, a causal window and kv_lens
# inside a block, a mask strided along the keys, a negative scale, split-KV with 16 rows,
# items of 128 rows (fp32's, and bf16's at Dv <= 64: Sq = 200), fp32's of 256 (Sq = 300);
# each with at least 128 query rows per key/value head, so that fp32 takes the tiles too. On 1
# thread every key/value head is a thread's task (packed, then its items run, by one thread),
# on 2 threads the cases with 2 or 4 heads are (two tasks at once); on 3 threads none of these
# cases' 1, 2 or 4 heads shares out evenly, so all threads pack a wave of heads and share its
# items (attention_head_tasks).
TILE_CASES = [
    (1, 6, 2, 48, 48, 64, 64, {}),
    (1, 2, 1, 70, 70, 32, 96, {"causal": True}),
    (2, 16, 2, 16, 300, 128, 64, {"window": 100, "lens": True}),
    (1, 4, 2, 65, 130, 64, 64, {"strided mask": True, "causal": True}),
    (1, 8, 2, 33, 200, 256, 256, {"scale": -0.3}),
    (2, 8, 1, 16, 2100, 64, 64, {"causal": True}),
    (1, 2, 1, 200, 260, 64, 64, {"strided mask": True, "causal": True}),
    (1, 2, 2, 300, 330, 32, 64, {"causal": True, "window": 90}),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("threads", (1, 2, 3))
@pytest.mark.parametrize(("b", "h", "hkv", "sq", "sk", "d", "dv", "opt"), TILE_CASES)
def test_kernel_tile_blocks(backend, threads, b, h, hkv, sq, sk, d, dv, opt):
    with run_on(backend):
        paths = _ext._C.cpu_kernel_paths()
    if backend == "cpu-amx":
        assert paths["attention_tiles_from_rows"] == 16
        assert sq * h // hkv >= paths["attention_fp32_tiles_from_rows_per_kv_head"]
    elif backend == "cpu-avx512" and _ext._C.cpu_features()["avx512bf16"]:
        assert paths["attention_tiles_from_rows"] == 16  # bf16 on VDPBF16PS
        assert paths["attention_fp32_tiles_from_rows_per_kv_head"] is None  # fp32 on FMAs
    gen = seeded(backend, b, h, hkv, sq, sk, d, dv, *opt)
    mask = torch.randn(sk, sq, generator=gen).T if "strided mask" in opt else None
    lens = torch.randint(sk // 2, sk + 1, (b,), generator=gen) if "lens" in opt else None
    causal, window, scale = "causal" in opt or "window" in opt, opt.get("window"), opt.get("scale")
    args = (mask, causal, scale, window, lens)
    for dtype in (torch.bfloat16, torch.float32):  # fp32: three bf16 parts an operand on tiles
        q, k, v = (_nan_padded(t) for t in _qkv(b, h, hkv, sq, sk, d, gen, dtype, dv))
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            with run_on(backend):
                out = torchslim.attention(
                    q, k, v, attn_mask=mask, causal=causal, scale=scale, window=window, kv_lens=lens
                )
        finally:
            torch.set_num_threads(before)
        ref64 = ref.attention(
            q.double(), k.double(), v.double(), *args, compute_dtype=torch.float64
        )
        check_close(out, ref64, ref.attention(q, k, v, *args, compute_dtype=dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_rows_without_keys_after_a_nan_output(backend, gen):
    """Rows that see no key (causal, kv_lens < Sq: whole groups of 32 rows among them) are
    zeros, even when the thread's buffers last held NaN outputs."""
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = _qkv(1, 2, 2, 200, 260, 64, gen, dtype)
        poisoned = v.clone()
        poisoned[:, :, 0] = math.nan  # every row sees key 0: every output row is NaN
        lens = torch.tensor([100])
        with run_on(backend):
            assert torchslim.attention(q, k, poisoned).isnan().all()
            out = torchslim.attention(q, k, v, causal=True, kv_lens=lens)
        args = (None, True, None, None, lens)
        ref64 = ref.attention(
            q.double(), k.double(), v.double(), *args, compute_dtype=torch.float64
        )
        assert (out[:, :, :100] == 0).all()
        check_close(out, ref64, ref.attention(q, k, v, *args, compute_dtype=dtype))


# --------------------------------------------------------------------------- autograd
GRAD_OPTIONS = ("plain", "causal", "bool mask, empty rows", "additive mask + causal")


@pytest.mark.parametrize("option", [*GRAD_OPTIONS, "window + lens"])
@pytest.mark.parametrize(("sq", "sk", "hkv"), [(5, 5, 4), (3, 9, 2), (9, 4, 1)])
def test_gradcheck(option, sq, sk, hkv):
    """float64 (the reference's path): the backward against finite differences of the forward,
    GQA included (the key/value gradients sum over the query heads of a group)."""
    gen = seeded("gradcheck", option, sq, sk, hkv)
    q, k, v = _qkv(2, 4, hkv, sq, sk, 6, gen, torch.float64, dv=5)
    opts = _options(option, 2, 4, sq, sk, gen)
    if "attn_mask" in opts and opts["attn_mask"].is_floating_point():
        opts["attn_mask"] = opts["attn_mask"].double()
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *a: torchslim.attention(*a, **opts), inputs)


def test_backward_op_opcheck(gen):
    q, k, v = _qkv(2, 4, 2, 3, 7, 16, gen)
    out = torchslim.attention(q, k, v)
    grad = torch.randn(out.shape, generator=gen)
    keep = torch.rand(2, 1, 3, 7, generator=gen) > 0.2
    strided = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v)]
    for extra in ((), (keep, True, 0.5, 3, torch.tensor([7, 5]))):
        args = (grad, q, k, v, out, *extra)
        torch.library.opcheck(torch.ops.torchslim.attention_backward.default, args)
        args = (grad, *strided, out, *extra)  # non-contiguous inputs, contiguous gradients
        torch.library.opcheck(torch.ops.torchslim.attention_backward.default, args)
    # And the forward op's autograd registration, with inputs that require grad.
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.torchslim.attention.default, (*inputs, keep, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("option", GRAD_OPTIONS)
def test_training_step_gradients_meet_the_flash_rule(dtype, option):
    """The gradients a training step gets (kernel forward, recomputing backward) against
    float64 autograd through the reference, by the flash rule. The low-precision yardstick is
    autograd through the reference forward in ``dtype``, not the backward formula under test
    (which on the CPU is the reference's own recompute)."""
    gen = seeded("grads", dtype, option)
    q, k, v = _qkv(2, 6, 2, 17, 40, 32, gen, dtype)
    opts = _options(option, 2, 6, 17, 40, gen)
    grad = torch.randn(2, 6, 17, 32, generator=gen).to(dtype)

    def grads(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        return torch.autograd.grad(fn(*leaves), leaves, grad.to(leaves[0].dtype))

    mask, causal = opts.get("attn_mask"), opts.get("causal", False)
    ours = grads(lambda *a: torchslim.attention(*a, **opts), (q, k, v))
    want = grads(
        lambda *a: ref.attention(*a, mask, causal, compute_dtype=torch.float64),
        [t.double() for t in (q, k, v)],
    )
    same_dtype = grads(lambda *a: ref.attention(*a, mask, causal, compute_dtype=dtype), (q, k, v))
    for name, got, exp, low in zip("qkv", ours, want, same_dtype, strict=True):
        assert got.dtype == dtype, name
        check_close(got, exp, low)


def test_mask_that_requires_grad_is_refused(gen):
    q, k, v = _qkv(1, 2, 2, 3, 4, 8, gen)
    bias = torch.randn(3, 4, generator=gen, requires_grad=True)
    with pytest.raises(ValueError, match="attn_mask requires grad"):
        torchslim.attention(q, k, v, attn_mask=bias)
    torchslim.attention(q, k, v, attn_mask=bias.detach())  # detached: fine


def test_backward_bad_input_names_the_argument(gen):
    q, k, v = _qkv(1, 2, 2, 3, 4, 8, gen)
    out = torchslim.attention(q, k, v)
    with pytest.raises(ValueError, match=r"grad_out must have attention's output shape"):
        torch.ops.torchslim.attention_backward(out[:, :, :2], q, k, v, out)
    with pytest.raises(ValueError, match=r"out must have"):
        torch.ops.torchslim.attention_backward(out, q, k, v, out[..., :4])
