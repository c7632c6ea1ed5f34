#!/usr/bin/env bash
# The CPU benchmark commands whose results are committed under bench/results/ (see the
# README "Benchmarks" section). Run from the repo root after scripts/setup-dev.sh.
# Speed ratios are measured side by side inside each command; the machine they ran on is
# recorded in each JSON (environment: cpu, threads, load average, date, commit).
#   bash bench/run_cpu_benchmarks.sh [speed|memory|all]      (about an hour on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

speed() {
    # low-rank layer vs nn.Linear against the ideal FLOP ratio (interleaved, one process)
    "$PY" bench/layer_ratio.py
    # the end-to-end speed ratios: every method's model in one process, steps interleaved
    "$PY" bench/e2e.py --model minilm --interleaved --train-repeats 5 --infer-repeats 9 \
        --methods train_dense,train_joint@1.0,train_joint@0.5,train_after@1.0,train_after_compact@1.0,infer_dense,infer_compressed
    # op benchmarks (pytest-benchmark)
    "$PY" -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
        --benchmark-json bench/results/ops_cpu.json
}

memory() {
    # peak RSS: a fresh process per method
    "$PY" bench/e2e.py --model minilm --rounds 1 --methods \
        train_dense,train_joint@1.0,train_joint@0.5,train_after@1.0,train_after_compact@1.0,infer_dense,infer_compressed
    "$PY" bench/e2e.py --model llama --batch 8 --seq 256 --steps 2 --rounds 1 \
        --methods train_dense,train_joint@1.0,train_joint@0.5,train_joint@0.35,train_joint@0.25,train_after_compact@1.0
    # the same Llama shape with activation checkpointing on every method
    "$PY" bench/e2e.py --model llama --batch 8 --seq 256 --steps 2 --rounds 1 --grad-ckpt \
        --methods train_dense,train_joint@0.5,train_joint@0.35 \
        --out bench/results/e2e_llama_ckpt.json
    # torch.compile over the exported MiniLM: graph breaks, max |compiled - eager|, latency
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
