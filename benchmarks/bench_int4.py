"""int4 linear benchmark: torchslim W4A16 against what users would otherwise run.

    torchslim bench int4 [--quick] [--out DIR]
    python benchmarks/bench_int4.py [--quick] [--out DIR]

Baselines, in the same run: fp32 and bf16 F.linear, torch._weight_int4pack_mm_for_cpu (torch's
own CPU int4, group 128, on the same quantized weights, on bf16 activations: its fast path; on
fp32 x it ran 20-50x slower), FBGEMM int8 dynamic and torchslim's int8 (W8A8 and W8A16). Ours:
W4A16 at group sizes 32 and 128, bf16 scales and zero points, on fp32 activations (and g128 on
bf16). Per (layer, M, implementation): time, speedup over the faster dense F.linear (the `vs`
column names it), GB/s, % of the memory floor (packed weight + scale bytes ÷ copy bandwidth),
GOP/s. Writes int4_cpu.csv and int4_cpu.png.

On a GPU (--device cuda): fp16 and bf16 F.linear (cuBLAS), torch._weight_int4pack_mm (torch's
CUDA int4, bf16, group 128) and ours at group 128 with fp16 activations on the Triton kernel
(plain layout) and the CUDA C++ tensor-core kernel (tc layout); speedups over the faster of
cuBLAS fp16 and bf16.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

import torchslim
from torchslim import ops
from torchslim import reference as ref
from torchslim.benchmarks.bench_quant import GPU_IMPLS as INT8_GPU_IMPLS
from torchslim.benchmarks.bench_quant import IMPLS as INT8_IMPLS
from torchslim.benchmarks.bench_quant import Family, Impl, fastest, run_family
from torchslim.quant import quantize_int4, unpack_int4

# (K in, N out): Llama-7B attention and MLP projections, and SmolLM2-135M's MLP down and up
# projections. K = 576 (all SmolLM2 layers but down) takes group 32, not 128: the up projection's
# g128 rows, torch's int4 among them, are "not run".
K128_LAYERS = ((4096, 4096), (4096, 11008), (11008, 4096), (1536, 576))
LAYERS = (*K128_LAYERS, (576, 1536))
BATCH = (1, 4, 16, 64, 512)
TORCH_GROUP = 128


def _int4_bytes(group_size: int, scale_bytes: int):
    """Packed codes plus one scale and one zero point per group, for (n, k)."""
    return lambda n, k: n * k / 2 + 2 * scale_bytes * n * (k // group_size)


def _ours(group_size: int, backend: str | None = None, x_dtype: torch.dtype | None = None) -> Impl:
    """Ours with bf16 scales. backend None: the automatic choice, fp32 activations (the CPU
    rows; or ``x_dtype``). Otherwise that GPU backend, forced and strict, on fp16 activations:
    Triton on the plain layout, cuda on the tc layout."""
    tc = backend == "cuda"
    op = ops.int4_weight_only_linear_tc if tc else ops.int4_weight_only_linear

    def make(w):
        packed, scales, zeros = quantize_int4(w, group_size, scale_dtype=torch.bfloat16)
        return (ref.plain_to_tc(packed) if tc else packed, scales, zeros)

    def run(x, o):
        forced = torchslim.backend(backend, strict=True) if backend else contextlib.nullcontext()
        with forced:
            return op(x, o[0], o[1], o[2], group_size)

    x_dtype = x_dtype or (torch.float32 if backend is None else torch.float16)
    suffix = f"-{backend}" if backend else ("-bf16" if x_dtype == torch.bfloat16 else "")
    return Impl(
        f"torchslim-w4a16-g{group_size}{suffix}",
        0.5,
        x_dtype,
        make,
        run,
        weight_bytes=_int4_bytes(group_size, 2),
    )


def _torch_int4(w: torch.Tensor) -> tuple:
    """The same group-128 weights in torch's layout: w = (q - 8) * s + zero_t, so our
    (q - z) * s has zero_t = (8 - z) * s. Scales and zeros in bf16, x's dtype."""
    packed, scales, zeros = quantize_int4(w, TORCH_GROUP, scale_dtype=torch.float32)
    codes = unpack_int4(packed).to(torch.int32)
    w_packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    zero_t = (8.0 - zeros) * scales
    scales_and_zeros = torch.stack((scales.T, zero_t.T), dim=-1).bfloat16().contiguous()
    return (w_packed, scales_and_zeros)  # scales_and_zeros: (K/G, N, 2)


TORCH_INT4 = Impl(
    "torch-int4pack-w4a16-bf16",
    0.5,
    torch.bfloat16,
    _torch_int4,
    lambda x, o: torch._weight_int4pack_mm_for_cpu(x, o[0], TORCH_GROUP, o[1]),
    weight_bytes=_int4_bytes(TORCH_GROUP, 2),
)


def _torch_int4_cuda(w: torch.Tensor) -> tuple:
    """torch's CUDA int4 (tinygemm) layout of the same group-128 weights: codes packed two per
    byte with the even k in the high nibble, scale and zero_t = (8 - z) * s as bf16."""
    packed, scales, zeros = quantize_int4(w, TORCH_GROUP, scale_dtype=torch.float32)
    codes = unpack_int4(packed)
    w_packed = torch._convert_weight_to_int4pack((codes[:, 0::2] << 4) | codes[:, 1::2], 8)
    zero_t = (8.0 - zeros) * scales
    sz = torch.stack((scales.T, zero_t.T), dim=-1).to(torch.bfloat16).contiguous()
    return (w_packed, sz)


def gpu_targets(rows: list[dict]) -> list[str]:
    """The issue's GPU targets: >= 3x cuBLAS fp16 at M <= 16 on 8192x8192, and no slower than
    cuBLAS at M = 128."""
    t = {(r["layer"], r["M"], r["impl"]): r for r in rows}
    lines = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        for m in dict.fromkeys(r["M"] for r in rows):
            fp16 = t.get((layer, m, "fp16"))
            if fp16 is None:
                continue
            parts = [
                f"{backend} {fp16['time_ms'] / ours['time_ms']:.2f}x cuBLAS fp16 "
                f"({ours['pct_floor']:.0f}% of floor)"
                for backend in ("cuda", "triton")
                if (ours := t.get((layer, m, f"torchslim-w4a16-g{TORCH_GROUP}-{backend}")))
            ]
            if parts:
                lines.append(f"{layer} M={m}: " + ", ".join(parts))
    return lines


_INT8 = {impl.name: impl for impl in INT8_IMPLS}
IMPLS = (
    Impl("fp32", 4, torch.float32, lambda w: (w.clone(),), lambda x, o: F.linear(x, o[0])),
    _INT8["bf16"],
    TORCH_INT4,
    _INT8["fbgemm-w8a8"],
    _INT8["torchslim-w8a8"],
    _INT8["torchslim-w8a16"],
    _ours(32),
    _ours(TORCH_GROUP),
    _ours(TORCH_GROUP, x_dtype=torch.bfloat16),
)


def targets(rows: list[dict]) -> list[str]:
    """The issue's CPU targets, as measured ratios; ours is g128 on fp32 x (the bf16-x row is
    reported beside it)."""
    t = {(r["layer"], r["M"], r["impl"]): r for r in rows}
    lines = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        for m in dict.fromkeys(r["M"] for r in rows):
            ours = t.get((layer, m, f"torchslim-w4a16-g{TORCH_GROUP}"))
            theirs = t.get((layer, m, TORCH_INT4.name))
            best = fastest(rows, layer, m, {TORCH_INT4.name, "bf16"})
            if not (ours and theirs and best):
                continue
            lines.append(
                f"{layer} M={m}: g{TORCH_GROUP} {theirs['time_ms'] / ours['time_ms']:.2f}x "
                f"{theirs['impl']}, {best['time_ms'] / ours['time_ms']:.2f}x the faster of bf16 "
                f"and torch int4 ({best['impl']}), {ours['pct_floor']:.0f}% of the memory floor"
            )
    return lines


_GPU_INT8 = {impl.name: impl for impl in INT8_GPU_IMPLS}
GPU_IMPLS = (
    _GPU_INT8["fp16"],
    _GPU_INT8["bf16"],
    Impl(
        "torch-int4pack-w4a16",
        0.5,
        torch.bfloat16,
        _torch_int4_cuda,
        lambda x, o: torch._weight_int4pack_mm(x, o[0], TORCH_GROUP, o[1]),
        weight_bytes=_int4_bytes(TORCH_GROUP, 2),
    ),
    _ours(TORCH_GROUP, "triton"),
    _ours(TORCH_GROUP, "cuda"),
    _ours(32, "cuda"),
)

INT4 = Family(
    name="int4",
    doc=__doc__,
    layers=LAYERS,
    batch=BATCH,
    impls=IMPLS,
    targets=targets,
    quick_layers=((1536, 576),),
    quick_batch=(1, 16),
    gpu_layers=(*K128_LAYERS, (8192, 8192)),  # the GPU rows are mostly g128
    gpu_batch=(1, 4, 16, 64, 128, 512),
    gpu_impls=GPU_IMPLS,
    gpu_targets=gpu_targets,
)


def main(argv: list[str] | None = None) -> int:
    return run_family(INT4, argv)


if __name__ == "__main__":
    sys.exit(main())
