"""The op registry: every torchslim op's schema, fake impl, backend choice and entry point."""

from torchslim.ops._registry import (
    BACKENDS,
    BackendUnavailableError,
    backend,
    explain,
    forced_backend,
    registered_ops,
    strict_mode,
)
from torchslim.ops.attention import attention
from torchslim.ops.int4 import int4_weight_only_linear, int4_weight_only_linear_tc
from torchslim.ops.int8 import (
    int8_dynamic_linear,
    int8_mm,
    int8_weight_only_linear,
    quantize_per_token,
)
from torchslim.ops.sparse import (
    sparse24_dynamic_linear,
    sparse24_linear,
    sparse_bitmask_dynamic_linear,
    sparse_bitmask_linear,
    sparse_block_dynamic_linear,
    sparse_block_linear,
    sparse_csr_linear,
    sparse_sliced_dynamic_linear,
    sparse_sliced_linear,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "attention",
    "backend",
    "explain",
    "forced_backend",
    "int4_weight_only_linear",
    "int4_weight_only_linear_tc",
    "int8_dynamic_linear",
    "int8_mm",
    "int8_weight_only_linear",
    "quantize_per_token",
    "registered_ops",
    "sparse24_dynamic_linear",
    "sparse24_linear",
    "sparse_bitmask_dynamic_linear",
    "sparse_bitmask_linear",
    "sparse_block_dynamic_linear",
    "sparse_block_linear",
    "sparse_csr_linear",
    "sparse_sliced_dynamic_linear",
    "sparse_sliced_linear",
    "strict_mode",
]
