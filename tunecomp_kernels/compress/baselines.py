"""One-shot truncation to a parameter budget: what the sequential baselines do.

* :func:`compress_to_budget` — one-shot truncation: factor every targeted layer with
  SVD / ASVD / SVD-LLM and keep the globally most important ranks so the targeted layers
  meet ``target_ratio`` exactly-or-under. Importance of rank i of a layer is its singular
  value σ_i in the init's metric (plain, activation-scaled or whitened), divided by
  ``in + out`` when ``score_per_param`` — the same greedy rule as the joint run
  (:func:`~.budget.prune_to_budget`). A layer whose kept rank would not be smaller than
  dense keeps its original dense weight.
* :func:`allocate_ranks` — the global rank allocation it uses.

The sequential pipelines built on it, (a) fine-tune → truncate → fine-tune and
(b) truncate → fine-tune, are in :mod:`.pipelines` beside TuneComp itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .budget import lowrank_is_smaller, prune_to_budget
from .calibration import collect_statistics
from .config import TuneCompConfig
from .hf_format import guard_save_pretrained
from .model_io import call_model
from .prepare import CONFIG_ATTR, build_lowrank, check_feasible, init_svd, select_targets
from .targets import INFO_ATTR, TargetInfo, dense_weight, make_target_infos, set_submodule
from .training import ForwardFn


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
    config = config.resolved(calibrated=calibration is not None)
    targets = select_targets(model, config)
    infos = make_target_infos(targets)
    check_feasible(list(infos.values()), config)
    if config.init != "svd" and calibration is None:
        raise ValueError(f"init={config.init!r} needs calibration data")
    stats = {}
    if config.init != "svd":
        stats = collect_statistics(model, targets, calibration,
                                   gram=config.init == "svd_llm", forward=forward)
    sigma = {}
    for name, mod in targets.items():
        sigma[name] = init_svd(dense_weight(mod), config.init, stats.get(name),
                               config.asvd_alpha).spectrum().cpu()
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
    return guard_save_pretrained(model)  # a plain save_pretrained would reload random layers


def __getattr__(name: str) -> Any:
    # The sequential pipelines moved to .pipelines; their old import path keeps working.
    if name in ("finetune_then_compress", "compress_then_finetune"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
