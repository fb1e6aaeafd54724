"""Pure-PyTorch reference implementations: the specification of every torchslim op."""

from torchslim.reference import sparse
from torchslim.reference.attention import attention, attention_backward, visible_keys
from torchslim.reference.int4 import (
    dequantize_int4,
    int4_weight_only_linear,
    int4_weight_only_linear_tc,
    pack_int4,
    pack_int4_tc,
    plain_to_tc,
    quantize_per_block,
    tc_to_plain,
    unpack_int4,
    unpack_int4_tc,
)
from torchslim.reference.int8 import (
    int8_dynamic_linear,
    int8_mm,
    int8_weight_only_linear,
    quantize_per_token,
)
from torchslim.reference.sparse import (
    compress_24,
    compress_bitmask,
    compress_block,
    compress_csr,
    decompress_24,
    decompress_bitmask,
    decompress_block,
    decompress_csr,
    sparse24_linear,
    sparse_bitmask_linear,
    sparse_block_linear,
    sparse_csr_linear,
)

__all__ = [
    "attention",
    "attention_backward",
    "compress_24",
    "compress_bitmask",
    "compress_block",
    "compress_csr",
    "decompress_24",
    "decompress_bitmask",
    "decompress_block",
    "decompress_csr",
    "dequantize_int4",
    "int4_weight_only_linear",
    "int4_weight_only_linear_tc",
    "int8_dynamic_linear",
    "int8_mm",
    "int8_weight_only_linear",
    "pack_int4",
    "pack_int4_tc",
    "plain_to_tc",
    "quantize_per_block",
    "quantize_per_token",
    "sparse",
    "sparse24_linear",
    "sparse_bitmask_linear",
    "sparse_block_linear",
    "sparse_csr_linear",
    "tc_to_plain",
    "unpack_int4",
    "unpack_int4_tc",
    "visible_keys",
]
