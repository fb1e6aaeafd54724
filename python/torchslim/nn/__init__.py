"""Drop-in modules backed by torchslim ops."""

from torchslim.nn.int8_linear import Int8Linear

__all__ = ["Int8Linear"]
