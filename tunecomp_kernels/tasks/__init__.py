"""Downstream tasks for ``tunecomp compress`` and the reproduction: data, models, evaluation."""

from .classifier import evaluate, load_classifier, load_tokenizer, measure_latency
from .data import (
    DataError,
    Dataset,
    Encoded,
    Split,
    Splits,
    encode,
    eval_batches,
    load_dataset,
    resolve_sizes,
    stratified_split,
    train_batches,
)

__all__ = [
    "DataError",
    "Dataset",
    "Encoded",
    "Split",
    "Splits",
    "encode",
    "eval_batches",
    "evaluate",
    "load_classifier",
    "load_dataset",
    "load_tokenizer",
    "measure_latency",
    "resolve_sizes",
    "stratified_split",
    "train_batches",
]
