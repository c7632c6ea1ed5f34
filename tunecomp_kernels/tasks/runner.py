"""Shared set-up and training methods for ``tunecomp compress`` and the reproduction.

:func:`setup_task` loads a data set, splits and tokenises it and records where the model
lives; the ``run_*`` functions each fine-tune a fresh classifier from that model with one
method — the same optimiser (AdamW, linear warm-up/decay, clipping), the same batch stream
and the same number of optimiser steps — and return the trained model:

* :func:`run_dense`: plain dense fine-tuning;
* :func:`run_joint`: TuneComp joint fine-tuning and compression (``prepare`` → train with the
  controller → ``finalize``);
* :func:`run_compress_then_finetune`: baseline (b), compress the pretrained model to the
  budget (SVD / ASVD / SVD-LLM), then fine-tune;
* :func:`run_finetune_compress_finetune`: baseline (a), fine-tune dense for a share of the
  steps, compress to the budget, fine-tune the rest.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import text_classification as tc


@dataclass
class TaskSetup:
    """A tokenised, split data set and the model directory to fine-tune from."""

    model_dir: Path
    splits: tc.Splits
    tokenizer: Any
    train: tc.Encoded
    val: tc.Encoded
    test: tc.Encoded
    max_length: int
    eval_batch_size: int = 128
    _val_batches: list | None = field(default=None, repr=False)
    _test_batches: list | None = field(default=None, repr=False)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    @property
    def label_names(self) -> list[str]:
        return self.splits.label_names

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._val_batches is None:
            self._val_batches = tc.eval_batches(self.val, self.eval_batch_size, self.pad_id)
        return self._val_batches

    def test_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._test_batches is None:
            self._test_batches = tc.eval_batches(self.test, self.eval_batch_size, self.pad_id)
        return self._test_batches

    def train_stream(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        return tc.train_batches(self.train, batch_size, self.pad_id, seed)

    def calibration_batches(self, batch_size: int, count: int, seed: int) -> list[dict]:
        """``count`` training batches without labels (for ASVD / SVD-LLM statistics)."""
        stream = self.train_stream(batch_size, seed=10_000 + seed)
        return [{k: v for k, v in next(stream).items() if k != "labels"} for _ in range(count)]

    def new_model(self, seed: int) -> nn.Module:
        return tc.load_classifier(self.model_dir, self.label_names, seed=seed)


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
) -> TaskSetup:
    """Load, filter, split (seeded, stratified) and tokenise; check the model directory."""
    model_dir = tc.check_model_dir(model_dir)
    data = tc.load_dataset(data_path, text_column, label_column, confidence_column)
    usable = len(data) if min_confidence is None else sum(
        1 for c in data.confidences if c is not None and c >= min_confidence)
    sizes = tc.resolve_sizes(usable, train_size, val_size, test_size)
    splits = tc.stratified_split(data, *sizes, seed=split_seed, min_confidence=min_confidence)
    tokenizer = tc.load_tokenizer(model_dir)
    return TaskSetup(model_dir, splits, tokenizer,
                     tc.encode(tokenizer, splits.train, max_length),
                     tc.encode(tokenizer, splits.val, max_length),
                     tc.encode(tokenizer, splits.test, max_length), max_length)


@dataclass
class TrainSettings:
    """The optimiser and step budget every method shares."""

    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 32
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    mask_lr_scale: float = 1.0  # TuneComp rank masks train at lr · mask_lr_scale


Callback = Callable[[int, dict[str, Any]], None]


def _train(model: nn.Module, stream, steps: int, settings: TrainSettings, *,
           controller=None, callback: Callback | None = None):
    from ..compress.training import train

    optimizer = tc.make_optimizer(model, settings.lr, settings.weight_decay,
                                  mask_lr=settings.lr * settings.mask_lr_scale)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, tc.linear_schedule(steps, settings.warmup_ratio))
    return train(model, optimizer, stream, controller=controller, steps=steps,
                 scheduler=scheduler, max_grad_norm=settings.max_grad_norm, callback=callback)


def run_dense(setup: TaskSetup, settings: TrainSettings, *, steps: int | None = None,
              stream=None, callback: Callback | None = None) -> nn.Module:
    """Dense fine-tuning of a fresh classifier."""
    model = setup.new_model(settings.seed)
    stream = stream if stream is not None else setup.train_stream(settings.batch_size,
                                                                  settings.seed)
    _train(model, stream, settings.steps if steps is None else steps, settings,
           callback=callback)
    return model


def run_joint(setup: TaskSetup, settings: TrainSettings, config, *,
              callback: Callback | None = None, calibration_batches: int = 8,
              on_prepared: Callable[[Any], None] | None = None) -> nn.Module:
    """TuneComp: prepare the fresh classifier with ``config``, train ``settings.steps``
    steps with the controller, finalize."""
    from ..compress.prepare import prepare

    model = setup.new_model(settings.seed)
    calib = (setup.calibration_batches(settings.batch_size, calibration_batches, settings.seed)
             if config.needs_calibration else None)
    controller = prepare(model, config, calibration=calib)
    if on_prepared is not None:
        on_prepared(controller)
    _train(model, setup.train_stream(settings.batch_size, settings.seed), settings.steps,
           settings, controller=controller, callback=callback)
    controller.finalize()
    return model


def truncate(model: nn.Module, setup: TaskSetup, ratio: float, init: str, seed: int,
             batch_size: int, calibration_batches: int = 8) -> nn.Module:
    """Compress ``model`` to ``ratio`` of its block linears' parameters in one shot."""
    from ..compress.baselines import compress_to_budget
    from ..compress.config import TuneCompConfig

    calib = (setup.calibration_batches(batch_size, calibration_batches, seed)
             if init != "svd" else None)
    compress_to_budget(model, TuneCompConfig(target_ratio=ratio, init=init, blend_steps=0,
                                             total_steps=1), calibration=calib)
    return model


def run_compress_then_finetune(setup: TaskSetup, settings: TrainSettings, ratio: float,
                               init: str, *, callback: Callback | None = None) -> nn.Module:
    """Baseline (b): truncate the pretrained model to the budget, then fine-tune."""
    model = setup.new_model(settings.seed)
    truncate(model, setup, ratio, init, settings.seed, settings.batch_size)
    _train(model, setup.train_stream(settings.batch_size, settings.seed), settings.steps,
           settings, callback=callback)
    return model


def run_finetune_compress_finetune(
    setup: TaskSetup, settings: TrainSettings, ratio: float, init: str, *,
    first_share: float = 0.5, dense_model: nn.Module | None = None,
    callback: Callback | None = None,
) -> nn.Module:
    """Baseline (a): fine-tune dense for ``first_share`` of the steps, truncate to the
    budget, fine-tune for the rest (a fresh optimiser and schedule for each phase).

    ``dense_model``: the phase-1 result, if already trained (shared between budgets); it
    is copied, not modified. The batch stream continues where phase 1 stopped.
    """
    first = max(1, round(first_share * settings.steps))
    second = settings.steps - first
    stream = setup.train_stream(settings.batch_size, settings.seed)
    if dense_model is None:
        model = run_dense(setup, settings, steps=first, stream=stream, callback=callback)
    else:
        model = copy.deepcopy(dense_model)
        for _ in range(first):  # keep the same batch order as an unshared run
            next(stream)
    truncate(model, setup, ratio, init, settings.seed, settings.batch_size)
    if second > 0:
        _train(model, stream, second, settings, callback=callback)
    return model


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
