"""Text classification for ``tunecomp compress`` and the reproduction.

The code lives in :mod:`.data` (read, split, encode, batch) and :mod:`.classifier` (load,
optimiser, schedule, evaluate, predict, latency, size); this module keeps the names that
were imported from here before.
"""

from __future__ import annotations

from .classifier import (
    check_model_dir,
    dir_size,
    evaluate,
    linear_schedule,
    load_classifier,
    load_tokenizer,
    make_optimizer,
    make_scheduler,
    measure_latency,
    measure_latency_pair,
    padding_token_id,
    peak_rss_mb,
    predict,
    saved_size,
)
from .data import (
    DataError,
    Dataset,
    Encoded,
    Split,
    Splits,
    collate,
    confident_rows,
    encode,
    epoch_batches,
    eval_batches,
    load_dataset,
    normalize_label,
    resolve_sizes,
    stratified_split,
    train_batches,
)

__all__ = [
    "DataError", "Dataset", "Encoded", "Split", "Splits", "check_model_dir", "collate",
    "confident_rows", "dir_size", "encode", "epoch_batches", "eval_batches", "evaluate",
    "linear_schedule", "load_classifier", "load_dataset", "load_tokenizer", "make_optimizer",
    "make_scheduler", "measure_latency", "measure_latency_pair", "normalize_label",
    "padding_token_id", "peak_rss_mb", "predict", "resolve_sizes", "saved_size",
    "stratified_split", "train_batches",
]
