#!/usr/bin/env bash
# GPU validation: on a machine with an NVIDIA GPU and its own torch/triton (no network), build
# the extension, run the CUDA and Triton tests, the correctness sweep (benchmarks/gpu_correctness.py: every
# op x backend x dtype against the fp64 reference, pass/fail against stated tolerances), compute-sanitizer
# memcheck on its small shapes where the tool exists, the GPU benchmarks and benchmarks/gpu_attention.py
# (timings vs SDPA, bandwidth vs a measured copy); logs, CSV and JSON go to the folder given as first
# argument (default ./gpu_results), with OUT/gpu_check.json gathering everything and a one-screen summary
# printed last. Every step is time-bounded and the whole run stays under an 8-minute budget. Exits non-zero
# on any correctness failure (a failed test, correctness row or sanitizer run).
#
#   bash benchmarks/gpu_check.sh [OUT] [--dry-run] [--quick]
#
# --dry-run runs the same steps on the CPU at tiny sizes (Triton in the interpreter; the build is an
# incremental in-place build_ext instead of pip install), to prove the script on a machine without a GPU.
# --quick (with --dry-run, as CI runs it) skips the build, test and benchmark-suite steps.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

OUT=./gpu_results
DRY=0
QUICK=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) OUT=$a ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
STEPS="$OUT/steps.csv"
echo "step,rc,seconds,log" > "$STEPS"

# step NAME LIMIT_S CMD...: run CMD under `timeout`, never past the overall budget; log to OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped (time budget spent)"
    echo "$name,budget,0,$name.log" >> "$STEPS"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0))
  tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
  [ "$rc" -eq 124 ] && echo "   timed out after ${limit}s"
  echo "$name,$rc,$dt,$name.log" >> "$STEPS"
}

# 1. Environment.
{
  date -Iseconds
  uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  git -C "$ROOT" rev-parse HEAD 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  [ "$QUICK" = 1 ] || step build 300 "$PY" setup.py build_ext --inplace
else
  # Only the local GPU's architecture: the full sm_80;sm_90 build is CI's job.
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  step build 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi

# 2. Tests: the CUDA ones (skipped without a GPU), then every Triton test file.
if [ "$QUICK" = 0 ]; then
  step tests_cuda 120 "$PY" -m pytest -m cuda -q -ra -p no:cacheprovider tests
  triton_tests=$(ls tests/test_*triton*.py 2>/dev/null)
  if [ -n "$triton_tests" ]; then
    # shellcheck disable=SC2086
    step tests_triton 90 "$PY" -m pytest -q -ra -p no:cacheprovider $triton_tests
  fi
fi

# 3. Correctness: every op x backend x dtype against the fp64 reference (small shapes only in a dry run),
#    then compute-sanitizer memcheck over the small shapes where the tool exists (GPU only).
small=""
[ "$DRY" = 1 ] && small=--small
step correctness 150 "$PY" benchmarks/gpu_correctness.py $small --out "$OUT/gpu_correctness.json"
if [ "$DRY" = 0 ] && command -v compute-sanitizer >/dev/null; then
  step sanitizer 120 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/gpu_correctness.py \
    --small --out "$OUT/sanitizer_correctness.json"
else
  echo "== sanitizer: skipped ($([ "$DRY" = 1 ] && echo "dry run" || echo "compute-sanitizer not found"))"
  echo "sanitizer,skipped,0,sanitizer.log" >> "$STEPS"
fi

# 4. The benchmark suite (every scenario: ops, training step, generation with CUDA graphs on and off) in
#    bf16 and fp32, through the same runner as the CPU default; CSV, JSON and plots per dtype.
if [ "$QUICK" = 1 ]; then
  :
elif [ "$DRY" = 1 ]; then
  step suite_fp32 240 "$PY" -m coconut_kernels.bench --quick --device cpu --out "$OUT/suite_fp32"
else
  step suite_bf16 200 "$PY" -m coconut_kernels.bench --device cuda --dtype bfloat16 --out "$OUT/suite_bf16"
  step suite_fp32 150 "$PY" -m coconut_kernels.bench --device cuda --dtype float32 --scenario latent_attention \
    --scenario train_step --scenario generate --out "$OUT/suite_fp32"
fi

# 5. Ceilings, decode and multi-pass attention: timings vs SDPA, bandwidth as a fraction of a measured copy.
if [ "$DRY" = 1 ]; then
  step gpu_attention 180 "$PY" benchmarks/gpu_attention.py --out "$OUT" --dry-run
else
  step gpu_attention 180 "$PY" benchmarks/gpu_attention.py --out "$OUT"
fi

# Summary last: the benchmark tables, then gpu_check.json and its one-screen summary, whose status is the exit
# status (non-zero on any correctness failure; a missed performance target shows in the steps table).
echo
for suite in "$OUT"/suite_*.log; do
  [ -f "$suite" ] && { echo; echo "== $(basename "$suite" .log)"; sed -n '/^## /,$p' "$suite" | head -40; }
done
if [ -f "$OUT/gpu_attention.log" ]; then
  echo
  sed -n '/^== summary/,$p' "$OUT/gpu_attention.log"
fi
echo "(logs in $OUT; total $(($(date +%s) - START))s)"
"$PY" benchmarks/gpu_correctness.py --summarize "$OUT"
