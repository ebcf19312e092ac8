#!/usr/bin/env bash
# The GPU check in one call: build the extension on this (fresh) GPU machine, run the CUDA
# agreement tests for every dtype, then benchmark every op with the providers reference,
# reference+compile, triton and cuda at the paper's scales and at a large scale, and print a
# compact table last. Uses the machine's own Python, torch and triton; installs nothing.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_out)
#
# Budget: about 8 minutes on an H100 (build ~2, tests ~2, benchmarks ~4). Switches:
#   GPU_CHECK_SKIP_TESTS=1   skip the agreement tests
#   GPU_CHECK_BENCH_BUDGET   seconds of timed calls per measurement (default 0.3)
#   GPU_CHECK_COMPILE_SCALES scales that also time torch.compile(reference) (default pattern,large)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
BUDGET=${GPU_CHECK_BENCH_BUDGET:-0.3}
COMPILE_SCALES=${GPU_CHECK_COMPILE_SCALES:-pattern,large}
status=0
stamp() { echo "== $(date +%T) $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT_DIR/gpu.txt"
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())" \
  | tee -a "$OUT_DIR/gpu.txt"

stamp "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
# Register the package (lps_fast.kernels lives in kernels/); fall back to a link if pip cannot.
if ! LPS_FAST_NO_EXTENSION=1 $PY -m pip install --no-build-isolation --no-deps --no-index -q -e . > "$OUT_DIR/install.log" 2>&1; then
  echo "pip install -e failed (see install.log); linking kernels/ into the package instead"
  ln -sfn ../kernels lps_fast/kernels
fi
if ! LPS_FAST_FORCE_CUDA=1 $PY setup.py -q build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
  tail -40 "$OUT_DIR/build.log"
  echo "BUILD FAILED"
  exit 1
fi
$PY -m lps_fast.cli info | tee "$OUT_DIR/backend_info.txt"

if [ "${GPU_CHECK_SKIP_TESTS:-0}" != "1" ]; then
  stamp "agreement tests on CUDA (float32, bfloat16, float16)"
  $PY -m pytest tests/test_gpu.py -q -p no:cacheprovider -o addopts="" > "$OUT_DIR/tests.log" 2>&1
  test_status=$?
  tail -25 "$OUT_DIR/tests.log"
  [ $test_status -eq 0 ] || { echo "AGREEMENT TESTS FAILED"; status=1; }
fi

stamp "benchmarks"
# Fast providers everywhere; torch.compile(reference) costs a compile per shape, so it is timed
# at the scales in COMPILE_SCALES only.
for family in permute frame sinkhorn gram_schmidt; do
  $PY benchmarks/bench_$family.py --device cuda --providers reference,triton,cuda --modes fwd,full \
    --scales pattern,exp,nbody,large --budget "$BUDGET" --out "$OUT_DIR/$family.jsonl" --quiet \
    > "$OUT_DIR/bench_$family.log" 2>&1 || { tail -20 "$OUT_DIR/bench_$family.log"; status=1; }
  $PY benchmarks/bench_$family.py --device cuda --providers reference+compile --modes fwd,full \
    --scales "$COMPILE_SCALES" --budget "$BUDGET" --no-memory --out "$OUT_DIR/$family.jsonl" --quiet \
    > "$OUT_DIR/bench_${family}_compile.log" 2>&1 || { tail -20 "$OUT_DIR/bench_${family}_compile.log"; status=1; }
done

stamp "summary"
$PY benchmarks/gpu_summary.py "$OUT_DIR"/*.jsonl | tee "$OUT_DIR/summary.txt"
exit $status
