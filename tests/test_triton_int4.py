"""Triton W4A16 linear (kernels/int4_matmul.py) against torchslim.reference.int4.

Where there is no GPU, runs the kernel under the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1, set by conftest.py before triton is imported; fp16 and fp32 only, as the
interpreter's bf16 tl.dot is wrong); on a GPU machine it tests the compiled kernel on CUDA
tensors, bf16 included. Outputs follow the flash-attention rule against the reference in float64.
"""

import pytest
import torch
from conftest import seeded, triton_kernel_modules

from torchslim.quant import quantize_int4
from torchslim.reference import int4 as ref
from torchslim.testing import check_close

autotune, im = triton_kernel_modules("int4_matmul")

DEVICE = "cpu" if autotune.INTERPRET else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
M_SIZES = [0, 1, 3, 17, 33]  # 1, 3: decode (split-K) path; 17, 33: tiled path
# (N, K, group sizes): groups of 32, 64 and 128, 96 (tiles of 32), 24 (shorter than any tile:
# scales per element), odd N, K with a partial tile, per-channel rows that no tile divides.
NKG = [(7, 64, (32, -1)), (65, 256, (64, 128)), (33, 288, (32, 96, -1)), (16, 30, (-1,)),
       (9, 72, (24,))]  # fmt: skip


def _inputs(g, M, N, K, group_size, dtype, scale_dtype, with_bias):
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = torch.randn(N, K, generator=g) / max(K, 1) ** 0.5
    packed, scales, zeros = quantize_int4(w, group_size, scale_dtype=scale_dtype)
    bias = torch.randn(N, generator=g).to(DEVICE, dtype) if with_bias else None
    return x, packed.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), bias


def _check(out, x, packed, scales, zeros, group_size, bias):
    args = (packed, scales, zeros, group_size, bias)
    assert out.shape == (x.shape[0], packed.shape[0]) and out.dtype == x.dtype
    ref64 = ref.int4_weight_only_linear(x.double(), *args, compute_dtype=torch.float64)
    check_close(out, ref64, ref.int4_weight_only_linear(x, *args))


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN, so an unwritten output element fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def _cases():
    return [(m, n, k, gs) for m in M_SIZES for n, k, groups in NKG for gs in groups]


@pytest.mark.parametrize(("M", "N", "K", "group_size"), _cases())
def test_against_reference(M, N, K, group_size, poisoned_empty):
    for i, dtype in enumerate(DTYPES):
        g = seeded("w4a16", M, N, K, group_size, str(dtype))
        scale_dtype = (torch.float32, torch.bfloat16, torch.float16)[(M + i) % 3]
        inputs = _inputs(g, M, N, K, group_size, dtype, scale_dtype, with_bias=(M + i) % 2 == 1)
        _check(im.int4_weight_only_linear(*inputs[:4], group_size, inputs[4]), *inputs[:4],
               group_size, inputs[4])  # fmt: skip


@pytest.mark.parametrize("M", [3, 33])
def test_strided_operands(M, poisoned_empty):
    """x column-major, the packed weight a row slice of a padded buffer, the bias every other
    element of one."""
    g = seeded("strided", M)
    N, K, gs = 40, 128, 32
    x, packed, scales, zeros, bias = _inputs(g, M, N, K, gs, torch.float32, torch.float32, True)
    xt = x.t().contiguous().t()
    buf = torch.full((N, K // 2 + 8), 0xFF, dtype=torch.uint8, device=DEVICE)
    buf[:, : K // 2] = packed
    strided_bias = torch.stack([bias, torch.full_like(bias, float("nan"))], 1)[:, 0]
    out = im.int4_weight_only_linear(xt, buf[:, : K // 2], scales, zeros, gs, strided_bias)
    _check(out, x, packed, scales, zeros, gs, bias)


def test_empty_k_gives_the_bias():
    x = torch.randn(3, 0, device=DEVICE)
    packed = torch.zeros(5, 0, dtype=torch.uint8, device=DEVICE)
    scales = torch.ones(5, 0, device=DEVICE)
    bias = torch.randn(5, device=DEVICE)
    out = im.int4_weight_only_linear(x, packed, scales, scales.clone(), -1, bias)
    assert torch.equal(out, bias.expand(3, 5))


def test_rejects_bad_input():
    x = torch.randn(2, 64, device=DEVICE)
    p = torch.zeros(8, 32, dtype=torch.uint8, device=DEVICE)
    s = torch.ones(8, 2, device=DEVICE)
    f = im.int4_weight_only_linear
    with pytest.raises(ValueError, match="packed_w must be"):
        f(x, p[:, :16], s, s, 32)
    with pytest.raises(TypeError, match="packed_w must be uint8"):
        f(x, p.to(torch.int8), s, s, 32)
    with pytest.raises(ValueError, match="group_size must be"):
        f(x, p, s, s, 48)
    with pytest.raises(ValueError, match="scales must be"):
        f(x, p, s[:, :1], s, 32)
    with pytest.raises(TypeError, match="zeros must be"):
        f(x, p, s, s.half(), 32)
    with pytest.raises(ValueError, match="even K"):
        f(torch.randn(2, 63, device=DEVICE), p, s, s, -1)


def test_prune_fits_tiles_inside_groups():
    """Every pruned config's BLOCK_K divides the group size; split-K never exceeds the K blocks."""
    table = autotune.GPU_TABLES["w4a16_decode"] + autotune.GPU_TABLES["w4a16_tiled"]
    for M, K, G in [(1, 4096, 32), (1, 4096, 128), (64, 576, 96), (1, 4096, 4096), (3, 64, 64)]:
        args = {
            "a_ptr": torch.empty(0, dtype=torch.float16),
            "b_ptr": torch.empty(0, dtype=torch.uint8),
            "M": M, "N": 4096, "K": K, "GROUP_SIZE": G,
        }  # fmt: skip
        kept = autotune.prune_w4a16_configs(table, args, M_BUCKET=autotune.m_bucket(M))
        assert kept
        for cfg in kept:
            bk, split = cfg.kwargs["BLOCK_K"], cfg.kwargs["SPLIT_K"]
            assert G == K or G % bk == 0, (G, bk)
            assert split <= max(1, -(-K // bk))


_GPU_CONFIGS = [
    (name, i)
    for name in ("w4a16_tiled", "w4a16_decode")
    for i in range(len(autotune.GPU_TABLES[name]))
]


@pytest.mark.skipif(DEVICE != "cuda", reason="the GPU tables compile for a GPU only")
@pytest.mark.parametrize("table, index", _GPU_CONFIGS, ids=[f"{t}-{i}" for t, i in _GPU_CONFIGS])
def test_every_gpu_config(table, index, monkeypatch, poisoned_empty):
    """Each config on a shape that is a multiple of no tile, groups of 32 and 128 and per
    channel; whatever autotuning picks must be correct."""
    kernel = im._w4a16_tiled if table == "w4a16_tiled" else im._w4a16_decode
    monkeypatch.setattr(kernel, "configs", [autotune.GPU_TABLES[table][index]])
    M = 33 if table == "w4a16_tiled" else 3
    N, K = 300, 1024
    for group_size in (32, 128, -1):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            g = seeded("config", table, index, group_size, str(dtype))
            inputs = _inputs(g, M, N, K, group_size, dtype, torch.bfloat16, True)
            out = im.int4_weight_only_linear(*inputs[:4], group_size, inputs[4])
            _check(out, *inputs[:4], group_size, inputs[4])
