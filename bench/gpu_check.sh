#!/usr/bin/env bash
# One prepared GPU run (H200: Python 3.12, torch 2.11 + CUDA 13, triton 3.6, nvcc 13;
# nothing downloadable). In order of importance: build; every CUDA kernel x dtype against
# float64; `pytest -m gpu`; the quick kernel benchmark; the CUDA-vs-Triton choice; then,
# if time is left, compute-sanitizer and the backend op tests on cuda.
#
#   bash bench/gpu_check.sh            # from the repository root; ends within ~7 minutes
#
# Every step runs under `timeout`, capped by what is left of the overall deadline, and
# the script goes on past a failing step. Each step's log is written as it runs
# (unbuffered) to bench/results/gpu-<timestamp>/NN-<step>.log, next to the JSON the steps
# write (copy that folder out); summary.tsv there gets each step's exit code and seconds
# as soon as the step ends, and is printed last.
#
# Adding a step: one `step NAME TIMEOUT_S 'COMMAND'` line in the list below. Steps run
# in order, in the repository root, with $LOG_DIR pointing at the results folder.
set -u

cd "$(dirname "$0")/.."
DEADLINE_S=${DEADLINE_S:-420}          # the whole script: 60 s of slack under 8 minutes
STAMP=$(date -u +%Y%m%d-%H%M%S)
export LOG_DIR=${LOG_DIR:-bench/results/gpu-$STAMP}
mkdir -p "$LOG_DIR"
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1              # logs fill as the steps print
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
NVCC=\$(command -v nvcc || echo /usr/local/cuda/bin/nvcc); \"\$NVCC\" --version | tail -2
git log --oneline -1 2>/dev/null || echo 'no git metadata in this copy'"
# Fails when the CUDA kernels cannot be built (rather than installing CPU-only); on an
# sm_90 GPU only sm_90a is compiled (the sm_80 build is checked in CI), halving nvcc time.
step build 150 "CAP=\$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .); [ \"\$CAP\" = 90 ] && export TUNECOMP_CUDA_ARCHS=\${TUNECOMP_CUDA_ARCHS:-90a}; echo \"TUNECOMP_CUDA_ARCHS=\${TUNECOMP_CUDA_ARCHS:-default}\"; TUNECOMP_REQUIRE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e ."
step build_info 20 "$PY -c 'import tunecomp_kernels as t, json; print(json.dumps(t.build_info(), indent=1, default=str)); print(\"backends:\", t.available_backends())'"
# CUDA backend: every CUDA kernel (forward fused/split/decode, backward) x dtype against
# float64; writes tunecomp_kernels/ops/cuda_verified.json ("auto" only picks kernels that
# passed on this GPU) and copies it into $LOG_DIR. Runs early so the deadline never skips it.
step cuda_verify 90 "$PY -m bench.cuda_verify --out-dir \"\$LOG_DIR\""
# The GPU tests (fp32, fp16 and bf16; Triton and CUDA backends), from the test files that
# hold them: collecting all of tests/ would import optional packages this machine lacks.
# No -x: every failure is listed. Each kernel runs its default config (no autotuning).
# The torch.compile tests (slow cold starts) run last, so a timeout cuts only them.
step pytest_gpu 120 "F=\$(grep -rl --include='test_*.py' 'pytest.mark.gpu' tests | sort); export TUNECOMP_TRITON_AUTOTUNE=0; rc=0; $PY -m pytest -q -p no:cacheprovider -rfE --durations=10 -m gpu -k 'not compile' \$F || rc=1; $PY -m pytest -q -p no:cacheprovider -rfE -m gpu -k compile \$F || rc=1; exit \$rc"
# The benchmark autotunes over the first 4 configs of each table (its first calls
# compile and time them); a run without the cap tunes over all of them.
step bench_kernels 120 "TUNECOMP_TRITON_MAX_CONFIGS=4 $PY -m bench.kernels --device cuda --quick --out \"\$LOG_DIR\""
# CUDA vs Triton timed per benchmark shape (fp16, bf16) -> ops/backend_choice.json, copied
# into $LOG_DIR; Triton tuned over the same 4 configs as above (their compiles are cached).
step cuda_choose 100 "TUNECOMP_TRITON_MAX_CONFIGS=4 $PY -m bench.cuda_verify --choose-only --out-dir \"\$LOG_DIR\""
# Best effort if time is left: compute-sanitizer memcheck, the backend op tests on cuda
# (with the bf16/fp16 teacher next to fp32 x, which no GPU test covers yet),
# then shared-memory races and barrier misuse in the CUDA kernels.
# compute-sanitizer memcheck of one tiny case per CUDA kernel and dtype (tunecomp kernels
# only are instrumented); skipped where compute-sanitizer is not installed.
step cuda_memcheck 60 "CS=\$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null); if [ -z \"\$CS\" ]; then echo 'compute-sanitizer not found: skipped'; exit 0; fi; \"\$CS\" --tool memcheck --kernel-name kns=mlr --error-exitcode 99 $PY -m bench.cuda_verify --memcheck-case"
step pytest_ops_cuda 60 "TUNECOMP_TRITON_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider -rfE -m 'not gpu' tests/ops/test_triton.py tests/ops/test_op.py tests/ops/test_registration.py tests/ops/test_reduced_teacher.py"
step cuda_racecheck 90 "CS=\$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null); if [ -z \"\$CS\" ]; then echo 'compute-sanitizer not found: skipped'; exit 0; fi; rc=0; for tool in racecheck synccheck; do echo \"== \$tool\"; \"\$CS\" --tool \$tool --kernel-name kns=mlr --error-exitcode 99 $PY -m bench.cuda_verify --memcheck-case || rc=1; done; exit \$rc"

# --- runner ----------------------------------------------------------------------------
SUMMARY="$LOG_DIR/summary.tsv"
printf 'step\texit\tseconds\n' > "$SUMMARY"
RCS=()
for i in "${!STEP_NAMES[@]}"; do
    name=${STEP_NAMES[$i]}
    left=$(( DEADLINE_S - ($(date +%s) - START) ))
    limit=${STEP_TIMEOUTS[$i]}
    (( left < limit )) && limit=$left
    log="$LOG_DIR/$(printf '%02d' "$i")-$name.log"
    if (( left < 5 )); then
        echo "[$name] skipped: overall deadline reached" | tee "$log"
        RCS+=("skip"); printf '%s\tskip\t0\n' "$name" >> "$SUMMARY"; continue
    fi
    echo "[$name] timeout ${limit}s -> $log"
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" bash -c "${STEP_CMDS[$i]}" > "$log" 2>&1
    rc=$?
    RCS+=("$rc")
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$SUMMARY"
    (( rc == 124 || rc == 137 )) && echo "[$name] TIMED OUT after ${limit}s" >> "$log"
    tail -n 3 "$log" | sed "s/^/    /"
done

echo
echo "=== gpu_check summary ($(( $(date +%s) - START )) s, logs in $LOG_DIR) ==="
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
# Non-zero when any step failed, so a caller can tell at a glance.
for rc in "${RCS[@]}"; do [[ "$rc" == 0 ]] || exit 1; done
exit 0
