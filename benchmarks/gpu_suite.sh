#!/usr/bin/env bash
# One command for a bare GPU machine, inside one time budget: build the CUDA extension, run the
# GPU tests, then the GPU benchmarks at the shapes the targets are read at, leaving a log per
# stage, the CSVs, junit XML and summary.txt in OUT_DIR.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [STAGE ...]
#
# Default stages, what only a GPU can show first:
#   build info tests-gpu bench-gpu-int4 bench-gpu-sparse bench-gpu-attention bench-gpu
# Optional: tests-gpu-all (the mixed files' CPU cases too), bench-cpu, tests-all.
# SUITE_BUDGET_S (default 540) caps the whole call: each stage gets the smaller of its own limit
# and what is left less a 20 s reserve, and is skipped when under MIN_STAGE_S (30) would remain.
# Each stage streams into OUT_DIR/<stage>.log and summary.txt gets a line as each stage ends, so
# a call cut off from outside still leaves every finished stage; a benchmark stopped by its
# limit (SIGINT) writes the rows it measured. SKIP_BUILD=1 reuses the extension already built
# in the tree (a second call on the same machine).
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_suite.sh OUT_DIR [STAGE ...]}")
shift
stages=${*:-build info tests-gpu bench-gpu-int4 bench-gpu-sparse bench-gpu-attention bench-gpu}
mkdir -p "$out"
cd "$(dirname "$0")/.."
start=$SECONDS
budget=${SUITE_BUDGET_S:-540}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Only the GPU in hand (the sm_80 / sm_90a pair is compile-checked by tests/test_cuda_compile.py).
arch=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))" 2>/dev/null)
[[ -n $arch ]] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
workers=${TEST_WORKERS:-$(nproc)}
xdist=()
python -c "import xdist" 2>/dev/null && xdist=(-n "$workers")
summary="$out/summary.txt"
: > "$summary"

{
  date -u
  git rev-parse HEAD 2>/dev/null
  git status --short | head -20
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} workers=$workers xdist=${xdist[*]:-none}"
  lscpu | grep -E 'Model name|^CPU\(s\)'
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# run_stage NAME SECONDS CMD...: CMD under min(SECONDS, the budget left), its output streamed to
# OUT_DIR/NAME.log; one line in summary.txt (exit status, seconds, pytest's last line).
run_stage() {
  local name=$1 want=$2
  shift 2
  local left=$((budget - (SECONDS - start) - 20)) t0=$SECONDS rc secs last
  secs=$((want < left ? want : left))
  if ((secs < ${MIN_STAGE_S:-30})); then
    printf '%-20s skipped (%d s of the budget left)\n' "$name" "$left" | tee -a "$summary"
    return 3
  fi
  echo "== $name (limit ${secs} s, $((SECONDS - start)) s into the suite)"
  timeout --signal=INT --kill-after=15 "$secs" "$@" > "$out/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL:-25}" "$out/$name.log"
  last=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$out/$name.log" | tail -1)
  printf '%-20s rc=%-3s %4d s  %s\n' "$name" "$rc" "$((SECONDS - t0))" "${last:0:110}" \
    | tee -a "$summary"
  return $rc
}

# The files with GPU cases. The CPU-level cases of the mixed files ("cpu-avx512", ...) are
# deselected: they need no GPU and were most of the first H100 run's tests.
GPU_TESTS=(tests/test_sparse_tc.py tests/test_triton_sparse.py tests/test_int8.py
  tests/test_triton_quant_matmul.py tests/test_int4_tc.py tests/test_triton_int4.py
  tests/test_int4.py tests/test_nn.py tests/test_compile.py tests/test_triton_attention.py
  tests/test_attention.py)
PYTEST=(python -m pytest -q -rfE -p no:cacheprovider "${xdist[@]}" --durations=15)

status=0
for stage in $stages; do
  case $stage in
    build)
      if [[ ${SKIP_BUILD:-0} != 1 ]] \
        && ! run_stage build 240 python -m pip install -v --no-build-isolation --no-deps -e .; then
        status=1  # without the extension the Triton stages still run (the CUDA C++ cases skip)
        run_stage install-python 60 env TORCHSLIM_NO_EXTENSION=1 \
          python -m pip install --no-build-isolation --no-deps -e . || exit 1
      fi
      ;;
    info) TAIL=45 run_stage info 60 python -m torchslim.cli info || status=1 ;;
    tests-gpu)
      run_stage tests-gpu "${TESTS_GPU_LIMIT:-240}" "${PYTEST[@]}" \
        --junitxml="$out/tests-gpu.xml" -k "not cpu-" "${GPU_TESTS[@]}" || status=1
      ;;
    tests-gpu-all)
      run_stage tests-gpu-all "${TESTS_GPU_LIMIT:-420}" "${PYTEST[@]}" \
        --junitxml="$out/tests-gpu-all.xml" "${GPU_TESTS[@]}" || status=1
      ;;
    bench-gpu-int4) # issue target: 8192^2, >= 3x cuBLAS fp16 at M <= 16, no slower at 128
      run_stage bench-gpu-int4 "${BENCH_GPU_LIMIT:-120}" python benchmarks/bench_int4.py \
        --device cuda --out "$out" --no-plot \
        ${BENCH_GPU_INT4_ARGS:---layers 8192x8192,4096x11008 --batch 1,16,128} || status=1
      ;;
    bench-gpu-sparse) # issue target: 8192^2 2:4 >= 1.2x dense fp16 at M >= 1024
      run_stage bench-gpu-sparse "${BENCH_GPU_LIMIT:-120}" python benchmarks/bench_sparse.py \
        --device cuda --out "$out" --no-plot \
        ${BENCH_GPU_SPARSE_ARGS:---layers 8192x8192 --batch 1,16,1024,4096 --sparsity 2:4,16x16@90} \
        || status=1
      ;;
    bench-gpu-attention) # issue target: forward >= 0.8x SDPA-flash at D = 128, S >= 4k
      run_stage bench-gpu-attention "${BENCH_GPU_LIMIT:-150}" python benchmarks/bench_attention.py \
        --device cuda --out "$out" --no-plot ${BENCH_GPU_ATTENTION_ARGS:-} || status=1
      ;;
    bench-gpu)
      run_stage bench-gpu "${BENCH_GPU_LIMIT:-120}" python benchmarks/bench_quant.py --device cuda \
        --out "$out" --no-plot ${BENCH_GPU_ARGS:---layers 4096x4096,8192x8192 --batch 1,16,1024} \
        || status=1
      ;;
    bench-cpu)
      run_stage bench-cpu "${BENCH_CPU_LIMIT:-200}" python benchmarks/bench_quant.py --device cpu \
        --out "$out/cpu" --no-plot ${BENCH_CPU_ARGS:---layers 4096x4096,11008x4096 --batch 1,512} \
        || status=1
      ;;
    tests-all)
      run_stage tests-all "${TESTS_ALL_LIMIT:-300}" "${PYTEST[@]}" --junitxml="$out/tests-all.xml" \
        tests || status=1
      ;;
    *)
      echo "unknown stage: $stage" >&2
      exit 2
      ;;
  esac
done
echo
echo "== summary ($((SECONDS - start)) s; logs, CSVs and junit XML in $out)"
cat "$summary"
ls "$out"/*.csv 2>/dev/null
exit $status
