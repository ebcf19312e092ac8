#!/usr/bin/env bash
# The GPU check in one call, with a verdict. Uses the machine's own Python, torch and triton
# (nothing beyond torch is needed; pytest is not used) and installs nothing.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--stages LIST]
#
# Stages, each with its own time limit (together under 9 minutes):
#   preflight    GPU name and free memory, python/torch/triton/CUDA versions, nvcc vs torch's CUDA
#   build        the CUDA extension in place (a failure leaves the Triton checks running)
#   correctness  every op and gradient against the reference (benchmarks/gpu_check.py)
#   compile      torch.compile(fullgraph=True) per op family, forward and backward, vs eager
#   sanitizer    compute-sanitizer memcheck on tiny shapes (skipped when the tool is absent)
#   bench        a short benchmark: pattern and large scales, a few ops under torch.compile
#   summary      the benchmark table
# The last line is "GPU CHECK PASS" or "GPU CHECK FAIL (<stages>)"; logs go to DIR
# (default: $OUT, else ./gpu_check_out).
#
# --dry-run runs here what needs no GPU: preflight (which reports the missing GPU), the
# correctness check list on CPU tensors (compiled CPU kernels, Triton under its interpreter),
# the compile check list, the benchmark command lines on CPU at tiny sizes (the reference only;
# torch.compile of it is left out), and the summary,
# ending with "GPU CHECK DRY RUN PASS|FAIL (...)".
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
DRY_RUN=0
OUT_DIR=${OUT:-gpu_check_out}
STAGES=preflight,build,correctness,compile,sanitizer,bench,summary
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) [ $# -ge 2 ] || { echo "--out needs a folder" >&2; exit 2; }; OUT_DIR=$2; shift ;;
    --out=*) OUT_DIR=${1#--out=} ;;
    --stages) [ $# -ge 2 ] || { echo "--stages needs a comma list" >&2; exit 2; }; STAGES=$2; shift ;;
    --stages=*) STAGES=${1#--stages=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for s in ${STAGES//,/ }; do
  case "$s" in preflight|build|correctness|compile|sanitizer|bench|summary) ;;
    *) echo "unknown stage: $s (stages: preflight,build,correctness,compile,sanitizer,bench,summary)" >&2; exit 2 ;;
  esac
done
wanted() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# A plugin installed without its dependencies must not break a pytest run started from here.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}

# Seconds per stage: 25 + 140 + 170 + 100 + 30 + 55 + 10 = 530, under 9 minutes. Correctness
# pays for about 180 Triton JIT compiles, compile for 8 inductor compilations (4 per provider).
T_PREFLIGHT=${GPU_CHECK_T_PREFLIGHT:-25}
T_BUILD=${GPU_CHECK_T_BUILD:-140}
T_CORRECTNESS=${GPU_CHECK_T_CORRECTNESS:-170}
T_COMPILE=${GPU_CHECK_T_COMPILE:-100}
T_SANITIZER=${GPU_CHECK_T_SANITIZER:-30}
T_BENCH=${GPU_CHECK_T_BENCH:-55}
T_SUMMARY=${GPU_CHECK_T_SUMMARY:-10}

# lps_fast.kernels is the kernels/ folder (setup.py maps it); link it into the package so that
# this checkout's kernels are imported, not those of an installed copy.
LINKED=0
if [ ! -e lps_fast/kernels ]; then
  ln -s ../kernels lps_fast/kernels && LINKED=1
fi
cleanup() { [ "$LINKED" = 1 ] && rm -f lps_fast/kernels; }
trap cleanup EXIT

FAILED=()
stamp() { echo "== $(date +%T) $*"; }

# run_stage NAME LIMIT COMMAND...: runs the command under a time limit, its output in
# OUT_DIR/NAME.log; prints the check lines that failed (or the log's tail) and a count.
run_stage() {
  local name=$1 limit=$2
  shift 2
  stamp "$name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local passed failed
  passed=$(grep -c '^PASS' "$OUT_DIR/$name.log")
  failed=$(grep -c '^FAIL' "$OUT_DIR/$name.log")
  grep -E '^(FAIL|INFO)' "$OUT_DIR/$name.log" | head -40
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    tail -5 "$OUT_DIR/$name.log"
    FAILED+=("$name: timeout after ${limit}s")
  elif [ "$rc" -ne 0 ]; then
    [ "$failed" -eq 0 ] && tail -25 "$OUT_DIR/$name.log"
    FAILED+=("$name")
  fi
  echo "   $name: rc=$rc, $passed passed, $failed failed (log: $OUT_DIR/$name.log)"
  return "$rc"
}

# bench_commands DEVICE EXTRA...: the benchmark command lines, one per line.
bench_commands() {
  local device=$1
  shift
  local family providers=reference,triton,cuda
  [ "$device" = cpu ] && providers=reference,cpp
  for family in permute sinkhorn frame gram_schmidt; do
    echo "benchmarks/bench_$family.py --device $device --providers $providers --modes fwd,full --scales pattern,large --budget 0.1 --no-memory --quiet --out $OUT_DIR/$family.jsonl $*"
  done
  # torch.compile of the reference takes minutes per shape on a CPU: GPU only
  [ "$device" = cpu ] && return
  echo "benchmarks/bench_sinkhorn.py --device $device --providers reference+compile --modes fwd,full --scales pattern --cases sinkhorn_sort --budget 0.1 --no-memory --quiet --out $OUT_DIR/sinkhorn.jsonl $*"
  echo "benchmarks/bench_permute.py --device $device --providers reference+compile --modes fwd,full --scales pattern --cases permute_edges --budget 0.1 --no-memory --quiet --out $OUT_DIR/permute.jsonl $*"
}

# run_bench DEVICE EXTRA...: every benchmark command, sharing one deadline; a failed agreement
# gate makes the scripts exit non-zero.
run_bench() {
  local status=0 line
  while IFS= read -r line; do
    echo "\$ $PY $line"
    # shellcheck disable=SC2086
    if $PY $line; then echo "PASS bench: ${line%% --*}"; else echo "FAIL bench: $line"; status=1; fi
  done < <(bench_commands "$@")
  return $status
}

# The benchmark table, from the rows the bench stage appended.
summary() {
  if compgen -G "$OUT_DIR/*.jsonl" > /dev/null; then
    run_stage summary "$T_SUMMARY" bash -c "$PY benchmarks/gpu_summary.py $OUT_DIR/*.jsonl"
    cat "$OUT_DIR/summary.log"
  else
    echo "== summary: no benchmark rows"
  fi
}

# verdict LABEL PASS_NOTE: the last line, and the exit status.
verdict() {
  if [ ${#FAILED[@]} -eq 0 ]; then
    echo "$1 PASS$2"
    exit 0
  fi
  echo "$1 FAIL ($(IFS=,; echo "${FAILED[*]}" | sed 's/,/, /g'))"
  exit 1
}

if [ "$DRY_RUN" = 1 ]; then
  stamp "DRY RUN: no GPU is used; stages that need one are listed, not run"
  # Triton's interpreter and a small shared CPU are slower than the GPU the limits are made for.
  T_CORRECTNESS=${GPU_CHECK_T_CORRECTNESS:-400}
  T_BENCH=${GPU_CHECK_T_BENCH:-200}
  rm -f "$OUT_DIR"/*.jsonl
  export TRITON_INTERPRET=1  # Triton kernels on CPU tensors (read before triton is imported)
  if wanted preflight; then
    run_stage preflight "$T_PREFLIGHT" "$PY" benchmarks/gpu_check.py preflight
    grep -E '^(PASS|SKIP)' "$OUT_DIR/preflight.log"
  fi
  wanted build && echo "== build: skipped in a dry run (LPS_FAST_FORCE_CUDA=1 $PY setup.py -q build_ext --inplace)"
  wanted correctness && run_stage correctness "$T_CORRECTNESS" \
    "$PY" benchmarks/gpu_check.py correctness --device cpu --providers cpp,triton --quick
  wanted compile && run_stage compile "$T_COMPILE" \
    "$PY" benchmarks/gpu_check.py compile --device cpu --providers cpp,triton --list
  wanted sanitizer && echo "== sanitizer: skipped in a dry run ($(command -v compute-sanitizer || echo 'compute-sanitizer not found'))"
  # The GPU's command lines at tiny CPU sizes: parses every argument and runs every gate.
  wanted bench && run_stage bench "$T_BENCH" env LPS_FAST_NO_TRITON=1 bash -c \
    "$(declare -f bench_commands run_bench); PY=$PY OUT_DIR=$OUT_DIR; run_bench cpu --quick"
  wanted summary && summary
  verdict "GPU CHECK DRY RUN" " (no GPU used: build, compile, sanitizer and GPU benchmarks not run)"
fi

# ---- the real run
rm -f "$OUT_DIR"/*.jsonl
PROVIDERS=triton
if wanted preflight; then
  run_stage preflight "$T_PREFLIGHT" bash -c \
    "nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv 2>&1; \
     $PY benchmarks/gpu_check.py preflight --require-gpu"
  grep -E '^(PASS|SKIP)' "$OUT_DIR/preflight.log"
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" 2>/dev/null || echo 9.0)
fi
export TORCH_CUDA_ARCH_LIST
if wanted build; then
  if run_stage build "$T_BUILD" env LPS_FAST_FORCE_CUDA=1 "$PY" setup.py -q build_ext --inplace; then
    PROVIDERS=cuda,triton
    $PY -m lps_fast.cli info > "$OUT_DIR/backend_info.txt" 2>&1
  else
    echo "   the CUDA extension did not build: checking Triton alone"
  fi
elif ls lps_fast/_C_cuda*.so > /dev/null 2>&1; then
  PROVIDERS=cuda,triton
fi
wanted correctness && run_stage correctness "$T_CORRECTNESS" \
  "$PY" benchmarks/gpu_check.py correctness --device cuda --providers "$PROVIDERS"
wanted compile && run_stage compile "$T_COMPILE" \
  "$PY" benchmarks/gpu_check.py compile --device cuda --providers "$PROVIDERS"
if wanted sanitizer; then
  if command -v compute-sanitizer > /dev/null 2>&1; then
    run_stage sanitizer "$T_SANITIZER" compute-sanitizer --tool memcheck --error-exitcode 1 \
      "$PY" benchmarks/gpu_check.py correctness --device cuda --providers "${PROVIDERS%%,*}" --small
  else
    echo "== sanitizer: compute-sanitizer not found, skipped"
  fi
fi
wanted bench && run_stage bench "$T_BENCH" bash -c \
  "$(declare -f bench_commands run_bench); PY=$PY OUT_DIR=$OUT_DIR; run_bench cuda"
wanted summary && summary
verdict "GPU CHECK" ""
