"""int8 ops against torchslim.reference, on every kernel backend this machine can run."""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_BACKENDS, device_of, run_on

import torchslim
from torchslim import _ext, ops
from torchslim import reference as ref
from torchslim.ops._registry import OpBackends
from torchslim.quant import quantize_int4, quantize_weight_per_channel
from torchslim.testing import (
    M_FULL,
    M_QUICK,
    NK_FULL,
    NK_QUICK,
    check_close,
    nan_padded,
    near_half_codes,
    random_int8,
)


def _float_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    if device_of(backend) == "cuda":
        return (torch.float16, torch.bfloat16)
    if backend == "triton":  # the interpreter's bf16 tl.dot is wrong; bf16 is checked on GPUs
        return (torch.float32, torch.float16)
    return (torch.float32, torch.bfloat16)


def _cases(with_dtype: bool):
    """(backend, m, (n, k)[, dtype]): the full shape list for compiled kernels, the quick one
    for the Triton interpreter (which runs each program in Python)."""
    cases = []
    for backend in KERNEL_BACKENDS:
        interpreted = backend == "triton" and device_of(backend) == "cpu"
        ms, nks = (M_QUICK, NK_QUICK) if interpreted else (M_FULL, NK_FULL)
        for m in ms:
            for nk in nks:
                if with_dtype:
                    cases += [(backend, m, nk, dt) for dt in _float_dtypes(backend)]
                else:
                    cases.append((backend, m, nk))
    return cases


def _activations(m, k, dtype, device, gen):
    """Gaussian rows with a spread of magnitudes and a few outlier channels, NaN-padded."""
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))
    if k > 4:
        x[:, torch.randperm(k, generator=gen)[:2]] *= 20
    return nan_padded(x.to(dtype=dtype, device=device))


def _weights(n, k, device, gen):
    w = torch.randn(n, k, generator=gen) / k**0.5
    w_q, w_scale = quantize_weight_per_channel(w)
    bias = torch.randn(n, generator=gen)
    return w_q.to(device), w_scale.to(device), bias.to(device)


@pytest.mark.parametrize(("backend", "m", "nk", "dtype"), _cases(with_dtype=True))
def test_quantize_per_token_exact(backend, m, nk, dtype, gen, poisoned_empty):
    x = _activations(m, nk[1], dtype, device_of(backend), gen)
    with run_on(backend):
        x_q, x_scale = ops.quantize_per_token(x)
    want_q, want_scale = ref.quantize_per_token(x)
    assert torch.equal(x_q, want_q)
    assert torch.equal(x_scale, want_scale)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b.startswith("cpu")])
def test_quantize_per_token_near_ties(backend, gen):
    """Values that divide out to within a few ulps of a half-integer: the codes are still
    round(x / scale)'s (the CPU kernels round a product with 1 / scale and divide only where the
    two could differ)."""
    x = near_half_codes(64, 1000, 1000, gen)
    with run_on(backend):
        x_q, x_scale = ops.quantize_per_token(x)
    want_q, want_scale = ref.quantize_per_token(x)
    assert torch.equal(x_scale, want_scale)
    assert torch.equal(x_q, want_q)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_quantize_per_token_scale_that_underflows(backend):
    """A row of subnormals so small that amax / 127 underflows to 0: scale 1 and codes 0, as
    for a zero row (the quotient is tested, not amax)."""
    x = torch.tensor([[1e-44, -2e-44, 0.0, 5e-45], [1e-40, 0.0, -3e-41, 1e-45], [0.0] * 4])
    x = x.to(device_of(backend))
    with run_on(backend):
        x_q, x_scale = ops.quantize_per_token(x)
    want_q, want_scale = ref.quantize_per_token(x)
    assert want_scale[0] == 1 and want_scale[2] == 1
    assert torch.equal(x_scale, want_scale) and torch.equal(x_q, want_q)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_row_holding_inf_or_nan_has_no_scale(backend, gen):
    """int8 codes cannot stand for an inf or a NaN: such a row's scale is NaN and its codes 0,
    so W8A8 gives the row NaN, not the finite and wrong row of a float max that skipped the NaN.
    The other rows are unchanged. M = 1, 5 and 80 (the dot kernels and the weight strips); the
    value first in its row, last (the scalar tail) or inside a vector."""
    device = device_of(backend)
    k, n = 100, 24
    w_q, w_scale, bias = _weights(n, k, device, gen)
    for dtype in _float_dtypes(backend):
        for m in (1, 5, 80):
            x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
            bad = {0: (0, float("nan")), m // 2: (37, float("-inf")), m - 1: (k - 1, float("inf"))}
            clean = x.clone()
            for row, (col, value) in bad.items():
                x[row, col] = value
            rows = torch.tensor(sorted(bad), device=device)
            good = torch.ones(m, dtype=torch.bool, device=device)
            good[rows] = False
            with run_on(backend):
                x_q, x_scale = ops.quantize_per_token(x)
                out = ops.int8_dynamic_linear(x, w_q, w_scale, bias)
                out_clean = ops.int8_dynamic_linear(clean, w_q, w_scale, bias)
            want_q, want_scale = ref.quantize_per_token(x)
            assert torch.equal(x_q, want_q), (dtype, m)
            torch.testing.assert_close(x_scale, want_scale, rtol=0, atol=0, equal_nan=True)
            assert x_scale[rows].isnan().all() and not x_q[rows].any(), (dtype, m)
            assert out[rows].isnan().all(), (dtype, m)
            assert ref.int8_dynamic_linear(x, w_q, w_scale, bias)[rows].isnan().all()
            assert torch.equal(out[good], out_clean[good]), (dtype, m)


@pytest.mark.parametrize(("backend", "m", "nk"), _cases(with_dtype=False))
def test_int8_mm_exact(backend, m, nk, gen, poisoned_empty):
    n, k = nk
    device = device_of(backend)
    a = nan_padded(random_int8(m, k, generator=gen).to(device))
    # weights may use the whole int8 range, -128 included
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen).to(device)
    with run_on(backend):
        out = ops.int8_mm(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out, ref.int8_mm(a, b))


LINEAR_OPS = {
    "dynamic": (ops.int8_dynamic_linear, ref.int8_dynamic_linear),
    "weight_only": (ops.int8_weight_only_linear, ref.int8_weight_only_linear),
}


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("mode", sorted(LINEAR_OPS))
@pytest.mark.parametrize(("backend", "m", "nk", "dtype"), _cases(with_dtype=True))
def test_int8_linear(backend, m, nk, dtype, mode, with_bias, gen, poisoned_empty):
    op, reference = LINEAR_OPS[mode]
    n, k = nk
    device = device_of(backend)
    x = _activations(m, k, dtype, device, gen)
    w_q, w_scale, bias = _weights(n, k, device, gen)
    bias = bias if with_bias else None
    with run_on(backend):
        out = op(x, w_q, w_scale, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    # x.double() holds x exactly, so the float64 reference quantizes it to the same codes.
    ref64 = reference(x.double(), w_q, w_scale, bias, compute_dtype=torch.float64)
    check_close(out, ref64, reference(x, w_q, w_scale, bias))


@pytest.mark.parametrize("op", [ops.int8_dynamic_linear, ops.int8_weight_only_linear])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_leading_dims_and_strides(backend, op, gen):
    """(B, T, K) inputs, and x in other layouts of the same values, match the 2-D result, for
    each activation dtype (bf16 x reaches W8A16's vector kernels widened row by row)."""
    device = device_of(backend)
    w_q, w_scale, bias = _weights(24, 40, device, gen)
    for dtype in _float_dtypes(backend):
        x = torch.randn(2, 3, 40, generator=gen).to(device=device, dtype=dtype)
        layouts = {
            "last dim not contiguous": x.reshape(6, 40).T.contiguous().T,
            "leading dims that do not merge": x.transpose(0, 1).contiguous().transpose(0, 1),
            "rows longer than K": torch.cat([x, x[..., :8]], -1)[..., :40],
            "4-D": x.reshape(1, 2, 3, 40),
        }
        with run_on(backend):
            out = op(x, w_q, w_scale, bias)
            flat = op(x.reshape(6, 40), w_q, w_scale, bias)
            outs = {name: op(v, w_q, w_scale, bias) for name, v in layouts.items()}
        assert out.shape == (2, 3, 24)
        torch.testing.assert_close(out.reshape(6, 24), flat, rtol=0, atol=0)
        for name, v in layouts.items():
            assert outs[name].shape == (*v.shape[:-1], 24), (dtype, name)
            assert torch.equal(outs[name].reshape(6, 24), flat), (dtype, name)


@pytest.mark.parametrize("op", [ops.int8_dynamic_linear, ops.int8_weight_only_linear])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_columns_give_the_bias(backend, op, gen, poisoned_empty):
    """K = 0, with leading dims, M = 0 and M past every kernel's tile threshold: every output
    is the bias (an empty sum)."""
    device = device_of(backend)
    dtype = _float_dtypes(backend)[0]
    n = 24
    w_q = torch.zeros(n, 0, dtype=torch.int8, device=device)
    w_scale = torch.rand(n, generator=gen).add(0.5).to(device)
    bias = torch.randn(n, generator=gen).to(device)
    for shape in ((1, 0), (2, 3, 0), (0, 0), (40, 0), (2, 150, 0)):
        with run_on(backend):
            out = op(torch.zeros(shape, dtype=dtype, device=device), w_q, w_scale, bias)
        assert out.shape == (*shape[:-1], n) and out.dtype == dtype, shape
        assert torch.equal(out, bias.to(dtype).expand(*shape[:-1], n)), shape


def test_reference_takes_empty_dims(gen):
    """K = 0 and N = 0 through the reference (what fp16 x on the CPU and backend("reference")
    run): the bias, or an empty output, as the kernels give, not a reshape error."""
    x = torch.randn(3, 0, generator=gen)
    w_q, w_scale, bias = torch.zeros(5, 0, dtype=torch.int8), torch.ones(5), torch.randn(5)
    for op in (ops.int8_dynamic_linear, ops.int8_weight_only_linear):
        for xx in (x, x.half()):
            with torchslim.backend("reference"):
                out = op(xx, w_q, w_scale, bias)
            assert torch.equal(out, bias.to(xx.dtype).expand(3, 5))
    packed, scales, zeros = quantize_int4(torch.zeros(0, 64), 32)
    with torchslim.backend("reference"):
        out = ops.int4_weight_only_linear(torch.randn(3, 64).half(), packed, scales, zeros, 32)
    assert out.shape == (3, 0)


OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, gen):
    device = device_of(backend)
    dtype = _float_dtypes(backend)[0]
    x = torch.randn(5, 33, generator=gen).to(device=device, dtype=dtype)
    w_q, w_scale, bias = _weights(17, 33, device, gen)
    a = random_int8(5, 33, generator=gen).to(device)
    calls = [
        (torch.ops.torchslim.quantize_per_token.default, (x,)),
        (torch.ops.torchslim.int8_mm.default, (a, w_q)),
        (torch.ops.torchslim.int8_dynamic_linear.default, (x, w_q, w_scale, bias)),
        (torch.ops.torchslim.int8_dynamic_linear.default, (x, w_q, w_scale, None)),
        (torch.ops.torchslim.int8_weight_only_linear.default, (x, w_q, w_scale, bias)),
    ]
    with run_on(backend):
        for op, args in calls:
            torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


def test_backend_selection_is_inspectable(gen):
    x = torch.randn(3, 16, generator=gen, dtype=torch.float16)
    w_q, w_scale, _ = _weights(8, 16, "cpu", gen)
    with ops.backend("cpu"):
        report = ops.explain("int8_dynamic_linear", x, w_q, w_scale)
    # fp16 on the CPU has no C++ kernel: the reference runs, and the report says why.
    assert report["backend"] == "reference"
    assert any("float16" in why for why in report["passed_over"])
    with ops.backend("reference"):
        assert ops.explain("int8_mm", w_q, w_q)["backend"] == "reference"
    with ops.backend("cpu", strict=True), pytest.raises(ops.BackendUnavailableError, match="cpu"):
        ops.int8_dynamic_linear(x, w_q, w_scale)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.backend("tpu").__enter__()


def test_reference_fallback_is_logged_once(gen, caplog):
    x = torch.randn(3, 16, generator=gen, dtype=torch.float16)
    w_q, w_scale, _ = _weights(8, 16, "cpu", gen)
    ops.registered_ops()["int8_weight_only_linear"]._logged.clear()
    with ops.backend("cpu"), caplog.at_level("WARNING", logger="torchslim"):
        first = ops.int8_weight_only_linear(x, w_q, w_scale)
        ops.int8_weight_only_linear(x, w_q, w_scale)
    messages = [r.getMessage() for r in caplog.records if "reference" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "float16" in messages[0]
    torch.testing.assert_close(first, ref.int8_weight_only_linear(x, w_q, w_scale))


def test_a_device_with_no_kernel_at_all_is_a_logged_fallback(caplog):
    """An op with kernels for some devices only (the csr op: the CPU) logs, once, when another
    device's tensors run its reference (shown with a device that has no kernel anywhere)."""
    assert "cuda" not in ops.registered_ops()["sparse_csr_linear"].preference
    meta = torch.empty(2, 16, device="meta")
    report = ops.explain("sparse_csr_linear", meta)
    assert report == {
        "op": "sparse_csr_linear",
        "backend": "reference",
        "passed_over": ["sparse_csr_linear has no meta kernel"],
    }
    calls = []
    cpu_only = OpBackends("probe", lambda *a: calls.append(a), preference={"cpu": ("cpu",)})
    with caplog.at_level("WARNING", logger="torchslim"):
        cpu_only(meta)
        cpu_only(meta)
    assert len(calls) == 2
    assert caplog.text.count("torchslim.probe: using the reference implementation") == 1
    assert "probe has no meta kernel" in caplog.text


def _bad_inputs():
    x = torch.randn(4, 16)
    w_q = random_int8(8, 16)
    s = torch.rand(8) + 0.1
    f = ops.int8_dynamic_linear
    g = ops.int8_weight_only_linear
    return [
        ("x dtype", lambda: f(x.to(torch.int32), w_q, s), TypeError, "x must be float32"),
        ("x 0-d", lambda: f(torch.tensor(1.0), w_q, s), ValueError, "x must have at least 1 dim"),
        ("w_q dtype", lambda: f(x, w_q.float(), s), TypeError, "w_q must be int8"),
        ("w_q 1-D", lambda: f(x, w_q[0], s), ValueError, "w_q must be 2-D"),
        ("w_q 3-D", lambda: g(x, w_q[None], s), ValueError, "w_q must be 2-D"),
        ("K mismatch", lambda: f(x, w_q[:, :15], s), ValueError, "w_q must have K=16"),
        ("scale dtype", lambda: g(x, w_q, s.double()), TypeError, "w_scale must be float32"),
        ("scale shape", lambda: f(x, w_q, s[:7]), ValueError, r"w_scale must have shape \(N,\)"),
        ("bias shape", lambda: f(x, w_q, s, torch.randn(9)), ValueError, "bias must have shape"),
        (
            "bias dtype",
            lambda: g(x, w_q, s, torch.ones(8, dtype=torch.int64)),
            TypeError,
            "bias must be a floating-point tensor, got torch.int64",
        ),
        ("mm a dtype", lambda: ops.int8_mm(x, w_q), TypeError, "a must be int8"),
        ("mm b K", lambda: ops.int8_mm(w_q, w_q[:, :3]), ValueError, "b must have K=16"),
        (
            "x not tensor",
            lambda: ops.quantize_per_token([1.0]),
            TypeError,
            "x must be a torch.Tensor, got list",
        ),
    ]


@pytest.mark.parametrize(("what", "call", "exc", "match"), _bad_inputs(), ids=lambda v: None)
def test_bad_input_names_the_argument(what, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(_ext._C is None, reason="the C++ extension is not built")
def test_k_past_exact_int32_sums_is_refused_by_the_op_and_the_binding():
    """K * 127 * 128 must stay below 2**31: past it, the int32 sums of int8 products wrap."""
    k = ops.int8.MAX_DYNAMIC_K + 1
    x, w = torch.randn(1, k), torch.full((1, k), -128, dtype=torch.int8)
    a = torch.full((1, k), 127, dtype=torch.int8)
    match = rf"K must be at most {k - 1} for an int8 GEMM .* got K = {k}"
    for call in (
        lambda: ops.int8_dynamic_linear(x, w, torch.ones(1)),
        lambda: _ext._C.int8_dynamic_linear_cpu(x, w, torch.ones(1), None),
        lambda: ops.int8_mm(a, w),
        lambda: _ext._C.int8_mm_cpu(a, w),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    # W8A16 sums in float: any K (fp32 sums over 132k products: a relative error of ~1e-6).
    out = ops.int8_weight_only_linear(x, w, torch.ones(1))
    torch.testing.assert_close(out.double(), x.double() @ w.double().T, rtol=1e-5, atol=0)
    # At the limit the W8A8 sums are exact.
    k -= 1
    got = ops.int8_mm(a[:, :k], w[:, :k])
    assert got.item() == -127 * 128 * k


def _entry_points():
    """(entry point, its arguments in schema order, the names of those that take a tensor)."""
    import torchslim.sparse as sp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, generator=g)
    w_q, s = random_int8(8, 16), torch.rand(8, generator=g) + 0.1
    sliced = sp.compress_sliced(w_q)
    q = torch.randn(1, 2, 3, 8, generator=g)
    return [
        (ops.int8_dynamic_linear, [x, w_q, s, torch.zeros(8)], ["x", "w_q", "w_scale", "bias"]),
        (
            ops.sparse_sliced_dynamic_linear,
            [x, *sliced, 8, s, torch.zeros(8)],
            ["x", "values", "columns", "groups", "group_offsets", "value_offsets", "", "scales"],
        ),
        (
            lambda q, k, v, mask: ops.attention(q, k, v, attn_mask=mask),
            [q, q, q, torch.ones(3, 3, dtype=torch.bool)],
            ["q", "k", "v", "attn_mask"],
        ),
    ]


@pytest.mark.parametrize("case", range(3))
def test_entry_points_name_an_argument_that_is_not_a_tensor(case):
    # The entry points check their arguments' types only when the op fails (_call_op); the error
    # still names the argument (a list, or None where a tensor is required), and a well-formed
    # call runs
    fn, args, names = _entry_points()[case]
    fn(*args)
    for at, name in enumerate(names):
        if not name:
            continue
        bad = list(args)
        bad[at] = [1.0]
        with pytest.raises(TypeError, match=rf"^{name} must be a torch\.Tensor, got list$"):
            fn(*bad)
        if name not in ("bias", "attn_mask"):  # (scales is optional in the schema)
            bad[at] = None
            with pytest.raises((TypeError, ValueError), match=rf"^{name} (must|\(N,\))"):
                fn(*bad)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b.startswith("cpu")])
def test_cpu_int8_mm_rejects_minus_128(backend):
    a = random_int8(3, 40)
    a[1, 7] = -128
    with run_on(backend), pytest.raises(ValueError, match=r"a must hold symmetric int8 codes"):
        ops.int8_mm(a, random_int8(5, 40))


def test_wrong_device_is_named():
    if not torch.cuda.is_available():
        meta_scale = torch.ones(8, device="meta")
        with pytest.raises(RuntimeError, match="w_scale must be on x's device"):
            ops.int8_weight_only_linear(torch.randn(2, 16), random_int8(8, 16), meta_scale)
    else:
        with pytest.raises(RuntimeError, match="w_q must be on x's device"):
            ops.int8_weight_only_linear(
                torch.randn(2, 16, device="cuda"), random_int8(8, 16), torch.ones(8)
            )
    # ops without an x name their own first argument
    with pytest.raises(RuntimeError, match="b must be on a's device meta"):
        ops.int8_mm(torch.zeros(2, 4, dtype=torch.int8, device="meta"), random_int8(3, 4))
    with pytest.raises(RuntimeError, match="k must be on q's device meta"):
        q = torch.zeros(1, 1, 2, 4, device="meta")
        ops.attention(q, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    with pytest.raises(TypeError, match=r"explain\('int8_mm', \.\.\.\) needs the op's arguments"):
        ops.explain("int8_mm", 1, 2)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b.startswith("cpu")])
@pytest.mark.parametrize("mode", sorted(LINEAR_OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (M, K, N): the threads split the columns; at few rows in blocks of up to 256 columns, several
# blocks a thread with a last one cut short; then, with fewer than 2M columns and 128 rows a
# thread, the rows (in shares that are not whole blocks of the tile kernels).
@pytest.mark.parametrize("mkn", [(1, 330, 1100), (3, 160, 700), (70, 300, 150), (300, 200, 290)])
def test_cpu_kernel_threads(backend, mode, dtype, mkn, gen):
    """The result does not depend on torch.set_num_threads (the work split is by output block),
    and meets the reference either way."""
    op, reference = LINEAR_OPS[mode]
    m, k, n = mkn
    x = torch.randn(m, k, generator=gen).to(dtype)
    w_q, w_scale, bias = _weights(n, k, "cpu", gen)
    threads = torch.get_num_threads()
    with run_on(backend):
        try:
            torch.set_num_threads(1)
            one = op(x, w_q, w_scale, bias)
            torch.set_num_threads(max(2, threads))
            many = op(x, w_q, w_scale, bias)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(one, many)
    ref64 = reference(x.double(), w_q, w_scale, bias, compute_dtype=torch.float64)
    check_close(many, ref64, reference(x, w_q, w_scale, bias))


@pytest.mark.skipif(
    _ext._C is None or "amx" not in _ext._C.supported_isas(), reason="no AMX tiles on this CPU"
)
def test_amx_tiles_from_their_threshold(gen):
    """The amx level runs the int8 GEMM on the tile unit from its threshold on (the AVX-512 VNNI
    dot kernels below it), exactly: int32 sums equal the reference, and the fp32/bf16 outputs
    equal the avx512 level's bit for bit (same sums, same epilogue arithmetic). The shapes cut
    the 32 x 32 register block and the 128 x 256 thread block, K has a tail of 3 columns and
    the weights a row stride past K."""
    with run_on("cpu-amx"):
        first = _ext._C.cpu_kernel_paths()["int8_tiles_from_m"]
    with run_on("cpu-avx512"):
        assert _ext._C.cpu_kernel_paths()["int8_tiles_from_m"] is None
    assert isinstance(first, int) and first >= 1
    n, k = 300, 4099
    b = nan_padded(torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen))
    w_q, w_scale, bias = _weights(n, k, "cpu", gen)
    for m in sorted({max(first - 1, 1), first, 17, 131}):
        a = nan_padded(random_int8(m, k, generator=gen))
        with run_on("cpu-amx"):
            assert torch.equal(ops.int8_mm(a, b), ref.int8_mm(a, b)), m
        for dtype in (torch.float32, torch.bfloat16):
            x = _activations(m, k, dtype, "cpu", gen)
            with run_on("cpu-amx"):
                tiles = ops.int8_dynamic_linear(x, w_q, w_scale, bias)
            with run_on("cpu-avx512"):
                dots = ops.int8_dynamic_linear(x, w_q, w_scale, bias)
            assert torch.equal(tiles, dots), (m, dtype)


# The levels whose W8A8 GEMM has weight strips, and the strips' width in columns.
STRIP_COLUMNS = {"avx512": 32, "avx2": 24}


@pytest.mark.parametrize("isa", sorted(STRIP_COLUMNS))
def test_strips_from_their_threshold(isa, gen, poisoned_empty):
    """From a threshold that grows with K, the avx512 and avx2 levels' W8A8 GEMM meets strips of
    weight columns (32 in the VNNI order; 24 for AVX2's sign trick) with broadcast activation
    codes (the dot kernels below it); the amx level's tiles take those M instead, and the
    portable level has none. Exact: int32 sums equal the reference, with -128 in the weights
    too (avx512's strips hold w + 128; on avx2 a strip that holds -128 takes the dot kernels,
    and its neighbours stay strips). N cuts the vectors, the strips and the thread blocks, M
    the register tiles (edges of every height) and the 128-row blocks, the rows are NaN-padded
    views; K not a multiple of a strip vector's bytes keeps the dot kernels at any M. The fp32
    and bf16 outputs equal the portable level's dot kernels bit for bit."""
    if _ext._C is None or isa not in _ext._C.supported_isas():
        pytest.skip(f"no {isa} on this CPU")
    with run_on(f"cpu-{isa}"):
        first = _ext._C.cpu_kernel_paths()["int8_strips_from_m"]
    assert sorted(first) == [1024, 2048, 4096, 65536]
    assert all(isinstance(m, int) and 1 <= m <= 64 for m in first.values())
    for other in ("amx", "portable"):
        if other in _ext._C.supported_isas():
            with run_on(f"cpu-{other}"):
                assert _ext._C.cpu_kernel_paths()["int8_strips_from_m"] is None
    cols = STRIP_COLUMNS[isa]
    for n, k in ((70, 320), (33, 2048), (129, 2112), (40, 4160), (20, 288), (3 * cols + 5, 96)):
        threshold = next(m for limit, m in sorted(first.items()) if k <= limit)
        raw = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        low = raw.clone()
        low[min(cols + 1, n - 1), k // 3] = -128  # one strip of columns (the second, if any)
        w_q, w_scale, bias = _weights(n, k, "cpu", gen)
        for m in sorted({threshold - 1, threshold, threshold + 5, 131}):
            a = nan_padded(random_int8(m, k, generator=gen))
            for b in (nan_padded(raw), nan_padded(low)):
                with run_on(f"cpu-{isa}"):
                    assert torch.equal(ops.int8_mm(a, b), ref.int8_mm(a, b)), (m, n, k)
            for dtype in (torch.float32, torch.bfloat16):
                x = _activations(m, k, dtype, "cpu", gen)
                args = (w_q, w_scale, bias if m % 2 else None)
                with run_on(f"cpu-{isa}"):
                    out = ops.int8_dynamic_linear(x, *args)
                ref64 = ref.int8_dynamic_linear(x.double(), *args, compute_dtype=torch.float64)
                check_close(out, ref64, ref.int8_dynamic_linear(x, *args), name=f"M={m} {n}x{k}")
                # The same sums and the dot kernels' epilogue, rounding for rounding: a bias
                # added after the op rounds as the one passed in (the graph passes rely on it).
                with run_on("cpu-portable"):
                    assert torch.equal(out, ops.int8_dynamic_linear(x, *args)), (m, n, k, dtype)


@pytest.mark.parametrize("k", [40, 4099])
def test_reference_linear_ignores_memory_beside_the_rows(k, gen):
    """The reference's bf16 matmul gives a NaN-padded view's rows the result of their contiguous
    copy: PyTorch's own on AMX CPUs reads past K when K % 32 != 0 (reference/_linear.py)."""
    x = nan_padded(torch.randn(33, k, generator=gen).bfloat16())
    w_q, w_scale, bias = _weights(17, k, "cpu", gen)
    for reference in (ref.int8_weight_only_linear, ref.int8_dynamic_linear):
        out = reference(x, w_q, w_scale, bias)
        assert torch.isfinite(out).all()
        assert torch.equal(out, reference(x.contiguous(), w_q, w_scale, bias))


@pytest.mark.skipif(
    _ext._C is None or "amx" not in _ext._C.supported_isas(), reason="no AMX tiles on this CPU"
)
def test_amx_weight_only_tiles_from_their_threshold(gen, poisoned_empty):
    """W8A16 on the amx level runs on bf16 tiles from its threshold on: x in 1 bf16 part (bf16
    x) or 3 (fp32 x), by the float rule against the float64 reference. N cuts the 32-row strips
    and the 256-column blocks, M the panel pairs and the 256-row blocks, K the 1024-column slices
    (with a tail of 3 columns)."""
    with run_on("cpu-amx"):
        first = _ext._C.cpu_kernel_paths()["int8_weight_only_tiles_from_m"]
    with run_on("cpu-avx512"):
        assert _ext._C.cpu_kernel_paths()["int8_weight_only_tiles_from_m"] is None
    assert isinstance(first, int) and first >= 1
    for n, k in ((300, 2051), (37, 96)):
        w_q, w_scale, bias = _weights(n, k, "cpu", gen)
        for m in sorted({max(first - 1, 1), first, 290}):
            for dtype in (torch.float32, torch.bfloat16):
                x = _activations(m, k, dtype, "cpu", gen)
                with run_on("cpu-amx"):
                    out = ops.int8_weight_only_linear(x, w_q, w_scale, bias)
                ref64 = ref.int8_weight_only_linear(
                    x.double(), w_q, w_scale, bias, compute_dtype=torch.float64
                )
                lowp = ref.int8_weight_only_linear(x, w_q, w_scale, bias)
                check_close(out, ref64, lowp, name=f"M={m} N={n} K={k} {dtype}")


def test_weight_only_bf16_pairs_from_their_threshold(gen, poisoned_empty):
    """W8A16 on bf16 x at the avx512 level of a CPU with AVX512_BF16 runs on VDPBF16PS against
    weight strips of bf16 pairs from its threshold on (the dot kernels on x widened to fp32
    below it, and fp32 x at any M), by the float rule against the float64 reference; no other
    level has the path. N cuts the 32-column strips and the thread blocks, M the 8-row register
    tiles (edges of every height) and the 128-row blocks, K odd (a last pair of one value) and
    not a multiple of 32 (the strips' zero padding), the rows NaN-padded views. Which path ran
    shows in subnormal x: VDPBF16PS reads it as zero (documented in pair_gemm.h), the dot
    kernels do not."""
    if _ext._C is None or "avx512" not in _ext._C.supported_isas():
        pytest.skip("no avx512 on this CPU")
    with run_on("cpu-avx512"):
        first = _ext._C.cpu_kernel_paths()["int8_weight_only_bf16_pairs_from_m"]
    for other in ("amx", "avx2", "portable"):
        if other in _ext._C.supported_isas():
            with run_on(f"cpu-{other}"):
                assert _ext._C.cpu_kernel_paths()["int8_weight_only_bf16_pairs_from_m"] is None
    if first is None:
        assert not _ext._C.cpu_features()["avx512bf16"]
        pytest.skip("no AVX512_BF16 on this CPU")
    assert isinstance(first, int) and 1 <= first <= 64
    for n, k in ((300, 2051), (37, 96), (65, 33), (33, 4100)):
        w_q, w_scale, bias = _weights(n, k, "cpu", gen)
        for m in sorted({first - 1, first, first + 1, first + 7, 131, 290}):
            x = _activations(m, k, torch.bfloat16, "cpu", gen)
            args = (w_q, w_scale, bias if m % 2 else None)
            with run_on("cpu-avx512"):
                out = ops.int8_weight_only_linear(x, *args)
            ref64 = ref.int8_weight_only_linear(x.double(), *args, compute_dtype=torch.float64)
            lowp = ref.int8_weight_only_linear(x, *args)
            check_close(out, ref64, lowp, name=f"M={m} N={n} K={k}")
    w_q, w_scale, _ = _weights(40, 64, "cpu", gen)
    for m in sorted({max(first - 1, 1), first}):
        tiny = torch.full((m, 64), 1e-39).bfloat16()  # subnormal in bf16
        assert tiny.float().abs().min() > 0
        with run_on("cpu-avx512"):
            out = ops.int8_weight_only_linear(tiny, w_q, w_scale, None)
        assert (out.abs().max() == 0) == (m >= first), m
