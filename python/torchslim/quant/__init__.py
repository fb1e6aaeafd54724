"""Quantization formats and quantizers (pure PyTorch, no kernels)."""

from torchslim.quant.int8 import dequantize_weight, quantize_weight_per_channel, smoothquant_factors

__all__ = ["dequantize_weight", "quantize_weight_per_channel", "smoothquant_factors"]
