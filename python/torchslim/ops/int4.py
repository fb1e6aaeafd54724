"""int4 ops: the W4A16 linear on group-wise int4 weights.

Schema (``torch.ops.torchslim.*``); format and math in :mod:`torchslim.reference.int4`:

    int4_weight_only_linear(Tensor x, Tensor packed_w, Tensor scales, Tensor zeros,
                            int group_size, Tensor? bias=None) -> Tensor
        x: (..., K) fp32/bf16/fp16, any leading dims, K even; packed_w: (N, K // 2) uint8 (two
        codes per byte, low nibble first); scales, zeros: (N, K // G) fp32/bf16/fp16, one dtype;
        group_size: G dividing K, or -1 for one group per row; bias: (N,) float or None
        ->  (..., N) in x.dtype

Backends: the CPU kernel (fp32/bf16 activations; G a multiple of 32, or per channel) rounds the
activations to int8 per run of 32, 64 or 128 values first (the longest dividing the group; see
the reference), or, on AMX tiles at larger M, x and the dequantized weights to bf16. The Triton
kernel (CUDA tensors,
fp16/bf16/fp32 activations, any group size) dequantizes weight tiles in registers and keeps x as
it is. Anything else runs the reference.

    int4_weight_only_linear_tc(Tensor x, Tensor packed_tc, Tensor scales, Tensor zeros,
                               int group_size, Tensor? bias=None) -> Tensor
        the same on codes in the tc layout: packed_tc (N // 64, K // 16 * 512) uint8
        (reference.pack_int4_tc), K % 16 == 0. Backend: the CUDA C++ tensor-core kernel (CUDA
        tensors, fp16/bf16 activations, G a multiple of 16); anything else runs the reference.
"""

from __future__ import annotations

import torch

from torchslim import _ext
from torchslim import reference as ref
from torchslim.ops._autograd import define_frozen_linear
from torchslim.ops._registry import Kernel, OpBackends, define_op, extension_kernel
from torchslim.ops.int8 import (
    _call_op,
    _check_activation,
    _check_bias,
    _check_same_device,
    _rows,
    _supports_floats,
    _triton_available,
    _triton_float_devices,
    _unit_last_stride,
)
from torchslim.quant.int4 import SCALE_DTYPES, check_group_size
from torchslim.reference.int4 import (
    Q8_BLOCK,
    TC_TILE_BYTES,
    TC_TILE_K,
    TC_TILE_N,
    resolve_group_size,
)


def _check_group_size_type(group_size) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")


def _check_int4_params(x, n, scales, zeros, group_size, bias, **tensors) -> None:
    """The checks shared by both layouts: x, group size, scales / zeros (N, K // G), bias and
    one device for all."""
    k = x.shape[-1]
    groups = k // resolve_group_size(group_size, k) if k else 0
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype not in SCALE_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if tuple(t.shape) != (n, groups):
            raise ValueError(
                f"{name} must have shape (N, K // group_size) = ({n}, {groups}), "
                f"got {tuple(t.shape)}"
            )
    if zeros.dtype != scales.dtype:
        raise TypeError(f"zeros must have the dtype of scales ({scales.dtype}), got {zeros.dtype}")
    _check_bias(bias, n)
    _check_same_device(x, **tensors, scales=scales, zeros=zeros, bias=bias)


def _check_int4_linear(x, packed_w, scales, zeros, group_size, bias) -> None:
    _check_activation(x)
    k = x.shape[-1]
    check_group_size(group_size, k)
    if packed_w.dtype != torch.uint8:
        raise TypeError(f"packed_w must be uint8 (two int4 codes per byte), got {packed_w.dtype}")
    if packed_w.dim() != 2 or packed_w.shape[1] != k // 2:
        raise ValueError(
            f"packed_w must have shape (N, K // 2) with K // 2 = {k // 2}, "
            f"got {tuple(packed_w.shape)}"
        )
    _check_int4_params(x, packed_w.shape[0], scales, zeros, group_size, bias, packed_w=packed_w)


def _check_int4_linear_tc(x, packed_tc, scales, zeros, group_size, bias) -> None:
    _check_activation(x)
    k = x.shape[-1]
    if k % TC_TILE_K:
        raise ValueError(f"x must have K divisible by {TC_TILE_K} for the tc layout, got K={k}")
    check_group_size(group_size, k)
    if packed_tc.dtype != torch.uint8:
        raise TypeError(f"packed_tc must be uint8 (the tc layout), got {packed_tc.dtype}")
    row_bytes = k // TC_TILE_K * TC_TILE_BYTES
    if packed_tc.dim() != 2 or packed_tc.shape[1] != row_bytes:
        raise ValueError(
            f"packed_tc must have shape (N // 64, K // 16 * 512) with K // 16 * 512 = "
            f"{row_bytes}, got {tuple(packed_tc.shape)}"
        )
    n = packed_tc.shape[0] * TC_TILE_N
    _check_int4_params(x, n, scales, zeros, group_size, bias, packed_tc=packed_tc)


def _cpu_supports(x, packed_w, scales, zeros, group_size, bias=None) -> str | None:
    if x.device.type != "cpu":
        return f"no kernel for {x.device.type} tensors"
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"cpu kernel takes float32, bfloat16 activations, got {x.dtype}"
    k = x.shape[-1]
    g = resolve_group_size(group_size, k)
    if g != k and g % Q8_BLOCK:
        return f"cpu kernel takes group sizes that are multiples of {Q8_BLOCK}, got {group_size}"
    return None


def _cpu_fn(*args):
    return _ext._C.int4_weight_only_linear_cpu(*args)


def _triton_supports(x, *_args) -> str | None:
    return _supports_floats(_triton_float_devices())(x)


def _triton_fn(*args):
    from torchslim.kernels import int4_matmul

    return int4_matmul.int4_weight_only_linear(*args)


_INT4_LINEAR = OpBackends(
    name="int4_weight_only_linear",
    reference=ref.int4_weight_only_linear,
    preference={"cpu": ("cpu",), "cuda": ("triton",)},
)
_INT4_LINEAR.register(Kernel("cpu", _cpu_fn, _ext.cpu_available, _cpu_supports))
_INT4_LINEAR.register(Kernel("triton", _triton_fn, _triton_available, _triton_supports))


def _cuda_tc_supports(x, packed_tc, scales, zeros, group_size, bias=None) -> str | None:
    if x.device.type != "cuda":
        return f"no kernel for {x.device.type} tensors"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"cuda kernel takes float16, bfloat16 activations, got {x.dtype}"
    k = x.shape[-1]
    if k == 0:
        return "cuda kernel needs K > 0"
    if resolve_group_size(group_size, k) % TC_TILE_K:
        return f"cuda kernel takes group sizes that are multiples of {TC_TILE_K}, got {group_size}"
    return None


_cuda_tc_available, _cuda_tc_fn = extension_kernel(
    "int4_weight_only_linear_tc_cuda", _ext.cuda_available
)


_INT4_LINEAR_TC = OpBackends(
    name="int4_weight_only_linear_tc",
    reference=ref.int4_weight_only_linear_tc,
    preference={"cpu": ("cuda",), "cuda": ("cuda",)},  # on the CPU: the reference, logged
)
_INT4_LINEAR_TC.register(Kernel("cuda", _cuda_tc_fn, _cuda_tc_available, _cuda_tc_supports))


def _impl(x, packed_w, scales, zeros, group_size, bias=None):
    _check_int4_linear(x, packed_w, scales, zeros, group_size, bias)
    w = _unit_last_stride(packed_w)
    out = _INT4_LINEAR(_rows(x), w, scales.contiguous(), zeros.contiguous(), group_size, bias)
    return out.reshape(*x.shape[:-1], packed_w.shape[0])


def _fake(x, packed_w, scales, zeros, group_size, bias=None):
    _check_int4_linear(x, packed_w, scales, zeros, group_size, bias)
    return x.new_empty((*x.shape[:-1], packed_w.shape[0]))


define_op(
    "int4_weight_only_linear(Tensor x, Tensor packed_w, Tensor scales, Tensor zeros, "
    "int group_size, Tensor? bias=None) -> Tensor",
    impl=_impl,
    fake=_fake,
    backends=_INT4_LINEAR,
)
define_frozen_linear(
    "int4_weight_only_linear",
    lambda a, k, dtype: ref.dequantize_int4(
        a["packed_w"], a["scales"], a["zeros"], a["group_size"], dtype=dtype
    ),
)


def int4_weight_only_linear(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W4A16 linear on group-wise int4 weights: x @ ((codes - zeros) * scales).T + bias."""
    _check_group_size_type(group_size)
    return _call_op(
        torch.ops.torchslim.int4_weight_only_linear, x, packed_w, scales, zeros, group_size, bias
    )


def _impl_tc(x, packed_tc, scales, zeros, group_size, bias=None):
    _check_int4_linear_tc(x, packed_tc, scales, zeros, group_size, bias)
    n = packed_tc.shape[0] * TC_TILE_N
    out = _INT4_LINEAR_TC(
        _rows(x), packed_tc.contiguous(), scales.contiguous(), zeros.contiguous(), group_size, bias
    )
    return out.reshape(*x.shape[:-1], n)


def _fake_tc(x, packed_tc, scales, zeros, group_size, bias=None):
    _check_int4_linear_tc(x, packed_tc, scales, zeros, group_size, bias)
    return x.new_empty((*x.shape[:-1], packed_tc.shape[0] * TC_TILE_N))


define_op(
    "int4_weight_only_linear_tc(Tensor x, Tensor packed_tc, Tensor scales, Tensor zeros, "
    "int group_size, Tensor? bias=None) -> Tensor",
    impl=_impl_tc,
    fake=_fake_tc,
    backends=_INT4_LINEAR_TC,
)
define_frozen_linear(
    "int4_weight_only_linear_tc",
    lambda a, k, dtype: ref.dequantize_int4(
        ref.tc_to_plain(a["packed_tc"]), a["scales"], a["zeros"], a["group_size"], dtype=dtype
    ),
)


def int4_weight_only_linear_tc(
    x: torch.Tensor,
    packed_tc: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`int4_weight_only_linear` on codes in the tc layout
    (:func:`torchslim.reference.pack_int4_tc`), for the CUDA tensor-core kernel."""
    _check_group_size_type(group_size)
    return _call_op(
        torch.ops.torchslim.int4_weight_only_linear_tc,
        x,
        packed_tc,
        scales,
        zeros,
        group_size,
        bias,
    )
