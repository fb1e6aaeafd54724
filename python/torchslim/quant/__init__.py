"""Quantization formats and quantizers (pure PyTorch, no kernels)."""

from torchslim.quant.int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from torchslim.quant.int8 import dequantize_weight, quantize_weight_per_channel, smoothquant_factors

__all__ = [
    "dequantize_int4",
    "dequantize_weight",
    "pack_int4",
    "quantize_int4",
    "quantize_weight_per_channel",
    "smoothquant_factors",
    "unpack_int4",
]
