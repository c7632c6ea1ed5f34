"""Sequential baselines that TuneComp is compared against, sharing its code and budget.

* :func:`compress_to_budget` — one-shot truncation: factor every targeted layer with
  SVD / ASVD / SVD-LLM and keep the globally most important ranks so the targeted layers
  meet ``target_ratio`` exactly-or-under. Importance of rank i of a layer is its singular
  value σ_i in the init's metric (plain, activation-scaled or whitened), divided by
  ``in + out`` when ``score_per_param`` — the same greedy rule as the joint run
  (:func:`~.budget.prune_to_budget`). A layer whose kept rank would not be smaller than
  dense keeps its original dense weight.
* :func:`finetune_then_compress` — (a) fine-tune dense → truncate → re-fine-tune.
* :func:`compress_then_finetune` — (b) truncate → fine-tune.

Both sequential pipelines take the same optimiser factory, batches, step count and
config (budget, init) as :func:`~.training.run_tunecomp`, so the comparison is fair: the
total number of optimiser steps and the stream of batches are the same.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .budget import lowrank_is_smaller, prune_to_budget
from .calibration import collect_statistics
from .config import TuneCompConfig
from .model_io import call_model
from .prepare import CONFIG_ATTR, build_lowrank, check_feasible, factor_weight, select_targets
from .report import compression_report
from .targets import INFO_ATTR, TargetInfo, dense_weight, layer_dims, origin_of, set_submodule
from .training import (
    ForwardFn,
    LossFn,
    OptimizerFactory,
    RunResult,
    TrainResult,
    cycle_batches,
    train,
    trainable_parameters,
)


def allocate_ranks(
    singular_values: dict[str, torch.Tensor],
    infos: dict[str, TargetInfo],
    config: TuneCompConfig,
) -> dict[str, int]:
    """Global rank allocation: per layer, how many of its leading singular values to keep
    so that ``Σ min(k·(in + out), in·out) <= floor(target_ratio·Σ in·out)``."""
    names = list(infos)
    budget = math.floor(config.target_ratio * sum(i.dense_params for i in infos.values()))
    alive = [torch.ones(singular_values[n].numel(), dtype=torch.bool) for n in names]
    new_alive, _ = prune_to_budget(
        alive, [singular_values[n] for n in names], [infos[n] for n in names],
        raw_budget=budget, final_budget=budget, min_rank=config.min_rank,
        per_param=config.score_per_param,
    )
    return {n: int(a.sum()) for n, a in zip(names, new_alive)}


@torch.no_grad()
def compress_to_budget(
    model: nn.Module,
    config: TuneCompConfig,
    calibration: Iterable[Any] | None = None,
    *,
    forward: ForwardFn = call_model,
) -> nn.Module:
    """Truncate ``model``'s targeted layers to the budget in place (no teacher, no
    schedule) and return it, ready to fine-tune, report and save.

    Low-rank layers are :class:`~tunecomp_kernels.MaskedLowRankLinear` with a frozen mask
    of ones (U and V train); layers kept dense stay the original modules. ``config.init``
    chooses SVD / ASVD / SVD-LLM (the last two need ``calibration``).
    """
    targets = select_targets(model, config)
    infos = {}
    for name, mod in targets.items():
        in_f, out_f = layer_dims(mod)
        infos[name] = TargetInfo(name, in_f, out_f, getattr(mod, "bias", None) is not None,
                                 origin_of(mod))
    check_feasible(list(infos.values()), config)
    if config.init != "svd" and calibration is None:
        raise ValueError(f"init={config.init!r} needs calibration data")
    stats = {}
    if config.init != "svd":
        stats = collect_statistics(model, targets, calibration,
                                   gram=config.init == "svd_llm", forward=forward)
    sigma = {}
    for name, mod in targets.items():
        full = min(infos[name].in_features, infos[name].out_features)
        U, _ = factor_weight(dense_weight(mod), full, config.init, stats.get(name),
                             config.asvd_alpha)
        sigma[name] = U.square().sum(0).cpu()  # ‖U[:, i]‖² = σ_i (√σ split, orthonormal P)
    ranks = allocate_ranks(sigma, infos, config)
    for name, mod in targets.items():
        info = infos[name]
        if lowrank_is_smaller(ranks[name], info):
            layer = build_lowrank(mod, info, ranks[name], config.init, stats.get(name),
                                  asvd_alpha=config.asvd_alpha, backend=config.backend)
            layer.mask.requires_grad_(False)
            set_submodule(model, name, layer)
        else:
            setattr(mod, INFO_ATTR, info)
    setattr(model, CONFIG_ATTR, config)
    return model


def _phase(
    model: nn.Module,
    make_optimizer: OptimizerFactory,
    stream: Any,
    steps: int,
    history: TrainResult,
    **kwargs: Any,
) -> None:
    if steps <= 0:
        return
    optimizer = make_optimizer(trainable_parameters(model))
    part = train(model, optimizer, stream, steps=steps, **kwargs)
    history.steps += part.steps
    history.losses.extend(part.losses)


def finetune_then_compress(
    model: nn.Module,
    config: TuneCompConfig,
    make_optimizer: OptimizerFactory,
    batches: Iterable[Any],
    *,
    steps: int | None = None,
    dense_fraction: float = 0.5,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    forward: ForwardFn = call_model,
    max_grad_norm: float | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Baseline (a): fine-tune dense for ``dense_fraction`` of ``steps`` (default
    ``config.total_steps``), truncate to the budget with ``config.init`` (calibration
    statistics come from the fine-tuned model), then re-fine-tune for the remaining steps
    with a fresh optimiser. The batch stream continues across the phases."""
    if not 0.0 <= dense_fraction <= 1.0:
        raise ValueError(f"dense_fraction must be in [0, 1], got {dense_fraction}")
    steps = config.total_steps if steps is None else steps
    start = time.perf_counter()
    stream = cycle_batches(batches)
    history = TrainResult()
    first = round(steps * dense_fraction)
    common = {"loss_fn": loss_fn, "forward": forward, "max_grad_norm": max_grad_norm,
              "callback": callback}
    _phase(model, make_optimizer, stream, first, history, **common)
    compress_to_budget(model, config, calibration, forward=forward)
    _phase(model, make_optimizer, stream, steps - first, history, **common)
    return RunResult(model, compression_report(model), history, time.perf_counter() - start)


def compress_then_finetune(
    model: nn.Module,
    config: TuneCompConfig,
    make_optimizer: OptimizerFactory,
    batches: Iterable[Any],
    *,
    steps: int | None = None,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    forward: ForwardFn = call_model,
    max_grad_norm: float | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Baseline (b): truncate the pretrained model to the budget with ``config.init``,
    then fine-tune it for ``steps`` (default ``config.total_steps``)."""
    steps = config.total_steps if steps is None else steps
    start = time.perf_counter()
    compress_to_budget(model, config, calibration, forward=forward)
    history = TrainResult()
    _phase(model, make_optimizer, cycle_batches(batches), steps, history, loss_fn=loss_fn,
           forward=forward, max_grad_norm=max_grad_norm, callback=callback)
    return RunResult(model, compression_report(model), history, time.perf_counter() - start)
