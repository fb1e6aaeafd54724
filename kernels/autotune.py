"""Autotune configurations for the Triton kernels, as named data, and their prune functions.

Every GEMM kernel names its operands ``a_ptr`` (M, K) and ``b_ptr`` (N, K) and takes the sizes
``M, N, K`` plus ``M_BUCKET = m_bucket(M)``, so that one prune function and one tuning key serve
them all:

    key     (M_BUCKET, N, K) (+ the dtypes of the tensor arguments, added by Triton): one tuning
            per power-of-two bucket of M rather than one per distinct M (a serving loop sees every
            M from 1 to thousands).
    prune   clamp BLOCK_M to M_BUCKET, BLOCK_N to next_pow2(N) and BLOCK_K to next_pow2(K) (never
            below the tensor-core minimum; GROUP_M = 1 once one tile row covers M), drop split-K
            factors larger than the number of K blocks, drop configs whose pipelined tiles exceed
            the device's shared memory, drop duplicates.

Tables (each a list of ``triton.Config``; kwargs BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K):

    INT8_GEMM_CONFIGS       int8 x int8 -> int32 (int8_mm, W8A8 linear): large tiles for prefill
                            and BLOCK_M = 16/32 tiles with long K for decode.
    W8A16_TILED_CONFIGS     fp16/bf16/fp32 x int8 weights, M > DECODE_MAX_M: tiled, no split-K.
    W8A16_DECODE_CONFIGS    the same kernel for M <= DECODE_MAX_M: BLOCK_M = 16, narrow N tiles
                            and split-K so that a 1-row GEMM still fills every SM while streaming
                            the weight once.
    W4A16_TILED_CONFIGS     fp16/bf16/fp32 x packed int4 weights, M > DECODE_MAX_M.
    W4A16_DECODE_CONFIGS    the same kernel for M <= DECODE_MAX_M, split-K. The W4A16 prune
                            also cuts BLOCK_K to a divisor of the group size.
    SP24_TILED_CONFIGS      fp16/bf16/fp32 x 2:4 sparse weights expanded in registers, M >
                            DECODE_MAX_M; SP24_DECODE_CONFIGS the same for M <= DECODE_MAX_M,
                            split-K. A weight tile expanded before tl.dot, as W4A16 dequantizes
                            one: the W4A16 tables, with the shared GEMM prune.

The attention kernels have their own key, prune and tables (ATTN_*_CONFIGS, one list per
head-dim class), described in the comment above those tables.

The same tables serve sm_80 (164 KiB shared memory per block) and sm_90 (227 KiB): the shared
memory prune drops what a device cannot hold. Under the Triton interpreter (TRITON_INTERPRET set)
nothing can be benchmarked and every program runs in numpy, so each table collapses to one small
config that still exercises masking, grouping and split-K.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import torch
import triton


def _interpreting() -> bool:
    """Whether ``@triton.jit`` builds interpreted functions (TRITON_INTERPRET, read as Triton
    reads it, at import time like ``triton.jit`` itself)."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # no knobs module
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


INTERPRET = _interpreting()

# Smallest tiles used by tl.dot across Triton 3.6-3.9 (int8 MMA needs K >= 32).
MIN_BLOCK_M = 16
MIN_BLOCK_N = 16
MIN_BLOCK_K = 32

# Largest M routed to the decode (split-K) configs of the W8A16 kernel.
DECODE_MAX_M = 16

GEMM_KEY = ["M_BUCKET", "N", "K"]


def _cfg(bm: int, bn: int, bk: int, group_m: int, warps: int, stages: int, split_k: int = 1):
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "SPLIT_K": split_k}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


#                 BM   BN   BK  GROUP_M warps stages
_INT8_GEMM_GPU = [
    _cfg(128, 256, 128, 8, 8, 3),
    _cfg(256, 128, 128, 8, 8, 3),
    _cfg(128, 128, 128, 8, 8, 4),
    _cfg(128, 128, 64, 8, 4, 4),
    _cfg(64, 128, 128, 8, 4, 4),
    _cfg(128, 64, 128, 8, 4, 4),
    _cfg(64, 64, 128, 8, 4, 5),
    _cfg(32, 128, 128, 4, 4, 4),
    _cfg(32, 64, 256, 4, 4, 4),
    _cfg(16, 128, 256, 1, 4, 3),
    _cfg(16, 64, 256, 1, 4, 4),
]

#                   BM   BN   BK  GROUP_M warps stages
_W8A16_TILED_GPU = [
    _cfg(128, 256, 64, 8, 8, 3),
    _cfg(256, 128, 64, 8, 8, 3),
    _cfg(128, 128, 64, 8, 4, 4),
    _cfg(128, 128, 32, 8, 4, 4),
    _cfg(64, 128, 64, 8, 4, 4),
    _cfg(128, 64, 64, 8, 4, 4),
    _cfg(64, 64, 64, 8, 4, 4),
    _cfg(32, 128, 128, 4, 4, 4),
    _cfg(32, 64, 128, 4, 4, 4),
]

#                    BM  BN   BK  GROUP_M warps stages split_k
_W8A16_DECODE_GPU = [
    _cfg(16, 64, 128, 1, 4, 4, 1),
    _cfg(16, 128, 128, 1, 4, 4, 1),
    _cfg(16, 32, 256, 1, 4, 4, 1),
    _cfg(16, 64, 256, 1, 4, 3, 2),
    _cfg(16, 32, 128, 1, 4, 4, 4),
    _cfg(16, 64, 128, 1, 4, 4, 4),
    _cfg(16, 32, 256, 1, 2, 4, 8),
    _cfg(16, 64, 256, 1, 4, 3, 8),
    _cfg(16, 128, 128, 1, 4, 4, 8),
    _cfg(16, 128, 256, 1, 8, 3, 16),
]


#                   BM   BN   BK  GROUP_M warps stages
_W4A16_TILED_GPU = [
    _cfg(128, 256, 64, 8, 8, 3),
    _cfg(128, 128, 64, 8, 4, 4),
    _cfg(128, 128, 128, 8, 8, 3),
    _cfg(64, 128, 128, 8, 4, 4),
    _cfg(128, 64, 128, 8, 4, 4),
    _cfg(64, 64, 128, 8, 4, 4),
    _cfg(32, 128, 128, 4, 4, 4),
    _cfg(32, 64, 256, 4, 4, 4),
]

#                    BM  BN   BK  GROUP_M warps stages split_k
_W4A16_DECODE_GPU = [
    _cfg(16, 64, 128, 1, 4, 4, 1),
    _cfg(16, 128, 128, 1, 4, 4, 1),
    _cfg(16, 64, 256, 1, 4, 3, 2),
    _cfg(16, 32, 128, 1, 4, 4, 4),
    _cfg(16, 64, 128, 1, 4, 4, 4),
    _cfg(16, 32, 256, 1, 2, 4, 8),
    _cfg(16, 64, 128, 1, 4, 4, 8),
    _cfg(16, 128, 128, 1, 4, 4, 8),
    _cfg(16, 64, 128, 1, 4, 3, 16),
]


# TORCHSLIM_TRITON_AUTOTUNE=0: one fixed config per table (the index below), no benchmarking.
# For test suites that sweep hundreds of shapes, where tuning each would cost far more than the
# tests; tests/test_triton_quant_matmul.py runs every config of every table on its own.
AUTOTUNE = os.environ.get("TORCHSLIM_TRITON_AUTOTUNE", "1").lower() not in ("0", "false", "off")


def _for_backend(
    gpu: list[triton.Config], default: int, interpreter: triton.Config
) -> list[triton.Config]:
    if INTERPRET:
        return [interpreter]
    return list(gpu) if AUTOTUNE else [gpu[default]]


# The GPU tables, for tests that run each config.
GPU_TABLES = {
    "int8_gemm": _INT8_GEMM_GPU,
    "w8a16_tiled": _W8A16_TILED_GPU,
    "w8a16_decode": _W8A16_DECODE_GPU,
    "w4a16_tiled": _W4A16_TILED_GPU,
    "w4a16_decode": _W4A16_DECODE_GPU,
    "sp24_tiled": _W4A16_TILED_GPU,
    "sp24_decode": _W4A16_DECODE_GPU,
}
INT8_GEMM_CONFIGS = _for_backend(_INT8_GEMM_GPU, 5, _cfg(32, 32, 64, 2, 4, 1))
W8A16_TILED_CONFIGS = _for_backend(_W8A16_TILED_GPU, 4, _cfg(32, 32, 64, 2, 4, 1))
W8A16_DECODE_CONFIGS = _for_backend(_W8A16_DECODE_GPU, 5, _cfg(16, 32, 32, 1, 4, 1, 2))
W4A16_TILED_CONFIGS = _for_backend(_W4A16_TILED_GPU, 5, _cfg(32, 32, 64, 2, 4, 1))
W4A16_DECODE_CONFIGS = _for_backend(_W4A16_DECODE_GPU, 4, _cfg(16, 32, 32, 1, 4, 1, 2))
SP24_TILED_CONFIGS = _for_backend(_W4A16_TILED_GPU, 5, _cfg(32, 32, 64, 2, 4, 1))
SP24_DECODE_CONFIGS = _for_backend(_W4A16_DECODE_GPU, 4, _cfg(16, 32, 32, 1, 4, 1, 2))

# Per-token quantization: a (BLOCK_M, BLOCK_K) tile of about _QUANTIZE_TILE elements per step,
# whole rows of up to BLOCK_K columns; long rows take one program each. Under the interpreter
# the K step is short so that the tests run the K loop several times.
_QUANTIZE_TILE = 4096
_QUANTIZE_MAX_BLOCK_K = 64 if INTERPRET else _QUANTIZE_TILE


def quantize_config(M: int, K: int) -> dict[str, int]:
    """Launch parameters of the per-token quantization kernel for an (M, K) input."""
    block_k = min(triton.next_power_of_2(max(K, 1)), _QUANTIZE_MAX_BLOCK_K)
    block_m = min(triton.next_power_of_2(max(M, 1)), max(1, _QUANTIZE_TILE // block_k))
    return {
        "BLOCK_M": block_m,
        "BLOCK_K": block_k,
        "num_warps": min(8, max(1, block_m * block_k // 256)),
    }


def m_bucket(M: int) -> int:
    """Tuning bucket of M: the next power of two (1, 2, 4, ..., 16, 32, ...)."""
    return triton.next_power_of_2(max(M, 1))


@functools.cache
def _max_shared_memory(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    if not smem:
        utils = triton.runtime.driver.active.utils
        smem = utils.get_device_properties(device_index)["max_shared_mem"]
    return int(smem)


def _shared_memory_limit(t: torch.Tensor) -> int | None:
    if not t.is_cuda:
        return None
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _max_shared_memory(index)


def prune_gemm_configs(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """``early_config_prune`` shared by every GEMM kernel (see the module docstring)."""
    args = {**named_args, **kwargs}
    a, b, K = args["a_ptr"], args["b_ptr"], args["K"]
    m_cap = max(MIN_BLOCK_M, args["M_BUCKET"])
    n_cap = max(MIN_BLOCK_N, triton.next_power_of_2(max(args["N"], 1)))
    k_cap = max(MIN_BLOCK_K, triton.next_power_of_2(max(K, 1)))
    smem_limit = _shared_memory_limit(a)

    kept: dict[tuple, triton.Config] = {}
    fallback: tuple[int, triton.Config] | None = None
    for cfg in configs:
        kw = dict(cfg.kwargs)
        kw["BLOCK_M"] = min(kw["BLOCK_M"], m_cap)
        kw["BLOCK_N"] = min(kw["BLOCK_N"], n_cap)
        kw["BLOCK_K"] = min(kw["BLOCK_K"], k_cap)
        if kw["BLOCK_M"] >= m_cap:  # a single row of tiles: grouping is moot
            kw["GROUP_M"] = 1
        new = copy.copy(cfg)
        new.kwargs = kw
        smem = (
            cfg.num_stages
            * kw["BLOCK_K"]
            * (kw["BLOCK_M"] * a.element_size() + kw["BLOCK_N"] * b.element_size())
        )
        if fallback is None or smem < fallback[0]:
            fallback = (smem, new)
        if kw.get("SPLIT_K", 1) > max(1, triton.cdiv(K, kw["BLOCK_K"])):
            continue
        if smem_limit is not None and smem > smem_limit:
            continue
        kept.setdefault((tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages), new)
    # Never return nothing: the smallest config is the one most likely to fit.
    return list(kept.values()) or [fallback[1]]


def autotune_gemm(configs: list[triton.Config], **kwargs: Any):
    """``triton.autotune`` with the shared GEMM key and prune; kwargs go to triton.autotune."""
    return triton.autotune(
        configs=configs,
        key=GEMM_KEY,
        prune_configs_by={"early_config_prune": prune_gemm_configs},
        **kwargs,
    )


# Smallest K tile of a float tl.dot.
_MIN_BLOCK_K_FLOAT = 16


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most cap."""
    return min(n & -n, cap)


def prune_w4a16_configs(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """``prune_gemm_configs``, then BLOCK_K cut to a power of two that divides the group size,
    so that a tile sits inside one group (per-channel groups, G = K, take any BLOCK_K; a group
    size with no such divisor of at least 16 keeps the tile and reads scales per element). A
    smaller BLOCK_K only adds K blocks, so the split-K factors kept stay valid."""
    args = {**named_args, **kwargs}
    K, G = args["K"], args["GROUP_SIZE"]
    kept: dict[tuple, triton.Config] = {}
    for cfg in prune_gemm_configs(configs, named_args, **kwargs):
        kw = dict(cfg.kwargs)
        if G != K and _pow2_divisor(G, kw["BLOCK_K"]) >= _MIN_BLOCK_K_FLOAT:
            kw["BLOCK_K"] = _pow2_divisor(G, kw["BLOCK_K"])
        new = copy.copy(cfg)
        new.kwargs = kw
        kept.setdefault((tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages), new)
    return list(kept.values())


def autotune_w4a16(configs: list[triton.Config], **kwargs: Any):
    """``triton.autotune`` for the W4A16 kernel: the GEMM key plus the group size."""
    return triton.autotune(
        configs=configs,
        key=[*GEMM_KEY, "GROUP_SIZE"],
        prune_configs_by={"early_config_prune": prune_w4a16_configs},
        **kwargs,
    )


# --------------------------------------------------------------------------------- attention
# The attention kernels (kernels/attention.py) name their tiles BLOCK_M (query rows) and BLOCK_N
# (keys), and take q_ptr, the padded head dims BLOCK_D / BLOCK_DV and the power-of-two buckets
# SQ_BUCKET / SK_BUCKET of the query and key lengths, so that one key and one prune serve all:
#
#     key     (SQ_BUCKET, SK_BUCKET, BLOCK_D, BLOCK_DV, CAUSAL, MASK_KIND) (+ dtypes): a decode
#             loop sees every key length once, and must not re-tune at each.
#     prune   clamp BLOCK_M to SQ_BUCKET and BLOCK_N to SK_BUCKET (never below 16, the tl.dot
#             minimum), drop configs whose pipelined tiles exceed the device's shared memory
#             (fp32 inputs need twice the bytes), drop duplicates; never return nothing.
#
# Register pressure decides the tiles far more than shared memory does, and it grows with the
# head dim, so each table comes in three classes of max(BLOCK_D, BLOCK_DV): 64 (and below), 128
# and 256. The first config of each class, compiled ahead of time for sm_90 (fp16, Triton 3.6
# and 3.9, no mask, MHA; not yet run on a GPU), has no register spills; the others are
# alternatives for the autotuner. Seen in those builds: attn_mask / window / kv_lens add enough
# live values that the forward's first D = 128 config spills where (128, 32, 8 warps) does not;
# the dK/dV kernel spills a little under GQA (its loop over the group) at every D = 128 config
# tried; IEEE fp32 tl.dot (fp32 inputs at "highest" precision) spills at almost any tile:
# correct but slow.
#
# Tables (dicts class -> list of ``triton.Config``; kwargs BLOCK_M, BLOCK_N; the decode kernel's
# BLOCK_M is the number of query rows it packs, set by the launcher, so its configs set BLOCK_N):
#
#     ATTN_FWD_CONFIGS        forward, one program per BLOCK_M query rows of one (b, h):
#                             BLOCK_M 128 and BLOCK_N 64-128 up to D = 128 (FlashAttention-2,
#                             the Triton tutorial; 8 warps at D = 128, where 4 spill).
#     ATTN_DECODE_CONFIGS     split-KV decode: the rows of one kv head's query group against one
#                             slice of the keys; memory bound, so long key tiles, deep pipelines.
#     ATTN_BWD_KV_CONFIGS     backward dK/dV: BLOCK_N keys per program, BLOCK_M query rows a step.
#     ATTN_BWD_Q_CONFIGS      backward dQ: BLOCK_M query rows per program, BLOCK_N keys a step.
#
# Autotuning (TORCHSLIM_TRITON_AUTOTUNE=1 on a GPU) benchmarks what the prune keeps. Without it,
# and under the interpreter, the launcher takes the first config the prune keeps.

ATTENTION_KEY = ["SQ_BUCKET", "SK_BUCKET", "BLOCK_D", "BLOCK_DV", "CAUSAL", "MASK_KIND"]
ATTN_HEAD_CLASSES = (64, 128, 256)

# Split-KV decode: query lengths up to ATTN_DECODE_MAX_SQ go to the decode kernel, which packs
# the query heads of one kv head (GQA) into at most ATTN_DECODE_MAX_ROWS rows per program (half
# that for head dims above 128), and splits the keys while there are fewer programs than
# ATTN_DECODE_PROGRAMS_PER_SM per SM, into at most ATTN_MAX_SPLITS slices of at least
# ATTN_SPLIT_MIN_KEYS keys. Under the interpreter the slices are short so that the tests split.
ATTN_DECODE_MAX_SQ = 16
ATTN_DECODE_MAX_ROWS = 32
ATTN_DECODE_PROGRAMS_PER_SM = 2
ATTN_MAX_SPLITS = 64
ATTN_SPLIT_MIN_KEYS = 16 if INTERPRET else 256
ATTN_INTERPRETER_SMS = 4


def _attn_cfg(bm: int | None, bn: int, warps: int, stages: int) -> triton.Config:
    kwargs = {"BLOCK_N": bn} if bm is None else {"BLOCK_M": bm, "BLOCK_N": bn}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


#                  BM   BN  warps stages
_ATTN_FWD_GPU = {
    64: [
        _attn_cfg(128, 64, 4, 3),
        _attn_cfg(128, 128, 8, 3),
        _attn_cfg(128, 64, 8, 3),
        _attn_cfg(128, 32, 4, 4),
        _attn_cfg(128, 64, 4, 4),
        _attn_cfg(64, 64, 4, 3),
        _attn_cfg(64, 32, 4, 2),
    ],
    128: [
        _attn_cfg(128, 64, 8, 3),
        _attn_cfg(128, 128, 8, 3),
        _attn_cfg(128, 64, 8, 2),
        _attn_cfg(128, 32, 8, 3),
        _attn_cfg(64, 64, 4, 3),
        _attn_cfg(64, 64, 8, 3),
        _attn_cfg(64, 32, 4, 2),
    ],
    256: [
        _attn_cfg(64, 32, 8, 3),
        _attn_cfg(64, 64, 8, 2),
        _attn_cfg(64, 32, 8, 2),
        _attn_cfg(32, 32, 4, 2),
        _attn_cfg(32, 16, 4, 2),
    ],
}

#                      BN  warps stages (BLOCK_M: up to 32 rows, 16 at 256)
_ATTN_DECODE_GPU = {
    64: [
        _attn_cfg(None, 64, 4, 3),
        _attn_cfg(None, 128, 4, 3),
        _attn_cfg(None, 64, 4, 4),
        _attn_cfg(None, 128, 8, 3),
        _attn_cfg(None, 32, 4, 4),
    ],
    128: [
        _attn_cfg(None, 64, 4, 4),
        _attn_cfg(None, 128, 8, 3),
        _attn_cfg(None, 64, 4, 3),
        _attn_cfg(None, 128, 4, 3),
        _attn_cfg(None, 32, 4, 4),
    ],
    256: [
        _attn_cfg(None, 32, 4, 3),
        _attn_cfg(None, 64, 8, 2),
        _attn_cfg(None, 64, 4, 3),
        _attn_cfg(None, 32, 4, 2),
    ],
}

#                     BM   BN  warps stages
_ATTN_BWD_KV_GPU = {
    64: [
        _attn_cfg(32, 128, 8, 3),
        _attn_cfg(32, 64, 4, 3),
        _attn_cfg(64, 128, 8, 2),
        _attn_cfg(64, 64, 4, 3),
        _attn_cfg(16, 64, 4, 2),
    ],
    128: [
        _attn_cfg(32, 128, 8, 3),
        _attn_cfg(32, 64, 8, 2),
        _attn_cfg(16, 64, 4, 2),
        _attn_cfg(32, 64, 4, 3),
        _attn_cfg(32, 128, 8, 2),
    ],
    256: [
        _attn_cfg(32, 32, 8, 2),
        _attn_cfg(16, 32, 4, 2),
        _attn_cfg(16, 32, 4, 1),
    ],
}

#                    BM   BN  warps stages
_ATTN_BWD_Q_GPU = {
    64: [
        _attn_cfg(128, 64, 8, 2),
        _attn_cfg(128, 32, 8, 3),
        _attn_cfg(64, 64, 4, 3),
        _attn_cfg(64, 32, 4, 3),
    ],
    128: [
        _attn_cfg(128, 32, 8, 3),
        _attn_cfg(128, 64, 8, 2),
        _attn_cfg(64, 32, 4, 3),
        _attn_cfg(128, 32, 8, 2),
    ],
    256: [
        _attn_cfg(64, 16, 4, 2),
        _attn_cfg(32, 32, 4, 2),
        _attn_cfg(64, 32, 8, 2),
    ],
}

GPU_TABLES.update(
    {
        f"attn_{name}_{cls}": table[cls]
        for name, table in (
            ("fwd", _ATTN_FWD_GPU),
            ("decode", _ATTN_DECODE_GPU),
            ("bwd_kv", _ATTN_BWD_KV_GPU),
            ("bwd_q", _ATTN_BWD_Q_GPU),
        )
        for cls in ATTN_HEAD_CLASSES
    }
)


def _attention_tables(
    gpu: dict[int, list[triton.Config]], interpreter: triton.Config
) -> dict[int, list[triton.Config]]:
    return {cls: [interpreter] if INTERPRET else list(gpu[cls]) for cls in ATTN_HEAD_CLASSES}


# Under the interpreter: tiles of 16 keys and 32 query rows, so that the tests' short sequences
# still cross several key blocks, diagonal blocks and fully visible ones.
ATTN_FWD_CONFIGS = _attention_tables(_ATTN_FWD_GPU, _attn_cfg(32, 16, 4, 1))
ATTN_DECODE_CONFIGS = _attention_tables(_ATTN_DECODE_GPU, _attn_cfg(None, 16, 4, 1))
ATTN_BWD_KV_CONFIGS = _attention_tables(_ATTN_BWD_KV_GPU, _attn_cfg(16, 32, 4, 1))
ATTN_BWD_Q_CONFIGS = _attention_tables(_ATTN_BWD_Q_GPU, _attn_cfg(32, 16, 4, 1))


def attention_head_class(block_d: int, block_dv: int) -> int:
    """The table class (64, 128 or 256) of padded head dims BLOCK_D and BLOCK_DV."""
    return next(c for c in ATTN_HEAD_CLASSES if max(block_d, block_dv) <= c)


def _attention_smem(kind: str, bm: int, bn: int, d: int, dv: int, es: int, stages: int) -> int:
    """Shared memory bytes of one config: the tiles streamed ``stages`` deep plus the tiles
    kept resident (matches what Triton 3.9 allocates for the forward on sm_90)."""
    if kind in ("fwd", "decode"):  # K/V streamed, Q resident
        return stages * bn * (d + dv) * es + bm * d * es
    if kind == "bwd_kv":  # Q/dO streamed, K/V resident
        return stages * bm * (d + dv) * es + bn * (d + dv) * es
    if kind == "bwd_q":  # K/V streamed, Q/dO resident
        return stages * bn * (d + dv) * es + bm * (d + dv) * es
    raise ValueError(f"unknown attention kernel kind {kind!r}")


def prune_attention_configs(
    configs: list[triton.Config], named_args: dict[str, Any], kind: str = "fwd", **kwargs: Any
) -> list[triton.Config]:
    """``early_config_prune`` shared by the attention kernels (see the comment above the
    tables); ``kind`` is "fwd", "decode", "bwd_kv" or "bwd_q". Also called by the launchers to
    pick the first fitting config when not autotuning."""
    args = {**named_args, **kwargs}
    q = args["q_ptr"]
    d, dv, es = args["BLOCK_D"], args["BLOCK_DV"], q.element_size()
    m_cap = max(MIN_BLOCK_M, args["SQ_BUCKET"])
    n_cap = max(MIN_BLOCK_N, args["SK_BUCKET"])
    smem_limit = _shared_memory_limit(q)

    kept: dict[tuple, triton.Config] = {}
    fallback: tuple[int, triton.Config] | None = None
    for cfg in configs:
        kw = dict(cfg.kwargs)
        if "BLOCK_M" in kw:
            kw["BLOCK_M"] = min(kw["BLOCK_M"], m_cap)
        kw["BLOCK_N"] = min(kw["BLOCK_N"], n_cap)
        new = copy.copy(cfg)
        new.kwargs = kw
        bm = kw.get("BLOCK_M", args.get("BLOCK_M"))
        smem = _attention_smem(kind, bm, kw["BLOCK_N"], d, dv, es, cfg.num_stages)
        if fallback is None or smem < fallback[0]:
            fallback = (smem, new)
        if smem_limit is not None and smem > smem_limit:
            continue
        kept.setdefault((tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages), new)
    return list(kept.values()) or [fallback[1]]


def autotune_attention(configs: list[triton.Config], kind: str):
    """``triton.autotune`` with the attention key and prune (``kind`` as in the prune)."""
    return triton.autotune(
        configs=configs,
        key=ATTENTION_KEY,
        prune_configs_by={
            "early_config_prune": functools.partial(prune_attention_configs, kind=kind)
        },
    )
