"""Gradients and autocast of the quantized and sparse linear ops (frozen weights).

Each of these ops computes ``x @ W.T + bias`` for a weight W it holds compressed (int8 or int4
codes with their scales, or a sparse format). W is frozen, as in QLoRA: the ops give gradients
for ``x`` and ``bias``,

    grad_x = grad_out @ W        grad_bias = grad_out summed over all leading dims,

with W decompressed by the reference (torchslim.reference) in grad_out's dtype. The ops that
quantize x inside (W8A8: int8_dynamic_linear, sparse_*_dynamic_linear) pass the gradient
straight through that rounding, as quantization-aware training does. A weight operand (codes,
scales, zeros, sparse values) that requires grad is an error, raised when the forward runs.

Two registrations carry the formula. ``torch.library.register_autograd`` sets the op's Autograd
kernel for every device. On the CPU, torchslim._C's AutogradCPU kernel takes precedence: when no
input requires grad (inference, with or without torch.no_grad) it goes straight on to the CPU
kernel, where the Python Autograd kernel would add ~4 us to a call of ~5 at M = 1; otherwise it
calls the op's ``autograd.Function`` here (the Python impl ``"<op>:grad"`` of torchslim._C).

Under ``torch.autocast`` the ops do what F.linear does: x (fp32, or a half type other than
autocast's) is cast to the autocast dtype, so the output is in that dtype; the weight operands
keep theirs. The kernel sits on the Autocast keys, which the dispatcher skips while autocast is
off, so it costs nothing outside autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from torchslim import _ext
from torchslim.ops._registry import _LIB

_AUTOCAST_DEVICES = ("cpu", "cuda")

# dense_weight(inputs, k, dtype): the (N, K) weight W of one call in `dtype`, from the op's
# inputs by schema name.
DenseWeight = Callable[[dict[str, object], int, torch.dtype], torch.Tensor]

_NOT_FROZEN = ("x", "bias")


def define_frozen_linear(name: str, dense_weight: DenseWeight) -> None:
    """Registers the gradient and the autocast rule of ``torch.ops.torchslim.<name>``, a linear
    op whose arguments include ``x`` (..., K) and ``bias`` (N,) or None; every other tensor
    argument is frozen."""
    op = getattr(torch.ops.torchslim, name).default
    names = [a.name for a in op._schema.arguments]
    x_at, bias_at = names.index("x"), names.index("bias")
    for device in _AUTOCAST_DEVICES:
        _register_autocast(name, op, x_at, device)

    def setup_context(ctx, inputs, output) -> None:
        for arg, value in zip(names, inputs, strict=True):
            if arg not in _NOT_FROZEN and isinstance(value, torch.Tensor) and value.requires_grad:
                raise ValueError(
                    f"{name}: {arg} requires grad, but torchslim's quantized and sparse linear "
                    f"ops keep their weights frozen and give gradients for x and bias only; pass "
                    f"{arg}.detach() (or set requires_grad=False on the module's buffers)"
                )
        frozen = [v if isinstance(v, torch.Tensor) else None for v in inputs]
        frozen[x_at] = frozen[bias_at] = None
        ctx.save_for_backward(*frozen)
        ctx.others = [None if isinstance(v, torch.Tensor) else v for v in inputs]
        ctx.k = inputs[x_at].shape[-1]
        ctx.x_dtype = inputs[x_at].dtype
        bias = inputs[bias_at]
        ctx.bias_dtype = bias.dtype if bias is not None else None

    def backward(ctx, grad_out):
        grads: list[torch.Tensor | None] = [None] * len(names)
        rows = grad_out.reshape(math.prod(grad_out.shape[:-1]), grad_out.shape[-1])  # N may be 0
        if ctx.needs_input_grad[x_at]:
            saved = ctx.saved_tensors
            inputs = {
                arg: saved[i] if saved[i] is not None else ctx.others[i]
                for i, arg in enumerate(names)
            }
            w = dense_weight(inputs, ctx.k, grad_out.dtype)
            grad_x = rows @ w
            grads[x_at] = grad_x.reshape(*grad_out.shape[:-1], ctx.k).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[bias_at]:
            wide = torch.promote_types(rows.dtype, ctx.bias_dtype)
            grads[bias_at] = rows.sum(0, dtype=wide).to(ctx.bias_dtype)
        return tuple(grads)

    torch.library.register_autograd(
        f"torchslim::{name}", backward, setup_context=setup_context, lib=_LIB
    )

    if _ext._C is not None:

        def forward(*inputs):
            # Grad mode is off in here: the op's AutogradCPU kernel goes to the CPU kernel.
            return op(*inputs)

        function = type(
            f"torchslim_{name}",
            (torch.autograd.Function,),
            {
                "forward": staticmethod(forward),
                "setup_context": staticmethod(setup_context),
                "backward": staticmethod(backward),
            },
        )
        _ext._C.set_python_impl(f"{name}:grad", function.apply)


def _register_autocast(name: str, op: torch._ops.OpOverload, x_at: int, device: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device)
    below = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def autocast(*args):
        x, dtype = args[x_at], torch.get_autocast_dtype(device)
        if x.is_floating_point() and x.dtype not in (dtype, torch.float64):  # as autocast casts
            args = (*args[:x_at], x.to(dtype), *args[x_at + 1 :])
        with torch._C._ExcludeDispatchKeyGuard(below):
            return op(*args)

    _LIB.impl(name, autocast, key)
