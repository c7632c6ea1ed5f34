"""A text-classification task set up for the methods of :mod:`tunecomp_kernels.compress.pipelines`.

:func:`setup_task` loads a data set, splits and tokenises it and records where the model
lives (:class:`TaskSetup`); :func:`training_plan` turns :class:`~.settings.JobSettings`
into the :class:`~tunecomp_kernels.compress.pipelines.TrainingPlan` that every method
shares (AdamW groups, linear warm-up/decay per phase, clipping). The methods themselves
are written once, in :mod:`tunecomp_kernels.compress.pipelines`; :func:`run_method` calls
the one a name selects on a fresh classifier, keeping the order of the calls that draw
random numbers (model load with the seed → calibration batches → prepare/truncate →
optimiser → scheduler → training).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compress.pipelines import (
    TrainingPlan,
    dense_finetune,
    finetune_truncate_finetune,
    truncate_finetune,
    tunecomp_joint,
)
from ..compress.training import RunResult
from . import classifier as clf
from . import data as td
from .settings import JobSettings

METHODS = ("dense", "seq_a", "seq_b", "tunecomp")


@dataclass
class TaskSetup:
    """A tokenised, split data set and the model directory to fine-tune from."""

    model_dir: Path
    splits: td.Splits
    tokenizer: Any
    train: td.Encoded
    val: td.Encoded
    test: td.Encoded
    max_length: int
    pad_id: int = 0
    eval_batch_size: int = 128
    #: what loading and filtering dropped, one line each (for the user)
    notes: list[str] = field(default_factory=list)
    _val_batches: list | None = field(default=None, repr=False)
    _test_batches: list | None = field(default=None, repr=False)

    @property
    def label_names(self) -> list[str]:
        return self.splits.label_names

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._val_batches is None:
            self._val_batches = td.eval_batches(self.val, self.eval_batch_size, self.pad_id)
        return self._val_batches

    def test_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._test_batches is None:
            self._test_batches = td.eval_batches(self.test, self.eval_batch_size, self.pad_id)
        return self._test_batches

    def test_in_order(self, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
        """The test split in its own order (for per-row predictions)."""
        return [td.collate(self.test.input_ids[i:i + batch_size],
                           self.test.labels[i:i + batch_size], self.pad_id)
                for i in range(0, len(self.test), batch_size)]

    def train_stream(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        return td.train_batches(self.train, batch_size, self.pad_id, seed)

    def calibration_batches(self, batch_size: int, count: int, seed: int) -> list[dict]:
        """``count`` training batches without labels (for ASVD / SVD-LLM statistics)."""
        stream = self.train_stream(batch_size, seed=10_000 + seed)
        return [{k: v for k, v in next(stream).items() if k != "labels"} for _ in range(count)]

    def new_model(self, seed: int) -> nn.Module:
        return clf.load_classifier(self.model_dir, self.label_names, seed=seed,
                                   pad_token_id=self.pad_id)


def setup_task(
    model_dir: str | Path,
    data_path: str | Path,
    *,
    text_column: str,
    label_column: str,
    confidence_column: str | None = None,
    min_confidence: float | None = None,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    split_seed: int = 0,
    max_length: int = 64,
    default_sizes: Sequence[int | None] = (None, None, None),
) -> TaskSetup:
    """Load, filter, split (seeded, stratified) and tokenise; check the model directory
    and find its padding token. Sizes left as None are ``default_sizes`` (None: the
    job's, see :func:`~.data.resolve_sizes`).

    Raises:
        DataError: a problem with the data or the model directory (one line).
    """
    model_dir = clf.check_model_dir(model_dir)
    data = td.load_dataset(data_path, text_column, label_column, confidence_column)
    notes = [data.dropped_summary()] if data.dropped else []
    usable = len(td.confident_rows(data, min_confidence))
    if usable < len(data):
        notes.append(f"kept {usable} of {len(data)} rows: those whose confidence is known "
                     f"and >= {min_confidence:g}")
    sizes = td.resolve_sizes(usable, train_size, val_size, test_size, *default_sizes)
    splits = td.stratified_split(data, *sizes, seed=split_seed, min_confidence=min_confidence)
    tokenizer = clf.load_tokenizer(model_dir)
    pad_id = clf.padding_token_id(tokenizer, model_dir)
    encoded = [td.encode(tokenizer, s, max_length) for s in (splits.train, splits.val,
                                                              splits.test)]
    return TaskSetup(model_dir, splits, tokenizer, *encoded, max_length, pad_id, notes=notes)


def training_plan(settings: JobSettings, *, steps: int | None = None,
                  callbacks: Sequence[Any] = (), checkpoint_dir: str | Path | None = None,
                  resume: bool = False, lr: float | None = None) -> TrainingPlan:
    """The plan every method shares: ``steps`` (default ``settings.steps``) optimiser
    steps, AdamW at peak rate ``lr`` (default ``settings.lr``) with the task's groups (a
    fresh optimiser per phase), linear warm-up and decay per phase, gradient clipping,
    ``callbacks``; checkpoints every ``settings.checkpoint_every`` steps into
    ``checkpoint_dir`` when it is given."""
    lr = settings.lr if lr is None else lr

    def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return clf.make_optimizer(model, lr, settings.weight_decay,
                                  mask_lr=lr * settings.mask_lr_scale)

    def make_scheduler(optimizer: torch.optim.Optimizer, phase_steps: int) -> Any:
        return clf.make_scheduler(optimizer, phase_steps, settings.warmup_ratio)

    checkpointing: dict[str, Any] = {}
    if checkpoint_dir is not None and settings.checkpoint_every > 0:
        checkpointing = {"checkpoint_dir": checkpoint_dir, "keep_checkpoints": 1,
                         "checkpoint_every": settings.checkpoint_every, "resume": resume}
    return TrainingPlan(steps=settings.steps if steps is None else steps,
                        make_optimizer=make_optimizer, make_scheduler=make_scheduler,
                        max_grad_norm=settings.max_grad_norm, callbacks=callbacks,
                        **checkpointing)


def baseline_config(settings: JobSettings, init: str):
    """The truncation config of the sequential baselines: ``settings.ratio`` with
    ``init``, no teacher."""
    from ..compress.config import TuneCompConfig

    return TuneCompConfig(target_ratio=settings.ratio, init=init, blend_steps=0,
                          backend=settings.backend)


def run_method(method: str, setup: TaskSetup, settings: JobSettings, plan: TrainingPlan, *,
               config=None, dense_model: nn.Module | None = None) -> RunResult:
    """Fine-tune a fresh classifier (seed ``settings.seed``) with ``method``:

    * ``"dense"``: :func:`~tunecomp_kernels.compress.pipelines.dense_finetune`;
    * ``"tunecomp"``: :func:`~tunecomp_kernels.compress.pipelines.tunecomp_joint` with
      ``config`` (default ``settings.tunecomp_config()``);
    * ``"seq_a"``: :func:`~tunecomp_kernels.compress.pipelines.finetune_truncate_finetune`
      (half the steps dense; ``dense_model``: that phase already trained, copied);
    * ``"seq_b"``: :func:`~tunecomp_kernels.compress.pipelines.truncate_finetune`.

    For the baselines ``config`` is the truncation config (:func:`baseline_config`).

    Raises:
        ValueError: an unknown ``method``; what the pipeline raises.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    seed, batch = settings.seed, settings.batch_size
    model = dense_model if dense_model is not None else setup.new_model(seed)
    if method == "dense":
        return dense_finetune(model, setup.train_stream(batch, seed), plan)
    config = config if config is not None else settings.tunecomp_config()
    # init="auto" calibrates on training batches when the job has them (it always does)
    needs = (config.needs_calibration or config.init == "auto" if method == "tunecomp"
             else config.init != "svd")
    calib = (setup.calibration_batches(batch, settings.calibration_batches, seed)
             if needs else None)
    stream = setup.train_stream(batch, seed)
    if method == "tunecomp":
        return tunecomp_joint(model, config, stream, plan, calibration=calib)
    if method == "seq_b":
        return truncate_finetune(model, config, stream, plan, calibration=calib)
    return finetune_truncate_finetune(model, config, stream, plan, calibration=calib,
                                      dense_model=dense_model)


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
