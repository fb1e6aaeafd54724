"""Drop-in modules backed by torchslim ops, and functional drop-ins (torchslim.nn.functional)."""

from torchslim.nn import functional
from torchslim.nn.attention import MultiheadAttention
from torchslim.nn.int4_linear import Int4Linear
from torchslim.nn.int8_linear import Int8Linear
from torchslim.nn.sparse_linear import SparseLinear

__all__ = ["Int4Linear", "Int8Linear", "MultiheadAttention", "SparseLinear", "functional"]
