"""The benchmark harness runs end to end (quick mode) and writes its CSV with every baseline."""

from __future__ import annotations

import csv

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
    for r in rows:
        if r.get("time_ms"):
            assert float(r["time_ms"]) > 0 and float(r["pct_floor"]) > 0
            assert r["commit"] and r["torch"] and r["device"].startswith("cpu-")
    assert "targets:" in capsys.readouterr().out


@pytest.mark.skipif(_ext._C is None, reason="the benchmark compares the compiled kernels")
def test_bench_int4_quick(tmp_path, capsys):
    from torchslim.benchmarks import bench_int4

    assert bench_int4.main(["--quick", "--out", str(tmp_path), "--no-plot"]) == 0
    with open(tmp_path / "int4_cpu_quick.csv") as f:
        rows = list(csv.DictReader(f))
    impls = {r["impl"] for r in rows if r.get("time_ms")}
    assert {"fp32", "bf16", "torch-int4pack-w4a16", "torchslim-w4a16-g128"} <= impls
    assert "torchslim-w4a16-g32" in impls
    out = capsys.readouterr().out
    assert "targets:" in out and "x torch int4" in out


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
    assert (tmp_path / "attention_cpu_quick.png").exists()


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
