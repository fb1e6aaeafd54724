"""Triton kernels for torchslim (installed as ``torchslim.kernels``).

Each module holds ``@triton.jit`` kernels and their launchers (*check → allocate → launch*):

    quant_matmul   int8 × int8 → int32 GEMM, W8A8 dynamic linear, W8A16 weight-only linear
    int4_matmul    W4A16 weight-only linear on group-wise int4 weights
    sparse_matmul  linear on 2:4 sparse weights, expanded in registers (float or int8 values)
    attention      fused attention (FlashAttention-2 forward and backward, split-KV decode):
                   GQA, causal, sliding window, kv_lens, bool / float masks

Shared jit helpers live in :mod:`._common`, autotune config tables and their prune functions in
:mod:`.autotune`. This package imports nothing heavy: import the kernel module you need. The
kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before triton is imported).
"""

__all__ = ["attention", "int4_matmul", "quant_matmul", "sparse_matmul"]
