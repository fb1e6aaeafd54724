"""Pure-PyTorch reference implementations: the specification of every torchslim op."""

from torchslim.reference.int4 import (
    dequantize_int4,
    int4_weight_only_linear,
    pack_int4,
    quantize_per_block,
    unpack_int4,
)
from torchslim.reference.int8 import (
    int8_dynamic_linear,
    int8_mm,
    int8_weight_only_linear,
    quantize_per_token,
)

__all__ = [
    "dequantize_int4",
    "int4_weight_only_linear",
    "int8_dynamic_linear",
    "int8_mm",
    "int8_weight_only_linear",
    "pack_int4",
    "quantize_per_block",
    "quantize_per_token",
    "unpack_int4",
]
