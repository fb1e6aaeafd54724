"""int8 ops: per-token quantization, exact int8 GEMM, W8A8 dynamic and W8A16 linear.

Schemas (``torch.ops.torchslim.*``); the math is in :mod:`torchslim.reference.int8`:

    quantize_per_token(Tensor x) -> (Tensor x_q, Tensor x_scale)
        x: (..., K) fp32/bf16/fp16  ->  x_q: (..., K) int8, x_scale: (...) fp32
    int8_mm(Tensor a, Tensor b) -> Tensor
        a: (M, K) int8 codes in [-127, 127] (symmetric; the CPU kernel rejects -128),
        b: (N, K) int8  ->  (M, N) int32, exact
    int8_dynamic_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor
    int8_weight_only_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor
        x: (..., K) fp32/bf16/fp16, any leading dims; w_q: (N, K) int8 row-major;
        w_scale: (N,) fp32; bias: (N,) float or None  ->  (..., N) in x.dtype

The ops check shapes, dtypes and devices (in eager mode and at trace time). They do not read
the scales' values, which would cost a device synchronisation per call: torchslim.nn.Int8Linear
checks that every scale is finite and positive when it is built or loaded.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from torchslim import _ext
from torchslim import reference as ref
from torchslim.ops._autograd import define_frozen_linear
from torchslim.ops._registry import Kernel, OpBackends, define_op, extension_kernel

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- argument checks
def _check_same_device(x: torch.Tensor, first: str = "x", **others: torch.Tensor | None) -> None:
    """Every one of ``others`` on the device of ``x`` (the op's argument ``first``)."""
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name} must be on {first}'s device {x.device}, got {t.device}")


def _check_activation(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim (..., K), got a 0-d tensor")


def _check_int8_matrix(w: torch.Tensor, name: str, k: int) -> None:
    if w.dtype != torch.int8:
        raise TypeError(f"{name} must be int8, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, K), got {w.dim()}-D shape {tuple(w.shape)}")
    if w.shape[1] != k:
        raise ValueError(f"{name} must have K={k} columns to match x, got shape {tuple(w.shape)}")


def _check_bias(bias: torch.Tensor | None, n: int) -> None:
    if bias is None:
        return
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape (N,) = ({n},), got {tuple(bias.shape)}")


# The most columns an int8 GEMM sums exactly in int32: K * 127 * 128 < 2**31 (activation codes
# are at most 127 in magnitude, a weight's code may be -128).
MAX_DYNAMIC_K = (2**31 - 1) // (127 * 128)


def _check_exact_k(k: int, name: str) -> None:
    if k > MAX_DYNAMIC_K:
        raise ValueError(
            f"{name}'s K must be at most {MAX_DYNAMIC_K} for an int8 GEMM (its int32 sums stay "
            f"exact), got K = {k}"
        )


def _check_linear(x, w_q, w_scale, bias, exact_k: bool = False) -> None:
    _check_activation(x)
    if exact_k:
        _check_exact_k(x.shape[-1], "x")
    _check_int8_matrix(w_q, "w_q", x.shape[-1])
    n = w_q.shape[0]
    if w_scale.dtype != torch.float32:
        raise TypeError(f"w_scale must be float32, got {w_scale.dtype}")
    if tuple(w_scale.shape) != (n,):
        raise ValueError(f"w_scale must have shape (N,) = ({n},), got {tuple(w_scale.shape)}")
    _check_bias(bias, n)
    _check_same_device(x, w_q=w_q, w_scale=w_scale, bias=bias)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride in its last dim (copies only when it must)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D (M, K) view with unit stride in K (copies only when it must). M is spelled
    out: reshape cannot infer it when K = 0."""
    return _unit_last_stride(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]))


# --------------------------------------------------------------------------- backends
def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_module():
    from torchslim.kernels import quant_matmul

    return quant_matmul


def _triton_available() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not torch.cuda.is_available() and not _triton_interpreting():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
    return None


def _supports_floats(devices: dict[str, tuple[torch.dtype, ...]]):
    """supports() for kernels that take activation x first: device type -> allowed dtypes."""

    def supports(x: torch.Tensor, *_args) -> str | None:
        allowed = devices.get(x.device.type)
        if allowed is None:
            return f"no kernel for {x.device.type} tensors"
        if x.dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            return f"{x.device.type} kernel takes {names} activations, got {x.dtype}"
        return None

    return supports


def _supports_int8(devices: tuple[str, ...]):
    def supports(a: torch.Tensor, *_args) -> str | None:
        return None if a.device.type in devices else f"no kernel for {a.device.type} tensors"

    return supports


def _triton_float_devices() -> dict[str, tuple[torch.dtype, ...]]:
    # bf16 tl.dot is wrong in the Triton interpreter (fp16/fp32/int8 are right).
    devices = {"cuda": _FLOATS}
    if _triton_interpreting():
        devices["cpu"] = (torch.float32, torch.float16)
    return devices


def _triton_int8_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if _triton_interpreting() else ("cuda",)


def _make_backends(name: str, reference, *, float_input: bool) -> OpBackends:
    """The cpu / triton / cuda kernels of one op, bound by name from _C and kernels/."""
    backends = OpBackends(
        name=name,
        reference=reference,
        preference={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
    )

    cpu_available, cpu_fn = extension_kernel(f"{name}_cpu", _ext.cpu_available)
    cuda_available, cuda_fn = extension_kernel(f"{name}_cuda", _ext.cuda_available)

    def triton_fn(*args):
        return getattr(_triton_module(), name)(*args)

    if float_input:
        cpu_supports = _supports_floats({"cpu": (torch.float32, torch.bfloat16)})
        cuda_supports = _supports_floats({"cuda": _FLOATS})

        def triton_supports(*args):
            return _supports_floats(_triton_float_devices())(*args)
    else:
        cpu_supports = _supports_int8(("cpu",))
        cuda_supports = _supports_int8(("cuda",))

        def triton_supports(*args):
            return _supports_int8(_triton_int8_devices())(*args)

    backends.register(Kernel("cpu", cpu_fn, cpu_available, cpu_supports))
    backends.register(Kernel("cuda", cuda_fn, cuda_available, cuda_supports))
    backends.register(Kernel("triton", triton_fn, _triton_available, triton_supports))
    return backends


# --------------------------------------------------------------------------- quantize_per_token
_QUANTIZE = _make_backends("quantize_per_token", ref.quantize_per_token, float_input=True)


def _quantize_impl(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_activation(x)
    x_q, x_scale = _QUANTIZE(_rows(x))
    return x_q.reshape(x.shape), x_scale.reshape(x.shape[:-1])


def _quantize_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_activation(x)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


define_op(
    "quantize_per_token(Tensor x) -> (Tensor, Tensor)",
    impl=_quantize_impl,
    fake=_quantize_fake,
    backends=_QUANTIZE,
)


# --------------------------------------------------------------------------- int8_mm
_INT8_MM = _make_backends("int8_mm", ref.int8_mm, float_input=False)


def _check_int8_mm(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.int8:
        raise TypeError(f"a must be int8, got {a.dtype}")
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D (M, K), got {a.dim()}-D shape {tuple(a.shape)}")
    _check_exact_k(a.shape[1], "a")
    _check_int8_matrix(b, "b", a.shape[1])
    _check_same_device(a, "a", b=b)


def _int8_mm_impl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check_int8_mm(a, b)
    return _INT8_MM(_rows(a), _unit_last_stride(b))


def _int8_mm_fake(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check_int8_mm(a, b)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


define_op(
    "int8_mm(Tensor a, Tensor b) -> Tensor",
    impl=_int8_mm_impl,
    fake=_int8_mm_fake,
    backends=_INT8_MM,
)


# --------------------------------------------------------------------------- linear ops
def _linear_op(name: str, reference, exact_k: bool) -> OpBackends:
    """exact_k: the op sums int8 products in int32 (W8A8), so K is bounded."""
    backends = _make_backends(name, reference, float_input=True)

    def impl(x, w_q, w_scale, bias=None):
        _check_linear(x, w_q, w_scale, bias, exact_k)
        out = backends(_rows(x), _unit_last_stride(w_q), w_scale.contiguous(), bias)
        return out.reshape(*x.shape[:-1], w_q.shape[0])

    def fake(x, w_q, w_scale, bias=None):
        _check_linear(x, w_q, w_scale, bias, exact_k)
        return x.new_empty((*x.shape[:-1], w_q.shape[0]))

    define_op(
        f"{name}(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor",
        impl=impl,
        fake=fake,
        backends=backends,
    )
    define_frozen_linear(
        name, lambda a, _k, dtype: ref.dequantize_int8(a["w_q"], a["w_scale"], dtype)
    )
    return backends


_DYNAMIC = _linear_op("int8_dynamic_linear", ref.int8_dynamic_linear, exact_k=True)
_WEIGHT_ONLY = _linear_op("int8_weight_only_linear", ref.int8_weight_only_linear, exact_k=False)


# --------------------------------------------------------------------------- entry points
def _require_tensors(**args: object) -> None:
    """The dispatcher's own error for a non-tensor names no argument; this one does."""
    for name, value in args.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


_TENSOR_OR_NONE = torch._C.OptionalType.ofTensor()
_TENSOR = torch._C.TensorType.get()


def _call_op(op: torch._ops.OpOverloadPacket, *args: object) -> object:
    """``op(*args)``; when the call fails on an argument that the schema takes as a tensor and
    that is not one (None only where the tensor is required), a TypeError naming it (as
    _require_tensors). Checked only after a failure: the same check before every call cost
    about 1 us of a decode-sized one."""
    try:
        return op(*args)
    except (TypeError, RuntimeError, AttributeError) as error:
        for arg, value in zip(op.default._schema.arguments, args, strict=False):
            if isinstance(value, torch.Tensor) or not arg.type.isSubtypeOf(_TENSOR_OR_NONE):
                continue
            if value is not None or arg.type.isSubtypeOf(_TENSOR):
                raise TypeError(
                    f"{arg.name} must be a torch.Tensor, got {type(value).__name__}"
                ) from error
        raise


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization: x (..., K) -> (x_q (..., K) int8, x_scale (...))."""
    return _call_op(torch.ops.torchslim.quantize_per_token, x)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 GEMM: a (M, K) int8 @ b (N, K) int8 .T -> (M, N) int32."""
    return _call_op(torch.ops.torchslim.int8_mm, a, b)


def int8_dynamic_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A8 linear, activations quantized per token inside the op; output in x.dtype."""
    return _call_op(torch.ops.torchslim.int8_dynamic_linear, x, w_q, w_scale, bias)


def int8_weight_only_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A16 linear: int8 weights dequantized per output channel inside the GEMM."""
    return _call_op(torch.ops.torchslim.int8_weight_only_linear, x, w_q, w_scale, bias)
