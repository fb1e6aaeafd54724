"""Triton quantized matmuls (kernels/quant_matmul.py) against torchslim.reference.int8.

Where there is no GPU, runs the kernels under the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1, set by conftest.py before triton is imported); on a GPU machine it tests
the compiled kernels on CUDA tensors, bf16 included (TRITON_INTERPRET=1 forces the interpreter
there too).

Integer results (int8_mm, the quantization codes) must match the reference exactly. Float
outputs follow the flash-attention rule: max |out - yardstick| <= 2 * max |ref - yardstick| +
1e-5, where the yardstick is the reference computed in float64 and ``ref`` is the reference in
its default precision (fp32 epilogue for W8A8, x.dtype matmul for W8A16).
"""

import pytest
import torch
from conftest import seeded, triton_kernel_modules

from torchslim.reference import int8 as ref
from torchslim.testing import check_close

autotune, qm = triton_kernel_modules("quant_matmul")

DEVICE = "cpu" if autotune.INTERPRET else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

M_SIZES = [0, 1, 3, 17, 33]  # 1, 3: decode (split-K) W8A16 path; 17, 33: tiled path
NK_SIZES = [(1, 1), (7, 13), (64, 96), (65, 257)]
# Triton 3.9's interpreter gets bf16 wrong in two ways: tl.dot on bf16 operands returns garbage,
# and fp32 -> bf16 casts truncate instead of rounding to nearest even. So bf16 outputs are
# tested on a GPU only; bf16 *inputs* to the quantizer (an exact upcast) are tested anywhere.
QUANT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LINEAR_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
POISON_INT = {torch.int8: -128, torch.int32: -(2**31)}  # never a code / an int8 GEMM result


def _randn(g, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _int8(g, *shape) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).to(DEVICE)


def _linear_inputs(g, M, N, K, dtype, bias_dtype):
    """x ~ N(0, 1); w = w_q * w_scale with rows of norm ~1, so outputs are O(1)."""
    x = _randn(g, M, K, dtype=dtype)
    w_q = _int8(g, N, K)
    w_scale = ((torch.rand(N, generator=g) + 0.5) / (127 * max(K, 1) ** 0.5)).to(DEVICE)
    bias = None if bias_dtype is None else _randn(g, N, dtype=bias_dtype)
    return x, w_q, w_scale, bias


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN / impossible integers, so an unwritten output element fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else POISON_INT.get(t.dtype, 0))

    monkeypatch.setattr(torch, "empty", empty)


def _assert_flash_rule(out, ref_fn, x, w_q, w_scale, bias):
    """The GUIDE's rule (torchslim.testing.check_close): max |out - ref64| <= 2 x the max error
    of the reference in x's dtype + a floor of a few ulps."""
    M, N = x.shape[0], w_q.shape[0]
    assert out.shape == (M, N) and out.dtype == x.dtype and out.device == x.device
    yardstick = ref_fn(x.double(), w_q, w_scale, bias, compute_dtype=torch.float64)
    check_close(out, yardstick.to(out.device), ref_fn(x, w_q, w_scale, bias))


# ---------------------------------------------------------------------------------------------
# int8_mm: exact
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N, K", [*NK_SIZES, (5, 0)])
@pytest.mark.parametrize("M", M_SIZES)
def test_int8_mm_exact(M, N, K, poisoned_empty):
    g = seeded("mm", M, N, K)
    a, b = _int8(g, M, K), _int8(g, N, K)
    c = qm.int8_mm(a, b)
    assert c.dtype == torch.int32 and c.shape == (M, N)
    assert torch.equal(c, ref.int8_mm(a, b))


def test_int8_mm_strided_operands(poisoned_empty):
    """a column-major, b a row slice of a buffer padded with 127s (out-of-bounds reads show)."""
    g = seeded("mm-strided")
    M, N, K = 33, 65, 257
    a = _int8(g, K, M).t()
    b_buf = torch.full((N, K + 7), 127, dtype=torch.int8, device=DEVICE)
    b_buf[:, :K] = _int8(g, N, K)
    b = b_buf[:, :K]
    assert not a.is_contiguous() and not b.is_contiguous()
    assert torch.equal(qm.int8_mm(a, b), ref.int8_mm(a, b))


# ---------------------------------------------------------------------------------------------
# Per-token quantization: bit-exact codes and scales
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
@pytest.mark.parametrize("M, K", [(0, 13), (1, 1), (3, 13), (17, 96), (33, 257), (3, 0)])
def test_quantize_per_token_exact(M, K, dtype, poisoned_empty):
    g = seeded("quant", M, K, str(dtype))
    x = _randn(g, M, K, dtype=dtype) * 3
    if M > 2:
        x[1] = 0  # all-zero row: scale 1.0
    x_q, x_scale = qm.quantize_per_token(x)
    want_q, want_scale = ref.quantize_per_token(x)
    assert x_q.dtype == torch.int8 and x_scale.dtype == torch.float32
    assert torch.equal(x_q, want_q)
    assert torch.equal(x_scale, want_scale)


def test_quantize_rounds_half_to_even():
    """Rows with amax = 127 (scale exactly 1) whose values are all k + 0.5: every code is a tie."""
    halves = torch.arange(-126, 126, dtype=torch.float32) + 0.5
    x = torch.stack([halves, -halves.flip(0)])
    x = torch.cat([x, torch.full((2, 1), 127.0)], dim=1).to(DEVICE)
    x_q, x_scale = qm.quantize_per_token(x)
    assert torch.equal(x_scale, torch.ones(2, device=DEVICE))
    assert torch.equal(x_q, torch.round(x).to(torch.int8))  # torch.round: half to even
    assert torch.equal(x_q, ref.quantize_per_token(x)[0])


def test_quantize_strided_input():
    """x is a column slice of a NaN-padded buffer: reading past K would poison the scale."""
    g = seeded("quant-strided")
    buf = torch.full((17, 96 + 5), float("nan"), device=DEVICE)
    buf[:, :96] = _randn(g, 17, 96)
    x = buf[:, :96]
    x_q, x_scale = qm.quantize_per_token(x)
    want_q, want_scale = ref.quantize_per_token(x)
    assert torch.equal(x_q, want_q) and torch.equal(x_scale, want_scale)


# ---------------------------------------------------------------------------------------------
# W8A8 dynamic and W8A16 weight-only linear: flash-attention error rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("N, K", NK_SIZES)
@pytest.mark.parametrize("M", M_SIZES)
def test_int8_dynamic_linear(M, N, K, dtype, with_bias, poisoned_empty):
    g = seeded("w8a8", M, N, K, str(dtype), with_bias)
    x, w_q, w_scale, bias = _linear_inputs(g, M, N, K, dtype, torch.float32 if with_bias else None)
    out = qm.int8_dynamic_linear(x, w_q, w_scale, bias)
    _assert_flash_rule(out, ref.int8_dynamic_linear, x, w_q, w_scale, bias)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("N, K", NK_SIZES)
@pytest.mark.parametrize("M", M_SIZES)
def test_int8_weight_only_linear(M, N, K, dtype, with_bias, poisoned_empty):
    g = seeded("w8a16", M, N, K, str(dtype), with_bias)
    x, w_q, w_scale, bias = _linear_inputs(g, M, N, K, dtype, dtype if with_bias else None)
    out = qm.int8_weight_only_linear(x, w_q, w_scale, bias)
    _assert_flash_rule(out, ref.int8_weight_only_linear, x, w_q, w_scale, bias)


@pytest.mark.parametrize("layout", ["padded-rows", "column-major"])
@pytest.mark.parametrize("M", [3, 33])
@pytest.mark.parametrize(
    "op, ref_fn",
    [
        (qm.int8_dynamic_linear, ref.int8_dynamic_linear),
        (qm.int8_weight_only_linear, ref.int8_weight_only_linear),
    ],
    ids=["w8a8", "w8a16"],
)
def test_linear_non_contiguous(op, ref_fn, M, layout, poisoned_empty):
    """Non-contiguous x (NaN padding after each row, or column-major) and padded w_q rows."""
    g = seeded("strided", op.__name__, M, layout)
    N, K = 65, 96
    x_dense, w_dense, w_scale, bias = _linear_inputs(g, M, N, K, torch.float16, torch.float16)
    if layout == "padded-rows":
        buf = torch.full((M, K + 3), float("nan"), dtype=torch.float16, device=DEVICE)
        buf[:, :K] = x_dense
        x = buf[:, :K]
    else:
        x = x_dense.t().contiguous().t()
    w_buf = torch.full((N, K + 5), 127, dtype=torch.int8, device=DEVICE)
    w_buf[:, :K] = w_dense
    w_q = w_buf[:, :K]
    assert not x.is_contiguous() and not w_q.is_contiguous()
    out = op(x, w_q, w_scale, bias)
    _assert_flash_rule(out, ref_fn, x, w_q, w_scale, bias)


@pytest.mark.parametrize("op", [qm.int8_dynamic_linear, qm.int8_weight_only_linear])
def test_linear_empty_k(op):
    """K = 0: the sum is empty, so the output is the bias."""
    g = seeded("k0", op.__name__)
    x, w_q, w_scale, bias = _linear_inputs(g, 3, 5, 0, torch.float32, torch.float32)
    assert torch.equal(op(x, w_q, w_scale, bias), bias.expand(3, 5))


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _valid_linear_args():
    g = seeded("valid")
    return _linear_inputs(g, 4, 32, 64, torch.float16, torch.float32)


@pytest.mark.parametrize("op", [qm.int8_dynamic_linear, qm.int8_weight_only_linear])
def test_linear_rejects_bad_input(op):
    x, w_q, w_scale, bias = _valid_linear_args()
    with pytest.raises(ValueError, match=r"w_q must be \(N, K\) = \(\*, 64\) to match x's K, got "
                       r"\(32, 48\)"):  # fmt: skip
        op(x, w_q[:, :48], w_scale, bias)
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16, got torch.int8"):
        op(x.to(torch.int8), w_q, w_scale, bias)
    with pytest.raises(ValueError, match=r"x must be 2-D \(M, K\), got shape \(1, 4, 64\)"):
        op(x[None], w_q, w_scale, bias)
    with pytest.raises(TypeError, match=r"w_q must be int8, got torch.float16"):
        op(x, w_q.half(), w_scale, bias)
    with pytest.raises(ValueError, match=r"w_scale must be \(N,\) = \(32,\) to match w_q's N, got "
                       r"\(33,\)"):  # fmt: skip
        op(x, w_q, torch.cat([w_scale, w_scale[:1]]), bias)
    with pytest.raises(ValueError, match=r"w_scale must be 1-D \(N,\), got shape \(32, 1\)"):
        op(x, w_q, w_scale[:, None], bias)
    with pytest.raises(TypeError, match=r"w_scale must be float32, got torch.float16"):
        op(x, w_q, w_scale.half(), bias)
    with pytest.raises(ValueError, match=r"bias must be \(N,\) = \(32,\) to match w_q's N"):
        op(x, w_q, w_scale, bias[:31])
    with pytest.raises(TypeError, match=r"bias must be a floating-point tensor, got torch.int32"):
        op(x, w_q, w_scale, bias.int())
    with pytest.raises(ValueError, match=r"w_scale must be on the same device as x"):
        op(x, w_q, w_scale.to("meta"), bias)


def test_int8_mm_and_quantize_reject_bad_input():
    a = torch.zeros(4, 64, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match=r"b must be \(N, K\) = \(\*, 64\) to match a's K"):
        qm.int8_mm(a, a[:, :48])
    with pytest.raises(TypeError, match=r"a must be int8, got torch.float32"):
        qm.int8_mm(a.float(), a)
    with pytest.raises(TypeError, match=r"b must be a torch.Tensor"):
        qm.int8_mm(a, a.tolist())
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16"):
        qm.quantize_per_token(a)


# ---------------------------------------------------------------------------------------------
# Every config of every GPU autotune table, each forced on its own (GPU only)
# ---------------------------------------------------------------------------------------------

_GPU_CONFIGS = [
    (name, i)
    for name, table in autotune.GPU_TABLES.items()
    if name in ("int8_gemm", "w8a16_tiled", "w8a16_decode")
    for i in range(len(table))
]


@pytest.mark.skipif(DEVICE != "cuda", reason="the GPU tables compile for a GPU only")
@pytest.mark.parametrize("table, index", _GPU_CONFIGS, ids=[f"{t}-{i}" for t, i in _GPU_CONFIGS])
def test_every_gpu_config(table, index, monkeypatch, poisoned_empty):
    """Each config unpruned (tiles larger than the problem, split-K with empty slices) on a
    shape that is a multiple of no tile; whatever autotuning picks must be correct."""
    kernel = {"int8_gemm": qm._int8_gemm, "w8a16_tiled": qm._w8a16_tiled}.get(
        table, qm._w8a16_decode
    )
    monkeypatch.setattr(kernel, "configs", [autotune.GPU_TABLES[table][index]])
    M = 3 if table == "w8a16_decode" else 33
    N, K = 300, 1000
    g = seeded("config", table, index)
    if table == "int8_gemm":
        a, b = _int8(g, M, K), _int8(g, N, K)
        assert torch.equal(qm.int8_mm(a, b), ref.int8_mm(a, b))
        x, w_q, w_scale, bias = _linear_inputs(g, M, N, K, torch.float16, torch.float32)
        out = qm.int8_dynamic_linear(x, w_q, w_scale, bias)
        _assert_flash_rule(out, ref.int8_dynamic_linear, x, w_q, w_scale, bias)
        return
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x, w_q, w_scale, bias = _linear_inputs(g, M, N, K, dtype, dtype)
        out = qm.int8_weight_only_linear(x, w_q, w_scale, bias)
        _assert_flash_rule(out, ref.int8_weight_only_linear, x, w_q, w_scale, bias)


# ---------------------------------------------------------------------------------------------
# Autotune pruning (pure Python, runs on the GPU tables even under the interpreter)
# ---------------------------------------------------------------------------------------------


def _prune(table, M, N, K, a_dtype=torch.float16):
    args = {
        "a_ptr": torch.empty(0, dtype=a_dtype),
        "b_ptr": torch.empty(0, dtype=torch.int8),
        "M": M,
        "N": N,
        "K": K,
    }
    return autotune.prune_gemm_configs(table, args, M_BUCKET=autotune.m_bucket(M))


def _signature(cfg):
    return (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages)


def test_prune_clamps_tiles_and_deduplicates():
    table = autotune._INT8_GEMM_GPU
    small = _prune(table, M=3, N=4096, K=4096, a_dtype=torch.int8)
    assert small and all(c.kwargs["BLOCK_M"] == autotune.MIN_BLOCK_M for c in small)
    assert len({_signature(c) for c in small}) == len(small) < len(table)
    big = _prune(table, M=4096, N=4096, K=4096, a_dtype=torch.int8)
    assert [_signature(c) for c in big] == [_signature(c) for c in table]
    narrow = _prune(table, M=4096, N=20, K=40, a_dtype=torch.int8)
    assert all(c.kwargs["BLOCK_N"] <= 32 and c.kwargs["BLOCK_K"] <= 64 for c in narrow)
    assert table[0].kwargs["BLOCK_M"] == 128, "pruning must not modify the shared table"


def test_prune_drops_useless_split_k_and_oversized_configs(monkeypatch):
    decode = autotune._W8A16_DECODE_GPU
    short_k = _prune(decode, M=1, N=4096, K=128)
    assert short_k and all(c.kwargs["SPLIT_K"] == 1 for c in short_k)
    assert any(c.kwargs["SPLIT_K"] > 1 for c in _prune(decode, M=1, N=4096, K=8192))

    monkeypatch.setattr(autotune, "_shared_memory_limit", lambda t: 100 * 1024)
    tiled = _prune(autotune._W8A16_TILED_GPU, M=4096, N=4096, K=4096, a_dtype=torch.float32)
    for c in tiled:
        kw = c.kwargs
        assert c.num_stages * kw["BLOCK_K"] * (kw["BLOCK_M"] * 4 + kw["BLOCK_N"]) <= 100 * 1024
    assert 0 < len(tiled) < len(autotune._W8A16_TILED_GPU)
