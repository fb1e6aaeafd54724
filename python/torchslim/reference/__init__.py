"""Pure-PyTorch reference implementations: the specification of every torchslim op."""

from torchslim.reference.int8 import (
    int8_dynamic_linear,
    int8_mm,
    int8_weight_only_linear,
    quantize_per_token,
)

__all__ = [
    "int8_dynamic_linear",
    "int8_mm",
    "int8_weight_only_linear",
    "quantize_per_token",
]
