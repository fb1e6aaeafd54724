#!/usr/bin/env bash
# One command for a bare GPU machine: build the CUDA extension, run every test (GPU and CPU),
# run the GPU benchmarks, and leave logs and CSVs in OUT_DIR.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}

{
  nvidia-smi || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  lscpu | grep -E 'Model name|Flags' | cut -c1-400
} > "$out/env.log" 2>&1

status=0
echo "== build"
if ! python -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
  echo "build failed: see $out/build.log"; tail -40 "$out/build.log"; exit 1
fi
python -m torchslim.cli info | tee "$out/info.log"

echo "== tests"
python -m pytest -q -rs tests --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1 || status=1
tail -30 "$out/tests.log"

echo "== benchmarks"
python benchmarks/bench_quant.py --device cuda --out "$out" --no-plot > "$out/bench_int8_cuda.log" 2>&1 || status=1
tail -60 "$out/bench_int8_cuda.log"
exit $status
