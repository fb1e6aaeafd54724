"""Sparse linear ops on pruned weights; formats and math in :mod:`torchslim.reference.sparse`.

Schemas (``torch.ops.torchslim.*``):

    sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias=None,
                    Tensor? scales=None) -> Tensor
        x: (..., K) fp32/bf16/fp16, any leading dims; values: (N, 2 * ceil(K / 4)), the two
        kept values of each group of 4 columns; meta: (N, ceil(K / 8)) uint8, their 2-bit
        column indices; bias: (N,) float or None; scales: (N,) fp32 or None  ->  (..., N) in
        x.dtype

    sparse24_dynamic_linear(Tensor x, Tensor values, Tensor meta, Tensor scales,
                            Tensor? bias=None) -> Tensor
        W8A8 as sparse_sliced_dynamic_linear below, on the 2:4 format's arrays  ->  (..., N) in
        x.dtype

    sparse_bitmask_linear(Tensor x, Tensor values, Tensor mask, Tensor row_offsets,
                          Tensor? bias=None, Tensor? scales=None) -> Tensor
        x: (..., K) as above; values: (nnz,), the nonzeros row by row; mask: (N, ceil(K / 8))
        uint8, a bit per weight; row_offsets: (N + 1,) int64, row n's values at
        [row_offsets[n], row_offsets[n + 1]); bias, scales as above  ->  (..., N) in x.dtype

    sparse_csr_linear(Tensor x, Tensor values, Tensor columns, Tensor bases,
                      Tensor group_offsets, Tensor? bias=None, Tensor? scales=None) -> Tensor
        x: (..., K) as above; values: (G, 8), the nonzeros row by row in groups of 8; columns:
        (G, 8) uint8, each value's column from its group's base column; bases: (G,) int16, the
        base column / 8; group_offsets: (N + 1,) int64, row n's groups at
        [group_offsets[n], group_offsets[n + 1]); bias, scales as above  ->  (..., N) in x.dtype

    sparse_block_linear(Tensor x, Tensor values, Tensor col_blocks, Tensor row_offsets, int n,
                        Tensor? bias=None, Tensor? scales=None) -> Tensor
        x: (..., K) as above; values: (B, R, C), the stored R x C blocks; col_blocks: (B,) int32,
        each block's first column / C; row_offsets: (ceil(N / R) + 1,) int64, block row r's
        blocks at [row_offsets[r], row_offsets[r + 1]); n: N; bias, scales as above  ->  (..., N)
        in x.dtype

    sparse_sliced_linear(Tensor x, Tensor values, Tensor columns, Tensor groups,
                         Tensor group_offsets, Tensor value_offsets, int n, Tensor? bias=None,
                         Tensor? scales=None) -> Tensor
        x: (..., K) as above; values: (V,), the nonzeros group by group, then 16 zero slots;
        columns: (V,) uint8, each value's column within its slice of 128; groups: (G, 2) uint8,
        each group's row within its block of 64 rows and its count (1..16); group_offsets
        (B * S + 1,) int64, block b's slice s's groups; value_offsets (B + 1,) int64, block b's
        values; B = ceil(N / 64), S = ceil(K / 128); n: N; bias, scales as above  ->  (..., N)
        in x.dtype

    sparse_bitmask_dynamic_linear(Tensor x, Tensor values, Tensor mask, Tensor row_offsets,
                                  Tensor scales, Tensor? bias=None) -> Tensor
        W8A8 as sparse_sliced_dynamic_linear below, on the bitmask format's arrays  ->  (..., N)
        in x.dtype

    sparse_block_dynamic_linear(Tensor x, Tensor values, Tensor col_blocks, Tensor row_offsets,
                                int n, Tensor scales, Tensor? bias=None) -> Tensor
        W8A8 as sparse_sliced_dynamic_linear below, on the block format's arrays  ->  (..., N)
        in x.dtype

    sparse_sliced_dynamic_linear(Tensor x, Tensor values, Tensor columns, Tensor groups,
                                 Tensor group_offsets, Tensor value_offsets, int n,
                                 Tensor scales, Tensor? bias=None) -> Tensor
        W8A8: the sliced arrays as above with int8 values and their scales (N,) fp32; x
        quantized per token inside the op and multiplied with the codes exactly
        (torchslim.reference.sparse_sliced_dynamic_linear); K at most
        ops.int8.MAX_DYNAMIC_K  ->  (..., N) in x.dtype

The values are fp32/bf16/fp16, possibly another dtype than x (bf16 values for fp32 activations
halve the bytes a decode step reads), or int8 codes, which need ``scales``: row n of the weight
is its codes times scales[n]. The ops check shapes, dtypes and devices; the bitmask kernels also
check that row_offsets agrees with the mask, the csr kernels that every column is below K, and
the sliced kernels that every group and column is in range, as they read them (a ValueError,
never a read out of bounds). Backends: the CPU kernel (fp32/bf16 activations:
csrc/cpu/sparse_gemm.h, sliced_gemm.h); for sparse24_linear on CUDA tensors the sparse
tensor cores (csrc/cuda/sparse24_gemm.cu, mma.sp: fp16/bf16 x with values of its dtype, M >= 17),
then the Triton kernel (fp32/bf16/fp16 activations, any values: kernels/sparse_matmul.py, the
weight tile expanded in registers; split-K for decode), and for sparse_block_linear a Triton
kernel that visits only the stored blocks (CUDA tensors); anything else runs the reference.
sparse_block_linear's Python impl checks its offsets and columns of blocks on every call
(torchslim.reference.sparse.check_block: a device sync on a GPU); the CPU kernel checks them as
it reads them.
"""

from __future__ import annotations

import math

import torch

from torchslim import _ext
from torchslim import reference as ref
from torchslim.ops._autograd import define_frozen_linear
from torchslim.ops._registry import _LIB, Kernel, OpBackends, define_op, extension_kernel
from torchslim.ops.int8 import (
    _FLOATS,
    _call_op,
    _check_activation,
    _check_bias,
    _check_exact_k,
    _check_same_device,
    _rows,
    _supports_floats,
    _triton_available,
    _triton_float_devices,
    _unit_last_stride,
)
from torchslim.reference.sparse import scale_rows


def _check_values(values: torch.Tensor, scales: torch.Tensor | None, n: int) -> None:
    if values.dtype not in (*_FLOATS, torch.int8):
        raise TypeError(f"values must be float32, bfloat16, float16 or int8, got {values.dtype}")
    if scales is None:
        if values.dtype == torch.int8:
            raise ValueError("int8 values need scales (N,) float32, got scales=None")
        return
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    if tuple(scales.shape) != (n,):
        raise ValueError(f"scales must have shape (N,) = ({n},), got {tuple(scales.shape)}")


def _check_dynamic(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor | None) -> None:
    """The W8A8 ops' own rules: int8 codes, their scales, K within ops.int8.MAX_DYNAMIC_K."""
    if values.dtype != torch.int8:
        raise TypeError(f"values must be int8 codes for a W8A8 linear, got {values.dtype}")
    if scales is None:
        raise ValueError("scales (N,) float32 is required for a W8A8 linear, got None")
    if x.dim() >= 1:
        _check_exact_k(x.shape[-1], "x")


def _check_byte_rows(t: torch.Tensor, name: str, n: int, k: int) -> None:
    cols = -(-k // ref.sparse.MASK_BITS)
    if t.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8, got {t.dtype}")
    if tuple(t.shape) != (n, cols):
        raise ValueError(
            f"{name} must have shape (N, ceil(K / 8)) = ({n}, {cols}), got {tuple(t.shape)}"
        )


def _check_sparse24(x, values, meta, bias, scales) -> None:
    _check_activation(x)
    k = x.shape[-1]
    (_, kept), _ = ref.sparse.sparse24_shapes(0, k)
    if values.dim() != 2 or values.shape[1] != kept:
        raise ValueError(
            f"values must have shape (N, 2 * ceil(K / 4)) with 2 * ceil(K / 4) = {kept}, "
            f"got {tuple(values.shape)}"
        )
    n = values.shape[0]
    _check_values(values, scales, n)
    _check_byte_rows(meta, "meta", n, k)
    _check_bias(bias, n)
    _check_same_device(x, values=values, meta=meta, bias=bias, scales=scales)


def _check_bitmask(x, values, mask, row_offsets, bias, scales) -> None:
    _check_activation(x)
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D (nnz,), got shape {tuple(values.shape)}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D (N, ceil(K / 8)), got shape {tuple(mask.shape)}")
    n = mask.shape[0]
    _check_values(values, scales, n)
    _check_byte_rows(mask, "mask", n, x.shape[-1])
    if row_offsets.dtype != torch.int64:
        raise TypeError(f"row_offsets must be int64, got {row_offsets.dtype}")
    if tuple(row_offsets.shape) != (n + 1,):
        raise ValueError(
            f"row_offsets must have shape (N + 1,) = ({n + 1},), got {tuple(row_offsets.shape)}"
        )
    _check_bias(bias, n)
    _check_same_device(
        x, values=values, mask=mask, row_offsets=row_offsets, bias=bias, scales=scales
    )


def _check_columns(columns: torch.Tensor, values: torch.Tensor) -> None:
    """csr's and sliced's column bytes: uint8, one per value."""
    if columns.dtype != torch.uint8:
        raise TypeError(f"columns must be uint8, got {columns.dtype}")
    if columns.shape != values.shape:
        raise ValueError(
            f"columns must have the shape of values {tuple(values.shape)}, "
            f"got {tuple(columns.shape)}"
        )


def _check_csr(x, values, columns, bases, group_offsets, bias, scales) -> None:
    _check_activation(x)
    if x.shape[-1] > ref.sparse.CSR_MAX_K:
        raise ValueError(
            f"x must have K <= {ref.sparse.CSR_MAX_K} for the csr format, got K = {x.shape[-1]}"
        )
    group = ref.sparse.CSR_GROUP
    if values.dim() != 2 or values.shape[1] != group:
        raise ValueError(f"values must have shape (G, {group}), got {tuple(values.shape)}")
    _check_columns(columns, values)
    if bases.dtype != torch.int16:
        raise TypeError(f"bases must be int16, got {bases.dtype}")
    if tuple(bases.shape) != (values.shape[0],):
        raise ValueError(
            f"bases must have shape (G,) = ({values.shape[0]},), got {tuple(bases.shape)}"
        )
    if group_offsets.dtype != torch.int64:
        raise TypeError(f"group_offsets must be int64, got {group_offsets.dtype}")
    if group_offsets.dim() != 1 or group_offsets.numel() < 1:
        raise ValueError(
            f"group_offsets must have shape (N + 1,), got {tuple(group_offsets.shape)}"
        )
    _check_values(values, scales, group_offsets.numel() - 1)
    _check_bias(bias, group_offsets.numel() - 1)
    _check_same_device(
        x,
        values=values,
        columns=columns,
        bases=bases,
        group_offsets=group_offsets,
        bias=bias,
        scales=scales,
    )


def _triton_supports(x, *_args) -> str | None:
    return _supports_floats(_triton_float_devices())(x)


def _backends(
    name: str, reference, triton_fn=None, cuda_supports=None, triton_supports=_triton_supports
) -> OpBackends:
    """The CPU kernel from _C; for CUDA tensors the CUDA C++ kernel from _C (``<name>_cuda``)
    where ``cuda_supports`` is given, then a Triton kernel where there is one."""
    cuda = (("cuda",) if cuda_supports else ()) + (("triton",) if triton_fn else ())
    preference = {"cpu": ("cpu",), **({"cuda": cuda} if cuda else {})}
    backends = OpBackends(name=name, reference=reference, preference=preference)
    available, fn = extension_kernel(f"{name}_cpu", _ext.cpu_available)
    supports = _supports_floats({"cpu": (torch.float32, torch.bfloat16)})
    backends.register(Kernel("cpu", fn, available, supports))
    if cuda_supports is not None:
        cuda_available, cuda_fn = extension_kernel(f"{name}_cuda", _ext.cuda_available)
        backends.register(Kernel("cuda", cuda_fn, cuda_available, cuda_supports))
    if triton_fn is not None:
        backends.register(Kernel("triton", triton_fn, _triton_available, triton_supports))
    return backends


def _vector(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


# The dense (N, K) weight of each format's op, for its gradient (torchslim/ops/_autograd.py).
def _weight_24(a: dict, k: int, dtype: torch.dtype) -> torch.Tensor:
    w = ref.decompress_24(a["values"], a["meta"], k, dtype=dtype)
    return scale_rows(w, a["scales"], dtype)


# Reading a bitmask, csr, block or sliced weight reads its data (offsets, masks): one op, so
# that torch.compile keeps the decompression of a training graph's backward opaque.
_DECOMPRESS = {
    "bitmask": lambda parts, _n, k, dtype: ref.decompress_bitmask(*parts, k, dtype=dtype),
    "csr": lambda parts, _n, k, dtype: ref.decompress_csr(*parts, k, dtype=dtype),
    "block": lambda parts, n, k, dtype: ref.decompress_block(*parts, n, k, dtype=dtype),
    "sliced": lambda parts, n, k, dtype: ref.decompress_sliced(*parts, n, k, dtype=dtype),
}


def _dense_weight_impl(fmt, parts, scales, n, k, dtype):
    return scale_rows(_DECOMPRESS[fmt](parts, n, k, dtype), scales, dtype)


def _dense_weight_fake(fmt, parts, scales, n, k, dtype):
    return parts[0].new_empty((n, k), dtype=dtype)


_LIB.define(
    "sparse_dense_weight(str format, Tensor[] parts, Tensor? scales, SymInt n, SymInt k, "
    "ScalarType dtype) -> Tensor"
)
_LIB.impl("sparse_dense_weight", _dense_weight_impl, "CompositeExplicitAutograd")
torch.library.register_fake("torchslim::sparse_dense_weight", _dense_weight_fake, lib=_LIB)


def _dense_weight(fmt: str, a: dict, names: tuple[str, ...], n, k: int, dtype: torch.dtype):
    parts = [a[name] for name in names]
    return torch.ops.torchslim.sparse_dense_weight(fmt, parts, a["scales"], n, k, dtype)


def _weight_bitmask(a: dict, k: int, dtype: torch.dtype) -> torch.Tensor:
    n = a["row_offsets"].shape[0] - 1
    return _dense_weight("bitmask", a, ("values", "mask", "row_offsets"), n, k, dtype)


def _weight_csr(a: dict, k: int, dtype: torch.dtype) -> torch.Tensor:
    names = ("values", "columns", "bases", "group_offsets")
    return _dense_weight("csr", a, names, a["group_offsets"].shape[0] - 1, k, dtype)


def _weight_block(a: dict, k: int, dtype: torch.dtype) -> torch.Tensor:
    return _dense_weight("block", a, ("values", "col_blocks", "row_offsets"), a["n"], k, dtype)


def _weight_sliced(a: dict, k: int, dtype: torch.dtype) -> torch.Tensor:
    names = ("values", "columns", "groups", "group_offsets", "value_offsets")
    return _dense_weight("sliced", a, names, a["n"], k, dtype)


# --------------------------------------------------------------------------- 2:4
def _sparse24_triton(*args):
    from torchslim.kernels import sparse_matmul

    return sparse_matmul.sparse24_linear(*args)


# Activations with at most this many rows go to the Triton kernel's split-K decode path: the
# tensor-core kernel's 128-row tiles of x would be mostly empty, and its grid too small.
SPARSE24_TC_MIN_M = 17


def _sparse24_cuda_supports(x, values, meta, bias=None, scales=None) -> str | None:
    if x.device.type != "cuda":
        return f"cuda kernel takes CUDA tensors, got {x.device.type}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"cuda kernel takes float16, bfloat16 activations, got {x.dtype}"
    if values.dtype != x.dtype:
        return f"cuda kernel takes values in x's dtype ({x.dtype}), got {values.dtype}"
    rows = math.prod(x.shape[:-1])  # x's leading dims flattened, as the op calls the kernel
    if rows < SPARSE24_TC_MIN_M:
        return f"cuda kernel serves M >= {SPARSE24_TC_MIN_M} (Triton decodes), got M={rows}"
    return None


_SPARSE24 = _backends(
    "sparse24_linear", ref.sparse24_linear, _sparse24_triton, _sparse24_cuda_supports
)


def _sparse24_impl(x, values, meta, bias=None, scales=None):
    _check_sparse24(x, values, meta, bias, scales)
    out = _SPARSE24(
        _rows(x), _unit_last_stride(values), _unit_last_stride(meta), bias, _vector(scales)
    )
    return out.reshape(*x.shape[:-1], values.shape[0])


def _sparse24_fake(x, values, meta, bias=None, scales=None):
    _check_sparse24(x, values, meta, bias, scales)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


define_op(
    "sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias=None, "
    "Tensor? scales=None) -> Tensor",
    impl=_sparse24_impl,
    fake=_sparse24_fake,
    backends=_SPARSE24,
)
define_frozen_linear("sparse24_linear", _weight_24)


def _check_sparse24_dynamic(x, values, meta, scales, bias) -> None:
    _check_dynamic(x, values, scales)
    _check_sparse24(x, values, meta, bias, scales)


_SPARSE24_DYNAMIC = _backends("sparse24_dynamic_linear", ref.sparse24_dynamic_linear)


def _sparse24_dynamic_impl(x, values, meta, scales, bias=None):
    _check_sparse24_dynamic(x, values, meta, scales, bias)
    out = _SPARSE24_DYNAMIC(
        _rows(x), _unit_last_stride(values), _unit_last_stride(meta), scales.contiguous(), bias
    )
    return out.reshape(*x.shape[:-1], values.shape[0])


def _sparse24_dynamic_fake(x, values, meta, scales, bias=None):
    _check_sparse24_dynamic(x, values, meta, scales, bias)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


define_op(
    "sparse24_dynamic_linear(Tensor x, Tensor values, Tensor meta, Tensor scales, "
    "Tensor? bias=None) -> Tensor",
    impl=_sparse24_dynamic_impl,
    fake=_sparse24_dynamic_fake,
    backends=_SPARSE24_DYNAMIC,
)
define_frozen_linear("sparse24_dynamic_linear", _weight_24)


# --------------------------------------------------------------------------- bitmask
_BITMASK = _backends("sparse_bitmask_linear", ref.sparse_bitmask_linear)


def _bitmask_impl(x, values, mask, row_offsets, bias=None, scales=None):
    _check_bitmask(x, values, mask, row_offsets, bias, scales)
    out = _BITMASK(
        _rows(x),
        values.contiguous(),
        _unit_last_stride(mask),
        row_offsets.contiguous(),
        bias,
        _vector(scales),
    )
    return out.reshape(*x.shape[:-1], mask.shape[0])


def _bitmask_fake(x, values, mask, row_offsets, bias=None, scales=None):
    _check_bitmask(x, values, mask, row_offsets, bias, scales)
    return x.new_empty((*x.shape[:-1], mask.shape[0]))


define_op(
    "sparse_bitmask_linear(Tensor x, Tensor values, Tensor mask, Tensor row_offsets, "
    "Tensor? bias=None, Tensor? scales=None) -> Tensor",
    impl=_bitmask_impl,
    fake=_bitmask_fake,
    backends=_BITMASK,
)
define_frozen_linear("sparse_bitmask_linear", _weight_bitmask)


_BITMASK_DYNAMIC = _backends("sparse_bitmask_dynamic_linear", ref.sparse_bitmask_dynamic_linear)


def _bitmask_dynamic_impl(x, values, mask, row_offsets, scales, bias=None):
    _check_dynamic(x, values, scales)
    _check_bitmask(x, values, mask, row_offsets, bias, scales)
    out = _BITMASK_DYNAMIC(
        _rows(x),
        values.contiguous(),
        _unit_last_stride(mask),
        row_offsets.contiguous(),
        scales.contiguous(),
        bias,
    )
    return out.reshape(*x.shape[:-1], mask.shape[0])


def _bitmask_dynamic_fake(x, values, mask, row_offsets, scales, bias=None):
    _check_dynamic(x, values, scales)
    _check_bitmask(x, values, mask, row_offsets, bias, scales)
    return x.new_empty((*x.shape[:-1], mask.shape[0]))


define_op(
    "sparse_bitmask_dynamic_linear(Tensor x, Tensor values, Tensor mask, Tensor row_offsets, "
    "Tensor scales, Tensor? bias=None) -> Tensor",
    impl=_bitmask_dynamic_impl,
    fake=_bitmask_dynamic_fake,
    backends=_BITMASK_DYNAMIC,
)
define_frozen_linear("sparse_bitmask_dynamic_linear", _weight_bitmask)


# --------------------------------------------------------------------------- csr
_CSR = _backends("sparse_csr_linear", ref.sparse_csr_linear)


def _csr_impl(x, values, columns, bases, group_offsets, bias=None, scales=None):
    _check_csr(x, values, columns, bases, group_offsets, bias, scales)
    out = _CSR(
        _rows(x),
        values.contiguous(),
        columns.contiguous(),
        bases.contiguous(),
        group_offsets.contiguous(),
        bias,
        _vector(scales),
    )
    return out.reshape(*x.shape[:-1], group_offsets.numel() - 1)


def _csr_fake(x, values, columns, bases, group_offsets, bias=None, scales=None):
    _check_csr(x, values, columns, bases, group_offsets, bias, scales)
    return x.new_empty((*x.shape[:-1], group_offsets.shape[0] - 1))


define_op(
    "sparse_csr_linear(Tensor x, Tensor values, Tensor columns, Tensor bases, "
    "Tensor group_offsets, Tensor? bias=None, Tensor? scales=None) -> Tensor",
    impl=_csr_impl,
    fake=_csr_fake,
    backends=_CSR,
)
define_frozen_linear("sparse_csr_linear", _weight_csr)


# --------------------------------------------------------------------------- block
def _check_block_args(x, values, col_blocks, row_offsets, n, bias, scales) -> None:
    _check_activation(x)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0 (the output features), got {n!r}")
    if values.dim() != 3 or min(values.shape[1:], default=0) < 1:
        raise ValueError(
            f"values must have shape (B, R, C) with R, C >= 1, got {tuple(values.shape)}"
        )
    blocks, rows = values.shape[0], values.shape[1]
    _check_values(values, scales, n)
    if col_blocks.dtype != torch.int32:
        raise TypeError(f"col_blocks must be int32, got {col_blocks.dtype}")
    if tuple(col_blocks.shape) != (blocks,):
        raise ValueError(
            f"col_blocks must have shape (B,) = ({blocks},), got {tuple(col_blocks.shape)}"
        )
    if row_offsets.dtype != torch.int64:
        raise TypeError(f"row_offsets must be int64, got {row_offsets.dtype}")
    want = ref.sparse.block_rows(n, (rows, 1)) + 1
    if tuple(row_offsets.shape) != (want,):
        raise ValueError(
            f"row_offsets must have shape (ceil(N / R) + 1,) = ({want},) for N = {n} and "
            f"R = {rows}, got {tuple(row_offsets.shape)}"
        )
    _check_bias(bias, n)
    _check_same_device(
        x, values=values, col_blocks=col_blocks, row_offsets=row_offsets, bias=bias, scales=scales
    )


def _block_triton(*args):
    from torchslim.kernels import sparse_matmul

    return sparse_matmul.sparse_block_linear(*args)


# The Triton block kernel holds a block and x's columns for it in registers and shared memory:
# past 64 a side its tiles outgrow an A100's shared memory in fp32.
MAX_TRITON_BLOCK = 64


def _block_triton_supports(x, values, *_args) -> str | None:
    why = _triton_supports(x)
    rows, cols = values.shape[1:]
    if why is None and max(rows, cols) > MAX_TRITON_BLOCK:
        return (
            f"the Triton kernel takes blocks of at most {MAX_TRITON_BLOCK} a side, got "
            f"{rows}x{cols}"
        )
    return why


_BLOCK = _backends(
    "sparse_block_linear",
    ref.sparse_block_linear,
    _block_triton,
    triton_supports=_block_triton_supports,
)


def _block_impl(x, values, col_blocks, row_offsets, n, bias=None, scales=None):
    _check_block_args(x, values, col_blocks, row_offsets, n, bias, scales)
    ref.sparse.check_block(values, col_blocks, row_offsets, n, x.shape[-1])
    out = _BLOCK(_rows(x), values, col_blocks, row_offsets, n, bias, _vector(scales))
    return out.reshape(*x.shape[:-1], n)


def _block_fake(x, values, col_blocks, row_offsets, n, bias=None, scales=None):
    _check_block_args(x, values, col_blocks, row_offsets, n, bias, scales)
    return x.new_empty((*x.shape[:-1], n))


define_op(
    "sparse_block_linear(Tensor x, Tensor values, Tensor col_blocks, Tensor row_offsets, int n, "
    "Tensor? bias=None, Tensor? scales=None) -> Tensor",
    impl=_block_impl,
    fake=_block_fake,
    backends=_BLOCK,
)
define_frozen_linear("sparse_block_linear", _weight_block)


def _check_block_dynamic(x, values, col_blocks, row_offsets, n, scales, bias) -> None:
    _check_dynamic(x, values, scales)
    _check_block_args(x, values, col_blocks, row_offsets, n, bias, scales)


_BLOCK_DYNAMIC = _backends("sparse_block_dynamic_linear", ref.sparse_block_dynamic_linear)


def _block_dynamic_impl(x, values, col_blocks, row_offsets, n, scales, bias=None):
    _check_block_dynamic(x, values, col_blocks, row_offsets, n, scales, bias)
    ref.sparse.check_block(values, col_blocks, row_offsets, n, x.shape[-1])
    out = _BLOCK_DYNAMIC(_rows(x), values, col_blocks, row_offsets, n, scales.contiguous(), bias)
    return out.reshape(*x.shape[:-1], n)


def _block_dynamic_fake(x, values, col_blocks, row_offsets, n, scales, bias=None):
    _check_block_dynamic(x, values, col_blocks, row_offsets, n, scales, bias)
    return x.new_empty((*x.shape[:-1], n))


define_op(
    "sparse_block_dynamic_linear(Tensor x, Tensor values, Tensor col_blocks, "
    "Tensor row_offsets, int n, Tensor scales, Tensor? bias=None) -> Tensor",
    impl=_block_dynamic_impl,
    fake=_block_dynamic_fake,
    backends=_BLOCK_DYNAMIC,
)
define_frozen_linear("sparse_block_dynamic_linear", _weight_block)


# --------------------------------------------------------------------------- sliced
def _check_sliced(x, values, columns, groups, group_offsets, value_offsets, n, bias, scales):
    _check_activation(x)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0 (the output features), got {n!r}")
    slack = ref.sparse.SLICED_GROUP
    if values.dim() != 1 or values.shape[0] < slack:
        raise ValueError(
            f"values must have shape (V,) with V >= {slack}, got {tuple(values.shape)}"
        )
    _check_values(values, scales, n)
    _check_columns(columns, values)
    if groups.dtype != torch.uint8:
        raise TypeError(f"groups must be uint8, got {groups.dtype}")
    if groups.dim() != 2 or groups.shape[1] != 2:
        raise ValueError(f"groups must have shape (G, 2), got {tuple(groups.shape)}")
    blocks, slices = ref.sparse.sliced_shape(n, x.shape[-1])
    for t, name, size in (
        (group_offsets, "group_offsets", blocks * slices + 1),
        (value_offsets, "value_offsets", blocks + 1),
    ):
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {t.dtype}")
        if tuple(t.shape) != (size,):
            raise ValueError(
                f"{name} must have shape ({size},) for N = {n} and K = {x.shape[-1]}, "
                f"got {tuple(t.shape)}"
            )
    _check_bias(bias, n)
    _check_same_device(
        x,
        values=values,
        columns=columns,
        groups=groups,
        group_offsets=group_offsets,
        value_offsets=value_offsets,
        bias=bias,
        scales=scales,
    )


_SLICED = _backends("sparse_sliced_linear", ref.sparse_sliced_linear)


def _sliced_impl(
    x, values, columns, groups, group_offsets, value_offsets, n, bias=None, scales=None
):
    args = (values, columns, groups, group_offsets, value_offsets, n)
    _check_sliced(x, *args, bias, scales)
    out = _SLICED(
        _rows(x),
        values.contiguous(),
        columns.contiguous(),
        groups.contiguous(),
        group_offsets.contiguous(),
        value_offsets.contiguous(),
        n,
        bias,
        _vector(scales),
    )
    return out.reshape(*x.shape[:-1], n)


def _sliced_fake(
    x, values, columns, groups, group_offsets, value_offsets, n, bias=None, scales=None
):
    _check_sliced(x, values, columns, groups, group_offsets, value_offsets, n, bias, scales)
    return x.new_empty((*x.shape[:-1], n))


define_op(
    "sparse_sliced_linear(Tensor x, Tensor values, Tensor columns, Tensor groups, "
    "Tensor group_offsets, Tensor value_offsets, int n, Tensor? bias=None, "
    "Tensor? scales=None) -> Tensor",
    impl=_sliced_impl,
    fake=_sliced_fake,
    backends=_SLICED,
)
define_frozen_linear("sparse_sliced_linear", _weight_sliced)


def _check_sliced_dynamic(
    x, values, columns, groups, group_offsets, value_offsets, n, scales, bias
) -> None:
    _check_dynamic(x, values, scales)
    _check_sliced(x, values, columns, groups, group_offsets, value_offsets, n, bias, scales)


_SLICED_DYNAMIC = _backends("sparse_sliced_dynamic_linear", ref.sparse_sliced_dynamic_linear)


def _sliced_dynamic_impl(
    x, values, columns, groups, group_offsets, value_offsets, n, scales, bias=None
):
    args = (values, columns, groups, group_offsets, value_offsets, n)
    _check_sliced_dynamic(x, *args, scales, bias)
    out = _SLICED_DYNAMIC(
        _rows(x),
        values.contiguous(),
        columns.contiguous(),
        groups.contiguous(),
        group_offsets.contiguous(),
        value_offsets.contiguous(),
        n,
        scales.contiguous(),
        bias,
    )
    return out.reshape(*x.shape[:-1], n)


def _sliced_dynamic_fake(
    x, values, columns, groups, group_offsets, value_offsets, n, scales, bias=None
):
    args = (values, columns, groups, group_offsets, value_offsets, n)
    _check_sliced_dynamic(x, *args, scales, bias)
    return x.new_empty((*x.shape[:-1], n))


define_op(
    "sparse_sliced_dynamic_linear(Tensor x, Tensor values, Tensor columns, Tensor groups, "
    "Tensor group_offsets, Tensor value_offsets, int n, Tensor scales, "
    "Tensor? bias=None) -> Tensor",
    impl=_sliced_dynamic_impl,
    fake=_sliced_dynamic_fake,
    backends=_SLICED_DYNAMIC,
)
define_frozen_linear("sparse_sliced_dynamic_linear", _weight_sliced)


# --------------------------------------------------------------------------- entry points
def sparse24_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W in the 2:4 format (:func:`torchslim.sparse.compress_24`);
    int8 values take per-row ``scales`` (:func:`torchslim.sparse.quantize_values`)."""
    return _call_op(torch.ops.torchslim.sparse24_linear, x, values, meta, bias, scales)


def sparse24_dynamic_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 ``x @ W.T + bias`` with W int8 codes in the 2:4 format and per-row ``scales``, x
    quantized per token inside the op (:func:`torchslim.reference.sparse24_dynamic_linear`)."""
    return _call_op(torch.ops.torchslim.sparse24_dynamic_linear, x, values, meta, scales, bias)


def sparse_bitmask_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    row_offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W in the bitmask format
    (:func:`torchslim.sparse.compress_bitmask`); int8 values take per-row ``scales``."""
    return _call_op(
        torch.ops.torchslim.sparse_bitmask_linear, x, values, mask, row_offsets, bias, scales
    )


def sparse_bitmask_dynamic_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    row_offsets: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 ``x @ W.T + bias`` with W int8 codes in the bitmask format and per-row ``scales``,
    x quantized per token inside the op
    (:func:`torchslim.reference.sparse_bitmask_dynamic_linear`)."""
    return _call_op(
        torch.ops.torchslim.sparse_bitmask_dynamic_linear,
        x,
        values,
        mask,
        row_offsets,
        scales,
        bias,
    )


def sparse_csr_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    bases: torch.Tensor,
    group_offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W in the csr format (:func:`torchslim.sparse.compress_csr`);
    int8 values take per-row ``scales``."""
    return _call_op(
        torch.ops.torchslim.sparse_csr_linear,
        x,
        values,
        columns,
        bases,
        group_offsets,
        bias,
        scales,
    )


def _require_rows(n: object) -> None:
    """``n`` (the output features of the block and sliced formats) must be an int: the
    dispatcher would take True for 1."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int (the output features), got {type(n).__name__}")


def sparse_block_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    col_blocks: torch.Tensor,
    row_offsets: torch.Tensor,
    n: int,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W (``n`` rows) in the block format
    (:func:`torchslim.sparse.compress_block`); int8 values take per-row ``scales``."""
    _require_rows(n)
    return _call_op(
        torch.ops.torchslim.sparse_block_linear, x, values, col_blocks, row_offsets, n, bias, scales
    )


def sparse_block_dynamic_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    col_blocks: torch.Tensor,
    row_offsets: torch.Tensor,
    n: int,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 ``x @ W.T + bias`` with W (``n`` rows) int8 codes in the block format and per-row
    ``scales``, x quantized per token inside the op
    (:func:`torchslim.reference.sparse_block_dynamic_linear`)."""
    _require_rows(n)
    return _call_op(
        torch.ops.torchslim.sparse_block_dynamic_linear,
        x,
        values,
        col_blocks,
        row_offsets,
        n,
        scales,
        bias,
    )


def sparse_sliced_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    groups: torch.Tensor,
    group_offsets: torch.Tensor,
    value_offsets: torch.Tensor,
    n: int,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W (``n`` rows) in the sliced format
    (:func:`torchslim.sparse.compress_sliced`); int8 values take per-row ``scales``."""
    _require_rows(n)
    return _call_op(
        torch.ops.torchslim.sparse_sliced_linear,
        x,
        values,
        columns,
        groups,
        group_offsets,
        value_offsets,
        n,
        bias,
        scales,
    )


def sparse_sliced_dynamic_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    groups: torch.Tensor,
    group_offsets: torch.Tensor,
    value_offsets: torch.Tensor,
    n: int,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 ``x @ W.T + bias`` with W (``n`` rows) int8 codes in the sliced format and per-row
    ``scales``, x quantized per token inside the op
    (:func:`torchslim.reference.sparse_sliced_dynamic_linear`)."""
    _require_rows(n)
    return _call_op(
        torch.ops.torchslim.sparse_sliced_dynamic_linear,
        x,
        values,
        columns,
        groups,
        group_offsets,
        value_offsets,
        n,
        scales,
        bias,
    )
