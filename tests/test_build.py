"""Build facts: run-time ISA choice, the env override, info/CLI, and life without the extension."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import torchslim
from torchslim import _ext

needs_ext = pytest.mark.skipif(_ext._C is None, reason=f"extension not built: {_ext.load_error}")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )


@needs_ext
def test_best_isa_matches_cpu_features():
    features = _ext._C.cpu_features()
    best = _ext._C.best_isa()
    avx2 = all(features[f] for f in ("avx2", "fma", "f16c", "popcnt", "bmi1", "bmi2"))
    avx512 = avx2 and all(features[f] for f in ("avx512f", "avx512bw", "avx512vl", "avx512vnni"))
    amx = ("avx512bf16", "amx_tile", "amx_int8", "amx_bf16", "os_allows_tiles")
    if avx512 and all(features[f] for f in amx):
        assert best == "amx"
    elif avx512:
        assert best == "avx512"
    elif avx2:
        assert best == "avx2"
    else:
        assert best == "portable"
    assert _ext._C.supported_isas()[0] == "portable"
    assert _ext._C.supported_isas()[-1] == best


@needs_ext
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_env_var_lowers_the_isa(isa):
    if isa not in _ext._C.supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    done = _python("import torchslim._C as c; print(c.isa())", TORCHSLIM_CPU_ISA=isa)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == isa


@needs_ext
def test_env_var_rejects_unknown_or_unsupported_isa():
    done = _python("import torchslim", TORCHSLIM_CPU_ISA="sse9")
    assert done.returncode != 0 and "TORCHSLIM_CPU_ISA must be one of" in done.stderr
    if "avx512" not in _ext._C.supported_isas():
        done = _python("import torchslim", TORCHSLIM_CPU_ISA="avx512")
        assert done.returncode != 0 and "not supported by this CPU" in done.stderr


@needs_ext
def test_set_isa_errors_name_the_argument():
    with pytest.raises(ValueError, match="isa must be one of"):
        _ext._C.set_isa("neon")


def test_info_reports_every_backend():
    data = torchslim.info()
    assert set(data["backends"]) == {"cpu", "triton", "cuda", "reference"}
    for name, status in data["backends"].items():
        assert status == "available" or len(status) > 10, (name, status)  # or the reason
    assert "int8_dynamic_linear" in data["ops"]


def test_cli_info_json():
    done = subprocess.run(
        [sys.executable, "-m", "torchslim.cli", "info", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["torchslim"] == torchslim.__version__
    if _ext._C is not None:
        assert data["cpu_isa"] in ("portable", "avx2", "avx512", "amx")


def test_import_without_extension_uses_the_reference():
    code = """
import sys
sys.modules["torchslim._C"] = None  # as if the extension had not been built
import torch, torchslim
from torchslim import reference as ref
assert torchslim.info()["backends"]["cpu"] != "available"
x = torch.randn(3, 8); s = torch.rand(5) + .1
w = torch.randint(-127, 128, (5, 8), dtype=torch.int8)
assert torchslim.explain("int8_dynamic_linear", x, w, s)["backend"] == "reference"
assert torch.equal(torchslim.ops.int8_dynamic_linear(x, w, s), ref.int8_dynamic_linear(x, w, s))
print("ok")
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_readme_usage_example_runs(capsys):
    """The README's usage block is executed as written, so it stays true."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["y"].shape == (8, 4096)
    assert "backend" in capsys.readouterr().out


def test_readme_sparse_example_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    code = next(b for b in blocks if "torchslim.sparse as sp" in b)
    scope: dict = {}
    exec(compile("import torch\nimport torchslim\n" + code, "README.md", "exec"), scope)
    assert scope["y"].shape == (8, 64) and scope["yb"].shape == (8, 512)
    assert scope["sp"].sparsity(scope["model"][0].weight) == 0.5


def test_ci_runs_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ci = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci and ci in (root / "README.md").read_text()
