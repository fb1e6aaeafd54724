"""int4: format, quantizer, the W4A16 op against torchslim.reference, Int4Linear."""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_BACKENDS, device_of, run_on
from torch import nn

from torchslim import _ext, ops
from torchslim import reference as ref
from torchslim.nn import Int4Linear
from torchslim.quant import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from torchslim.testing import M_FULL, check_close, nan_padded, near_half_codes, sqnr

CPU_BACKENDS = [b for b in KERNEL_BACKENDS if b.startswith("cpu")]
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (N, K, group sizes): N not a multiple of any tile; K a multiple of 32 or, per channel, not.
NKG = (
    (1, 32, (32, -1)),
    (7, 64, (32, 64)),
    (65, 288, (32, 96, -1)),  # 96: chunks of 64 straddle groups
    (9, 480, (160,)),
    (111, 1024, (64, 128, 256)),
    (13, 640, (32, 64)),  # K in steps of 128: 20 groups of 32 (16 per masked step, then 4)
    (21, 576, (32, 64)),  # K = 4.5 steps of 128: the last 64 weights a half step
    (59, 4224, (128, -1)),
    (3, 16384, (32,)),  # 512 groups: as many as the kernels' stack buffers of scales hold
    (3, 16448, (32,)),  # group 32 past those buffers (514 groups)
    (2, 16512, (32,)),  # the same in steps of 128 (516 groups)
    (33, 130, (-1,)),  # per channel with a partial last activation block
    (5, 98, (-1,)),  # per channel: chunk, a lone block of 32, then a partial block
    (5, 2, (-1,)),
)


# --------------------------------------------------------------------------- format
def test_pack_unpack_are_exact_inverses(gen):
    codes = torch.randint(0, 16, (37, 258), dtype=torch.uint8, generator=gen)
    packed = pack_int4(codes)
    assert packed.shape == (37, 129) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    # low nibble first
    assert pack_int4(torch.tensor([[3, 12]], dtype=torch.uint8)).item() == 3 | 12 << 4


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="even K"):
        pack_int4(torch.zeros(2, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 15\]"):
        pack_int4(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="codes must be uint8"):
        pack_int4(torch.zeros(2, 4, dtype=torch.int8))


# --------------------------------------------------------------------------- quantizer
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_quantizer_follows_its_formulas(group_size, symmetric, gen):
    w = torch.randn(48, 256, generator=gen) * 0.02
    packed, scales, zeros = quantize_int4(w, group_size, symmetric=symmetric)
    g = 256 if group_size == -1 else group_size
    assert scales.shape == zeros.shape == (48, 256 // g)
    codes = unpack_int4(packed).reshape(48, 256 // g, g)
    if symmetric:
        assert torch.equal(zeros, torch.full_like(zeros, 8.0))
    else:  # the group's min is code 0 and its max code 15
        groups = w.reshape(48, 256 // g, g)
        lo, hi = groups.amin(-1), groups.amax(-1)
        torch.testing.assert_close(scales, (hi - lo) / 15)
        torch.testing.assert_close(zeros, -lo / scales)
        assert (codes.gather(-1, groups.argmin(-1, keepdim=True)) == 0).all()
        assert (codes.gather(-1, groups.argmax(-1, keepdim=True)) == 15).all()
    # Round to nearest: every weight inside the group's range is within half a step; the one
    # symmetric code past the top (+max|w| / scale = 7.5 clips to 7) is within a whole step.
    err = (dequantize_int4(packed, scales, zeros, group_size) - w).abs()
    step = scales.float().repeat_interleave(g, dim=1)
    limit = step * (1.0 if symmetric else 0.5) * (1 + 1e-5)
    assert (err <= limit).all()


@pytest.mark.parametrize("group_size", [32, 128])
def test_weights_on_a_16_level_grid_come_back_exactly(group_size, gen):
    """Weights already 4-bit per group (llama.cpp Q4_1: min + code * step, a GGUF model loaded
    into float) are recovered code for code, whether their range spans zero or not."""
    n, k, g = 24, 256, group_size
    codes = torch.randint(0, 16, (n, k // g, g), generator=gen, dtype=torch.uint8)
    codes[..., 0], codes[..., 1] = 0, 15  # every group uses its whole range
    step = torch.rand(n, k // g, 1, generator=gen) * 0.01 + 1e-3
    low = torch.randn(n, k // g, 1, generator=gen) * 0.05 - 7.5 * step
    w = (low + codes * step).reshape(n, k)
    packed, scales, zeros = quantize_int4(w, g)
    assert torch.equal(unpack_int4(packed), codes.reshape(n, k))
    torch.testing.assert_close(dequantize_int4(packed, scales, zeros, g), w, rtol=0, atol=1e-6)


# What the math allows for N(0, 1) weights: step = range / 15 with the range of a group's
# samples (about 4 sigma at g32, 5.2 at g128, 7.2 for a 4096-long row);
# SQNR = 10 log10(12 / step^2).
SQNR_FLOOR_DB = {32: 21.5, 64: 20.5, 128: 19.5, -1: 16.8}


@pytest.mark.parametrize("group_size", sorted(SQNR_FLOOR_DB))
def test_gaussian_sqnr_meets_the_math(group_size, gen):
    w = torch.randn(256, 4096, generator=gen)
    plain = quantize_int4(w, group_size, scale_dtype=torch.float32)
    clipped = quantize_int4(w, group_size, scale_dtype=torch.float32, clip_search=True)
    db = sqnr(w, dequantize_int4(*plain, group_size))
    db_clip = sqnr(w, dequantize_int4(*clipped, group_size))
    assert db >= SQNR_FLOOR_DB[group_size], db
    assert db_clip >= db  # the search includes ratio 1.0 and keeps the best per group
    symmetric = sqnr(w, dequantize_int4(*quantize_int4(w, group_size, symmetric=True), group_size))
    assert symmetric < db  # a fitted zero point uses the 16 levels better on Gaussian groups


def test_clip_search_shrinks_groups_that_do_not_span_zero(gen):
    """Clipping is about each group's centre: shifting every weight by a constant changes
    neither the plain nor the clipped error."""
    w = torch.randn(64, 1024, generator=gen)
    for shift in (0.0, 3.0, -5.0):
        plain = quantize_int4(w + shift, 128)
        clipped = quantize_int4(w + shift, 128, clip_search=True)
        db = sqnr(w, dequantize_int4(*plain, 128) - shift)
        db_clip = sqnr(w, dequantize_int4(*clipped, 128) - shift)
        assert db_clip > db + 0.3, (shift, db, db_clip)


def test_quantizer_bad_input():
    w = torch.randn(8, 96)
    with pytest.raises(ValueError, match=r"group_size must be -1 .* that divides K=96, got 64"):
        quantize_int4(w, 64)
    with pytest.raises(ValueError, match="K must be even"):
        quantize_int4(torch.randn(8, 33), -1)
    with pytest.raises(TypeError, match="scale_dtype"):
        quantize_int4(w, 32, scale_dtype=torch.int32)
    with pytest.raises(ValueError, match="finite"):
        quantize_int4(torch.full((2, 32), float("inf")), 32)
    with pytest.raises(TypeError, match="group_size must be an int"):
        quantize_int4(w, 32.0)
    # fp16 cannot hold the zero point of a narrow group far from 0, nor the scale of a tiny one
    narrow = torch.ones(2, 32)
    narrow[1, ::2] += 1e-4
    tiny = torch.linspace(-1e-7, 1e-7, 64).reshape(2, 32)  # every group too narrow
    for weight, row in ((narrow, 1), (tiny, 0)):
        with pytest.raises(ValueError, match=rf"float16 cannot hold .* of row {row}, group 0"):
            quantize_int4(weight, 32, scale_dtype=torch.float16)
        quantize_int4(weight, 32, scale_dtype=torch.float32)  # what it suggests
    # bf16 holds a zero point to 8 bits: a group far from 0 for its range would shift whole
    # codes (it came back 1.8, 27 steps, off); fp16's range: a scale of inf
    offset = 1000 + torch.linspace(0, 1, 32)[None]
    huge = torch.tensor([[6e5, -6e5] * 16])
    for weight, dtype in ((offset, torch.bfloat16), (huge, torch.float16)):
        with pytest.raises(ValueError, match=r"cannot hold .* use scale_dtype=torch\.float32"):
            quantize_int4(weight, 32, scale_dtype=dtype)
    packed, scales, zeros = quantize_int4(offset, 32, scale_dtype=torch.float32)
    assert (dequantize_int4(packed, scales, zeros, 32) - offset).abs().max() <= scales / 2 + 1e-4
    with pytest.raises(ValueError, match=r"K >= 2 columns, got shape \(4, 0\)"):
        quantize_int4(torch.randn(4, 0), 32)
    with pytest.raises(ValueError, match="group_size=64 does not fit: K=96"):
        dequantize_int4(*quantize_int4(w, 32), 64)
    for ratios, error in (((-1.0,), ValueError), ((float("nan"),), ValueError), (0.5, TypeError)):
        with pytest.raises(error, match="clip_ratios must"):
            quantize_int4(w, 32, clip_search=True, clip_ratios=ratios)


# --------------------------------------------------------------------------- the op
def _cases():
    cases = []
    for backend in CPU_BACKENDS:
        for m in M_FULL:
            for n, k, groups in NKG:
                cases += [(backend, m, n, k, g) for g in groups]
    return cases


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("group_size", [-1, 32])
def test_k_zero_gives_the_bias(backend, group_size, gen, poisoned_empty):
    """K = 0: no columns to sum, so the output is the bias (or zeros), as in the reference."""
    x = torch.randn(3, 0, generator=gen)
    empty = torch.zeros(5, 0)
    bias = torch.randn(5, generator=gen)
    for b in (None, bias):
        with run_on(backend):
            out = ops.int4_weight_only_linear(x, empty.to(torch.uint8), empty, empty, group_size, b)
        want = ref.int4_weight_only_linear(x, empty.to(torch.uint8), empty, empty, group_size, b)
        assert torch.equal(out, want) and torch.equal(
            want, torch.zeros(3, 5) if b is None else bias.expand(3, 5)
        )


def _activations(m, k, dtype, gen):
    """Rows with a spread of magnitudes and a few outlier channels (as in LLMs), NaN-padded."""
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))
    if k > 8:
        x[:, torch.randperm(k, generator=gen)[:2]] *= 20
    return nan_padded(x.to(dtype))


def _weights(n, k, group_size, scale_dtype, gen, symmetric=False):
    w = torch.randn(n, k, generator=gen) / k**0.5
    packed_scales_zeros = quantize_int4(w, group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    return (*packed_scales_zeros, torch.randn(n, generator=gen))


def _cpu_references(x, args, k):
    """(float64, x.dtype) references in the arithmetic the active CPU level takes for x: x
    rounded to int8 per run of cpu_activation_block values, or, on bf16 tiles from the level's
    threshold for that run on, x and the dequantized weight rounded to bf16. Called inside
    run_on."""
    block = ref.cpu_activation_block(args[3], k)
    from_m = _ext._C.int4_bf16_tiles_from_m(block, args[0].shape[0])
    m = x.reshape(-1, k).shape[0]
    rule = (
        {"operand_dtype": torch.bfloat16}
        if from_m is not None and m >= from_m
        else {"activation_block": block}
    )
    ref64 = ref.int4_weight_only_linear(x.double(), *args, compute_dtype=torch.float64, **rule)
    return ref64, ref.int4_weight_only_linear(x, *args, **rule)


@pytest.mark.parametrize(("backend", "m", "n", "k", "group_size"), _cases())
def test_int4_linear_against_reference(backend, m, n, k, group_size, gen, poisoned_empty):
    """The kernel computes the reference's arithmetic (activations rounded to int8 per run of
    cpu_activation_block values, or x and the weight rounded to bf16 on the amx level's bf16
    tiles)."""
    scale_dtype = SCALE_DTYPES[(m + n) % 3]
    for dtype in (torch.float32, torch.bfloat16):
        x = _activations(m, k, dtype, gen)
        packed, scales, zeros, bias = _weights(n, k, group_size, scale_dtype, gen)
        bias = bias if m % 2 else None
        args = (packed, scales, zeros, group_size, bias)
        with run_on(backend):
            out = ops.int4_weight_only_linear(x, *args)
            references = _cpu_references(x, args, k)
        assert out.dtype == dtype and out.shape == (m, n)
        check_close(out, *references)


def test_reference_takes_one_arithmetic(gen):
    """The reference refuses int8 rounding and bf16 operands together, naming both."""
    packed, scales, zeros, _ = _weights(4, 64, 32, torch.float32, gen)
    x = torch.randn(2, 64, generator=gen)
    with pytest.raises(ValueError, match="activation_block and operand_dtype"):
        ref.int4_weight_only_linear(
            x, packed, scales, zeros, 32, activation_block=32, operand_dtype=torch.bfloat16
        )


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="no Triton backend here")
def test_triton_through_the_op(gen):
    """The op on the Triton backend (interpreter on CPU tensors, fp32/fp16; GPU: bf16 too),
    leading dims and bias included; the kernel's own sweep is tests/test_triton_int4.py."""
    device = device_of("triton")
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if device == "cuda" else ())
    packed, scales, zeros, bias = _weights(24, 128, 32, torch.bfloat16, gen)
    packed, scales, zeros, bias = (t.to(device) for t in (packed, scales, zeros, bias))
    for dtype in dtypes:
        x = torch.randn(2, 3, 128, generator=gen).to(device, dtype)
        with run_on("triton"):
            out = ops.int4_weight_only_linear(x, packed, scales, zeros, 32, bias)
        args = (packed, scales, zeros, 32, bias)
        assert out.shape == (2, 3, 24) and out.dtype == dtype
        ref64 = ref.int4_weight_only_linear(x.double(), *args, compute_dtype=torch.float64)
        check_close(out, ref64, ref.int4_weight_only_linear(x, *args))


def test_cpu_activation_block():
    """The longest of 128, 64 and 32 dividing the group; 128 per channel; groups the CPU kernel
    does not take are refused by name."""
    cases = {
        (128, 4096): 128,
        (256, 4096): 128,
        (64, 4096): 64,
        (192, 4224): 64,
        (32, 4096): 32,
        (96, 960): 32,
        (-1, 4130): 128,
        (4130, 4130): 128,
        (-1, 96): 128,
    }
    for (group_size, k), block in cases.items():
        assert ref.cpu_activation_block(group_size, k) == block, (group_size, k)
    for group_size, k in ((16, 64), (0, 64), (128, 4000), (-2, 64)):
        with pytest.raises(ValueError, match="group_size"):
            ref.cpu_activation_block(group_size, k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_row_holding_inf_or_nan(backend, gen):
    """Where the kernel rounds x to int8 (per run of cpu_activation_block values), a run
    holding an inf or a NaN has no scale and its row's outputs are NaN, as the reference's: never
    the finite row of a float max that skipped the NaN. The other rows are unchanged. M = 1, 3
    (the dot kernels), 8 and 40 (the strips; on the amx level the tiles)."""
    k, n, group_size = 256, 40, 32
    packed, scales, zeros, bias = _weights(n, k, group_size, torch.float32, gen)
    args = (packed, scales, zeros, group_size, bias)
    for m in (1, 3, 8, 40):
        x = torch.randn(m, k, generator=gen)
        clean = x.clone()
        x[0, 5] = float("nan")
        x[m - 1, k - 1] = float("inf")
        rows = sorted({0, m - 1})
        with run_on(backend):
            out = ops.int4_weight_only_linear(x, *args)
            out_clean = ops.int4_weight_only_linear(clean, *args)
            ref64, _ = _cpu_references(x, args, k)
        assert not out[rows].isfinite().any(), f"M={m}"
        assert torch.equal(out.isnan(), ref64.isnan()), f"M={m}"
        good = [r for r in range(m) if r not in rows]
        assert torch.equal(out[good], out_clean[good]), f"M={m}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("group_size", [32, 128])
def test_activation_codes_near_ties(backend, group_size, gen):
    """The op's int8 activation codes are round(x / scale)'s even for values within a few ulps
    of a half-integer step, in the dot kernels (M = 1, 3) and on the tile unit (M = 8; from
    M = 32 groups of 32 take bf16 tiles, which do not round x to int8), read
    back through an identity weight (codes 9 on the diagonal and 8 elsewhere, zero point 8,
    scale 1: each output is one activation's code times its run's scale)."""
    k = 256
    block = ref.cpu_activation_block(group_size, k)
    codes = torch.full((k, k), 8, dtype=torch.uint8)
    codes.diagonal().fill_(9)
    packed = pack_int4(codes)
    scales = torch.ones(k, k // group_size)
    zeros = torch.full_like(scales, 8.0)
    for m in (1, 3, 8):
        x = near_half_codes(m, k, block, gen)
        with run_on(backend):
            out = ops.int4_weight_only_linear(x, packed, scales, zeros, group_size)
        want_q, want_scale = ref.quantize_per_block(x, block)
        got = torch.round(out / want_scale.repeat_interleave(block, dim=1))
        wrong = (got != want_q.float()).sum().item()
        assert wrong == 0, f"M={m}: {wrong} codes differ"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_adds_no_measurable_error(backend, gen):
    """Against the float layer, the kernel's SQNR is the float-activation reference's within
    0.25 dB: rounding activations to int8 per run of 32 to 128 is noise next to rounding weights
    to 4 bits. Errors add in power, so an activation error a fifth of the weights' costs
    10 log10(1 + 0.2^2) = 0.17 dB; with two 20x outlier channels a row, runs of 32 cost
    0.02-0.07 dB here and runs of 128 0.08-0.17 dB."""
    x = _activations(64, 1024, torch.float32, gen)
    w = torch.randn(256, 1024, generator=gen) / 32
    float_out = x @ w.T
    for group_size in (32, 64, 128, -1):
        packed, scales, zeros = quantize_int4(w, group_size)
        with run_on(backend):
            out = ops.int4_weight_only_linear(x, packed, scales, zeros, group_size)
        want = ref.int4_weight_only_linear(
            x.double(), packed, scales, zeros, group_size, compute_dtype=torch.float64
        )
        assert sqnr(float_out, out) >= sqnr(float_out, want) - 0.25, f"G={group_size}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_leading_dims_strides_and_threads(backend, gen):
    x = torch.randn(2, 3, 256, generator=gen)
    packed, scales, zeros, bias = _weights(40, 256, 64, torch.bfloat16, gen)
    threads = torch.get_num_threads()
    with run_on(backend):
        out = ops.int4_weight_only_linear(x, packed, scales, zeros, 64, bias)
        flat = ops.int4_weight_only_linear(x.reshape(6, 256), packed, scales, zeros, 64, bias)
        layouts = {
            "last dim not contiguous": x.reshape(6, 256).T.contiguous().T,
            "leading dims that do not merge": x.transpose(0, 1).contiguous().transpose(0, 1),
            "rows longer than K": torch.cat([x, x[..., :32]], -1)[..., :256],
            "4-D": x.reshape(1, 2, 3, 256),
        }
        outs = {
            name: ops.int4_weight_only_linear(v, packed, scales, zeros, 64, bias)
            for name, v in layouts.items()
        }
        try:
            torch.set_num_threads(1)
            one = ops.int4_weight_only_linear(x, packed, scales, zeros, 64, bias)
        finally:
            torch.set_num_threads(threads)
    assert out.shape == (2, 3, 40)
    assert torch.equal(out.reshape(6, 40), flat)
    for name, v in layouts.items():
        assert outs[name].shape == (*v.shape[:-1], 40), name
        assert torch.equal(outs[name].reshape(6, 40), flat), name
    assert torch.equal(one, out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("mn", [(300, 290), (1, 1100), (3, 700)])
def test_threads_split_rows_or_columns(backend, group_size, mn, gen):
    """With fewer than 2M columns and 128 rows a thread, the tile kernels' threads split the rows
    (in shares that are not whole blocks); at few rows the vector kernels' threads split the
    columns, in blocks of up to 256 with a last one cut short: the same result as one thread,
    every output written."""
    m, n = mn
    x = torch.randn(m, 256, generator=gen)
    packed, scales, zeros, bias = _weights(n, 256, group_size, torch.bfloat16, gen)
    threads = torch.get_num_threads()
    with run_on(backend):
        try:
            torch.set_num_threads(1)
            one = ops.int4_weight_only_linear(x, packed, scales, zeros, group_size, bias)
            torch.set_num_threads(max(2, threads))
            many = ops.int4_weight_only_linear(x, packed, scales, zeros, group_size, bias)
        finally:
            torch.set_num_threads(threads)
        float64, like_x = _cpu_references(x, (packed, scales, zeros, group_size, bias), 256)
    assert torch.equal(one, many)
    check_close(many, float64, like_x)


def test_unsupported_inputs_run_the_reference(gen):
    """fp16 activations and group sizes the CPU kernel lacks fall back, and say why."""
    packed, scales, zeros, _ = _weights(8, 64, 16, torch.float32, gen)
    x = torch.randn(3, 64, generator=gen)
    report = ops.explain("int4_weight_only_linear", x, packed, scales, zeros, 16)
    assert report["backend"] == "reference"
    assert any("multiples of 32" in why for why in report["passed_over"])
    out = ops.int4_weight_only_linear(x.half(), packed, scales, zeros, 16)
    want = ref.int4_weight_only_linear(x.half(), packed, scales, zeros, 16)
    assert torch.equal(out, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend, gen):
    with run_on(backend):
        _opcheck(gen)


def _opcheck(gen):
    x = torch.randn(5, 64, generator=gen)
    packed, scales, zeros, bias = _weights(17, 64, 32, torch.bfloat16, gen)
    op = torch.ops.torchslim.int4_weight_only_linear.default
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for args in ((x, packed, scales, zeros, 32, bias), (x, packed, scales, zeros, -1, None)):
        if args[4] == -1:
            args = (x, packed, scales[:, :1].contiguous(), zeros[:, :1].contiguous(), -1, None)
        torch.library.opcheck(op, args, test_utils=tests)


def _bad_inputs():
    x = torch.randn(4, 64)
    p = torch.randint(0, 256, (8, 32), dtype=torch.uint8)
    s = torch.rand(8, 2) + 0.1
    z = torch.full((8, 2), 8.0)
    f = ops.int4_weight_only_linear
    return [
        ("group not dividing K", lambda: f(x, p, s, z, 48), ValueError, "group_size must be -1"),
        ("odd K", lambda: f(torch.randn(4, 63), p, s, z, -1), ValueError, "K must be even"),
        ("packed dtype", lambda: f(x, p.to(torch.int8), s, z, 32), TypeError, "packed_w must be"),
        ("packed shape", lambda: f(x, p[:, :31], s, z, 32), ValueError, r"packed_w must have"),
        ("scales shape", lambda: f(x, p, s[:, :1], z, 32), ValueError, r"scales must have shape"),
        ("scales dtype", lambda: f(x, p, s.double(), z, 32), TypeError, "scales must be float32"),
        ("zeros dtype", lambda: f(x, p, s, z.half(), 32), TypeError, "zeros must have the dtype"),
        ("x dtype", lambda: f(x.int(), p, s, z, 32), TypeError, "x must be float32"),
        ("bias shape", lambda: f(x, p, s, z, 32, torch.randn(3)), ValueError, "bias must have"),
        ("group type", lambda: f(x, p, s, z, 32.0), TypeError, "group_size"),
        ("not a tensor", lambda: f(x, p.tolist(), s, z, 32), TypeError, "packed_w"),
    ]


@pytest.mark.parametrize(("what", "call", "exc", "match"), _bad_inputs(), ids=lambda v: None)
def test_bad_input_names_the_argument(what, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------- Int4Linear
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_int4_linear_module(group_size, gen):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    layer = Int4Linear.from_linear(linear, group_size=group_size)
    x = torch.randn(4, 7, 256, generator=gen)
    out = layer(x)
    assert out.shape == (4, 7, 96)
    buffers = (layer.weight, layer.weight_scales, layer.weight_zeros, group_size, layer.bias)
    check_close(out, *_cpu_references(x, buffers, 256))  # the op on its buffers, bias included
    assert sqnr(linear(x).detach(), out) > 22.0  # 23.8-24.5 dB here; 21.1-21.5 without the bias
    # state_dict round trip: bit-identical buffers and outputs
    again = Int4Linear(256, 96, group_size=group_size)
    again.load_state_dict(layer.state_dict())
    for key, value in layer.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert torch.equal(again(x), out)
    # casting the module keeps the scales' dtype
    assert layer.to(torch.float64).weight_scales.dtype == torch.bfloat16


def test_int4_linear_rejects_bad_state(gen):
    state = Int4Linear.from_linear(nn.Linear(64, 8), group_size=32).state_dict()
    with pytest.raises(ValueError, match="weight_scales must be finite and > 0"):
        Int4Linear(64, 8, group_size=32).load_state_dict(
            {**state, "weight_scales": -state["weight_scales"]}
        )
    with pytest.raises(RuntimeError, match="size mismatch"):
        Int4Linear(64, 8, group_size=32).load_state_dict(
            {**state, "weight": state["weight"][:, :16]}
        )
    with pytest.raises(ValueError, match=r"weight must hold torch\.uint8 codes, got torch\.int32"):
        Int4Linear(64, 8, group_size=32).load_state_dict(
            {**state, "weight": state["weight"].to(torch.int32)}
        )
    with pytest.raises(ValueError, match="group_size must be -1"):
        Int4Linear(96, 8, group_size=64)
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear"):
        Int4Linear.from_linear(nn.Conv1d(4, 4, 1))


@pytest.mark.skipif(_ext._C is None, reason="no C++ extension")
def test_bf16_tiles_threshold_rejects_bad_arguments():
    """int4_bf16_tiles_from_m names the argument it cannot take."""
    with pytest.raises(ValueError, match="run must be 32, 64 or 128, got 48"):
        _ext._C.int4_bf16_tiles_from_m(48, 576)
    with pytest.raises(ValueError, match="n must be non-negative, got -1"):
        _ext._C.int4_bf16_tiles_from_m(32, -1)


@pytest.mark.skipif(
    _ext._C is None or "amx" not in _ext._C.supported_isas(), reason="no AMX tiles on this CPU"
)
def test_amx_tiles_from_their_threshold(gen, poisoned_empty):
    """The amx level runs the int4 GEMM on the int8 tiles from a threshold per activation run
    (the AVX-512 kernel below it), and on bf16 tiles from another, by run and N (the shorter the
    runs and the narrower the layer, the sooner), each with its reference arithmetic: N cuts the
    16-row strips and the 256-column thread blocks, M the 16-row panels and the 128- to 512-row
    blocks. Every kind of run: one a group (128, 64, 32 with a lone last block: multiplies of 64
    and of 32 columns), two and three a group (256, 96), and per channel with a partial last run
    and block; symmetric weights too (zero point 8); runs of 128 on a narrow and a wide layer."""
    with run_on("cpu-amx"):
        first = _ext._C.cpu_kernel_paths()["int4_tiles_from_m"]
        bf16_from = {
            n: {run: _ext._C.int4_bf16_tiles_from_m(run, n) for run in (32, 64, 128)}
            for n in (576, 4096)
        }
    with run_on("cpu-avx512"):
        assert _ext._C.cpu_kernel_paths()["int4_tiles_from_m"] is None
        assert _ext._C.int4_bf16_tiles_from_m(32, 576) is None
    assert sorted(first) == [32, 64, 128]
    assert all(isinstance(first[run], int) and first[run] >= 1 for run in first)
    for n in bf16_from:
        thresholds = [bf16_from[n][run] for run in (32, 64, 128)]
        assert thresholds == sorted(thresholds)
        assert all(first[run] < bf16_from[n][run] for run in first)
    assert all(bf16_from[576][run] <= bf16_from[4096][run] for run in first)
    cases = ((300, 4224, 128), (40, 1600, 64), (50, 1056, 32), (33, 2560, 256), (20, 960, 96))
    symmetric = ((50, 1056, 32, True), (40, 1600, 64, True), (20, 960, 96, True))
    wide = ((2100, 256, 128),)
    for n, k, group_size, *sym in (*cases, (37, 4130, -1), *symmetric, *wide):
        packed, scales, zeros, bias = _weights(n, k, group_size, torch.bfloat16, gen, *sym)
        args = (packed, scales, zeros, group_size, bias)
        run = ref.cpu_activation_block(group_size, k)
        with run_on("cpu-amx"):
            tiles16 = _ext._C.int4_bf16_tiles_from_m(run, n)
        at_tiles16 = () if tiles16 is None else (tiles16 - 1, tiles16)
        for m in sorted({max(first[run] - 1, 1), first[run], 131, *at_tiles16}):
            for dtype in (torch.float32, torch.bfloat16):
                x = _activations(m, k, dtype, gen)
                with run_on("cpu-amx"):
                    out = ops.int4_weight_only_linear(x, *args)
                    ref64, lowp = _cpu_references(x, args, k)
                check_close(out, ref64, lowp, name=f"M={m} {dtype} G={group_size}")


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_strips_from_their_threshold(isa, gen, poisoned_empty):
    """From a threshold per activation run, the avx512 and avx2 levels unpack each strip of
    weight columns (32; 24 on AVX2) to bytes and meet them with broadcast activation codes
    (vpdpbusd; vpmaddubsw and vpmaddwd on AVX2; the dot kernels below it); the amx level's tiles
    take those M instead, and the portable level has none. Every kind of run (one a group: 32,
    64, 128; two and three a group: 256, 96; per channel with a last run of 64; one run,
    uncentred), symmetric weights, K with a last chunk of 64 (half an AVX-512 strip step), N
    cutting the vectors, the strips and the thread blocks, M cutting the register tiles (edges
    of every height) and the 128-row blocks; K not a multiple of 64 keeps the dot kernels at
    any M."""
    if _ext._C is None or isa not in _ext._C.supported_isas():
        pytest.skip(f"no {isa} on this CPU")
    with run_on(f"cpu-{isa}"):
        first = _ext._C.cpu_kernel_paths()["int4_strips_from_m"]
    assert sorted(first) == [32, 64, 128]
    assert all(isinstance(first[run], int) and 1 <= first[run] <= 64 for run in first)
    for other in ("amx", "portable"):
        if other in _ext._C.supported_isas():
            with run_on(f"cpu-{other}"):
                assert _ext._C.cpu_kernel_paths()["int4_strips_from_m"] is None
    cases = ((70, 320, 64), (33, 1024, 128), (129, 768, 32), (40, 960, 96), (17, 2560, 256))
    centred = ((23, 768, 192),)  # runs of 64, three a group
    symmetric = ((50, 1088, 32, True), (24, 1600, 64, True))
    per_channel = ((37, 4160, -1), (19, 1024, -1), (18, 128, -1))  # 128: one run, not centred
    not_chunks = ((20, 288, -1), (21, 288, 32))  # K = 288: not whole chunks of 64
    for n, k, group_size, *sym in (*cases, *centred, *symmetric, *per_channel, *not_chunks):
        packed, scales, zeros, bias = _weights(n, k, group_size, SCALE_DTYPES[n % 3], gen, *sym)
        run = ref.cpu_activation_block(group_size, k)
        for m in sorted({first[run] - 1, first[run], first[run] + 7, 131}):
            for dtype in (torch.float32, torch.bfloat16):
                x = _activations(m, k, dtype, gen)
                args = (packed, scales, zeros, group_size, bias if m % 2 else None)
                with run_on(f"cpu-{isa}"):
                    out = ops.int4_weight_only_linear(x, *args)
                    ref64, lowp = _cpu_references(x, args, k)
                check_close(out, ref64, lowp, name=f"M={m} {dtype} N={n} K={k} G={group_size}")
