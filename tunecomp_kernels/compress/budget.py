"""Parameter accounting and the global, deterministic rank selection.

Cost of a layer of rank ``k`` with ``in``/``out`` features (biases and masks excluded):

* raw low-rank cost ``k·(in + out)`` (U and V);
* effective cost ``min(k·(in + out), in·out)``: a layer whose low-rank form is not smaller
  than its dense form counts as dense (and is exported dense).

Rank selection (:func:`prune_to_budget`) ranks every alive rank of every layer by its
importance score, divided by ``in + out`` when ``per_param`` (importance per parameter
freed), and prunes the lowest first until the raw cost is within the step's budget *or*
the effective cost is already within the final budget — whichever comes first — never
taking a layer below ``min_rank``. Scores come from the parameters alone, are compared in
float64 on the CPU, and ties are broken by (layer order, rank index) with a stable sort,
so every data-parallel rank (which holds identical parameters) prunes the same ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .targets import TargetInfo


def effective_cost(rank: int, info: TargetInfo) -> int:
    """``min(rank·(in + out), in·out)``: the parameters the layer costs when exported."""
    return min(rank * info.rank_cost, info.dense_params)


def lowrank_is_smaller(rank: int, info: TargetInfo) -> bool:
    """Whether a rank-``rank`` factorisation is strictly smaller than the dense layer."""
    return rank * info.rank_cost < info.dense_params


def max_lowrank_rank(info: TargetInfo) -> int:
    """The largest rank whose low-rank form is still strictly smaller than dense."""
    return (info.dense_params - 1) // info.rank_cost


def min_feasible_params(infos: Sequence[TargetInfo], min_rank: int) -> int:
    """The smallest reachable effective cost: every layer at ``min_rank``."""
    return sum(effective_cost(min_rank, info) for info in infos)


def prune_to_budget(
    alive: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    infos: Sequence[TargetInfo],
    *,
    raw_budget: int,
    final_budget: int,
    min_rank: int | Sequence[int] = 1,
    per_param: bool = True,
) -> tuple[list[torch.Tensor], int]:
    """Prune the globally least important ranks until the budget holds.

    Args:
        alive: per layer, a CPU bool ``[r]`` of ranks still alive.
        scores: per layer, a ``[r]`` importance score (any float dtype/device).
        infos: per layer, its original dense shape.
        raw_budget: stop once ``Σ k·(in + out) <= raw_budget`` ...
        final_budget: ... or once ``Σ min(k·(in + out), in·out) <= final_budget``.
        min_rank: never leave a layer with fewer alive ranks (one int for every layer, or
            one per layer).
        per_param: rank by ``score / (in + out)`` instead of ``score``.

    Returns:
        ``(new_alive, pruned)``: fresh CPU bool tensors and the number of ranks pruned.
    """
    new_alive = [a.detach().to("cpu", torch.bool).clone() for a in alive]
    floors = [min_rank] * len(infos) if isinstance(min_rank, int) else list(min_rank)
    ranks = [int(a.sum()) for a in new_alive]
    raw = sum(k * info.rank_cost for k, info in zip(ranks, infos))
    eff = sum(effective_cost(k, info) for k, info in zip(ranks, infos))
    if raw <= raw_budget or eff <= final_budget:
        return new_alive, 0

    keys, layer_ids, rank_ids = [], [], []
    for i, (a, s, info) in enumerate(zip(new_alive, scores, infos)):
        idx = a.nonzero().flatten()
        if idx.numel() == 0:
            continue
        key = torch.nan_to_num(s.detach().to("cpu", torch.float64)[idx], nan=0.0)
        if per_param:
            key = key / info.rank_cost
        keys.append(key)
        layer_ids.append(torch.full_like(idx, i))
        rank_ids.append(idx)
    key_all = torch.cat(keys)
    order = torch.sort(key_all, stable=True).indices
    layer_order = torch.cat(layer_ids)[order].tolist()
    rank_order = torch.cat(rank_ids)[order].tolist()

    pruned = 0
    for i, j in zip(layer_order, rank_order):
        if raw <= raw_budget or eff <= final_budget:
            break
        if ranks[i] <= floors[i]:
            continue
        info = infos[i]
        new_alive[i][j] = False
        eff -= effective_cost(ranks[i], info) - effective_cost(ranks[i] - 1, info)
        ranks[i] -= 1
        raw -= info.rank_cost
        pruned += 1
    return new_alive, pruned


def hard_shrink(
    alive: torch.Tensor, mask: torch.Tensor, threshold: float, min_rank: int = 1
) -> torch.Tensor:
    """``alive & (|mask| > threshold)``, keeping at least ``min_rank`` ranks (the largest
    ``|mask|`` among those alive before, ties to the lower index). CPU bool ``[r]``."""
    alive = alive.detach().to("cpu", torch.bool)
    mag = mask.detach().to("cpu", torch.float64).abs()
    new = alive & (mag > threshold)
    keep = min(min_rank, int(alive.sum()))
    if int(new.sum()) >= keep:
        return new
    candidates = alive.nonzero().flatten()
    order = torch.sort(-mag[candidates], stable=True).indices[:keep]
    new = torch.zeros_like(alive)
    new[candidates[order]] = True
    # ranks above the threshold stay alive too (there are fewer than ``keep`` of them)
    return new | (alive & (mag > threshold))


def prune_within_layer(alive: torch.Tensor, score: torch.Tensor, keep: int) -> torch.Tensor:
    """``alive`` with its least important ranks removed until at most ``keep`` remain
    (lowest ``score`` first, ties to the higher index; compared in float64 on the CPU, so
    deterministic). CPU bool ``[r]``; unchanged when ``keep`` already holds."""
    alive = alive.detach().to("cpu", torch.bool).clone()
    excess = int(alive.sum()) - keep
    if excess <= 0:
        return alive
    idx = alive.nonzero().flatten()
    key = torch.nan_to_num(score.detach().to("cpu", torch.float64)[idx], nan=0.0)
    # stable sort on -key keeps the lower index first among equals, so it is dropped last
    order = torch.sort(-key, stable=True).indices
    alive[idx[order[keep:]]] = False
    return alive
