"""The benchmark harness runs end to end (quick mode) and writes its CSV with every baseline."""

from __future__ import annotations

import csv
import math
import re

import pytest

from torchslim import _ext


@pytest.mark.skipif(_ext._C is None, reason="the benchmark compares the compiled kernels")
def test_bench_int8_quick(tmp_path, capsys):
    from torchslim.benchmarks import bench_quant

    assert bench_quant.main(["--quick", "--out", str(tmp_path), "--no-plot"]) == 0
    with open(tmp_path / "int8_cpu_quick.csv") as f:
        rows = list(csv.DictReader(f))
    impls = {r["impl"] for r in rows if r.get("time_ms")}
    assert {"fp32", "bf16", "fbgemm-w8a8", "torchslim-w8a8", "torchslim-w8a16"} <= impls
    assert "torch-int8pack-w8a16-bf16" in impls
    for r in rows:
        if r.get("time_ms"):
            assert float(r["time_ms"]) > 0 and float(r["pct_floor"]) > 0
            assert r["commit"] and r["torch"] and r["device"].startswith("cpu-")
            # The floor is the bytes moved (GB/s x time) over the row's own copy bandwidth.
            share = 100 * float(r["GB/s"]) / float(r["copy_GB/s"])
            assert share == pytest.approx(float(r["pct_floor"]), rel=1e-3)
    bandwidths = {(r["layer"], r["M"]): r["copy_GB/s"] for r in rows if r.get("time_ms")}
    for r in rows:
        if r.get("time_ms"):
            assert r["copy_GB/s"] == bandwidths[(r["layer"], r["M"])]
    assert len(set(bandwidths.values())) == len(bandwidths)  # one copy timed per case
    assert "targets:" in capsys.readouterr().out


def test_time_in_turns_alternates_and_takes_each_median(monkeypatch):
    """The fns take turns round by round; each figure is the median of its own rounds; a fn
    slower than 2 s a call is timed in the first round only; one that raises keeps its error
    and gets no more turns."""
    from torchslim.benchmarks import common

    oom = RuntimeError("out of memory")
    times = {
        "a": iter([5.0, 1.0, 3.0]),
        "b": iter([10.0, 30.0, 20.0]),
        "slow": iter([2500.0]),
        "fails": iter([4.0, oom]),
    }
    order = []

    def fake_time_ms(fn, min_run_time, device):
        order.append(fn())
        assert min_run_time == pytest.approx(0.3 / 3)
        value = next(times[order[-1]])
        if isinstance(value, Exception):
            raise value
        return value

    monkeypatch.setattr(common, "time_ms", fake_time_ms)
    fns = {name: (lambda name=name: name) for name in ("a", "b", "slow", "fails")}
    result = common.time_in_turns(fns, rounds=3)
    assert order == ["a", "b", "slow", "fails", "a", "b", "fails", "a", "b"]
    assert result == {"a": 3.0, "b": 20.0, "slow": 2500.0, "fails": oom}
    # On a GPU one round (do_bench is stable), at the whole min_run_time.
    times["a"] = iter([7.0])
    order.clear()

    def fake_cuda_time_ms(fn, min_run_time, device):
        assert device == "cuda" and min_run_time == pytest.approx(0.3)
        order.append(fn())
        return next(times[order[-1]])

    monkeypatch.setattr(common, "time_ms", fake_cuda_time_ms)
    assert common.time_in_turns({"a": fns["a"]}, device="cuda", rounds=3) == {"a": 7.0}
    assert order == ["a"]


@pytest.mark.skipif(_ext._C is None, reason="the benchmark compares the compiled kernels")
def test_bench_int4_quick(tmp_path, capsys):
    from torchslim.benchmarks import bench_int4

    assert bench_int4.main(["--quick", "--out", str(tmp_path), "--no-plot"]) == 0
    with open(tmp_path / "int4_cpu_quick.csv") as f:
        rows = list(csv.DictReader(f))
    impls = {r["impl"] for r in rows if r.get("time_ms")}
    assert {"fp32", "bf16", "torch-int4pack-w4a16-bf16", "torchslim-w4a16-g128"} <= impls
    assert "torchslim-w4a16-g32" in impls
    out = capsys.readouterr().out
    assert "targets:" in out and "x torch-int4pack-w4a16-bf16" in out
    # speedups are over the faster dense F.linear, named in the vs column
    for r in rows:
        if r.get("time_ms"):
            dense = {d["impl"]: float(d["time_ms"]) for d in rows if d["M"] == r["M"]}
            faster = min(("fp32", "bf16"), key=dense.__getitem__)
            assert r["vs"] == faster
            assert float(r["speedup"]) == pytest.approx(dense[faster] / float(r["time_ms"]))


@pytest.mark.skipif(_ext._C is None, reason="the benchmark compares the compiled kernels")
def test_bench_attention_quick(tmp_path):
    from torchslim.benchmarks import bench_attention

    assert bench_attention.main(["--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "attention_cpu_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["kind"], r["impl"]) for r in rows} == {
        (kind, impl) for kind in ("prefill", "decode") for impl in ("torchslim", "sdpa", "naive")
    }
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert all(float(r["time_ms"]) > 0 and float(r["speedup_vs_sdpa"]) > 0 for r in rows)
    for r in rows:  # prefill against its dtype's GEMM roof; decode is read as bandwidth
        assert float(r["gemm_GFLOP/s"]) > 0
        of_gemm = float(r["GFLOP/s"]) / float(r["gemm_GFLOP/s"])
        assert (
            (r["of_gemm"] == "")
            if r["kind"] == "decode"
            else math.isclose(float(r["of_gemm"]), of_gemm, rel_tol=1e-6)
        )
    for r in rows:  # decode: the K/V bytes at the bandwidth of the copy timed in its turns
        if r["kind"] == "decode":
            kv_bytes = 2 * int(r["B"]) * int(r["Hkv"]) * int(r["Sk"]) * int(r["D"])
            kv_bytes *= 4 if r["dtype"] == "float32" else 2
            floor_ms = kv_bytes / float(r["copy_GB/s"]) / 1e6
            assert math.isclose(float(r["floor_ms"]), floor_ms, rel_tol=1e-6)
            assert math.isclose(float(r["pct_floor"]), 100 * floor_ms / float(r["time_ms"]))
    per_case = {(r["dtype"], r["Sk"]): r["copy_GB/s"] for r in rows if r["kind"] == "decode"}
    assert len(set(per_case.values())) == len(per_case)  # a copy timed with each case
    assert (tmp_path / "attention_cpu_quick.png").exists()


@pytest.mark.parametrize("kind", ["prefill", "train"])
def test_bench_attention_times_in_turns_and_keeps_a_failure(monkeypatch, kind):
    """A case's implementations go to common.time_in_turns together; one that fails (in its
    timed call, or a training step's first forward) keeps a row with its error, and the others
    their times and ratios to SDPA."""
    import torch

    from torchslim.benchmarks import bench_attention, common

    def broken(q, k, v):
        raise RuntimeError("out of memory\nmore detail")

    def silent(q, k, v):
        raise NotImplementedError

    impls = {
        "torchslim": lambda q, k, v: q * k * v,
        "sdpa": lambda q, k, v: q * k + v,
        "broken": broken,
        "silent": silent,
    }
    monkeypatch.setattr(bench_attention, "implementations", lambda case: impls)
    calls = []
    real = common.time_in_turns

    def spy(fns, **kwargs):
        calls.append(list(fns))
        return real(fns, min_run_time=0.01, **kwargs)

    monkeypatch.setattr(common, "time_in_turns", spy)
    case = bench_attention.Case(kind, 1, 2, 2, 8, 8, 16, False, torch.float32)
    rows = {r["impl"]: r for r in bench_attention.measure(case, torch.Generator().manual_seed(0))}
    timed_together = ["torchslim", "sdpa"] if kind == "train" else list(impls)
    assert calls == [timed_together]
    assert list(rows) == list(impls)
    assert rows["broken"]["error"] == "out of memory" and "time_ms" not in rows["broken"]
    assert rows["silent"]["error"] == "NotImplementedError" and "time_ms" not in rows["silent"]
    for name in ("torchslim", "sdpa"):
        assert rows[name]["time_ms"] > 0 and rows[name]["speedup_vs_sdpa"] > 0
    assert rows["sdpa"]["speedup_vs_sdpa"] == 1.0


@pytest.mark.skipif(_ext._C is None, reason="the benchmark compares the compiled kernels")
def test_bench_sparse_quick(tmp_path, capsys, monkeypatch):
    """`torchslim bench sparse` on a tiny layer: every (M, pattern, implementation) row is
    timed in turns with both dense ones, with positive finite figures, speedups over the dense of
    its own turns and each format's own weight bytes."""
    import torch

    import torchslim.sparse as sp
    from torchslim import cli
    from torchslim.benchmarks import bench_sparse, common

    # The machinery, not the figures: short turns, weights rotated through 8 MB.
    real = common.time_in_turns
    monkeypatch.setattr(common, "time_in_turns", lambda fns, **kw: real(fns, 0.02, **kw))
    monkeypatch.setattr(common, "ROTATE_BYTES", 8 << 20)
    argv = ["bench", "sparse", "--quick", "--layers", "256x384", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    with open(tmp_path / "sparse_cpu_quick.csv") as f:
        rows = list(csv.DictReader(f))
    columns = {"layer", "M", "pattern", "sparsity", "impl", "format", "w_dtype", "x_dtype",
               "time_ms", "speedup", "vs", "GB/s", "weight_bytes", "floor_ms", "pct_floor",
               "compute_floor_ms", "binds", "GFLOP/s", "nnz", "copy_GB/s", "device", "torch",
               "commit", "turns", "vs_ms", "roof", "roof_GFLOP/s"}  # fmt: skip
    assert columns <= set(rows[0])
    variants = ("fp32", "bf16", "bf16-fp32x", "int8-fp32x")
    unstructured = tuple(
        f"torchslim-{f}-{v}" for f in ("bitmask", "csr", "sliced") for v in variants
    )
    per_pattern = {"dense": ("dense-fp32", "dense-bf16")}
    unstructured += ("torchslim-bitmask-w8a8", "torchslim-sliced-w8a8")
    per_pattern.update({p: (*unstructured, "torch-csr-fp32") for p in ("50%", "75%", "90%")})
    per_pattern["2:4"] = (
        *(f"torchslim-2:4-{v}" for v in variants),
        "torchslim-2:4-w8a8",
        "torch-csr-fp32",
    )
    for p in ("16x16@50%", "16x16@90%"):
        per_pattern[p] = (
            *(f"torchslim-block-{v}" for v in variants),
            "torchslim-block-w8a8",
            "torch-csr-fp32",
        )
    # Each pattern's implementations take turns with both dense ones (and the copy probe).
    dense = per_pattern.pop("dense")
    expected = {
        (m, q, i, p)
        for m in ("1", "16")
        for p, impls in per_pattern.items()
        for q, names in (("dense", dense), (p, impls))
        for i in names
    }
    assert [r.get("error") for r in rows if r.get("error")] == []
    assert sorted((r["M"], r["pattern"], r["impl"], r["turns"]) for r in rows) == sorted(expected)
    dense_ms, bandwidth = {}, {}
    for r in rows:
        case = (r["M"], r["turns"])
        if r["pattern"] == "dense":
            dense_ms[case] = min(dense_ms.get(case, float("inf")), float(r["time_ms"]))
        bandwidth.setdefault(case, set()).add(r["copy_GB/s"])
    for r in rows:  # speedups and floors from the row's own turns
        case = (r["M"], r["turns"])
        assert float(r["vs_ms"]) == dense_ms[case]
        assert float(r["speedup"]) == pytest.approx(dense_ms[case] / float(r["time_ms"]))
        assert len(bandwidth[case]) == 1
    for r in rows:
        for col in ("time_ms", "speedup", "GB/s", "weight_bytes", "pct_floor", "GFLOP/s"):
            assert 0 < float(r[col]) < float("inf"), (r["impl"], r["pattern"], col, r[col])
        assert r["layer"] == "256x384" and r["device"].startswith("cpu-")
        assert r["vs"] in ("dense-fp32", "dense-bf16")
        nominal = 0.0 if r["pattern"] == "dense" else bench_sparse.percent(r["pattern"])
        blocks = "@" in r["pattern"]  # 16 blocks a block row: whole blocks, 6.25% each
        assert abs(float(r["sparsity"]) - nominal) < (6.25 if blocks else 1)
    by = {(r["M"], r["pattern"], r["impl"]): r for r in rows}
    bf16_24 = by[("1", "2:4", "torchslim-2:4-bf16")]
    assert int(bf16_24["weight_bytes"]) == sp.format_bytes("2:4", 384, 256, dtype=torch.bfloat16)
    fp32_90 = by[("1", "90%", "torchslim-bitmask-fp32")]
    nnz = int(fp32_90["nnz"])
    assert int(fp32_90["weight_bytes"]) == 4 * nnz + 384 * 256 // 8 + 8 * 385
    bf16_csr = by[("1", "90%", "torchslim-csr-bf16")]  # 26 nonzeros a row: 4 groups of 8
    assert int(bf16_csr["weight_bytes"]) == 384 * 4 * (8 * 3 + 2) + 8 * 385
    block = by[("1", "16x16@50%", "torchslim-block-bf16")]  # 8 of 16 blocks a block row
    assert int(block["weight_bytes"]) == 24 * 8 * (16 * 16 * 2 + 4) + 8 * 25
    csr = by[("1", "90%", "torch-csr-fp32")]
    assert int(csr["weight_bytes"]) == (4 + 8) * nnz + 8 * 385
    # Each row's compute floor is at the GEMM roof of the dtype it multiplies in.
    roofs = {}
    for r in rows:
        roofs.setdefault(r["roof"], set()).add(r["roof_GFLOP/s"])
        flops = float(r["GFLOP/s"]) * float(r["time_ms"]) * 1e6
        assert float(r["compute_floor_ms"]) == pytest.approx(flops / float(r["roof_GFLOP/s"]) / 1e6)
    assert all(len(v) == 1 for v in roofs.values()) and set(roofs) == {"fp32", "bf16", "int8"}
    assert by[("1", "2:4", "torchslim-2:4-w8a8")]["roof"] == "int8"
    assert by[("1", "2:4", "torchslim-2:4-bf16")]["roof"] == "bf16"
    assert by[("1", "2:4", "torchslim-2:4-bf16-fp32x")]["roof"] == "fp32"
    assert by[("1", "dense", "dense-bf16")]["roof"] == "bf16"
    out = capsys.readouterr().out
    assert "crossover" in out and "targets:" in out and "2:4 >= 3x dense" in out
    assert (tmp_path / "sparse_cpu_quick.png").exists()


def test_sparse_targets_and_crossover_are_read_from_the_rows():
    from torchslim.benchmarks import bench_sparse

    def row(pattern, impl, ms, pct_floor=80.0, m=1):
        fmt = {"dense": "dense", "2:4": "2:4"}.get(pattern, "bitmask")
        fmt = "torch-csr" if impl.startswith("torch-csr") else fmt
        return {"layer": "4096x4096", "M": m, "pattern": pattern, "impl": impl, "format": fmt,
                "time_ms": ms, "pct_floor": pct_floor}  # fmt: skip

    rows = [
        row("dense", "dense-fp32", 2.0),
        row("dense", "dense-bf16", 1.2),
        row("50%", "torchslim-fp32", 1.5),  # slower than dense-bf16
        row("50%", "torchslim-bf16", 1.0),
        row("75%", "torchslim-bf16", 0.6),
        row("90%", "torchslim-bf16", 0.1, pct_floor=70.0),
        row("90%", "torch-csr-fp32", 0.6),
        row("2:4", "torchslim-bf16", 0.3),
        row("dense", "dense-fp32", 3.0, m=16),
        row("dense", "dense-bf16", 4.0, m=16),
        row("50%", "torchslim-bf16", 4.0, m=16),
        row("90%", "torchslim-bf16", 1.0, m=16),
    ]
    bench_sparse.add_speedups(rows, {"dense-fp32", "dense-bf16"})
    assert [r["vs"] for r in rows[:2]] == ["dense-bf16"] * 2 and rows[-1]["vs"] == "dense-fp32"
    assert rows[3]["speedup"] == pytest.approx(1.2)
    lines = bench_sparse.targets(rows)
    assert lines[1] == "4096x4096: dense = dense-bf16, 1.2 ms (in each pattern's turns)"
    assert lines[2:] == [
        "  2:4 >= 3x dense: 4.00x (torchslim-bf16): met",
        "  90% >= 8x dense: 12.00x (torchslim-bf16): met",
        "  90% >= 5x torch CSR: 6.00x torch-csr-fp32 (torchslim-bf16): met",
        "  beats dense from 50% up: 1.20x at 50%, 2.00x at 75%, 12.00x at 90%: met",
        "  >= 75% of its memory floor: 50% 80%, 75% 80%, 90% 70%, 2:4 80%: NOT met",
    ]
    cross = {(r["M"], r["impl"]): r for r in bench_sparse.crossovers(rows)}
    assert cross[(1, "torchslim-fp32")]["crossover"] == "none"
    # Timed in turns: each row's speedup is over the dense of its own turns.
    rows += [row("dense", "dense-fp32", 1.0), row("dense", "dense-bf16", 1.5)]
    for r in rows:
        if r["M"] == 1 and (r["pattern"] == "90%" or r in rows[-2:]):
            r["turns"] = "90%"
    bench_sparse.add_speedups(rows, {"dense-fp32", "dense-bf16"})
    ours90 = next(r for r in rows if r["impl"] == "torchslim-bf16" and r["pattern"] == "90%")
    assert (ours90["vs"], ours90["vs_ms"], ours90["speedup"]) == ("dense-fp32", 1.0, 10.0)
    assert rows[3]["speedup"] == pytest.approx(1.2)  # 50%: the dense without turns
    lines = bench_sparse.targets(rows)
    assert (
        lines[1] == "4096x4096: dense = dense-bf16, dense-fp32, 1-1.2 ms (in each pattern's turns)"
    )
    assert lines[3] == "  90% >= 8x dense: 10.00x (torchslim-bf16): met"
    assert cross[(1, "torchslim-bf16")]["crossover"] == "50%"
    assert cross[(16, "torchslim-bf16")]["crossover"] == "90%"
    assert cross[(16, "torchslim-bf16")]["75%"] == "-"


def test_sparse_gpu_target_is_ours_over_dense_fp16_from_m_1024():
    from torchslim.benchmarks import bench_sparse

    def row(m, impl, ms, pattern="2:4", layer="8192x8192"):
        fmt = "dense" if impl.startswith("dense") else "2:4"
        return {"layer": layer, "M": m, "pattern": pattern, "impl": impl, "format": fmt,
                "time_ms": ms, "pct_floor": 50.0}  # fmt: skip

    rows = [
        row(1024, "dense-fp16", 1.2, "dense"),
        row(1024, "dense-bf16", 0.6, "dense"),  # not the target's baseline
        row(1024, "torchslim-2:4-fp16", 1.1),
        row(1024, "torchslim-2:4-int8-fp16x", 0.9),
        row(1024, "torch-2:4-cusparselt-fp16", 0.5),  # torch's, not ours
        row(128, "dense-fp16", 1.0, "dense"),  # below the target's M
        row(128, "torchslim-2:4-fp16", 0.1),
        row(1024, "dense-fp16", 1.0, "dense", layer="4096x4096"),  # another layer
        row(1024, "torchslim-2:4-fp16", 0.1, layer="4096x4096"),
    ]
    lines = bench_sparse.gpu_targets(rows)
    assert lines[:2] == [
        "2:4 >= 1.2x dense fp16 on 8192x8192 at M >= 1024 (eager):",
        "  M=1024: 1.33x (torchslim-2:4-int8-fp16x): met",
    ]
    rows[3]["time_ms"] = 1.05
    assert (
        bench_sparse.gpu_targets(rows)[1] == "  M=1024: 1.14x (torchslim-2:4-int8-fp16x): NOT met"
    )


def test_sparse_gpu_lines_compare_eager_with_eager_and_graph_with_graph():
    from torchslim.benchmarks import bench_sparse

    # ours carry one name for both formats: a row is keyed by (impl, format)
    keys = [(impl.name, impl.fmt) for impl in (*bench_sparse.GPU_DENSE, *bench_sparse.GPU_IMPLS)]
    assert len(keys) == len(set(keys))
    names = {name for name, _ in keys}
    assert {"dense-fp16", "torch-2:4-cusparselt-fp16-graph", "torchslim-2:4-fp16"} <= names
    row = {"layer": "8192x8192", "M": 16, "pct_floor": 40.0}
    rows = [
        {**row, "impl": "dense-fp16", "format": "dense", "time_ms": 0.06},
        {**row, "impl": "dense-bf16-graph", "format": "dense", "time_ms": 0.05},
        {**row, "impl": "torch-2:4-cusparselt-fp16", "format": "semi-structured", "time_ms": 1.2},
        {
            **row,
            "impl": "torch-2:4-cutlass-fp16-graph",
            "format": "semi-structured",
            "time_ms": 0.04,
        },
    ]
    lines = bench_sparse.gpu_targets(rows)
    assert lines[:2] == [
        "2:4 >= 1.2x dense fp16 on 8192x8192 at M >= 1024 (eager):",
        "  not measured",
    ]
    (line,) = lines[3:]
    assert line == (
        "8192x8192 M=16: eager 0.05x dense-fp16 (torch-2:4-cusparselt-fp16, 40% of its memory "
        "floor); graph 1.25x dense-bf16-graph (torch-2:4-cutlass-fp16-graph, 40% of its memory "
        "floor)"
    )


def test_int4_gpu_targets_are_ratios_of_the_rows():
    from torchslim.benchmarks import bench_int4

    names = [impl.name for impl in bench_int4.GPU_IMPLS]
    assert len(names) == len(set(names))
    assert {"fp16", "torch-int4pack-w4a16", "torchslim-w4a16-g128-cuda"} <= set(names)
    row = {"layer": "8192x8192", "M": 16}
    rows = [
        {**row, "impl": "fp16", "time_ms": 0.3, "pct_floor": 10.0},
        {**row, "impl": "torchslim-w4a16-g128-cuda", "time_ms": 0.1, "pct_floor": 60.0},
        {**row, "impl": "torchslim-w4a16-g128-triton", "time_ms": 0.15, "pct_floor": 40.0},
    ]
    (line,) = bench_int4.gpu_targets(rows)
    assert line == (
        "8192x8192 M=16: cuda 3.00x cuBLAS fp16 (60% of floor), "
        "triton 2.00x cuBLAS fp16 (40% of floor)"
    )


def test_demo_decode_rounds_interleave_and_subtract_the_first_token(monkeypatch):
    """decode_rounds times every generator once per round, in turn, and reports (time of n
    tokens - time of 1) / (n - 1): checked on a fake clock that each generator advances."""
    from torchslim import demo

    clock, calls = [0.0], []

    def generator(name, prefill, per_token):
        def generate(n):
            calls.append((name, n))
            clock[0] += prefill + per_token * n

        return generate

    monkeypatch.setattr(demo.time, "perf_counter", lambda: clock[0])
    ours, theirs = demo.decode_rounds(
        [generator("ours", 5.0, 2.0), generator("theirs", 1.0, 3.0)], new_tokens=8, repeats=3
    )
    assert ours == [2.0] * 3 and theirs == [3.0] * 3
    assert calls == [("ours", 1), ("ours", 8), ("theirs", 1), ("theirs", 8)] * 3


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["demo", "--configs", ""], "--configs: expected at least one"),
        (["demo", "--modes", ""], "--modes: expected some of"),
        (["demo", "--configs", "int4-g7"], "group_size must be -1 .* got 7"),
        (["demo", "--tokens", "16", "--prefill", "512"], "--prefill must be at most --tokens"),
        (["demo", "--decode", "2"], "--decode must be >= 8"),
        (["demo", "--model", "/nonexistent.gguf"], r"--model: /nonexistent\.gguf does not exist"),
        (["demo", "--out", "{file}"], "--out .*: File exists"),
        (["bench", "int8", "--out", "{file}"], "--out .*: File exists"),
        (["bench", "attention", "--out", "{file}/below"], "--out .*: Not a directory"),
        (["bench"], "the following arguments are required: family"),
    ],
)
def test_cli_errors_name_the_option_before_any_work(argv, match, tmp_path, capsys):
    from torchslim import cli

    file = tmp_path / "a_file"
    file.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([a.format(file=file) for a in argv])
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_bench_help_lists_the_families(capsys):
    from torchslim import cli

    assert cli.main(["bench", "--help"]) == 0
    assert "int8,int4,sparse,attention" in capsys.readouterr().out


def test_rotating_copies_are_capped():
    from torchslim.benchmarks import common

    made = []
    common.rotating(lambda: made.append(1), nbytes=1)
    assert len(made) == common.MAX_COPIES


def test_an_interrupted_run_keeps_the_rows_measured_so_far(capsys):
    from torchslim.benchmarks import common

    def measured():
        yield {"case": 1}
        yield {"case": 2}
        raise KeyboardInterrupt  # a time limit's SIGINT, mid-case

    assert common.collect(measured()) == [{"case": 1}, {"case": 2}]
    assert "keeping the 2 rows" in capsys.readouterr().err
