"""The CUDA C++ 2:4 kernel on the sparse tensor cores (csrc/cuda/sparse24_gemm.cu, mma.sp)
against torchslim.reference.sparse.

The kernel's tests need a GPU and the extension built with CUDA; elsewhere they are skipped (the
compile check of every .cu file is tests/test_cuda_compile.py). Outputs follow the
flash-attention rule against the reference in float64.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_BACKENDS, dense_from_24, seeded

import torchslim
from torchslim import _ext, ops
from torchslim.ops.sparse import SPARSE24_TC_MIN_M
from torchslim.reference import sparse as ref
from torchslim.sparse import compress_24, prune_
from torchslim.testing import check_close, nan_padded

needs_cuda_kernel = pytest.mark.skipif(
    "cuda" not in KERNEL_BACKENDS, reason="needs a GPU and torchslim._C built with CUDA"
)

DTYPES = [torch.float16, torch.bfloat16]
# (N, K): whole tiles; N and K cutting tiles (K = 70: a short meta byte; 129: a lone column in
# the last group; 30: less than one k tile); several block rows and k tiles.
NK = [(128, 64), (33, 70), (40, 129), (16, 30), (200, 256), (300, 1000)]
M_SIZES = [1, 17, 128, 131, 300]


def _run(x, values, meta, bias=None, scales=None):
    return _ext._C.sparse24_linear_cuda(x, values, meta, bias, scales)


def _check(out, x, values, meta, bias=None, scales=None, name=""):
    assert out.shape == (x.shape[0], values.shape[0]) and out.dtype == x.dtype
    args = (values, meta, bias, scales)
    ref64 = ref.sparse24_linear(x.double(), *args, compute_dtype=torch.float64)
    check_close(out, ref64, ref.sparse24_linear(x, *args), name=name)


def _layer(n, k, dtype, g):
    w = prune_(torch.randn(n, k, generator=g) / k**0.5, "2:4", progress=False)
    values, meta = compress_24(w, dtype)
    return values.cuda(), meta.cuda()


@needs_cuda_kernel
@pytest.mark.parametrize(("N", "K"), NK)
@pytest.mark.parametrize("M", M_SIZES)
def test_against_reference(M, N, K, poisoned_empty):
    """Both dtypes, with and without bias and scales (bias in x's dtype or fp32)."""
    g = seeded("sp24-tc", M, N, K)
    for i, dtype in enumerate(DTYPES):
        values, meta = _layer(N, K, dtype, g)
        x = torch.randn(M, K, generator=g).to("cuda", dtype)
        bias = torch.randn(N, generator=g).to("cuda", (dtype, torch.float32)[i]) if M % 2 else None
        scales = (torch.rand(N, generator=g) + 0.5).cuda() if (M + i) % 2 else None
        out = _run(x, values, meta, bias, scales)
        _check(out, x, values, meta, bias, scales, name=f"{dtype}")


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_operands(dtype, poisoned_empty):
    """x with NaN-padded rows at an odd offset, values and meta as slices of wider buffers: the
    kernel stages its tiles with bounds-checked loads instead of cp.async."""
    g = seeded("sp24-tc-unaligned", dtype)
    N, K = 96, 200
    values, meta = _layer(N, K, dtype, g)
    x = nan_padded(torch.randn(40, K, generator=g).to("cuda", dtype), 3)
    vbuf = torch.full((N, values.shape[1] + 5), float("nan"), dtype=dtype, device="cuda")
    vbuf[:, 1 : 1 + values.shape[1]] = values
    mbuf = torch.full((N, meta.shape[1] + 3), 0xFF, dtype=torch.uint8, device="cuda")
    mbuf[:, 1 : 1 + meta.shape[1]] = meta
    v, m = vbuf[:, 1 : 1 + values.shape[1]], mbuf[:, 1 : 1 + meta.shape[1]]
    _check(_run(x, v, m), x, values, meta)


@needs_cuda_kernel
def test_broadcast_rows_of_x():
    """x rows that are one row expanded (row stride 0) are read as they are."""
    g = seeded("sp24-tc-broadcast")
    values, meta = _layer(64, 256, torch.float16, g)
    x = torch.randn(1, 256, generator=g).to("cuda", torch.float16).expand(40, 256)
    assert x.stride(0) == 0
    _check(ops.sparse24_linear(x, values, meta), x, values, meta)


@needs_cuda_kernel
@pytest.mark.parametrize("pattern", ["same-column", "decreasing"])
def test_meta_the_tensor_cores_cannot_take(pattern, poisoned_empty):
    """Nibbles that name one column twice (undefined for mma.sp) or a decreasing pair: the
    stages holding them take the scalar path, which adds each value at its column as the
    reference does; the other block rows stay on the tensor cores. Both must agree with the
    reference."""
    g = seeded("sp24-tc-bad-meta", pattern)
    N, K = 300, 256
    values, meta = _layer(N, K, torch.float16, g)
    meta = meta.clone()
    nibble = 0b0101 if pattern == "same-column" else 0b0010  # (1, 1) or (2, 0)
    meta[5, 3] = (meta[5, 3] & 0xF0) | nibble  # block row 0, k tile 0
    meta[250, 20] = (meta[250, 20] & 0x0F) | (nibble << 4)  # block row 1, k tile 2
    x = torch.randn(200, K, generator=g).to("cuda", torch.float16)
    out = _run(x, values, meta)
    expected = x.double().cpu() @ dense_from_24(values.cpu(), meta.cpu(), K).T
    check_close(out.cpu(), expected, ref.sparse24_linear(x, values, meta).cpu())


@needs_cuda_kernel
def test_empty_k_gives_the_bias_and_empty_m():
    values = torch.zeros(5, 0, dtype=torch.float16, device="cuda")
    meta = torch.zeros(5, 0, dtype=torch.uint8, device="cuda")
    bias = torch.randn(5, device="cuda", dtype=torch.float16)
    x = torch.randn(20, 0, device="cuda", dtype=torch.float16)
    assert torch.equal(_run(x, values, meta, bias), bias.expand(20, 5))
    assert _run(x[:0], values, meta, bias).shape == (0, 5)


@needs_cuda_kernel
def test_rejects_bad_input():
    x = torch.randn(20, 64, device="cuda", dtype=torch.float16)
    v = torch.zeros(8, 32, device="cuda", dtype=torch.float16)
    m = torch.full((8, 8), 0x44, dtype=torch.uint8, device="cuda")
    with pytest.raises(TypeError, match="x must be float16 or bfloat16"):
        _run(x.float(), v.float(), m)
    with pytest.raises(TypeError, match="values must have x's dtype"):
        _run(x, v.bfloat16(), m)
    with pytest.raises(ValueError, match=r"values must have 2 \* ceil\(K / 4\) = 32 columns"):
        _run(x, v[:, :16], m)
    with pytest.raises(ValueError, match=r"meta must have shape \(N, ceil\(K / 8\)\)"):
        _run(x, v, m[:4])
    with pytest.raises(TypeError, match="meta must be uint8"):
        _run(x, v, m.to(torch.int8))
    with pytest.raises(ValueError, match=r"scales must have shape \(N,\)"):
        _run(x, v, m, None, torch.ones(7, device="cuda"))
    with pytest.raises(RuntimeError, match="values must be a CUDA tensor"):
        _run(x, v.cpu(), m)


@needs_cuda_kernel
def test_the_op_picks_it_from_the_minimum_m():
    """torch.ops.torchslim.sparse24_linear: the tensor cores from M = SPARSE24_TC_MIN_M rows
    (leading dims flattened: explain and the op count (3, 17, K) as 51 rows), the Triton kernel
    below and for values in another dtype."""
    g = seeded("sp24-tc-op")
    values, meta = _layer(64, 128, torch.bfloat16, g)
    big = torch.randn(3, SPARSE24_TC_MIN_M, 128, generator=g).to("cuda", torch.bfloat16)
    small = big[0, : SPARSE24_TC_MIN_M - 1]
    assert torchslim.explain("sparse24_linear", big, values, meta)["backend"] == "cuda"
    assert torchslim.explain("sparse24_linear", small, values, meta)["backend"] == "triton"
    assert torchslim.explain("sparse24_linear", big, values.float(), meta)["backend"] == "triton"
    out = ops.sparse24_linear(big, values, meta)
    assert out.shape == (3, SPARSE24_TC_MIN_M, 64)
    _check(out.reshape(-1, 64), big.reshape(-1, 128), values, meta)


def test_cpu_tensors_never_reach_it():
    """The CUDA kernel's supports() turns CPU tensors away with a reason, whatever the build."""
    values, meta = compress_24(prune_(torch.randn(8, 64), "2:4", progress=False), torch.float16)
    x = torch.randn(SPARSE24_TC_MIN_M, 64, dtype=torch.float16)
    assert ops.sparse._sparse24_cuda_supports(x, values, meta) == (
        "cuda kernel takes CUDA tensors, got cpu"
    )

    assert torchslim.explain("sparse24_linear", x, values, meta)["backend"] != "cuda"
