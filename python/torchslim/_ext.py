"""Loads the compiled extension, torchslim._C, and remembers why when it cannot."""

from __future__ import annotations

import os
from types import ModuleType

_C: ModuleType | None
load_error: str | None

try:
    from torchslim import _C  # type: ignore[attr-defined, no-redef]

    load_error = None
except ImportError as exc:  # not built (TORCHSLIM_NO_EXTENSION=1) or built for another torch
    _C = None
    load_error = f"torchslim._C could not be imported: {exc}"

ISA_ENV = "TORCHSLIM_CPU_ISA"


def _apply_isa_env() -> None:
    """Validates TORCHSLIM_CPU_ISA (the extension reads it too, but cannot raise on import)."""
    name = os.environ.get(ISA_ENV, "").strip()
    if not name or _C is None:
        return
    valid = ("portable", "avx2", "avx512", "amx")
    if name not in valid:
        raise ValueError(f"{ISA_ENV} must be one of {valid}, got {name!r}")
    _C.set_isa(name)  # raises ValueError when the CPU cannot run it


_apply_isa_env()


def cpu_available() -> str | None:
    """None when the C++ CPU kernels can run, else the reason they cannot."""
    return load_error


def cuda_available() -> str | None:
    """None when the CUDA C++ kernels can run, else the reason they cannot."""
    import torch

    if _C is None:
        return load_error
    if not _C.build_info()["with_cuda"]:
        return "torchslim._C was built without CUDA (torch without CUDA, or nvcc not found)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None
