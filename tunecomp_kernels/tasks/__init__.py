"""Downstream tasks for ``tunecomp compress`` and the reproduction: data (:mod:`.data`),
the classifier (:mod:`.classifier`), the job's settings (:mod:`.settings`) and the job
(:mod:`.job`, driven by :mod:`.compress_job`)."""

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
from .settings import JobSettings, SettingsError, full, quick

__all__ = [
    "DataError",
    "Dataset",
    "Encoded",
    "JobSettings",
    "SettingsError",
    "Split",
    "Splits",
    "encode",
    "eval_batches",
    "evaluate",
    "full",
    "load_classifier",
    "load_dataset",
    "load_tokenizer",
    "measure_latency",
    "quick",
    "resolve_sizes",
    "stratified_split",
    "train_batches",
]
