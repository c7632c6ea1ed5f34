#!/usr/bin/env bash
# One prepared GPU run (H200: Python 3.12, torch 2.11 + CUDA 13, triton 3.6, nvcc 13;
# nothing downloadable): build, GPU tests, op tests on cuda, quick kernel benchmark.
#
#   bash bench/gpu_check.sh            # from the repository root; ends within 8 minutes
#
# Every step runs under `timeout`, capped by what is left of the overall deadline, and
# the script goes on past a failing step. Full logs and the benchmark JSON land in
# bench/results/gpu-<timestamp>/ (copy that folder out); a summary table with each
# step's exit code is printed last and saved as summary.tsv there.
#
# Adding a step: one `step NAME TIMEOUT_S 'COMMAND'` line in the list below. Steps run
# in order, in the repository root, with $LOG_DIR pointing at the results folder.
set -u

cd "$(dirname "$0")/.."
DEADLINE_S=${DEADLINE_S:-465}          # the whole script, leaving slack under 8 minutes
STAMP=$(date -u +%Y%m%d-%H%M%S)
export LOG_DIR=${LOG_DIR:-bench/results/gpu-$STAMP}
mkdir -p "$LOG_DIR"
PY=${PYTHON:-python}
START=$(date +%s)

STEP_NAMES=()
STEP_TIMEOUTS=()
STEP_CMDS=()
step() { STEP_NAMES+=("$1"); STEP_TIMEOUTS+=("$2"); STEP_CMDS+=("$3"); }

# --- the steps -------------------------------------------------------------------------
step env 20 "nvidia-smi; $PY - <<'EOF'
import sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except ImportError as e:
    print('triton missing:', e)
print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
EOF
nvcc --version | tail -2; git log --oneline -1"
step build 150 "$PY -m pip install --no-build-isolation --no-deps -e . "
step build_info 30 "$PY -c 'import tunecomp_kernels as t, json; print(json.dumps(t.build_info(), indent=1, default=str)); print(\"backends:\", t.available_backends())'"
# CUDA backend: every CUDA kernel (forward fused/split/decode, backward) x dtype against
# float64; writes tunecomp_kernels/ops/cuda_verified.json ("auto" only picks kernels that
# passed on this GPU) and copies it into $LOG_DIR. Runs early so the deadline never skips it.
step cuda_verify 100 "$PY -m bench.cuda_verify --out-dir \"\$LOG_DIR\""
# compute-sanitizer memcheck of one tiny case per CUDA kernel and dtype (tunecomp kernels
# only are instrumented); skipped where compute-sanitizer is not installed.
step cuda_memcheck 90 "CS=\$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null); if [ -z \"\$CS\" ]; then echo 'compute-sanitizer not found: skipped'; exit 0; fi; \"\$CS\" --tool memcheck --kernel-name kns=mlr --error-exitcode 99 $PY -m bench.cuda_verify --memcheck-case"
# Correctness runs use each kernel's default config (no autotuning) to fit the time box.
step pytest_gpu 110 "TUNECOMP_TRITON_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider -m gpu tests/ -x --durations=10"
step pytest_ops_cuda 70 "TUNECOMP_TRITON_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider -m 'not gpu' tests/ops/test_triton.py tests/ops/test_op.py tests/ops/test_registration.py"
# The benchmark autotunes over the first 4 configs of each table (its first calls
# compile and time them); a run without the cap tunes over all of them.
step bench_kernels 150 "TUNECOMP_TRITON_MAX_CONFIGS=4 $PY -m bench.kernels --device cuda --quick --out \"\$LOG_DIR\""
# Best effort if time is left: shared-memory races and barrier misuse in the CUDA kernels,
# then CUDA vs Triton timed per benchmark shape -> tunecomp_kernels/ops/backend_choice.json.
step cuda_racecheck 120 "CS=\$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null); if [ -z \"\$CS\" ]; then echo 'compute-sanitizer not found: skipped'; exit 0; fi; rc=0; for tool in racecheck synccheck; do echo \"== \$tool\"; \"\$CS\" --tool \$tool --kernel-name kns=mlr --error-exitcode 99 $PY -m bench.cuda_verify --memcheck-case || rc=1; done; exit \$rc"
step cuda_choose 120 "$PY -m bench.cuda_verify --choose-only --out-dir \"\$LOG_DIR\""

# --- runner ----------------------------------------------------------------------------
RCS=()
SECS=()
for i in "${!STEP_NAMES[@]}"; do
    name=${STEP_NAMES[$i]}
    left=$(( DEADLINE_S - ($(date +%s) - START) ))
    limit=${STEP_TIMEOUTS[$i]}
    (( left < limit )) && limit=$left
    log="$LOG_DIR/$(printf '%02d' "$i")-$name.log"
    if (( left < 5 )); then
        echo "[$name] skipped: overall deadline reached" | tee "$log"
        RCS+=("skip"); SECS+=(0); continue
    fi
    echo "[$name] timeout ${limit}s -> $log"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c "${STEP_CMDS[$i]}" > "$log" 2>&1
    rc=$?
    RCS+=("$rc"); SECS+=($(( $(date +%s) - t0 )))
    (( rc == 124 || rc == 137 )) && echo "[$name] TIMED OUT after ${limit}s" >> "$log"
    tail -n 3 "$log" | sed "s/^/    /"
done

{
    printf 'step\texit\tseconds\n'
    for i in "${!STEP_NAMES[@]}"; do
        printf '%s\t%s\t%s\n' "${STEP_NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}"
    done
} > "$LOG_DIR/summary.tsv"

echo
echo "=== gpu_check summary ($(( $(date +%s) - START )) s, logs in $LOG_DIR) ==="
column -t -s $'\t' "$LOG_DIR/summary.tsv" 2>/dev/null || cat "$LOG_DIR/summary.tsv"
# Non-zero when any step failed, so a caller can tell at a glance.
for rc in "${RCS[@]}"; do [[ "$rc" == 0 ]] || exit 1; done
exit 0
