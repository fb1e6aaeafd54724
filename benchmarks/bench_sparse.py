"""Sparse linear benchmark: torchslim's 2:4, bitmask, csr, sliced and block kernels against dense
and torch.sparse.

    torchslim bench sparse [--quick] [--layers KxN,...] [--batch M,...] [--sparsity 50,90,2:4]
                           [--device cpu|cuda] [--out DIR] [--no-plot]
    python benchmarks/bench_sparse.py [same options]

Weights: the int8 benchmark's layers (K in, N out, random normal), pruned with
torchslim.sparse.prune_ (magnitude) once per (layer, pattern) on the fp32 weight, then
compressed once per value dtype: "unstructured" at 50 / 75 / 90% (every row keeps the same
count; the bitmask and csr formats), "2:4" (the 2:4 format) and 16 x 16 blocks at 50 and 90%
("16x16@50%": every block row keeps the same count of whole blocks; the block format). M in
{1, 16, 64, 512}.

CPU implementations, in the same run:

    dense-fp32, dense-bf16  F.linear on the unpruned weight, timed in turns with each
                            pattern's implementations (below)
    torch-csr-fp32          torch.sparse CSR (w.to_sparse_csr(): fp32 values, int64 column
                            indices and row pointers) as torch.mm(csr, x.T).T, MKL's sparse mm.
                            The fastest torch path measured: torch.sparse.mm, torch.sparse.addmm
                            and torch.mm(csr, x.T.contiguous()) time the same (the same MKL
                            call); F.linear(x, csr) ties at M = 1 and is 4-9x slower at M >= 16;
                            x @ csr.T (CSC) is 5-50x slower. No bf16 CSR: torch's CPU CSR mm
                            ("addmm_out_sparse_csr_impl_mkl") is not implemented for bf16.
    torchslim-<fmt>-fp32        ours, fp32 values and fp32 x
    torchslim-<fmt>-bf16        ours, bf16 values and bf16 x
    torchslim-<fmt>-bf16-fp32x  ours, bf16 values and fp32 x (half the value bytes, fp32
                                activations)
    torchslim-<fmt>-int8-fp32x  ours, int8 values (the pruned weight quantized per output
                                channel, fp32 scales: W8A16) and fp32 x
    torchslim-<fmt>-w8a8        ours, bitmask, sliced, 2:4 or block int8 values against fp32 x
                                quantized per token inside the op
                                (sparse_bitmask_dynamic_linear, sparse_sliced_dynamic_linear,
                                sparse24_dynamic_linear and sparse_block_dynamic_linear: W8A8,
                                the rule of int8_dynamic_linear; the op's quantization of x is
                                timed)

Ours run sparse_bitmask_linear, sparse_csr_linear and sparse_sliced_linear (<fmt> bitmask, csr,
sliced) at the unstructured patterns, sparse24_linear (2:4) at 2:4 and sparse_block_linear
(block) at the block patterns; torch's CSR runs at every pattern.

GPU (--device cuda): dense-fp16 and dense-bf16 (cuBLAS) and, at 2:4, torch's semi-structured
sparsity (torch.sparse.to_sparse_semi_structured's classes) on each backend, cuSPARSELt and
CUTLASS, fp16 and bf16, as F.linear(x, w_sparse); a backend this torch or GPU lacks is reported
as not run (torch's CUTLASS 2:4 runs on sm_8x only). Eager cuSPARSELt spends ~0.6-1 ms of host
time per call setting up its descriptors (torch 2.11, H100), which hides the kernel, so the
"-graph" rows replay the call from a CUDA graph (captured once per rotated weight copy): the
kernel's own time. dense-*-graph does the same for cuBLAS, to compare like with like; speedups
stay over the faster eager dense. Ours appear only where torchslim.ops.explain picks a kernel,
and the `kernel` column names it: on CUDA, sparse24_linear runs the sparse tensor cores (CUDA
C++, mma.sp: torchslim-2:4-fp16 and -bf16 from M = 17) or else the Triton kernel (decode, and
torchslim-2:4-int8-fp16x with int8 values), sparse_block_linear the Triton block kernel, while
bitmask and csr have no GPU kernel yet (they would run the reference) and their rows are "not
run". The GPU target line reads ours on 2:4 against dense fp16, both eager, on 8192 x 8192 from
M = 1024 up.

A case is (layer, pattern, M). Its implementations, the two dense ones and the copy that
measures memory bandwidth take turns (common.time_in_turns: rounds in which each is timed in
its turn, each figure the median of its rounds), so that every ratio and floor is taken in the
same seconds of a shared machine: a case's operands, each rotated through common.ROTATE_BYTES
of copies (at least 96 MB, twice the last-level cache) so that a timed call does not find its
weight in cache, all live at once. Every row carries the pattern it took turns with (`turns`);
a dense row therefore appears once per pattern.

Per row: time (median ms: torch.utils.benchmark's blocked_autorange at the process's thread
count; on a GPU triton's do_bench, one round), speedup over the faster of dense fp32 and bf16
F.linear in the same turns (fp16 and bf16 on a GPU; `vs` names which, `vs_ms` its time), GB/s,
weight_bytes of the row's own format (torchslim.sparse.format_bytes for ours and torch's 2:4;
CSR: values + int64 column indices + int64 row pointers; dense: N K elements), % of its memory
floor (weight + x + out bytes ÷ the copy bandwidth of the same turns, copy_GB/s), the compute
floor (useful FLOPs ÷ roof_GFLOP/s, the GEMM rate measured at the start in the dtype the row
multiplies in, `roof`: int8 for W8A8, else x's dtype) and which of the two binds, and
GFLOP/s of useful work (2 M nnz; 2 M N K for dense). Each path's output is checked once against
fp32 F.linear on its weight (a wiring check: the kernels' accuracy is tests/test_sparse.py's
job).

Prints the table, the crossover sparsity (per layer, M and variant of ours: the lowest measured
unstructured sparsity at which it beats the faster dense) and the issue's targets: on the CPU
at M = 1, on a GPU the 2:4 target above.
Writes sparse_<device>.csv and .png under benchmarks/results/<device>/ (sparse_<device>_quick.*
with --quick).
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import torchslim.sparse as sp
from torchslim import ops
from torchslim.benchmarks import common
from torchslim.benchmarks.bench_quant import (
    BATCH,
    GPU_BATCH,
    GPU_LAYERS,
    LAYERS,
    QUICK_BATCH,
    QUICK_LAYERS,
    make_parser,
)
from torchslim.quant.int8 import quantize_weight_per_channel

# Unstructured percentages (bitmask, csr), 2:4, and blocks pruned to a percentage ("RxC@P%").
PATTERNS = ("50%", "75%", "90%", "2:4", "16x16@50%", "16x16@90%")
DENSE = "dense"  # the pseudo-pattern of the unpruned weight
# The wiring check: relative Frobenius error of each path's output against fp32 F.linear on the
# pruned weight (bf16 / fp16 inputs give ~0.5%; a wrong layout gives ~100%).
MAX_REL_ERR = 3e-2
# The CPU targets, read at M = 1 against the faster of dense fp32 and bf16.
TARGET_M = 1
SPEEDUP_TARGETS = (("2:4", 3.0), ("90%", 8.0))
CSR_TARGET = ("90%", 5.0)
GPU_TARGET = ("8192x8192", 1024, 1.2)  # layer, from this M up, 2:4 over dense fp16
FLOOR_TARGET = 75.0  # % of the memory floor
# What a baseline may raise for a case it does not take (shape or dtype limits, a missing
# backend): the row is reported as not run.
NOT_RUN = (RuntimeError, NotImplementedError, ValueError, TypeError, AssertionError)

_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}


@dataclass(frozen=True)
class Impl:
    """One way to compute x @ W.T with W (N, K) a pruned weight.

    fmt: "dense" (the unpruned weight), "bitmask", "csr" or "sliced" (the unstructured patterns),
    "2:4", "torch-csr" (every pattern) or "semi-structured" (2:4). op: the torchslim op it calls,
    None for the baselines; ours run only where ops.explain(op, ...) picks a kernel (not the
    reference). clones: the operands' rotated copies are clones (else each is made again from the
    weight: torch's semi-structured tensors do not all support clone()). graphed: time the replay
    of a CUDA graph of the call (captured per rotated copy) instead of the eager call. op_args: the
    op's arguments after x, from the operands.
    """

    name: str
    fmt: str
    w_dtype: torch.dtype
    x_dtype: torch.dtype
    make: Callable[[torch.Tensor, str], tuple]  # (pruned (N, K) fp32 weight, pattern) -> operands
    run: Callable[[torch.Tensor, tuple], torch.Tensor]  # (x (M, K), operands) -> (M, N)
    op: str | None = None
    clones: bool = True
    graphed: bool = False
    op_args: Callable[[tuple], tuple] = lambda operands: operands

    def applies(self, pattern: str) -> bool:
        if self.fmt == DENSE:
            return pattern == DENSE
        if pattern == DENSE:
            return False
        if self.fmt in ("2:4", "semi-structured"):
            return pattern == "2:4"
        if self.fmt in ("bitmask", "csr", "sliced"):
            return is_unstructured(pattern)
        if self.fmt == "block":
            return _is_block(pattern)
        return True  # torch-csr


def _dense(dtype: torch.dtype, graphed: bool = False) -> Impl:
    return Impl(
        f"dense-{_SHORT[dtype]}" + ("-graph" if graphed else ""),
        DENSE,
        dtype,
        dtype,
        lambda w, _pattern: (w.to(dtype),),
        lambda x, o: F.linear(x, o[0]),
        graphed=graphed,
    )


def _to_csr(w: torch.Tensor, _pattern: str) -> tuple:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return (w.to_sparse_csr(),)


TORCH_CSR = Impl(
    "torch-csr-fp32",
    "torch-csr",
    torch.float32,
    torch.float32,
    _to_csr,
    lambda x, o: torch.mm(o[0], x.T).T,  # (N, K) CSR @ (K, M) dense -> (N, M), viewed as (M, N)
)


def _compress_block(w: torch.Tensor, pattern: str, dtype: torch.dtype | None = None) -> tuple:
    """The block format of w pruned in ``pattern``'s blocks, and N for the op."""
    return (*sp.compress_block(w, split_pattern(pattern)[0], dtype), w.shape[0])


def _compress_sliced(w: torch.Tensor, _pattern: str, dtype: torch.dtype | None = None) -> tuple:
    """The sliced format of w, and N for the op."""
    return (*sp.compress_sliced(w, dtype), w.shape[0])


_OURS = {  # format -> (op name, entry point, compression (w, pattern, dtype))
    "bitmask": (
        "sparse_bitmask_linear",
        ops.sparse_bitmask_linear,
        lambda w, _, dtype=None: sp.compress_bitmask(w, dtype),
    ),
    "2:4": (
        "sparse24_linear",
        ops.sparse24_linear,
        lambda w, _, dtype=None: sp.compress_24(w, dtype),
    ),
    "csr": (
        "sparse_csr_linear",
        ops.sparse_csr_linear,
        lambda w, _, dtype=None: sp.compress_csr(w, dtype),
    ),
    "block": ("sparse_block_linear", ops.sparse_block_linear, _compress_block),
    "sliced": ("sparse_sliced_linear", ops.sparse_sliced_linear, _compress_sliced),
}


def _ours(fmt: str, w_dtype: torch.dtype, x_dtype: torch.dtype) -> Impl:
    """Ours in one format: torchslim-<format>-<value dtype>[-<x dtype>x]. int8 values are the
    pruned weight's codes per output channel, their scales passed to the op."""
    op_name, op, compress = _OURS[fmt]
    suffix = "" if x_dtype == w_dtype else f"-{_SHORT[x_dtype]}x"
    if w_dtype == torch.int8:

        def make(w, pattern):
            codes, scales = quantize_weight_per_channel(w)
            return (*compress(codes, pattern), scales)

        def op_args(o):
            return (*o[:-1], None, o[-1])  # no bias

    else:

        def make(w, pattern):
            return compress(w, pattern, w_dtype)

        def op_args(o):
            return o

    return Impl(
        f"torchslim-{fmt}-{_SHORT[w_dtype]}{suffix}",
        fmt,
        w_dtype,
        x_dtype,
        make,
        lambda x, o: op(x, *op_args(o)),
        op=op_name,
        op_args=op_args,
    )


def _semi_structured(backend: str, dtype: torch.dtype, graphed: bool = False) -> Impl:
    """torch's 2:4 on a GPU, on one backend ("cusparselt" or "cutlass")."""

    def make(w, _pattern):
        cls = (
            torch.sparse.SparseSemiStructuredTensorCUSPARSELT
            if backend == "cusparselt"
            else torch.sparse.SparseSemiStructuredTensorCUTLASS
        )
        with warnings.catch_warnings():  # "The PyTorch API of SparseSemiStructuredTensors
            warnings.simplefilter("ignore", UserWarning)  # is in prototype stage"
            return (cls.from_dense(w.to(dtype)),)

    return Impl(
        f"torch-2:4-{backend}-{_SHORT[dtype]}" + ("-graph" if graphed else ""),
        "semi-structured",
        dtype,
        dtype,
        make,
        lambda x, o: F.linear(x, o[0]),
        clones=False,
        graphed=graphed,
    )


_W8A8_OPS = {  # format -> its W8A8 op
    "bitmask": "sparse_bitmask_dynamic_linear",
    "sliced": "sparse_sliced_dynamic_linear",
    "2:4": "sparse24_dynamic_linear",
    "block": "sparse_block_dynamic_linear",
}


def _w8a8(fmt: str) -> Impl:
    """Ours, W8A8: the codes per output channel in ``fmt`` (a key of _W8A8_OPS), and fp32 x
    quantized per token inside the format's W8A8 op."""
    _, _, compress = _OURS[fmt]
    op_name = _W8A8_OPS[fmt]
    op = getattr(ops, op_name)

    def make(w, pattern):
        codes, scales = quantize_weight_per_channel(w)
        return (*compress(codes, pattern), scales)

    return Impl(
        f"torchslim-{fmt}-w8a8",
        fmt,
        torch.int8,
        torch.float32,
        make,
        lambda x, o: op(x, *o),
        op=op_name,
    )


_F32, _BF16, _F16, _I8 = torch.float32, torch.bfloat16, torch.float16, torch.int8
CPU_DENSE = (_dense(_F32), _dense(_BF16))
IMPLS = (
    TORCH_CSR,
    *(
        _ours(fmt, w, x)
        for w, x in ((_F32, _F32), (_BF16, _BF16), (_BF16, _F32), (_I8, _F32))
        for fmt in ("bitmask", "csr", "sliced", "2:4", "block")
    ),
    *(_w8a8(fmt) for fmt in _W8A8_OPS),
)
GPU_DENSE = (_dense(_F16), _dense(_BF16))
GPU_IMPLS = (
    *(_dense(d, graphed=True) for d in (_F16, _BF16)),
    *(_semi_structured(b, d) for b in ("cusparselt", "cutlass") for d in (_F16, _BF16)),
    *(_semi_structured("cusparselt", d, graphed=True) for d in (_F16, _BF16)),
    *(_ours(fmt, d, d) for d in (_F16, _BF16) for fmt in ("bitmask", "csr", "2:4", "block")),
    _ours("2:4", torch.int8, _F16),
)


def split_pattern(pattern: str) -> tuple[str | None, str]:
    """("RxC", "P%") for a block pattern "RxC@P%", else (None, pattern)."""
    block, at, rest = pattern.partition("@")
    return (block, rest) if at else (None, pattern)


def is_unstructured(pattern: str) -> bool:
    return pattern not in (DENSE, "2:4") and split_pattern(pattern)[0] is None


def _is_block(pattern: str) -> bool:
    return split_pattern(pattern)[0] is not None


def percent(pattern: str) -> float:
    """The sparsity a pattern label stands for, in %: "90%" -> 90, "2:4" -> 50, "16x16@75%" ->
    75."""
    return 50.0 if pattern == "2:4" else float(split_pattern(pattern)[1].rstrip("%"))


def prune(w: torch.Tensor, pattern: str) -> torch.Tensor:
    """A pruned copy of the fp32 weight w (N, K) (w itself for the dense pseudo-pattern)."""
    if pattern == DENSE:
        return w
    pruned = w.clone()
    if pattern == "2:4":
        return sp.prune_(pruned, "2:4")
    block, _ = split_pattern(pattern)
    return sp.prune_(pruned, block or "unstructured", sparsity=percent(pattern) / 100)


def weight_bytes(impl: Impl, operands: tuple, n: int, k: int, zeros: float) -> int:
    """Bytes of the row's own weight format; zeros: the weight's fraction of zeros."""
    if impl.fmt == "torch-csr":
        (csr,) = operands
        return sum(t.nbytes for t in (csr.values(), csr.col_indices(), csr.crow_indices()))
    if impl.fmt in ("block", "sliced"):  # the tensors as made (+ scales)
        return sum(t.nbytes for t in operands if isinstance(t, torch.Tensor))
    # torch's 2:4 keeps the same values and 2-bit indices as ours (cuSPARSELt may pad its buffer)
    fmt = "2:4" if impl.fmt == "semi-structured" else impl.fmt
    return sp.format_bytes(fmt, n, k, sparsity=zeros, dtype=impl.w_dtype)


def _clone(operands: tuple) -> tuple:
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in operands)


def _cuda_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _timed_call(impl: Impl, x: torch.Tensor, operands: tuple, remake: Callable[[], tuple]):
    """(make one rotated copy, the timed call on a copy). A copy is a clone of the operands or,
    where they do not clone, made again from the weight; for a graphed impl it is a CUDA graph
    of the call on such a copy, and the timed call is its replay alone."""
    make_copy = (lambda: _clone(operands)) if impl.clones else remake
    if not impl.graphed:
        return make_copy, lambda copy: impl.run(x, copy)
    return (
        lambda: _cuda_graph(functools.partial(impl.run, x, make_copy())),
        lambda replay: replay(),
    )


def _check_output(out: torch.Tensor, expected: torch.Tensor) -> None:
    if tuple(out.shape) != tuple(expected.shape):
        raise RuntimeError(f"wrong output shape {tuple(out.shape)}, {tuple(expected.shape)}")
    err = float((out.float() - expected).norm() / expected.norm().clamp_min(1e-30))
    if not err <= MAX_REL_ERR:
        raise RuntimeError(f"wrong output: relative error {err:.2g} against fp32 F.linear")


def _kernel_of_ours(impl: Impl, x: torch.Tensor, operands: tuple) -> tuple[str, str | None]:
    """(the backend torchslim.ops.explain picks for ours, None), or ("", why there is no
    kernel: the op would run the reference); ("", None) for the baselines."""
    if impl.op is None:
        return "", None
    chosen = ops.explain(impl.op, x, *impl.op_args(operands))
    if chosen["backend"] != "reference":
        return chosen["backend"], None
    why = "; ".join(chosen["passed_over"]) or f"no {x.device.type} kernel"
    return "", f"no kernel, the op would run the reference ({why})"


@dataclass
class Entry:
    """One implementation in a case's turns: its row so far, and the timed call on rotated
    copies (None where it does not run: the row then carries "error"), the bytes a call moves
    and the useful FLOPs it does."""

    row: dict
    call: Callable[[], object] | None = None
    moved: int = 0
    flops: float = 0.0


def prepare(
    impl: Impl,
    operands: tuple | Exception,
    remake: Callable[[], tuple],
    x: torch.Tensor,
    expected: torch.Tensor | None,
    case: dict,
    n: int,
    nnz: int,
) -> Entry:
    """One implementation of a case, ready to be timed: x (M, K); remake() makes the operands
    again from the weight; case: layer, M, pattern, sparsity (% of zeros), turns; expected: fp32
    F.linear on the weight, or None to skip the wiring check."""
    m, k = x.shape
    row = {
        **case,
        "impl": impl.name,
        "format": impl.fmt,
        "w_dtype": _SHORT[impl.w_dtype],
        "x_dtype": _SHORT[impl.x_dtype],
        "roof": arithmetic(impl),
    }
    if isinstance(operands, Exception):
        return Entry({**row, "error": common.error_text(operands)})
    x = x.to(impl.x_dtype)
    row["kernel"], why = _kernel_of_ours(impl, x, operands)
    if why is not None:
        return Entry({**row, "error": why})
    nbytes = weight_bytes(impl, operands, n, k, case["sparsity"] / 100)
    try:
        if expected is not None:
            _check_output(impl.run(x, operands), expected)
        make_copy, call = _timed_call(impl, x, operands, remake)
        copies = common.rotating(make_copy, nbytes)
    except NOT_RUN as exc:
        return Entry({**row, "error": common.error_text(exc)})
    row.update(weight_bytes=nbytes, nnz=nnz)
    moved = nbytes + m * k * x.element_size() + m * n * x.element_size()
    return Entry(row, lambda: call(copies()), moved, 2.0 * m * nnz)


def arithmetic(impl: Impl) -> str:
    """The dtype an implementation multiplies in, whose GEMM is its compute roof: int8 for W8A8
    (x quantized inside the op), else x's dtype (values are widened or converted to it)."""
    return "int8" if impl.op in _W8A8_OPS.values() else _SHORT[impl.x_dtype]


def time_case(
    entries: list[Entry], copy: common.CopyProbe, roofs: dict[str, float], device: str
) -> list[dict]:
    """The entries' rows, their calls and the copy that gives the floor timed in turns
    (common.time_in_turns): time, GB/s, % of the memory floor at the copy bandwidth of the same
    turns, the compute floor at the roof of the row's arithmetic (``roofs``, GFLOP/s or GOP/s by
    name) and which binds, GFLOP/s."""
    calls = {i: e.call for i, e in enumerate(entries) if e.call is not None}
    times = common.time_in_turns({"copy": copy, **calls}, device=device)
    copy_ms = times.pop("copy")
    if isinstance(copy_ms, Exception):
        raise copy_ms
    bandwidth = copy.gbs(copy_ms)
    rows = []
    for i, e in enumerate(entries):
        ms = times.get(i)
        if ms is None:
            rows.append(e.row)
            continue
        if isinstance(ms, Exception):
            row = {key: v for key, v in e.row.items() if key not in ("weight_bytes", "nnz")}
            rows.append({**row, "error": common.error_text(ms)})
            continue
        floor_ms = e.moved / bandwidth / 1e6
        roof = roofs[e.row["roof"]]
        compute_floor_ms = e.flops / roof / 1e6
        rows.append(
            {
                **e.row,
                "time_ms": ms,
                "GB/s": e.moved / ms / 1e6,
                "floor_ms": floor_ms,
                "pct_floor": 100.0 * floor_ms / ms,
                "roof_GFLOP/s": roof,
                "compute_floor_ms": compute_floor_ms,
                "binds": "memory" if floor_ms >= compute_floor_ms else "compute",
                "GFLOP/s": e.flops / ms / 1e6,
                "copy_GB/s": bandwidth,
            }
        )
    return rows


def _make(impl: Impl, pruned: torch.Tensor, pattern: str) -> tuple | Exception:
    try:
        return impl.make(pruned, pattern)
    except NOT_RUN as exc:  # e.g. a semi-structured backend this torch does not have
        return exc


def run(
    layers: tuple,
    batch: tuple,
    patterns: tuple,
    impls: tuple,
    roofs: dict[str, float],
    device: str,
    gen: torch.Generator,
) -> Iterator[dict]:
    """Every (layer, pattern, M, impl) row, as it is measured. Per layer the fp32 weight is
    pruned once per pattern and compressed once per (format, value dtype). A case is (layer,
    pattern, M): its implementations, the dense ones on the unpruned weight and the copy that
    gives the floor take turns (time_case), so that each ratio is taken in the same seconds of a
    shared machine; every row carries the pattern it was timed with as `turns` (a dense row's
    own pattern is "dense")."""
    dense = [impl for impl in impls if impl.applies(DENSE)]
    copy = common.CopyProbe(device=device)
    total = len(layers) * len(batch) * sum(len(dense) + _count(impls, p) for p in patterns)
    with tqdm(total=total, desc="sparse") as bar:
        for k, n in layers:
            w = (torch.randn(n, k, generator=gen) / k**0.5).to(device)
            xs = {m: torch.randn(m, k, generator=gen).to(device) for m in batch}
            wanted = {m: F.linear(xs[m], w) for m in batch[:1]}
            made = {impl.name: _make(impl, w, DENSE) for impl in dense}
            for pattern in patterns:
                todo = [impl for impl in impls if impl.applies(pattern)]
                bar.set_postfix_str(f"{k}x{n} {pattern}: prune, compress")
                pruned = prune(w, pattern)
                nnz = int(torch.count_nonzero(pruned))
                compressed = {}  # (format, value dtype) -> operands: one compression each
                for impl in todo:
                    key = (impl.fmt, impl.w_dtype)
                    if key not in compressed:
                        compressed[key] = _make(impl, pruned, pattern)
                bar.set_postfix_str(f"{k}x{n} {pattern}")
                case = {"layer": f"{k}x{n}", "turns": pattern}
                for m in batch:
                    entries = [
                        prepare(
                            impl,
                            made[impl.name],
                            lambda impl=impl, w=w: impl.make(w, DENSE),
                            xs[m],
                            wanted.get(m),
                            {**case, "pattern": DENSE, "sparsity": 0.0, "M": m},
                            n,
                            n * k,
                        )
                        for impl in dense
                    ]
                    expected = F.linear(xs[m], pruned) if m in wanted else None
                    sparsity = 100 * sp.sparsity(pruned)
                    entries += [
                        prepare(
                            impl,
                            compressed[(impl.fmt, impl.w_dtype)],
                            lambda impl=impl, w=pruned, p=pattern: impl.make(w, p),
                            xs[m],
                            expected,
                            {**case, "pattern": pattern, "sparsity": sparsity, "M": m},
                            n,
                            nnz,
                        )
                        for impl in todo
                    ]
                    yield from time_case(entries, copy, roofs, device)
                    bar.update(len(entries))


def _count(impls: tuple, pattern: str) -> int:
    return sum(impl.applies(pattern) for impl in impls)


def add_speedups(rows: list[dict], dense_names: set[str]) -> None:
    """speedup = the faster dense time in the row's own turns (layer, M, turns) ÷ the row's
    time; vs names that dense and vs_ms is its time."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["layer"], r["M"], r.get("turns"))
        timed_dense = r["impl"] in dense_names and "time_ms" in r
        if timed_dense and (key not in best or r["time_ms"] < best[key]["time_ms"]):
            best[key] = r
    for r in rows:
        b = best.get((r["layer"], r["M"], r.get("turns")))
        r["vs"] = b["impl"] if b else ""
        r["vs_ms"] = b["time_ms"] if b else float("nan")
        r["speedup"] = b["time_ms"] / r["time_ms"] if b and "time_ms" in r else float("nan")


def _is_ours(row: dict) -> bool:
    return row["impl"].startswith("torchslim")


def crossovers(rows: list[dict]) -> list[dict]:
    """Per (layer, M, variant of ours): its speedup at each measured unstructured sparsity and
    the crossover, the lowest of them at which it beats the faster dense ("none" if none)."""
    points: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if _is_ours(r) and "time_ms" in r and r["pattern"] not in (DENSE, "2:4"):
            points.setdefault((r["layer"], r["M"], r["impl"]), {})[r["pattern"]] = r["speedup"]
    labels = sorted({p for pts in points.values() for p in pts}, key=percent)
    out = []
    for (layer, m, impl), pts in points.items():
        faster = [p for p in sorted(pts, key=percent) if pts[p] > 1.0]
        out.append(
            {
                "layer": layer,
                "M": m,
                "impl": impl,
                "crossover": faster[0] if faster else "none",
                **{p: f"{pts[p]:.2f}x" if p in pts else "-" for p in labels},
            }
        )
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def targets(rows: list[dict]) -> list[str]:
    """The issue's CPU targets at M = 1, each as its measured figure and met / NOT met. "ours"
    is the fastest torchslim variant at each pattern; "dense" the faster of fp32 and bf16. The
    targets are set for unstructured sparsity and 2:4: block patterns are not read here."""
    timed = [
        r for r in rows if "time_ms" in r and r["M"] == TARGET_M and not _is_block(r["pattern"])
    ]
    if not timed:
        return [f"not measured: the targets are read at M = {TARGET_M}"]
    lines = [
        f"(M = {TARGET_M}; ours = the fastest torchslim variant at each pattern, "
        "dense = the faster of dense fp32 and bf16 F.linear)"
    ]
    for layer in dict.fromkeys(r["layer"] for r in timed):
        here = [r for r in timed if r["layer"] == layer]
        best: dict[str, dict] = {}
        for r in here:
            if _is_ours(r) and (
                r["pattern"] not in best or r["time_ms"] < best[r["pattern"]]["time_ms"]
            ):
                best[r["pattern"]] = r
        if not best or not all(r["vs"] for r in best.values()):
            lines.append(f"{layer}: not measured (no dense or no torchslim row)")
            continue
        names = ", ".join(sorted({r["vs"] for r in best.values()}))
        lo, hi = (f(r["vs_ms"] for r in best.values()) for f in (min, max))
        span = f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g}-{hi:.3g}"
        lines.append(f"{layer}: dense = {names}, {span} ms (in each pattern's turns)")
        for pattern, goal in SPEEDUP_TARGETS:
            if b := best.get(pattern):
                lines.append(
                    f"  {pattern} >= {goal:g}x dense: {b['speedup']:.2f}x ({b['impl']}): "
                    f"{_verdict(b['speedup'] >= goal)}"
                )
        pattern, goal = CSR_TARGET
        csr = next(
            (r for r in here if r["pattern"] == pattern and r["format"] == "torch-csr"), None
        )
        if (b := best.get(pattern)) and csr:
            ratio = csr["time_ms"] / b["time_ms"]
            lines.append(
                f"  {pattern} >= {goal:g}x torch CSR: {ratio:.2f}x {csr['impl']} ({b['impl']}): "
                f"{_verdict(ratio >= goal)}"
            )
        unstructured = sorted(
            (p for p in best if is_unstructured(p) and percent(p) >= 50), key=percent
        )
        if unstructured:
            figures = ", ".join(f"{best[p]['speedup']:.2f}x at {p}" for p in unstructured)
            ok = all(best[p]["speedup"] > 1.0 for p in unstructured)
            lines.append(f"  beats dense from 50% up: {figures}: {_verdict(ok)}")
        floors = sorted(best.values(), key=lambda r: (r["pattern"] == "2:4", percent(r["pattern"])))
        figures = ", ".join(f"{r['pattern']} {r['pct_floor']:.0f}%" for r in floors)
        ok = all(r["pct_floor"] >= FLOOR_TARGET for r in floors)
        lines.append(f"  >= {FLOOR_TARGET:g}% of its memory floor: {figures}: {_verdict(ok)}")
    return lines


def gpu_targets(rows: list[dict]) -> list[str]:
    """The issue's GPU target (ours on 2:4, eager, over eager dense fp16 on GPU_TARGET's layer
    from its M up), then torch's 2:4 against cuBLAS for reference: eager against the faster eager
    dense and graph-replayed against the faster graph-replayed dense."""
    layer, min_m, want = GPU_TARGET
    lines = [f"2:4 >= {want:g}x dense fp16 on {layer} at M >= {min_m} (eager):"]
    rows = [r for r in rows if r.get("turns") in (None, "2:4")]  # dense in 2:4's turns
    for m in sorted({r["M"] for r in rows if r["layer"] == layer and r["M"] >= min_m}):
        here = [r for r in rows if r["layer"] == layer and r["M"] == m]
        ours = [r for r in here if _is_ours(r) and r["pattern"] == "2:4"]
        dense = [r for r in here if r["impl"] == "dense-fp16"]
        if ours and dense:
            best = min(ours, key=lambda r: r["time_ms"])
            ratio = dense[0]["time_ms"] / best["time_ms"]
            lines.append(f"  M={m}: {ratio:.2f}x ({best['impl']}): {_verdict(ratio >= want)}")
    if len(lines) == 1:
        lines.append("  not measured")
    lines.append("torch's 2:4 over cuBLAS (the faster of fp16 and bf16):")
    for layer in dict.fromkeys(r["layer"] for r in rows):
        for m in dict.fromkeys(r["M"] for r in rows):
            here = [r for r in rows if r["layer"] == layer and r["M"] == m]
            parts = []
            for mode, graphed in (("eager", False), ("graph", True)):
                pick = [r for r in here if r["impl"].endswith("-graph") == graphed]
                semi = [r for r in pick if r["format"] == "semi-structured"]
                dense = [r for r in pick if r["format"] == DENSE]
                if semi and dense:
                    s, d = (min(rs, key=lambda r: r["time_ms"]) for rs in (semi, dense))
                    parts.append(
                        f"{mode} {d['time_ms'] / s['time_ms']:.2f}x {d['impl']} ({s['impl']}, "
                        f"{s['pct_floor']:.0f}% of its memory floor)"
                    )
            if parts:
                lines.append(f"{layer} M={m}: " + "; ".join(parts))
    return lines


def plot(rows: list[dict], path, dense: str) -> None:
    """Speedup over the faster dense against sparsity, one panel per (M, layer): a line per
    implementation through its unstructured points, a dotted one through its block points, a
    star at its 2:4 point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    batch = list(dict.fromkeys(r["M"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["pattern"] != DENSE))
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours, not "C0".."C9" again
    color = {impl: palette[i % len(palette)] for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(
        len(batch),
        len(layers),
        figsize=(4.2 * len(layers), 3.2 * len(batch)),
        squeeze=False,
        sharex=True,
    )
    for axes_row, m in zip(axes, batch, strict=True):
        for ax, layer in zip(axes_row, layers, strict=True):
            for impl in impls:
                here = [r for r in rows if (r["layer"], r["M"], r["impl"]) == (layer, m, impl)]
                label = impl
                for marker, style, kind in (("o", "-", is_unstructured), ("s", ":", _is_block)):
                    pts = sorted(
                        (percent(r["pattern"]), r["speedup"]) for r in here if kind(r["pattern"])
                    )
                    if pts:
                        ax.plot(
                            *zip(*pts, strict=True),
                            marker=marker,
                            ls=style,
                            color=color[impl],
                            label=label,
                        )
                        label = None
                s24 = [r["speedup"] for r in here if r["pattern"] == "2:4"]
                if s24:
                    ax.plot([50.0] * len(s24), s24, "*", ms=11, color=color[impl], label=label)
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_yscale("log", base=2)
            ax.set_title(f"K x N = {layer}, M = {m}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        axes_row[0].set_ylabel(f"speedup over {dense}", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("sparsity % (o unstructured, s blocks, * 2:4)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # the panel with the most lines carries the legend
        h, lab = ax.get_legend_handles_labels()
        if len(h) > len(handles):
            handles, labels = h, lab
    axes[0][-1].legend(handles, labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _patterns(text: str) -> tuple[str, ...]:
    """--sparsity: comma-separated unstructured percentages, 2:4 and blocks at a percentage
    ("16x16@90") -> pattern labels."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if item == "2:4":
            out.append(item)
            continue
        block, share = split_pattern(item)
        try:
            value = float(share.removesuffix("%"))
            if block is not None:
                block = sp.parse_pattern(block)
                if block.kind != "block":
                    raise ValueError(block)
        except ValueError:
            raise argparse.ArgumentTypeError(
                "expected unstructured percentages, 2:4 and/or blocks at a percentage, e.g. "
                f"50,90,2:4,16x16@90, got {text!r}"
            ) from None
        if not 1.0 <= value < 100.0:
            raise argparse.ArgumentTypeError(
                f"sparsity must be a percentage in [1, 100) (90 for 90%), got {item!r}"
            )
        out.append(f"{block}@{value:g}%" if block is not None else f"{value:g}%")
    return tuple(dict.fromkeys(out))


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("sparse", __doc__)
    parser.add_argument(
        "--sparsity",
        type=_patterns,
        help="unstructured percentages, 2:4 and/or blocks at a percentage "
        "(default: 50,75,90,2:4,16x16@50,16x16@90)",
    )
    args = parser.parse_args(argv)
    common.check_out(parser, args.out)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")

    env = common.Environment.capture(device)
    if device == "cuda":
        layers, batch, dense, impls = GPU_LAYERS, GPU_BATCH, GPU_DENSE, GPU_IMPLS
        where = torch.cuda.get_device_name()
    else:
        layers, batch, dense, impls = LAYERS, BATCH, CPU_DENSE, IMPLS
        where = f"{env.cpu}, {common.threads_note()}, ISA {env.isa}"
    if args.quick:
        layers, batch = QUICK_LAYERS, QUICK_BATCH
    layers, batch = args.layers or layers, args.batch or batch
    patterns = args.sparsity or PATTERNS
    print(f"torchslim bench sparse on {where}")
    # Each row's compute roof: the GEMM of the dtype it multiplies in (arithmetic), measured now.
    every = (*dense, *impls)
    short = {v: k for k, v in _SHORT.items()}
    sizes = (1024,) if args.quick else None
    roofs = {
        name: common.gemm_gflops(device, short[name], sizes)
        for name in sorted({arithmetic(impl) for impl in every})
    }
    print("GEMM roofs (measured now): " + ", ".join(f"{k} {v:.0f}" for k, v in roofs.items()))

    gen = torch.Generator().manual_seed(0)
    rows = common.collect(run(layers, batch, patterns, every, roofs, device, gen))
    add_speedups(rows, {impl.name for impl in dense})

    timed = [r for r in rows if "time_ms" in r]
    dense_names = " and ".join(_SHORT[impl.w_dtype] for impl in dense)
    columns = ["layer", "M", "pattern", "impl", "kernel", "time_ms", "speedup", "vs", "GB/s",
               "weight_MB", "pct_floor", "binds", "GFLOP/s"]  # fmt: skip
    print(
        f"\nspeedup: over the faster of dense {dense_names} F.linear (vs) timed in the same "
        "turns; a dense row shows the pattern it took turns with"
    )
    shown = [
        {
            **r,
            "pattern": f"dense ({r['turns']})" if r["pattern"] == DENSE else r["pattern"],
            "weight_MB": r["weight_bytes"] / 1e6,
        }
        for r in timed
    ]
    print(common.format_table(shown, columns))
    bandwidths = [r["copy_GB/s"] for r in timed]
    if bandwidths:
        print(
            f"copy bandwidth, per case (the floor's): {min(bandwidths):.1f}-"
            f"{max(bandwidths):.1f} GB/s"
        )
    not_run: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if "error" in r:
            case = f"{r['layer']} M={r['M']} {r['pattern']}"
            not_run.setdefault((r["impl"], r["error"]), []).append(case)
    for (impl, error), cases in not_run.items():
        where = cases[0] if len(cases) == 1 else f"{len(cases)} cases, e.g. {cases[0]}"
        print(f"not run: {impl} ({where}): {error}")
    cross = crossovers(timed)
    if cross:
        print(
            "\ncrossover: the lowest measured sparsity (unstructured, or in blocks) at which "
            "ours beats dense"
        )
        print(common.format_table(cross, list(cross[0])))
    check = targets if device == "cpu" else gpu_targets
    print("\n".join(["", "targets:", *check(timed)]))

    out = common.results_dir(env, args.out)
    name = f"sparse_{device}" + ("_quick" if args.quick else "")
    common.write_csv(out / f"{name}.csv", rows, env)
    if not args.no_plot and timed:
        plot(timed, out / f"{name}.png", f"the faster of dense {dense_names}")
    print(f"\nwrote {out / name}.csv" + ("" if args.no_plot else f" and {name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
