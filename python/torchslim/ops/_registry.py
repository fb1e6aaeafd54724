"""Backend selection for torchslim ops.

Every op in ``torch.ops.torchslim`` has a reference implementation and up to three kernels:

    cpu        C++ (torchslim._C), CPU tensors
    triton     Triton (torchslim.kernels); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    cuda       CUDA C++ (torchslim._C built with CUDA), CUDA tensors
    reference  pure PyTorch (torchslim.reference), any device

By default an op takes the first kernel in its preference list that is available and supports
the input; when none does it runs the reference and logs why, once. The choice is explicit:

    with torchslim.backend("triton"): ...          # or TORCHSLIM_BACKEND=triton
    with torchslim.backend("cpu", strict=True): ... # or TORCHSLIM_STRICT=1: raise, never fall back
    torchslim.ops.explain("int8_dynamic_linear", x, w_q, w_scale)  # which one, and why
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from torchslim import _ext

logger = logging.getLogger("torchslim")

BACKENDS = ("cpu", "triton", "cuda", "reference")
BACKEND_ENV = "TORCHSLIM_BACKEND"
STRICT_ENV = "TORCHSLIM_STRICT"


class BackendUnavailableError(RuntimeError):
    """Raised in strict mode when the requested backend cannot run an input."""


def _env_backend() -> str | None:
    name = os.environ.get(BACKEND_ENV, "").strip().lower() or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {name!r}")
    return name


def _env_strict() -> bool:
    return os.environ.get(STRICT_ENV, "0").strip().lower() not in ("", "0", "false", "no")


_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("torchslim_backend")
_strict: contextvars.ContextVar[bool] = contextvars.ContextVar("torchslim_strict")


def forced_backend() -> str | None:
    """The backend forced by ``torchslim.backend(...)`` or TORCHSLIM_BACKEND, else None."""
    return _forced.get(_env_backend())


def strict_mode() -> bool:
    return _strict.get(_env_strict())


# Under torch.compile these two are read once, while a function is traced: its graph keeps the
# backend in force then (Dynamo cannot trace a ContextVar; the ops' own choice at run time is
# unchanged). This is what torch.compiler.assume_constant_result does; calling it would import
# torch._dynamo with torchslim (0.2 s -> 2.8 s), so the mark is set here
# (tests/test_compile.py's fullgraph test of the drop-ins fails if it stops working).
forced_backend._dynamo_marked_constant = True
strict_mode._dynamo_marked_constant = True


@contextlib.contextmanager
def backend(name: str | None, *, strict: bool | None = None) -> Iterator[None]:
    """Forces every torchslim op in this context onto one backend.

    Args:
        name: "cpu", "triton", "cuda", "reference", or None for the automatic choice.
        strict: if True, an input the backend cannot run raises BackendUnavailableError instead
            of falling back to the reference. None keeps the current setting.
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    token = _forced.set(name)
    strict_token = _strict.set(strict) if strict is not None else None
    # While it is open, C++ impls of other backends defer to the Python impl
    # (csrc/bindings/registry.h).
    scoped = name is not None and _ext._C is not None
    if scoped:
        _ext._C.forced_backend_scope(name, 1)
    try:
        yield
    finally:
        if scoped:
            _ext._C.forced_backend_scope(name, -1)
        _forced.reset(token)
        if strict_token is not None:
            _strict.reset(strict_token)


@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of an op.

    ``available()`` returns None when the backend can run at all, else why not;
    ``supports(*args)`` returns None when it can run these arguments, else why not.
    """

    backend: str
    fn: Callable[..., object]
    available: Callable[[], str | None]
    supports: Callable[..., str | None]


@dataclass
class OpBackends:
    """The kernels of one op, in order of preference per device type."""

    name: str
    reference: Callable[..., object]
    kernels: dict[str, Kernel] = field(default_factory=dict)
    preference: dict[str, Sequence[str]] = field(default_factory=dict)
    _logged: set[tuple[str, str]] = field(default_factory=set)

    def register(self, kernel: Kernel) -> None:
        self.kernels[kernel.backend] = kernel

    def _why_not(self, backend: str, args: tuple) -> str | None:
        kernel = self.kernels.get(backend)
        if kernel is None:
            return f"{self.name} has no {backend} kernel"
        return kernel.available() or kernel.supports(*args)

    def select(self, device: torch.device, args: tuple) -> tuple[str, list[str]]:
        """Returns (backend, reasons the preferred ones were passed over)."""
        forced = forced_backend()
        if forced == "reference":
            return "reference", []
        candidates = [forced] if forced else list(self.preference.get(device.type, ()))
        # No kernel for the device at all is a fallback too, and is logged like one.
        reasons = [] if candidates else [f"{self.name} has no {device.type} kernel"]
        for name in candidates:
            why = self._why_not(name, args)
            if why is None:
                return name, reasons
            reasons.append(f"{name}: {why}")
        if forced and strict_mode():
            raise BackendUnavailableError(
                f"torchslim.{self.name}: backend {forced!r} cannot run this input ({reasons[0]})"
                f" and strict mode forbids the reference fallback"
            )
        return "reference", reasons

    def __call__(self, *args):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        backend, reasons = self.select(device, args)
        if backend == "reference":
            if reasons:
                key = (device.type, "; ".join(reasons))
                if key not in self._logged:
                    self._logged.add(key)
                    logger.warning(
                        "torchslim.%s: using the reference implementation (%s)",
                        self.name,
                        "; ".join(reasons),
                    )
            return self.reference(*args)
        return self.kernels[backend].fn(*args)


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Logs ``message`` as a warning on the "torchslim" logger the first time it is seen, in
    eager calls only: Dynamo cannot trace a logger, and a graph break for a log would defeat
    fullgraph=True (the same call made eagerly logs it)."""
    if torch.compiler.is_compiling():
        return
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


def extension_kernel(
    function: str, backend_available: Callable[[], str | None]
) -> tuple[Callable[[], str | None], Callable[..., object]]:
    """(available, fn) for a kernel bound as ``torchslim._C.<function>``: available() is the
    backend's own check, then whether this build of the extension has the function."""

    def available() -> str | None:
        why = backend_available()
        if why is None and not hasattr(_ext._C, function):
            return f"torchslim._C has no {function} (rebuild the extension)"
        return why

    def fn(*args):
        return getattr(_ext._C, function)(*args)

    return available, fn


_LIB = torch.library.Library("torchslim", "DEF")
_OPS: dict[str, OpBackends] = {}


def define_op(
    schema: str,
    *,
    impl: Callable[..., object],
    fake: Callable[..., object],
    backends: OpBackends,
) -> None:
    """Defines ``torch.ops.torchslim.<name>``: its schema, its eager impl (which validates the
    arguments and calls ``backends``) and its fake impl (same validation, metadata only).

    Where torchslim._C registers a C++ impl for a device (CPU kernels), eager calls on that
    device go to it directly; it takes the arguments it can run as ``impl`` would, and hands
    everything else to ``impl`` (csrc/bindings/registry.h).
    """
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"torchslim::{name}", fake, lib=_LIB)
    if _ext._C is not None:
        _ext._C.set_python_impl(name, impl)
    _OPS[name] = backends


def explain(op: str, *args) -> dict[str, object]:
    """Which backend ``torch.ops.torchslim.<op>`` would run for these arguments, and why.

    Returns a dict with "backend" and "passed_over" (the preferred backends not taken, with the
    reason for each).
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    backends = _OPS[op]
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is None:
        raise TypeError(f"explain({op!r}, ...) needs the op's arguments, tensors among them")
    chosen, reasons = backends.select(device, args)
    return {"op": op, "backend": chosen, "passed_over": reasons}


def registered_ops() -> dict[str, OpBackends]:
    return dict(_OPS)
