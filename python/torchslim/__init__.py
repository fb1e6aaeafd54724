"""torchslim: fast, cheap PyTorch inference with quantized, sparse and fused kernels.

import torchslim
layer = torchslim.nn.Int8Linear.from_linear(linear, mode="weight_only")
torchslim.info()                      # what runs here, and why not when it does not
with torchslim.backend("reference"):  # force a backend (cpu | triton | cuda | reference)
    ...
torch.compile(model, backend="torchslim")  # torchslim's graph passes, then Inductor
lm = torchslim.aot_compile(hf_model)        # prefill + decode as C++ (AOTInductor)
out = torchslim.attention(q, k, v, causal=True)  # fused attention, (B, H, S, D)
"""

__version__ = "0.1.0"

from torchslim import compiler, hf_attention, nn, ops, quant, reference, sparse
from torchslim._info import info
from torchslim.aot import AOTCausalLM, aot_compile
from torchslim.ops import BackendUnavailableError, attention, backend, explain
from torchslim.patching import METHODS, PatchReport, patch
from torchslim.serialization import load, save

compiler.register()  # torch.compile(model, backend="torchslim")

__all__ = [
    "METHODS",
    "AOTCausalLM",
    "BackendUnavailableError",
    "PatchReport",
    "__version__",
    "aot_compile",
    "attention",
    "backend",
    "compiler",
    "explain",
    "hf_attention",
    "info",
    "load",
    "nn",
    "ops",
    "patch",
    "quant",
    "reference",
    "save",
    "sparse",
]
