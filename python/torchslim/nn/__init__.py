"""Drop-in modules backed by torchslim ops."""

from torchslim.nn.int4_linear import Int4Linear
from torchslim.nn.int8_linear import Int8Linear

__all__ = ["Int4Linear", "Int8Linear"]
