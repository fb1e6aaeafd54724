"""Sparse weights (pure PyTorch): pruning, patterns and the compressed formats.

import torchslim.sparse as sp
sp.prune_(model, "2:4", method="wanda", calibration=batches)   # zero weights, in place
values, meta = sp.compress_24(linear.weight)                    # what the kernels read
y = torchslim.ops.sparse24_linear(x, values, meta, linear.bias)
"""

from torchslim.sparse.formats import (
    FORMATS,
    check_sliced,
    compress_24,
    compress_bitmask,
    compress_block,
    compress_csr,
    compress_sliced,
    decompress_24,
    decompress_bitmask,
    decompress_block,
    decompress_csr,
    decompress_sliced,
    format_bytes,
)
from torchslim.sparse.patterns import Pattern, check_pattern, parse_pattern
from torchslim.sparse.prune import METHODS, fold_torch_prune, prune_, sparsity

__all__ = [
    "FORMATS",
    "METHODS",
    "Pattern",
    "check_pattern",
    "check_sliced",
    "compress_24",
    "compress_bitmask",
    "compress_block",
    "compress_csr",
    "compress_sliced",
    "decompress_24",
    "decompress_bitmask",
    "decompress_block",
    "decompress_csr",
    "decompress_sliced",
    "fold_torch_prune",
    "format_bytes",
    "parse_pattern",
    "prune_",
    "sparsity",
]
