"""The C++ impls of the CPU ops (csrc/bindings/registry.h): an eager call runs the kernel
without entering Python when the automatic choice is the CPU kernel, and hands everything else
to the op's Python impl, so both paths agree on results and on errors."""

from __future__ import annotations

import contextlib

import pytest
import torch

import torchslim
from torchslim import _ext, ops
from torchslim.quant import quantize_int4, quantize_weight_per_channel
from torchslim.testing import random_int8

pytestmark = pytest.mark.skipif(_ext._C is None, reason="torchslim._C is not built")


class PythonImplCalled(Exception):
    pass


@contextlib.contextmanager
def python_impl_spy(op: str):
    """Swaps op's Python impl for one that records its calls, then runs the real one."""
    real = _ext._C.python_impl(op)
    calls = []

    def spy(*args):
        calls.append(args)
        return real(*args)

    _ext._C.set_python_impl(op, spy)
    try:
        yield calls
    finally:
        _ext._C.set_python_impl(op, real)


def _int8_args(gen, lead=(2, 3), k=40, n=24):
    x = torch.randn(*lead, k, generator=gen)
    w_q, w_scale = quantize_weight_per_channel(torch.randn(n, k, generator=gen))
    return x, w_q, w_scale, torch.randn(n, generator=gen)


def _int4_args(gen, lead=(2, 3), k=64, n=24, group_size=32):
    x = torch.randn(*lead, k, generator=gen)
    packed, scales, zeros = quantize_int4(torch.randn(n, k, generator=gen), group_size)
    return x, packed, scales, zeros, group_size, torch.randn(n, generator=gen)


def _calls(gen):
    """(op name, torch.ops callable, args) for every op with a C++ CPU impl."""
    x, w_q, w_scale, bias = _int8_args(gen)
    t = torch.ops.torchslim
    return [
        ("quantize_per_token", t.quantize_per_token, (x,)),
        ("int8_mm", t.int8_mm, (random_int8(5, 40, generator=gen), w_q)),
        ("int8_dynamic_linear", t.int8_dynamic_linear, (x, w_q, w_scale, bias)),
        ("int8_weight_only_linear", t.int8_weight_only_linear, (x, w_q, w_scale, None)),
        ("int4_weight_only_linear", t.int4_weight_only_linear, _int4_args(gen)),
    ]


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_equal(u, v) for u, v in zip(a, b, strict=True))
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("case", range(5))
def test_cpu_kernel_runs_without_python_and_matches_it(case, gen):
    name, op, args = _calls(gen)[case]
    with python_impl_spy(name) as calls:
        fast = op(*args)
        with ops.backend("cpu"):  # forcing the kernel's own backend keeps the C++ path
            forced_cpu = op(*args)
    assert calls == []
    slow = _ext._C.python_impl(name)(*args)  # the Python impl, which picks the same kernel
    assert _equal(fast, slow) and _equal(forced_cpu, slow)


@pytest.mark.parametrize("case", range(5))
def test_forced_backends_go_through_python(case, gen, monkeypatch):
    name, op, args = _calls(gen)[case]
    with python_impl_spy(name) as calls:
        with ops.backend("reference"):
            op(*args)
        with ops.backend("cpu"), ops.backend("reference"):
            op(*args)
        monkeypatch.setenv("TORCHSLIM_BACKEND", "reference")
        op(*args)
        monkeypatch.delenv("TORCHSLIM_BACKEND")
        op(*args)  # automatic again
    assert len(calls) == 3


def test_inputs_the_kernel_lacks_go_through_python(gen):
    x, w_q, w_scale, bias = _int8_args(gen)
    with python_impl_spy("int8_weight_only_linear") as calls:
        out = torch.ops.torchslim.int8_weight_only_linear(x.half(), w_q, w_scale, bias)
    assert len(calls) == 1 and out.dtype == torch.float16
    x, packed, scales, zeros, _, bias = _int4_args(gen, group_size=16)  # not a multiple of 32
    with python_impl_spy("int4_weight_only_linear") as calls:
        torch.ops.torchslim.int4_weight_only_linear(x, packed, scales, zeros, 16, bias)
    assert len(calls) == 1


def test_leading_dims_and_strides_match_the_python_path(gen):
    x, packed, scales, zeros, g, bias = _int4_args(gen, lead=(3, 5), k=128, n=40)
    x_strided = x.transpose(0, 1)  # (5, 3, K): not viewable as (15, K)
    x_1d, packed_pc, scales_pc, zeros_pc, _, _ = _int4_args(
        gen, lead=(), k=128, n=40, group_size=-1
    )
    for args in (
        (x_strided, packed, scales, zeros, g, bias),
        (x_1d, packed_pc, scales_pc, zeros_pc, -1),
    ):
        fast = torch.ops.torchslim.int4_weight_only_linear(*args)
        assert fast.shape == (*args[0].shape[:-1], 40)
        assert _equal(fast, _ext._C.python_impl("int4_weight_only_linear")(*args))
    # bf16 activations and a non-contiguous weight (a column slice of a wider one).
    x, w_q, w_scale, bias = _int8_args(gen, lead=(7,), k=40)
    wide = torch.cat([w_q, w_q], dim=1)[:, ::2]
    assert wide.stride(1) == 2
    for xx, w in ((x.bfloat16(), w_q), (x, wide)):
        fast = torch.ops.torchslim.int8_dynamic_linear(xx, w, w_scale, bias)
        assert _equal(fast, _ext._C.python_impl("int8_dynamic_linear")(xx, w, w_scale, bias))


def test_bad_input_errors_are_the_python_impl_errors(gen):
    x, w_q, w_scale, _ = _int8_args(gen)
    with pytest.raises(ValueError, match=r"w_scale must have shape \(N,\) = \(24,\)"):
        torch.ops.torchslim.int8_weight_only_linear(x, w_q, w_scale[:5])
    x, packed, scales, zeros, g, _ = _int4_args(gen)
    with pytest.raises(TypeError, match="zeros must have the dtype of scales"):
        torch.ops.torchslim.int4_weight_only_linear(x, packed, scales, zeros.half(), g)
    with pytest.raises(ValueError, match="group_size must be -1"):
        torch.ops.torchslim.int4_weight_only_linear(x, packed, scales, zeros, 24)


def test_forced_backend_scopes_are_balanced(gen):
    with pytest.raises(RuntimeError), ops.backend("reference"):
        raise RuntimeError("leaves the context by an exception")
    assert _ext._C.forced_backend_scope("reference", 0) == 0
    with pytest.raises(ValueError, match="backend must be one of"):
        _ext._C.forced_backend_scope("tpu", 1)
    assert torchslim.ops.forced_backend() is None
