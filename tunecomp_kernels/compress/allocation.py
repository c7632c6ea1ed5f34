"""Rank allocation planned before training: how many ranks each layer ends with, and
which layers stay dense.

A planned allocation (``TuneCompConfig.allocation`` other than ``"adaptive"``) fixes
every targeted layer's final rank from its initial spectrum — the singular values
``σ_i`` of the factorisation ``prepare`` starts from, i.e. in the init's own metric
(plain for ``svd``, activation-scaled for ``asvd``, whitened for ``svd_llm``). A layer
whose final rank would not make it smaller than dense is not converted at all: it stays
an ``nn.Linear`` and is fine-tuned as one, so no exported dense layer is rank-deficient.
The other layers start above their final rank (``prune_fraction``) and the controller
prunes each one, within the layer, down to it on the budget schedule.

Rules (cost of a rank ``in + out``, of a dense layer ``in·out``; budget
``B = floor(target_ratio · Σ in·out)``):

* ``"uniform"``: every layer keeps the same share of its own parameters:
  ``k = floor(target_ratio · in·out / (in + out))`` (SVD-LLM's rule).
* ``"global"``: ranks of all layers compete on ``σ_i / (in + out)`` (importance per
  parameter freed); the least important are removed until the budget holds.
* ``"floor"``: ``"global"``, but no layer goes below ``allocation_floor`` times its
  uniform rank (no layer is starved).
* ``"sigma2"``: ``"global"`` on each rank's share of its layer's energy,
  ``σ_i² / Σ_j σ_j²`` per parameter (scale-free across layers).

The ``"adaptive"`` rule (the default) plans only which layers stay dense (with
``plan_dense``, from the ``"global"`` plan): every other layer starts at
``init_rank_ratio`` and the controller prunes them globally during training on the current
scores (:func:`~.budget.prune_to_budget`), within what the dense layers leave of the
budget. Without ``plan_dense`` every layer is converted, and one that ends above its
break-even rank is exported dense with only the ranks it kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .budget import max_lowrank_rank, prune_to_budget
from .targets import TargetInfo

#: Allocation rules; ``"adaptive"`` is the default (decided during training).
ALLOCATIONS = ("adaptive", "global", "uniform", "floor", "sigma2")

#: Planned final rank of a layer that stays dense (not converted).
DENSE = -1


def uniform_rank(info: TargetInfo, target_ratio: float, min_rank: int = 1) -> int:
    """``max(min_rank, floor(target_ratio · in·out / (in + out)))``, at most ``min(in, out)``."""
    k = math.floor(target_ratio * info.dense_params / info.rank_cost)
    return min(min(info.in_features, info.out_features), max(min_rank, k))


def plan_ranks(
    spectra: Sequence[torch.Tensor],
    infos: Sequence[TargetInfo],
    rule: str,
    target_ratio: float,
    *,
    min_rank: int = 1,
    floor: float = 0.5,
) -> list[int]:
    """Each layer's final rank under ``rule``, or :data:`DENSE` for a layer that stays dense.

    Args:
        spectra: per layer, its singular values ``σ [min(in, out)]`` in the init's metric
            (descending; any float dtype).
        infos: per layer, its dense shape.
        rule: ``"global"``, ``"uniform"``, ``"floor"`` or ``"sigma2"`` (module docstring).
        target_ratio: kept fraction of ``Σ in·out``, in ``(0, 1]``.
        min_rank: no low-rank layer ends below this rank.
        floor: for ``"floor"``, the fraction of its uniform rank every layer keeps.

    Returns:
        A list of ints: the final rank of each low-rank layer (``1 <= k <=
        max_lowrank_rank``), :data:`DENSE` for a dense one. The planned cost
        ``Σ_lowrank k·(in + out) + Σ_dense in·out`` never exceeds the budget unless every
        layer is already at its minimum.

    Raises:
        ValueError: unknown rule, or ``spectra`` and ``infos`` differ in length.
    """
    if len(spectra) != len(infos):
        raise ValueError(f"{len(spectra)} spectra for {len(infos)} layers")
    if rule == "uniform":
        ranks = [uniform_rank(i, target_ratio, min_rank) for i in infos]
    elif rule in ("global", "floor", "sigma2"):
        ranks = _global_ranks(spectra, infos, rule, target_ratio, min_rank, floor)
    else:
        raise ValueError(f"unknown allocation {rule!r}; choose one of {list(ALLOCATIONS[1:])}")
    return [k if k <= max_lowrank_rank(i) else DENSE for k, i in zip(ranks, infos)]


def _global_ranks(spectra: Sequence[torch.Tensor], infos: Sequence[TargetInfo], rule: str,
                  target_ratio: float, min_rank: int, floor: float) -> list[int]:
    """Greedy global pruning from full rank on the rule's score (via ``prune_to_budget``,
    which counts a layer above its dense-break-even rank as dense)."""
    scores = []
    for s in spectra:
        s = s.detach().to("cpu", torch.float64)
        scores.append(s * s / (s * s).sum().clamp_min(1e-300) if rule == "sigma2" else s)
    floors = [min_rank] * len(infos)
    if rule == "floor":
        floors = [max(min_rank, math.floor(floor * uniform_rank(i, target_ratio, min_rank)))
                  for i in infos]
    alive = [torch.ones(s.numel(), dtype=torch.bool) for s in scores]
    budget = math.floor(target_ratio * sum(i.dense_params for i in infos))
    new_alive, _ = prune_to_budget(alive, scores, infos, raw_budget=-1, final_budget=budget,
                                   min_rank=floors, per_param=True)
    return [int(a.sum()) for a in new_alive]


def start_rank(final_rank: int, info: TargetInfo, prune_fraction: float) -> int:
    """The starting rank that leaves ``prune_fraction`` of it to prune:
    ``ceil(final / (1 − prune_fraction))``, at most ``min(in, out)``."""
    full = min(info.in_features, info.out_features)
    if prune_fraction >= 1.0:
        return full
    return min(full, max(final_rank, math.ceil(final_rank / (1.0 - prune_fraction))))
