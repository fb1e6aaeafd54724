"""Shared benchmark machinery: timing, memory and compute floors, environment, CSV and plots.

Method (see the project's engineering guide): every figure is measured side by side with its
baselines in one run and reported as a ratio, with achieved GB/s and GOP/s and the share of the
memory floor (bytes that must move ÷ copy bandwidth measured in the same run).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

RESULTS = Path(__file__).resolve().parent / "results"


def last_level_cache_bytes() -> int:
    """The largest CPU cache this process sees (sysfs), or 0 where it cannot be read."""
    sizes = [0]
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return max(sizes)


# Weights are rotated through at least this many bytes of copies so that a timed call never
# finds its weights in cache from the previous call: twice the last-level cache (tens of MB on
# most servers; a cloud Sapphire Rapids here reports 480 MB), and never less than 96 MB.
# TORCHSLIM_BENCH_ROTATE_MB overrides it (the tests, which check the machinery, use 96).
ROTATE_BYTES = int(os.environ.get("TORCHSLIM_BENCH_ROTATE_MB", 0)) << 20 or max(
    96 << 20, 2 * last_level_cache_bytes()
)


def time_ms(fn: Callable[[], object], min_run_time: float = 0.3, device: str = "cpu") -> float:
    """Median time of fn() in ms: blocked_autorange on the CPU, triton's do_bench (CUDA events,
    L2 flushed between runs) on a GPU. A call slower than 2 s is timed once, after a warm-up."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    start = time.perf_counter()
    fn()  # warm-up (first-call allocations, lazy init)
    if time.perf_counter() - start > 2.0:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


# How many turns the implementations of one case take (time_in_turns).
ROUNDS = 5


def time_in_turns(
    fns: Mapping[str, Callable[[], object]],
    min_run_time: float = 0.3,
    device: str = "cpu",
    rounds: int = ROUNDS,
) -> dict[str, float | Exception]:
    """Median time in ms of each of fns, the fns taking turns: in each of `rounds` rounds every
    fn is timed for min_run_time / rounds (time_ms); each fn's figure is the median of its
    rounds. A shared machine's memory bandwidth drifts over seconds: timed one after another for
    0.3 s each, torchslim's W8A8 at M = 1 on Zen 4 (11008x4096, weights cold) came out at 0.83x
    FBGEMM's speed in one run of the int8 benchmark and 1.31x in another; timed in turns, four
    runs gave 1.18-1.37x. A fn slower than 2 s a call is timed once, in the first round. On a
    GPU (do_bench: CUDA events, L2 flushed) one round. A fn that raises RuntimeError or
    NotImplementedError (out of memory, say) gets the exception as its figure and no more turns.
    All of fns' operands live at once: each of them rotated through ROTATE_BYTES, the memory a
    case needs is that many times the implementations."""
    rounds = 1 if device == "cuda" else rounds
    times: dict[str, list[float]] = {name: [] for name in fns}
    failed: dict[str, Exception] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in failed or (times[name] and times[name][0] > 2000.0):
                continue
            try:
                times[name].append(time_ms(fn, min_run_time / rounds, device))
            except (RuntimeError, NotImplementedError) as exc:
                failed[name] = exc
    return {
        name: failed[name] if name in failed else statistics.median(times[name]) for name in fns
    }


def collect(rows: Iterable[dict]) -> list[dict]:
    """The rows of an iterable that measures as it goes. Interrupted (Ctrl-C, or the SIGINT of
    `timeout --signal=INT`), it returns the rows measured so far, so the caller still writes
    them: a run cut off by a time limit keeps its finished cases."""
    out: list[dict] = []
    try:
        for row in rows:
            out.append(row)
    except KeyboardInterrupt:
        print(f"\ninterrupted: keeping the {len(out)} rows measured so far", file=sys.stderr)
    return out


def error_text(exc: BaseException) -> str:
    """An exception's first line, for a row that was not measured (its type when it has none)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# The most copies rotating() makes: a layer of a few KB would need hundreds of thousands (a
# 33x7 int8 layer: 389k, about an hour to make); below ROTATE_BYTES / MAX_COPIES (48 KB) the
# copies stay in the caches, where such a call's time is its fixed cost anyway.
MAX_COPIES = 2048


def rotating(make: Callable[[], object], nbytes: int) -> Callable[[], object]:
    """Builds enough copies of make()'s operands to exceed ROTATE_BYTES (at most MAX_COPIES);
    returns a getter that hands out the next copy on each call."""
    count = min(MAX_COPIES, max(1, -(-ROTATE_BYTES // max(nbytes, 1))))
    copies = [make() for _ in range(count)]
    state = {"i": 0}

    def next_copy():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return next_copy


class CopyProbe:
    """The copy that measures memory bandwidth: a large buffer copied into a preallocated one
    (read + write), 256 MB each, or ROTATE_BYTES where the cache is larger than that. `probe()`
    runs one copy; gbs(ms) is the bandwidth of a copy that took ms (timed beside the
    implementations of a case, time_in_turns, it gives that case's floor)."""

    def __init__(self, nbytes: int | None = None, device: str = "cpu") -> None:
        if nbytes is None:
            nbytes = 256 << 20 if device == "cuda" else max(256 << 20, ROTATE_BYTES)
        self.nbytes = nbytes
        self.src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
        self.dst = torch.empty_like(self.src)

    def __call__(self) -> torch.Tensor:
        return self.dst.copy_(self.src)

    def gbs(self, ms: float) -> float:
        return 2 * self.nbytes / (ms * 1e-3) / 1e9


def gemm_gflops(
    device: str = "cpu", dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] | None = None
) -> float:
    """The compute roof for kernels multiplying ``dtype`` on this device, measured now: the best
    throughput of torch.mm (torch._int_mm for int8) over square sizes (1024, 2048, 4096 on the
    CPU; 4096, 8192 on a GPU). The best, as a roof is what the hardware reaches; on a shared
    machine one size can come out a third low (2048 fp32 on two Zen 4 cores: 101-183 GFLOP/s in
    different runs)."""
    best = 0.0
    mm = torch._int_mm if dtype == torch.int8 else torch.mm
    for n in sizes or ((1024, 2048, 4096) if device == "cpu" else (4096, 8192)):
        if dtype == torch.int8:
            a = torch.randint(-127, 128, (n, n), dtype=dtype).to(device)
            b = torch.randint(-127, 128, (n, n), dtype=dtype).to(device)
        else:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
        ms = time_ms(lambda a=a, b=b: mm(a, b), min_run_time=0.3, device=device)
        best = max(best, 2 * n**3 / (ms * 1e-3) / 1e9)
    return best


def _git_commit() -> str:
    """The commit the run measured, "-dirty" when the tree had changes to tracked files."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str = "cpu") -> str:
    """Folder name under results/: e.g. cpu-amd-epyc-avx2-2t, cuda-nvidia-h100-80gb-hbm3. A CPU's
    name carries the ISA level our kernels run at: one model name ("AMD EPYC") covers machines
    with and without AVX-512."""
    if device == "cuda":
        raw = f"cuda-{torch.cuda.get_device_name()}"
    else:
        from torchslim import _ext

        isa = _ext._C.isa() if _ext._C is not None else "reference"
        raw = f"cpu-{cpu_model()}-{isa}-{torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")


@dataclass(frozen=True)
class Environment:
    device: str
    cpu: str
    threads: int
    torch: str
    torchslim: str
    isa: str
    commit: str
    date: str
    rotate_mb: int  # the bytes of weight copies each timed call rotates through

    @classmethod
    def capture(cls, device: str = "cpu") -> Environment:
        import torchslim
        from torchslim import _ext

        return cls(
            device=device_name(device),
            cpu=cpu_model(),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            torchslim=torchslim.__version__,
            isa=_ext._C.isa() if _ext._C is not None else "none",
            commit=_git_commit(),
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            rotate_mb=ROTATE_BYTES >> 20,
        )


def write_csv(path: Path, rows: Sequence[dict], env: Environment) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row)) + list(env.__dict__)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **env.__dict__})


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]  # "": not measured
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def check_out(parser: argparse.ArgumentParser, out: str | None) -> None:
    """Makes the --out folder now, so that a path that cannot be one fails before the run, not
    after it (parser.error names --out)."""
    if out is None:
        return
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {out}: {exc.strerror or exc}")
    if not os.access(out, os.W_OK):
        parser.error(f"--out {out}: not writable")


def results_dir(env: Environment, out: str | None) -> Path:
    return Path(out) if out else RESULTS / env.device


def threads_note() -> str:
    return (
        f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"
    )
