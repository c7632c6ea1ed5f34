#!/usr/bin/env bash
# The CPU benchmark commands whose results are committed under bench/results/ (see the
# README "Benchmarks" section). Run from the repo root after scripts/setup-dev.sh.
# Speed ratios are measured side by side inside each command; the machine they ran on is
# recorded in each JSON (environment: cpu, threads, load average, date, commit).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

speed() {
    "$PY" bench/layer_ratio.py
    "$PY" bench/e2e.py --model minilm --rounds 3 --methods \
        train_dense,train_joint@1.0,train_joint@0.5,train_after@1.0,train_after_compact@1.0,infer_dense,infer_compressed
    "$PY" -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
        --benchmark-json bench/results/ops_cpu.json
}

memory() {
    "$PY" bench/e2e.py --model llama --batch 8 --seq 256 --steps 2 --rounds 1 \
        --methods train_dense,train_joint@1.0,train_joint@0.5,train_joint@0.25,train_after_compact@1.0
    "$PY" bench/e2e.py --model minilm --rounds 1 --methods infer_dense,infer_compiled \
        --out bench/results/e2e_minilm_compile.json
}

case "${1:-all}" in
    speed) speed ;;
    memory) memory ;;
    all) speed; memory ;;
    *) echo "usage: $0 [speed|memory|all]" >&2; exit 2 ;;
esac
"$PY" bench/plots.py
