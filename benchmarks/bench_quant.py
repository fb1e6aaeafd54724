"""int8 linear benchmark: torchslim W8A8 / W8A16 against what users would otherwise run.

    torchslim bench int8 [--quick] [--out DIR]
    python benchmarks/bench_quant.py [--quick] [--out DIR]

Baselines, in the same run: fp32 and bf16 F.linear, FBGEMM int8 dynamic
(torch.ao.quantization.quantize_dynamic) and torch._weight_int8pack_mm (torch's W8A16) on bf16
activations, its fast path (on fp32 x it ran 10-40x slower: 30 ms against 2.4 ms at 4096^2,
M = 1, one thread).
Per (layer, M, implementation): time, speedup over the faster dense F.linear (the `vs` column
names it), GB/s, % of the memory floor, GOP/s.
Writes int8_<device>.csv and .png under benchmarks/results/<device>/ (int8_<device>_quick.*
with --quick).
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import torchslim
from torchslim import ops
from torchslim.benchmarks import common
from torchslim.quant import quantize_weight_per_channel

# (K in, N out): Llama-7B attention and MLP projections, and SmolLM2-135M's MLP.
LAYERS = ((4096, 4096), (4096, 11008), (11008, 4096), (576, 1536))
BATCH = (1, 16, 64, 512)
QUICK_LAYERS = ((576, 1536),)
QUICK_BATCH = (1, 16)
GPU_LAYERS = (*LAYERS, (8192, 8192))
GPU_BATCH = (1, 16, 128, 1024)


@dataclass(frozen=True)
class Impl:
    name: str
    weight_bytes_per_elem: float
    x_dtype: torch.dtype
    make: Callable[[torch.Tensor], tuple]  # fp32 weight (N, K) -> operands
    run: Callable[[torch.Tensor, tuple], torch.Tensor]  # (x, operands) -> out
    # bytes of the stored weight for (n, k), scales included; default: n * k * per-elem bytes,
    # plus one fp32 scale per row for 1-byte formats
    weight_bytes: Callable[[int, int], float] | None = None

    def bytes_for(self, n: int, k: int) -> float:
        if self.weight_bytes is not None:
            return self.weight_bytes(n, k)
        per_row_scale = 4 * n if self.weight_bytes_per_elem == 1 else 0
        return n * k * self.weight_bytes_per_elem + per_row_scale


def _fbgemm(w: torch.Tensor) -> tuple:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8
        )
    return (q,)


def _int8(w: torch.Tensor) -> tuple:
    return quantize_weight_per_channel(w)


def _int8_bf16_scales(w: torch.Tensor) -> tuple:
    """torch._weight_int8pack_mm takes scales in x's dtype."""
    codes, scales = quantize_weight_per_channel(w)
    return codes, scales.bfloat16()


TORCH_INT8PACK = "torch-int8pack-w8a16-bf16"


IMPLS = (
    Impl("fp32", 4, torch.float32, lambda w: (w.clone(),), lambda x, o: F.linear(x, o[0])),
    Impl("bf16", 2, torch.bfloat16, lambda w: (w.bfloat16(),), lambda x, o: F.linear(x, o[0])),
    Impl("fbgemm-w8a8", 1, torch.float32, _fbgemm, lambda x, o: o[0](x)),
    Impl(
        TORCH_INT8PACK,
        1,
        torch.bfloat16,
        _int8_bf16_scales,
        lambda x, o: torch._weight_int8pack_mm(x, o[0], o[1]),
        weight_bytes=lambda n, k: n * k + 2 * n,
    ),
    Impl(
        "torchslim-w8a8",
        1,
        torch.float32,
        _int8,
        lambda x, o: ops.int8_dynamic_linear(x, o[0], o[1]),
    ),
    Impl(
        "torchslim-w8a16",
        1,
        torch.float32,
        _int8,
        lambda x, o: ops.int8_weight_only_linear(x, o[0], o[1]),
    ),
    Impl(
        "torchslim-w8a16-bf16",
        1,
        torch.bfloat16,
        _int8,
        lambda x, o: ops.int8_weight_only_linear(x, o[0], o[1]),
    ),
)


def _ours_on(backend: str, op):
    """Runs a torchslim op on one forced backend (strict: no silent reference fallback)."""

    def run(x, o):
        with torchslim.backend(backend, strict=True):
            return op(x, o[0], o[1])

    return run


def _int_mm_w8a8(x, o):
    """torch's own int8 GEMM (cuBLASLt) with per-token quantization and the scale epilogue."""
    x_q, x_scale = torchslim.reference.quantize_per_token(x)
    acc = torch._int_mm(x_q, o[0].T)
    return (acc * x_scale[:, None] * o[1]).to(x.dtype)


GPU_IMPLS = (
    Impl("fp16", 2, torch.float16, lambda w: (w.half(),), lambda x, o: F.linear(x, o[0])),
    Impl("bf16", 2, torch.bfloat16, lambda w: (w.bfloat16(),), lambda x, o: F.linear(x, o[0])),
    Impl("torch-int_mm-w8a8", 1, torch.float16, _int8, _int_mm_w8a8),
    Impl(
        "torch-int8pack-w8a16",
        1,
        torch.bfloat16,
        _int8,
        lambda x, o: torch._weight_int8pack_mm(x, o[0], o[1].to(x.dtype)),
    ),
    *(
        Impl(f"torchslim-{kind}-{backend}", 1, torch.float16, _int8, _ours_on(backend, op))
        for kind, op in (("w8a8", ops.int8_dynamic_linear), ("w8a16", ops.int8_weight_only_linear))
        for backend in ("triton", "cuda")
    ),
)


def measure(
    k: int, n: int, m: int, impls: tuple, copy: common.CopyProbe, gen, device: str
) -> list[dict]:
    """One row per implementation at (k, n, m): the implementations and the copy that gives
    the floor timed in turns (common.time_in_turns), each on operands rotated past the cache."""
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(device)
    x32 = torch.randn(m, k, generator=gen).to(device)
    rows, fns, moved = {}, {"copy": copy}, {}
    for impl in impls:
        x = x32.to(impl.x_dtype)
        weight_bytes = impl.bytes_for(n, k)
        row = {"layer": f"{k}x{n}", "M": m, "impl": impl.name}
        try:
            # A layer an implementation does not take (a group size that does not divide K, a
            # baseline without the kernel) is a row with its error, not the end of the run.
            operands = common.rotating(lambda impl=impl: impl.make(w), int(weight_bytes))
            fn = functools.partial(_run_rotated, impl, x, operands)
            fn()
            if device == "cuda":
                torch.cuda.synchronize()  # a kernel's error shows here, not in a later turn
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            rows[impl.name] = {**row, "error": common.error_text(exc)}
            continue
        rows[impl.name] = row
        fns[impl.name] = fn
        elem = torch.finfo(impl.x_dtype).bits // 8
        moved[impl.name] = weight_bytes + m * k * elem + m * n * elem
    times = common.time_in_turns(fns, device=device)
    copy_ms = times.pop("copy")
    if isinstance(copy_ms, Exception):
        raise copy_ms
    bandwidth = copy.gbs(copy_ms)
    for name, ms in times.items():
        if isinstance(ms, Exception):
            rows[name]["error"] = common.error_text(ms)
            continue
        floor_ms = moved[name] / bandwidth / 1e6
        rows[name].update(
            {
                "time_ms": ms,
                "GB/s": moved[name] / ms / 1e6,
                "floor_ms": floor_ms,
                "pct_floor": 100.0 * floor_ms / ms,
                "GOP/s": 2.0 * m * n * k / ms / 1e6,
                "copy_GB/s": bandwidth,
            }
        )
    return list(rows.values())


def _run_rotated(impl: Impl, x: torch.Tensor, operands: Callable[[], tuple]) -> torch.Tensor:
    return impl.run(x, operands())


def fastest(rows: list[dict], layer: str, m: int, impls) -> dict | None:
    """The timed row of ``impls`` with the least time at (layer, m), or None."""
    timed = [
        r
        for r in rows
        if r["layer"] == layer and r["M"] == m and r["impl"] in impls and "time_ms" in r
    ]
    return min(timed, key=lambda r: r["time_ms"], default=None)


def add_speedups(rows: list[dict], baselines: tuple[str, ...]) -> None:
    """speedup: the faster of ``baselines`` (dense F.linear in each float dtype) over each row,
    at the row's (layer, M); vs: which baseline that was."""
    for r in rows:
        base = fastest(rows, r["layer"], r["M"], baselines)
        ok = base is not None and "time_ms" in r
        r["speedup"] = base["time_ms"] / r["time_ms"] if ok else float("nan")
        r["vs"] = base["impl"] if base is not None else ""


def targets(rows: list[dict]) -> list[str]:
    """The issue's CPU targets, as measured ratios."""
    t = {(r["layer"], r["M"], r["impl"]): r for r in rows}
    lines = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        for m in dict.fromkeys(r["M"] for r in rows):
            ours8 = t.get((layer, m, "torchslim-w8a8"))
            fb = t.get((layer, m, "fbgemm-w8a8"))
            ours16 = t.get((layer, m, "torchslim-w8a16"))
            pack = t.get((layer, m, TORCH_INT8PACK))
            parts = []
            if ours8 and fb:
                parts.append(
                    f"W8A8 {fb['time_ms'] / ours8['time_ms']:.2f}x FBGEMM, "
                    f"{ours8['pct_floor']:.0f}% of floor"
                )
            if ours16 and pack:
                parts.append(
                    f"W8A16 {pack['time_ms'] / ours16['time_ms']:.2f}x {pack['impl']}, "
                    f"{ours16['pct_floor']:.0f}% of floor"
                )
            if parts:
                lines.append(f"{layer} M={m}: " + "; ".join(parts))
    return lines


def plot(rows: list[dict], path, baselines: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 4), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [
                (r["M"], r["speedup"]) for r in rows if r["layer"] == layer and r["impl"] == impl
            ]
            ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"K x N = {layer}")
        ax.set_xlabel("M (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"speedup over the faster of {' and '.join(baselines)} F.linear")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _layers(text: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple(tuple(int(v) for v in item.split("x")) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KxN[,KxN...], got {text!r}") from None
    if any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected KxN[,KxN...] with K, N >= 1, got {text!r}")
    return pairs


@dataclass(frozen=True)
class Family:
    """One benchmark family: its implementations, shapes and target check."""

    name: str
    doc: str
    layers: tuple
    batch: tuple
    impls: tuple
    targets: Callable[[list[dict]], list[str]]
    quick_layers: tuple = QUICK_LAYERS
    quick_batch: tuple = QUICK_BATCH
    gpu_layers: tuple = GPU_LAYERS
    gpu_batch: tuple = GPU_BATCH
    gpu_impls: tuple = ()
    gpu_targets: Callable[[list[dict]], list[str]] | None = None


def make_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The options of every linear-layer benchmark (`torchslim bench <name>`): --quick, --out,
    --no-plot, --device, --layers, --batch."""
    parser = argparse.ArgumentParser(
        prog=f"torchslim bench {name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="one small layer, M in {1, 16}")
    parser.add_argument("--out", help="output folder (default: benchmarks/results/<device>)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--layers", type=_layers, help="e.g. 4096x4096,576x1536 (K x N)")
    parser.add_argument("--batch", type=_ints, help="e.g. 1,16 (values of M)")
    return parser


def run_family(family: Family, argv: list[str] | None = None) -> int:
    parser = make_parser(family.name, family.doc)
    args = parser.parse_args(argv)
    common.check_out(parser, args.out)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    if device == "cuda" and not family.gpu_impls:
        parser.error(f"--device cuda: the {family.name} family has no GPU implementations yet")

    env = common.Environment.capture(device)
    if device == "cuda":
        layers, batch, impls = family.gpu_layers, family.gpu_batch, family.gpu_impls
        baselines, roof = ("fp16", "bf16"), "fp16"
        where = torch.cuda.get_device_name()
    else:
        layers, batch, impls = family.layers, family.batch, family.impls
        baselines, roof = ("fp32", "bf16"), "fp32"
        where = f"{env.cpu}, {common.threads_note()}, ISA {env.isa}"
    if args.quick:
        layers, batch = family.quick_layers, family.quick_batch
    layers, batch = args.layers or layers, args.batch or batch
    print(f"torchslim bench {family.name} on {where}")
    copy = common.CopyProbe(device=device)
    gemm_dtype = torch.float32 if device == "cpu" else torch.float16
    peak = common.gemm_gflops(device, gemm_dtype, (1024,) if args.quick else None)

    gen = torch.Generator().manual_seed(0)
    cases = [(k, n, m) for k, n in layers for m in batch]
    measured = (
        row
        for k, n, m in tqdm(cases, desc=family.name)
        for row in measure(k, n, m, impls, copy, gen, device)
    )
    rows = common.collect(measured)
    add_speedups(rows, baselines)
    for r in rows:
        r[f"{roof}_gemm_GFLOP/s"] = peak
    bandwidths = [r["copy_GB/s"] for r in rows if "copy_GB/s" in r] or [float("nan")]
    print(
        f"copy bandwidth {min(bandwidths):.1f}-{max(bandwidths):.1f} GB/s over the cases (each "
        f"case's floor takes the copy timed in turns with it), {roof} GEMM {peak:.0f} "
        "GFLOP/s (measured now)"
    )

    out = common.results_dir(env, args.out)
    name = f"{family.name}_{device}" + ("_quick" if args.quick else "")
    common.write_csv(out / f"{name}.csv", rows, env)  # first: nothing below can lose the run
    timed = [r for r in rows if "time_ms" in r]
    columns = ["layer", "M", "impl", "time_ms", "speedup", "vs", "GB/s", "pct_floor", "GOP/s"]
    print(common.format_table(timed, columns))
    for r in rows:
        if "error" in r:
            print(f"not run: {r['layer']} M={r['M']} {r['impl']}: {r['error']}")
    check = family.targets if device == "cpu" else family.gpu_targets
    if check is not None:
        print("\n".join(["", "targets:", *check(timed)]))
    if not args.no_plot:
        plot(timed, out / f"{name}.png", baselines)
    print(f"\nwrote {out / name}.csv" + ("" if args.no_plot else f" and {name}.png"))
    return 0


INT8 = Family(
    name="int8",
    doc=__doc__,
    layers=LAYERS,
    batch=BATCH,
    impls=IMPLS,
    targets=targets,
    gpu_impls=GPU_IMPLS,
)


def main(argv: list[str] | None = None) -> int:
    return run_family(INT8, argv)


if __name__ == "__main__":
    sys.exit(main())
