"""Attention benchmark: torchslim.attention against PyTorch's SDPA and the naive math.

    torchslim bench attention [--device cpu|cuda] [--quick] [--out DIR] [--no-plot]
    python benchmarks/bench_attention.py [--device cuda] [--quick] [--out DIR]

Prefill: q, k, v (B, H, S, D), causal and not, in GFLOP/s (4 B H S^2 D, halved for causal).
Decode: one query token against a KV cache of 1k..32k positions, GQA 4:1 (32 query heads,
8 key/value heads, D = 128), in GB/s of K/V read, with K/V rotated through copies past the
caches and a copy timed in turns with them: pct_floor is the K/V bytes at that copy's
bandwidth over the time. Implementations, in the same run: ours
(torchslim.attention), F.scaled_dot_product_attention (SDPA: on the CPU its flash kernel, on
a GPU whichever PyTorch picks, FlashAttention-2 for fp16/bf16) and the naive
softmax(q k^T * scale) v, which materialises the score matrix (only where that matrix stays
under 1 GB). CPU: fp32 and bf16. GPU: fp16 and bf16, longer sequences, and "train" rows: the
forward and backward of a training step (3.5x the forward's FLOPs, FlashAttention's count).
Each case's implementations are timed in turns (common.time_in_turns). of_gemm: a prefill
or training row's GFLOP/s over torch.mm's best in the same dtype, measured in the same run
(common.gemm_gflops), the compute roof it is read against. Writes attention_<device>.csv and
.png.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import torchslim
from torchslim.benchmarks import common

# (B, S) at H = 32, for D in (64, 128): the grid, trimmed to what two cores finish.
PREFILL = ((1, 512), (4, 512), (1, 2048), (1, 4096))
HEAD_DIMS = (64, 128)
PREFILL_HEADS = 32
DECODE_CACHE = (1024, 4096, 16384, 32768)
DECODE_HEADS, DECODE_KV_HEADS, DECODE_DIM = 32, 8, 128
QUICK_PREFILL, QUICK_HEAD_DIMS, QUICK_HEADS, QUICK_CACHE = ((1, 256),), (64,), 8, (1024, 4096)
NAIVE_MAX_SCORE_BYTES = 1 << 30
DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float16, torch.bfloat16)}
# The GPU's grid: the (B 1..8, S 512..8192); its target is read at D = 128, S >= 4k.
GPU_PREFILL = ((8, 512), (4, 1024), (2, 2048), (1, 4096), (2, 4096), (1, 8192))
GPU_TRAIN = ((4, 1024), (1, 4096), (1, 8192))
TRAIN_FLOPS = 3.5  # forward + backward (2.5x) over the forward


@dataclass(frozen=True)
class Case:
    kind: str  # "prefill", "decode" or "train" (forward + backward)
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    causal: bool
    dtype: torch.dtype

    def flops(self) -> float:
        full = 4 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim
        full *= TRAIN_FLOPS if self.kind == "train" else 1
        return full / 2 if self.causal else full

    def kv_bytes(self) -> int:
        return 2 * self.batch * self.kv_heads * self.kv_len * self.head_dim * self.dtype.itemsize


def naive(q, k, v, causal):
    """softmax(q k^T * scale) v with the score matrix in memory (GQA by repeating k, v)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        sq, sk = scores.shape[-2:]
        hidden = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
        scores = scores.masked_fill(hidden, -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def implementations(case: Case) -> dict:
    gqa = case.heads != case.kv_heads
    impls = {
        "torchslim": lambda q, k, v: torchslim.attention(q, k, v, causal=case.causal),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=case.causal, enable_gqa=gqa
        ),
    }
    score_bytes = case.batch * case.heads * case.q_len * case.kv_len * 4
    if score_bytes <= NAIVE_MAX_SCORE_BYTES:
        impls["naive"] = lambda q, k, v: naive(q, k, v, case.causal)
    return impls


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    gpu = device == "cuda"
    prefill = QUICK_PREFILL if quick else GPU_PREFILL if gpu else PREFILL
    dims = QUICK_HEAD_DIMS if quick else HEAD_DIMS
    heads = QUICK_HEADS if quick else PREFILL_HEADS
    dtypes = DTYPES[device]
    out = [
        Case(kind, b, heads, heads, s, s, d, causal, dtype)
        for kind, grid in (("prefill", prefill), ("train", (QUICK_PREFILL if quick else GPU_TRAIN)))
        if kind == "prefill" or gpu
        for dtype in dtypes
        for b, s in grid
        for d in dims
        for causal in (False, True)
    ]
    out += [
        Case("decode", 1, DECODE_HEADS, DECODE_KV_HEADS, 1, n, DECODE_DIM, False, dtype)
        for dtype in dtypes
        for n in (QUICK_CACHE if quick else DECODE_CACHE)
    ]
    return out


def training_step(fn, q, k, v):
    """fn's forward and backward for a fixed output gradient (inputs that require grad)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(fn(*leaves))

    def step():
        torch.autograd.grad(fn(*leaves), leaves, grad)

    return step


def measure(
    case: Case, gen: torch.Generator, device: str = "cpu", copy: common.CopyProbe | None = None
) -> list[dict]:
    """The case's rows, its implementations timed in turns. Decode reads K/V rotated through
    copies past the caches (as a served model's long cache comes from memory), and with
    ``copy`` takes turns with it too: its floor is the K/V bytes at that copy's bandwidth."""

    def tensor(heads, length):
        shape = (case.batch, heads, length, case.head_dim)
        return torch.randn(shape, generator=gen).to(device, case.dtype)

    q = tensor(case.heads, case.q_len)
    k, v = tensor(case.kv_heads, case.kv_len), tensor(case.kv_heads, case.kv_len)
    decode = case.kind == "decode"
    if decode:
        operands = common.rotating(lambda: (q, k.clone(), v.clone()), case.kv_bytes())
    impls = implementations(case)
    steps, failed = {}, {}
    for name, fn in impls.items():
        try:  # a training step runs the forward once to shape its gradient
            if case.kind == "train":
                steps[name] = training_step(fn, q, k, v)
            elif decode:
                steps[name] = lambda fn=fn: fn(*operands())
            else:
                steps[name] = functools.partial(fn, q, k, v)
        except (RuntimeError, NotImplementedError) as exc:
            failed[name] = exc
    # The implementations take turns (common.time_in_turns), so each ratio is taken in the
    # same seconds of a shared machine.
    with_copy = decode and copy is not None
    times = common.time_in_turns({**steps, **({"copy": copy} if with_copy else {})}, device=device)
    bandwidth = None
    if with_copy:
        copy_ms = times.pop("copy")
        if isinstance(copy_ms, Exception):
            raise copy_ms
        bandwidth = copy.gbs(copy_ms)
    times = {**times, **failed}
    rows = []
    for name in impls:
        ms = times[name]
        row = {
            "kind": case.kind,
            "B": case.batch,
            "H": case.heads,
            "Hkv": case.kv_heads,
            "Sq": case.q_len,
            "Sk": case.kv_len,
            "D": case.head_dim,
            "causal": case.causal,
            "dtype": str(case.dtype).removeprefix("torch."),
            "impl": name,
        }
        if isinstance(ms, Exception):
            row["error"] = common.error_text(ms)
        else:
            row["time_ms"] = ms
            row["GFLOP/s"] = case.flops() / (ms * 1e-3) / 1e9
            row["KV_GB/s"] = case.kv_bytes() / (ms * 1e-3) / 1e9
            if bandwidth is not None:
                row["copy_GB/s"] = bandwidth
                row["floor_ms"] = case.kv_bytes() / bandwidth / 1e6
                row["pct_floor"] = 100 * row["floor_ms"] / ms
        rows.append(row)
    sdpa = next((r["time_ms"] for r in rows if r["impl"] == "sdpa" and "time_ms" in r), None)
    for r in rows:
        if sdpa is not None and "time_ms" in r:
            r["speedup_vs_sdpa"] = sdpa / r["time_ms"]
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.2))
    prefill = [r for r in rows if r["kind"] == "prefill"]
    labels = sorted(
        {(r["dtype"], r["B"], r["Sk"], r["D"], r["causal"]) for r in prefill},
        key=lambda t: (t[0], t[1] * t[2] ** 2, t[3], t[4]),
    )
    impls = list(dict.fromkeys(r["impl"] for r in prefill))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        by = {
            (r["dtype"], r["B"], r["Sk"], r["D"], r["causal"]): r["GFLOP/s"]
            for r in prefill
            if r["impl"] == impl
        }
        values = [by.get(lab, 0.0) for lab in labels]
        left.bar([x + i * width for x in range(len(labels))], values, width, label=impl)
    roofs = {r["dtype"]: r["gemm_GFLOP/s"] for r in prefill if "gemm_GFLOP/s" in r}
    for j, (dtype, roof) in enumerate(roofs.items()):  # a line over that dtype's bars
        at = [x for x, lab in enumerate(labels) if lab[0] == dtype]
        label = "torch.mm in the same dtype" if j == 0 else None
        left.hlines(roof, min(at) - 0.2, max(at) + 0.8, colors="black", linestyles="dashed",
                    linewidth=1, label=label)  # fmt: skip
    left.set_xticks(
        [x + width * (len(impls) - 1) / 2 for x in range(len(labels))],
        [f"{d} B{b} S{s}\nD{dd}{' causal' if c else ''}" for d, b, s, dd, c in labels],
        fontsize=6,
        rotation=90,
    )
    left.set_ylabel("GFLOP/s")
    left.set_title("prefill")
    left.legend(fontsize=7)
    decode = [r for r in rows if r["kind"] == "decode"]
    for impl in dict.fromkeys(r["impl"] for r in decode):
        for dtype in dict.fromkeys(r["dtype"] for r in decode):
            pts = [r for r in decode if r["impl"] == impl and r["dtype"] == dtype]
            right.plot([r["Sk"] for r in pts], [r["KV_GB/s"] for r in pts], "o-",
                       label=f"{impl} {dtype}")  # fmt: skip
    right.set_xscale("log", base=2)
    right.set_xlabel("cache length")
    right.set_ylabel("K/V GB/s")
    right.set_title(f"decode, {DECODE_HEADS}:{DECODE_KV_HEADS} GQA, D={DECODE_DIM}")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchslim bench attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="one small prefill, short caches")
    parser.add_argument("--out", help="output folder (default: benchmarks/results/<device>)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    common.check_out(parser, args.out)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    env = common.Environment.capture(device)
    where = (
        common.device_name(device) if device == "cuda" else f"{env.cpu}, {common.threads_note()}"
    )
    print(f"torchslim bench attention on {where}, ISA {env.isa}")
    copy = common.CopyProbe(device=device)
    bandwidth = copy.gbs(common.time_ms(copy, min_run_time=0.5, device=device))
    # Each dtype's compute roof: the best torch.mm rate in that dtype, measured now.
    sizes = (1024,) if args.quick else None
    roofs = {
        str(dtype).removeprefix("torch."): common.gemm_gflops(device, dtype, sizes)
        for dtype in DTYPES[device]
    }
    gemms = ", ".join(f"{name} {gflops:.0f}" for name, gflops in roofs.items())
    print(f"copy bandwidth {bandwidth:.1f} GB/s, GEMM GFLOP/s {gemms} (measured now)")
    gen = torch.Generator().manual_seed(0)
    todo = tqdm(cases(args.quick, device), desc="attention")
    rows = common.collect(r for case in todo for r in measure(case, gen, device, copy))
    for r in rows:  # decode rows carry the copy timed in turns with them
        r.setdefault("copy_GB/s", bandwidth)
        r["gemm_GFLOP/s"] = roofs[r["dtype"]]
        if r["kind"] != "decode" and "GFLOP/s" in r:  # decode is bound by the K/V read
            r["of_gemm"] = r["GFLOP/s"] / r["gemm_GFLOP/s"]
    columns = ["kind", "dtype", "B", "Sq", "Sk", "D", "causal", "impl", "time_ms", "GFLOP/s",
               "of_gemm", "KV_GB/s", "pct_floor", "speedup_vs_sdpa"]  # fmt: skip
    timed = [r for r in rows if "speedup_vs_sdpa" in r]
    print(common.format_table(timed, columns))
    for r in rows:
        if "speedup_vs_sdpa" not in r:
            why = r.get("error", "SDPA failed on this case")
            print(f"not run: {r['kind']} {r['dtype']} B={r['B']} S={r['Sk']} {r['impl']}: {why}")
    out = common.results_dir(env, args.out)
    name = f"attention_{device}" + ("_quick" if args.quick else "")
    common.write_csv(out / f"{name}.csv", rows, env)
    if not args.no_plot:
        plot(timed, out / f"{name}.png")
    print(f"\nwrote {out / name}.csv" + ("" if args.no_plot else f" and {name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
