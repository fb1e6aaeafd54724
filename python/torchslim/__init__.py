"""torchslim: fast, cheap PyTorch inference with quantized, sparse and fused kernels.

import torchslim
layer = torchslim.nn.Int8Linear.from_linear(linear, mode="weight_only")
torchslim.info()                      # what runs here, and why not when it does not
with torchslim.backend("reference"):  # force a backend (cpu | triton | cuda | reference)
    ...
torch.compile(model, backend="torchslim")  # torchslim's graph passes, then Inductor
"""

__version__ = "0.1.0"

from torchslim import compiler, nn, ops, quant, reference
from torchslim._info import info
from torchslim.ops import BackendUnavailableError, backend, explain
from torchslim.patching import METHODS, PatchReport, patch
from torchslim.serialization import load, save

compiler.register()  # torch.compile(model, backend="torchslim")

__all__ = [
    "METHODS",
    "BackendUnavailableError",
    "PatchReport",
    "__version__",
    "backend",
    "compiler",
    "explain",
    "info",
    "load",
    "nn",
    "ops",
    "patch",
    "quant",
    "reference",
    "save",
]
