"""Helpers shared by the Triton kernels: jit functions and the launchers' input checks.

jit helpers:
    round_half_even(x)      fp32 round to nearest integer, ties to even (torch.round), |x| <= 2**22
    grouped_tile(pid, ...)  program id -> (pid_m, pid_n), GROUP_M row-tiles per group for L2 reuse
    add_bias(out, ...)      out + bias[n] in fp32 (the first K slice only, under split-K)
    store_tile(c_ptr, ...)  masked store of an output tile, or atomic add under split-K
    even_k(args)            heuristic: K % (BLOCK_K * SPLIT_K) == 0, so no K mask is needed

launcher helpers:
    check_tensor / check_same_device   ValueError/TypeError naming the argument, rule and value
    device_guard(t)                     launch on t's device (Triton launches on the current one)
    gemm_output / no_launch            a weight-compressed GEMM's output buffer (fp32, zeroed,
                                        for split-K decode) and its result when K or M N is 0
    dot_precision(dtype)                tl.dot's input_precision for fp32 (TF32 unless "highest")
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .autotune import DECODE_MAX_M, INTERPRET

# 1.5 * 2**23: adding it to |x| <= 2**22 lands in [2**23, 2**24), where the fp32 spacing is 1, so
# the addition itself rounds x to an integer with the IEEE default mode (nearest, ties to even);
# subtracting it back is exact. Works identically on every backend, unlike libdevice.rint.
_RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def round_half_even(x):
    """Round fp32 ``x`` to the nearest integer, ties to even; exact for |x| <= 2**22."""
    return (x + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a 1-D program id to a (pid_m, pid_n) output tile, column-major within groups of
    GROUP_M row-tiles so that consecutive programs share B tiles in L2 (Triton tutorial 03)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def add_bias(out, bias_ptr, offs_cn, N, pid_k, SPLIT_K: tl.constexpr):
    """out + bias[offs_cn] in fp32; with SPLIT_K > 1 only K slice 0 adds it."""
    bias = tl.load(bias_ptr + offs_cn, mask=offs_cn < N, other=0.0).to(tl.float32)
    if SPLIT_K > 1:
        bias = tl.where(pid_k == 0, bias, 0.0)
    return out.to(tl.float32) + bias[None, :]


@triton.jit
def store_tile(c_ptr, out, offs_cm, offs_cn, M, N, stride_cm, stride_cn, SPLIT_K: tl.constexpr):
    """Stores the (offs_cm, offs_cn) tile of C masked to (M, N), cast to C's dtype; with
    SPLIT_K > 1 adds it atomically instead (C fp32 and zero-filled)."""
    c_ptrs = c_ptr + offs_cm.to(tl.int64)[:, None] * stride_cm + offs_cn[None, :] * stride_cn
    c_mask = (offs_cm < M)[:, None] & (offs_cn < N)[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, out, mask=c_mask, sem="relaxed")


def even_k(args) -> bool:
    """``triton.heuristics`` EVEN_K: every K tile of every split is full."""
    return args["K"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(
    name: str,
    t: object,
    dtypes: tuple[torch.dtype, ...] | None,
    shape: tuple[int | None, ...],
    dims: str,
    rule: str = "",
) -> None:
    """Validate one tensor argument of a launcher.

    Args:
        name: the argument's name, used in the message.
        t: the argument.
        dtypes: allowed dtypes; None for any floating-point dtype.
        shape: required sizes, one per dimension, None for "any" (``(None, 64)``).
        dims: the symbolic shape for the message, e.g. ``"(N, K)"``.
        rule: why the sizes are required, e.g. ``" to match x's K"``.

    Raises:
        TypeError: ``t`` is not a tensor or has a wrong dtype.
        ValueError: ``t`` has a wrong number of dimensions or wrong sizes, e.g.
            ``w_q must be (N, K) = (*, 64) to match x's K, got (32, 48)``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
    if dtypes is None:
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    elif t.dtype not in dtypes:
        raise TypeError(f"{name} must be {_dtype_names(dtypes)}, got {t.dtype}")
    got = "(" + ", ".join(str(d) for d in t.shape) + ("," if t.dim() == 1 else "") + ")"
    if t.dim() != len(shape):
        raise ValueError(f"{name} must be {len(shape)}-D {dims}, got shape {got}")
    if any(s is not None and s != d for s, d in zip(shape, t.shape, strict=True)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        want = "(" + want + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name} must be {dims} = {want}{rule}, got {got}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors (None skipped) on one device, and one Triton can run on."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{n} must be on the same device as {first_name} ({first.device}), got {t.device}"
            )
    if first.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            f"{first_name} is on cpu: the Triton kernels need a GPU tensor "
            "(or TRITON_INTERPRET=1 set before importing triton)"
        )


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context that makes ``t``'s CUDA device current (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def gemm_output(x: torch.Tensor, n: int) -> tuple[torch.Tensor, bool]:
    """(out (M, N), decode) for a GEMM launcher whose decode configs split K: at M <=
    DECODE_MAX_M an fp32 zero-filled buffer that the programs add into atomically, else an
    uninitialised one in x.dtype. The launcher returns ``out.to(x.dtype)``."""
    decode = x.shape[0] <= DECODE_MAX_M
    make = torch.zeros if decode else torch.empty
    return make(
        (x.shape[0], n), dtype=torch.float32 if decode else x.dtype, device=x.device
    ), decode


def no_launch(
    out: torch.Tensor, k: int, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """The result that needs no launch, in ``dtype``: an empty ``out`` as it is, K == 0 the bias
    alone (zeros without one); None when there is work."""
    if out.numel() == 0:
        return out.to(dtype)
    if k == 0:
        out.zero_()
        if bias is not None:
            out += bias.to(out.dtype)
        return out.to(dtype)
    return None


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 follows torch.get_float32_matmul_precision() ("highest"
    is IEEE fp32, else TF32); other dtypes ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"
