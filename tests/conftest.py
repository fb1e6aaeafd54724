"""Shared fixtures: the kernel backends this machine can run, and poisoned allocations."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter where there is no GPU. It must be
# chosen before triton.jit decorates the kernels, i.e. before torchslim.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, one fixed config per Triton kernel: autotuning each of the hundreds of shapes below
# would cost far more than the tests. test_triton_quant_matmul.py runs every config on its own.
os.environ.setdefault("TORCHSLIM_TRITON_AUTOTUNE", "0")
# The benchmark tests check the machinery, not the figures: weights rotate through 96 MB of
# copies, not twice a large last-level cache.
os.environ.setdefault("TORCHSLIM_BENCH_ROTATE_MB", "96")

import torchslim
import torchslim.testing
from torchslim import _ext

# `python -m pytest` puts the working directory first on sys.path. From the repository root
# that makes its kernels/ folder (installed as torchslim.kernels) shadow Hugging Face's
# `kernels` package, which transformers imports; the installed torchslim is what is tested.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]


def _kernel_backends() -> list[str]:
    """Every (backend, ISA) pair that can run here, e.g. cpu-avx2, cpu-portable, triton."""
    out = []
    if _ext._C is not None:
        out += [f"cpu-{isa}" for isa in reversed(_ext._C.supported_isas())]
    info = torchslim.info()["backends"]
    out += [name for name in ("triton", "cuda") if info[name] == "available"]
    return out


KERNEL_BACKENDS = _kernel_backends()


def triton_kernel_modules(name: str):
    """(autotune, kernels.<name>) from the installed package, or from the source tree's
    kernels/ directory when torchslim.kernels is not installed."""
    try:
        package = "torchslim.kernels"
        autotune = importlib.import_module(f"{package}.autotune")
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        package = "kernels"
        autotune = importlib.import_module(f"{package}.autotune")
    return autotune, importlib.import_module(f"{package}.{name}")


def seeded(*key) -> torch.Generator:
    """A generator seeded from a test's parameters (stable across runs, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def dense_from_24(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """The 2:4 layout decoded one value at a time, in float64: value 2 g + t of a row sits in
    column 4 g + its 2-bit index (bits 4 (g % 2) + 2 t of meta byte g // 2); two values that
    name one column add up."""
    n, kept = values.shape
    dense = torch.zeros(n, kept * 2, dtype=torch.float64)
    for row in range(n):
        for j in range(kept):
            g, t = divmod(j, 2)
            index = int(meta[row, g // 2]) >> (4 * (g % 2) + 2 * t) & 3
            dense[row, 4 * g + index] += float(values[row, j])
    return dense[:, :k]


@contextlib.contextmanager
def run_on(backend: str):
    """Forces ``backend`` ("cpu-<isa>", "triton", "cuda") with strict mode: no silent fallback."""
    name, _, isa = backend.partition("-")
    previous = _ext._C.isa() if _ext._C is not None else None
    if isa:
        _ext._C.set_isa(isa)
    try:
        with torchslim.backend(name, strict=True):
            yield
    finally:
        if isa:
            _ext._C.set_isa(previous)


def device_of(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request) -> str:
    with run_on(request.param):
        yield request.param


@pytest.fixture
def poisoned_empty():
    """Makes torch.empty (in Python and in C++) fill float memory with NaN and integer memory
    with its max value, so outputs a kernel leaves unwritten fail the comparison."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    """A randomly initialised 2-layer Llama (Hugging Face transformers), in eval mode."""
    pytest.importorskip("transformers")
    return torchslim.testing.tiny_llama()
