#!/usr/bin/env bash
# One command for a bare GPU machine: build the CUDA extension, run the GPU tests, the GPU
# benchmarks, the CPU benchmarks of the host (often an AVX-512 VNNI CPU) and the rest of the
# tests, leaving one log and the CSVs in OUT_DIR. Every stage has a time limit, so a hang in
# one still leaves the others' results.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [STAGE ...]
#
# Stages (default: all, in this order): build tests-gpu bench-gpu bench-gpu-int4
# bench-gpu-attention bench-gpu-sparse bench-cpu tests-all.
# A prebuilt extension (python/torchslim/_C.cpython-*.so built with CUDA for this Python) is
# reused when SKIP_BUILD=1; the build copies the one it makes to OUT_DIR for that purpose.
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_suite.sh OUT_DIR [STAGE ...]}")
shift
stages=${*:-build tests-gpu bench-gpu bench-gpu-int4 bench-gpu-attention bench-gpu-sparse bench-cpu tests-all}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Only the GPU in hand (the sm_80 / sm_90a pair is compile-checked by tests/test_cuda_compile.py).
arch=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
log="$out/suite.log"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  lscpu | grep -E 'Model name|^CPU\(s\)' ; grep -o -w -E 'avx512_vnni|avx512_bf16|avx_vnni|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
} > "$log" 2>&1
cat "$log"

# run_stage NAME SECONDS CMD...: runs CMD under a time limit, appends its output to the log,
# prints its tail and returns its status.
run_stage() {
  local name=$1 secs=$2
  shift 2
  local t0=$SECONDS rc
  echo "== $name (limit ${secs} s)" | tee -a "$log"
  timeout --signal=INT --kill-after=20 "$secs" "$@" > "$out/.stage" 2>&1
  rc=$?
  cat "$out/.stage" >> "$log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  tail -n "${TAIL:-30}" "$out/.stage"
  rm -f "$out/.stage"
  return $rc
}

status=0
for stage in $stages; do
  case $stage in
    build)
      if [[ ${SKIP_BUILD:-0} == 1 ]]; then
        run_stage install 120 env TORCHSLIM_NO_EXTENSION=1 \
          python -m pip install --no-build-isolation --no-deps -e . || exit 1
      else
        run_stage build 420 python -m pip install -v --no-build-isolation --no-deps -e . || exit 1
        cp python/torchslim/_C.cpython-*.so "$out/" || true
      fi
      TAIL=40 run_stage info 60 python -m torchslim.cli info || status=1
      ;;
    tests-gpu)
      run_stage tests-gpu "${TESTS_GPU_LIMIT:-420}" python -m pytest -q -rfEs -p no:cacheprovider \
        -n "${TEST_WORKERS:-8}" tests/test_int8.py tests/test_triton_quant_matmul.py \
        tests/test_int4_tc.py tests/test_triton_int4.py tests/test_int4.py \
        tests/test_nn.py tests/test_compile.py tests/test_triton_attention.py \
        tests/test_attention.py tests/test_triton_sparse.py tests/test_sparse_tc.py || status=1
      ;;
    bench-gpu)
      run_stage bench-gpu "${BENCH_GPU_LIMIT:-300}" python benchmarks/bench_quant.py --device cuda \
        --out "$out" --no-plot ${BENCH_GPU_ARGS:-} || status=1
      ;;
    bench-gpu-int4)
      run_stage bench-gpu-int4 "${BENCH_GPU_LIMIT:-300}" python benchmarks/bench_int4.py \
        --device cuda --out "$out" --no-plot ${BENCH_GPU_INT4_ARGS:-} || status=1
      ;;
    bench-gpu-attention)
      run_stage bench-gpu-attention "${BENCH_GPU_LIMIT:-300}" python benchmarks/bench_attention.py \
        --device cuda --out "$out" --no-plot ${BENCH_GPU_ATTENTION_ARGS:-} || status=1
      ;;
    bench-gpu-sparse)
      run_stage bench-gpu-sparse "${BENCH_GPU_LIMIT:-300}" python benchmarks/bench_sparse.py \
        --device cuda --out "$out" --no-plot ${BENCH_GPU_SPARSE_ARGS:-} || status=1
      ;;
    bench-cpu)
      run_stage bench-cpu "${BENCH_CPU_LIMIT:-200}" python benchmarks/bench_quant.py --device cpu \
        --out "$out/cpu" --no-plot ${BENCH_CPU_ARGS:---layers 4096x4096,11008x4096 --batch 1,512} \
        || status=1
      ;;
    tests-all)
      run_stage tests-all "${TESTS_ALL_LIMIT:-300}" python -m pytest -q -rfEs -p no:cacheprovider \
        -n "${TEST_WORKERS:-8}" tests || status=1
      ;;
    *)
      echo "unknown stage: $stage" >&2
      exit 2
      ;;
  esac
done
exit $status
