"""Global budget: exact-or-under over several ratios, permanent pruning, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import (
    block_net,
    ce_loss,
    forward_x,
    text_batches,
    tiny_bert,
    vector_batches,
)

from tunecomp_kernels.compress import (
    TuneCompConfig,
    compression_report,
    finalize,
    prepare,
    train,
)
from tunecomp_kernels.compress.budget import (
    effective_cost,
    hard_shrink,
    lowrank_is_smaller,
    prune_to_budget,
)
from tunecomp_kernels.compress.targets import TargetInfo


def info(in_f: int, out_f: int, name: str = "l") -> TargetInfo:
    return TargetInfo(name, in_f, out_f, True, "linear")


# --- the pure functions ------------------------------------------------------------------


def test_costs():
    sq = info(32, 32)
    assert effective_cost(8, sq) == 8 * 64
    assert effective_cost(16, sq) == 1024  # 16·64 == 1024: not smaller, counts as dense
    assert effective_cost(32, sq) == 1024
    assert lowrank_is_smaller(15, sq) and not lowrank_is_smaller(16, sq)


def test_prune_to_budget_global_order_and_budget():
    infos = [info(10, 10, "a"), info(10, 30, "b")]
    alive = [torch.ones(10, dtype=torch.bool), torch.ones(10, dtype=torch.bool)]
    scores = [torch.arange(10, 0, -1, dtype=torch.float64),  # a: 10..1
              torch.arange(10, 0, -1, dtype=torch.float64) * 2]  # b: 20..2
    budget = 3 * 20 + 4 * 40
    new, pruned = prune_to_budget(alive, scores, infos, raw_budget=budget, final_budget=budget,
                                  per_param=False)
    raw = sum(int(a.sum()) * i.rank_cost for a, i in zip(new, infos))
    assert raw <= budget
    # the least important ranks go first: the tail of each layer
    for a in new:
        k = int(a.sum())
        assert a[:k].all() and not a[k:].any()
    assert pruned == 20 - sum(int(a.sum()) for a in new)


def test_prune_to_budget_stops_at_final_budget_and_respects_min_rank():
    infos = [info(8, 8)]
    alive = [torch.ones(8, dtype=torch.bool)]
    scores = [torch.linspace(1, 0.1, 8, dtype=torch.float64)]
    # a dense-sized budget needs no pruning at all
    new, pruned = prune_to_budget(alive, scores, infos, raw_budget=0, final_budget=64)
    assert pruned == 0 and new[0].all()
    # 63 is met at rank 3 (3·16 = 48); rank 4 costs 64 (not smaller: dense), even though
    # the raw budget 0 is never reached
    new, _ = prune_to_budget(alive, scores, infos, raw_budget=0, final_budget=63)
    assert int(new[0].sum()) == 3
    new, _ = prune_to_budget(alive, scores, infos, raw_budget=0, final_budget=0, min_rank=2)
    assert int(new[0].sum()) == 2


def test_prune_to_budget_is_deterministic_with_ties():
    infos = [info(6, 6, "a"), info(6, 6, "b")]
    alive = [torch.ones(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool)]
    scores = [torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)]
    results = [prune_to_budget(alive, scores, infos, raw_budget=5 * 12, final_budget=0)[0]
               for _ in range(3)]
    for r in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(r, results[0]))
    # ties go to the lower (layer, rank) index first; min_rank=1 keeps a's last rank
    assert results[0][0].tolist() == [False] * 5 + [True]
    assert results[0][1].tolist() == [False] * 2 + [True] * 4


def test_hard_shrink_keeps_min_rank():
    alive = torch.tensor([True, True, False, True])
    mask = torch.tensor([0.5, 1e-5, 0.0, -2e-5])
    assert hard_shrink(alive, mask, 1e-3).tolist() == [True, False, False, False]
    tiny = torch.tensor([1e-6, 3e-6, 0.0, 2e-6])
    assert hard_shrink(alive, tiny, 1e-3, min_rank=1).tolist() == [False, True, False, False]
    assert hard_shrink(alive, tiny, 1e-3, min_rank=2).tolist() == [False, True, False, True]


# --- the controller ----------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.5, 0.8])
def test_budget_met_over_ratios(ratio):
    model = tiny_bert()
    cfg = TuneCompConfig(target_ratio=ratio, blend_steps=3, total_steps=4)
    controller = prepare(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, opt, text_batches(4), controller=controller)
    budget = math.floor(ratio * controller.original_params)
    assert controller.budget_params == budget
    assert controller.current_params <= budget
    finalize(model)
    report = compression_report(model)
    assert report.params_before == controller.original_params
    assert report.params_after <= budget
    assert report.within_budget
    # the budget is used, not wasted: within one rank of the largest layer
    assert budget - report.params_after < max(i.rank_cost for i in controller._infos)
    assert model(**text_batches(1)[0]).logits.shape == (4, 3)
    table = str(report)
    assert "targeted layers" in table and "whole model" in table
    assert f"target ratio {ratio:.4g}: budget met" in table
    assert report.to_dict()["ratio"] == report.params_after / report.params_before


@pytest.mark.parametrize("per_param", [True, False])
@pytest.mark.parametrize("ratio", [0.25, 0.6, 0.9])
def test_budget_met_plain_module(ratio, per_param):
    model = block_net()
    cfg = TuneCompConfig(target_ratio=ratio, blend_steps=2, total_steps=3,
                         score_per_param=per_param, budget_schedule="linear")
    controller = prepare(model, cfg, forward=forward_x)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    train(model, opt, vector_batches(3), controller=controller, loss_fn=ce_loss)
    finalize(model)
    report = compression_report(model)
    assert report.params_after <= math.floor(ratio * report.params_before)


def test_full_ratio_keeps_everything_dense():
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=1.0, blend_steps=2, total_steps=2))
    train(model, torch.optim.SGD(model.parameters(), lr=1e-3), text_batches(2),
          controller=controller)
    assert all(a.all() for a in controller.alive_masks().values())
    finalize(model)
    report = compression_report(model)
    assert report.params_after == report.params_before
    assert all(r.kind == "dense" for r in report.layers)


def test_infeasible_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match=r"target_ratio=0.01 is infeasible.*use target_ratio >="):
        prepare(tiny_bert(), TuneCompConfig(target_ratio=0.01))


def test_budget_tightens_gradually_and_is_met_at_prune_end():
    model = tiny_bert()
    cfg = TuneCompConfig(target_ratio=0.3, blend_steps=6, total_steps=8, budget_schedule="cubic")
    controller = prepare(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = train(model, opt, text_batches(8), controller=controller).stats
    raws = [s["raw_params"] for s in history]
    assert all(x >= y for x, y in zip(raws, raws[1:]))
    assert all(s["raw_params"] <= s["raw_budget"] or s["params"] <= s["budget_params"]
               for s in history)
    assert history[0]["params"] > controller.budget_params  # not all at once
    assert history[5]["params"] <= controller.budget_params  # met at prune_end = 6


def test_pruned_ranks_stay_pruned_despite_momentum():
    model = tiny_bert()
    cfg = TuneCompConfig(target_ratio=0.3, blend_steps=4, total_steps=8, l1_lambda=0.0)
    controller = prepare(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    batches = text_batches(8)
    dead_before: dict[str, torch.Tensor] = {}
    moved = False
    for batch in batches:
        opt.zero_grad()
        out = model(**batch)
        (out.loss + controller.regularization()).backward()
        opt.step()
        for name, layer in controller.layers.items():
            if name in dead_before and (layer.mask.detach()[dead_before[name]] != 0).any():
                moved = True  # the optimiser did move a pruned entry ...
        controller.step()
        alive = controller.alive_masks()
        for name, layer in controller.layers.items():
            dead = ~alive[name]
            assert (layer.mask.detach()[dead] == 0).all()  # ... and step() zeroed it again
            if name in dead_before:
                assert dead[dead_before[name]].all()  # never revived
            dead_before[name] = dead
    assert moved, "momentum never touched a pruned mask entry: the test proves nothing"


def test_hard_shrink_prunes_small_masks():
    model = tiny_bert()
    cfg = TuneCompConfig(target_ratio=0.9, blend_steps=2, total_steps=3, shrink_threshold=0.5)
    controller = prepare(model, cfg)
    name, layer = next(iter(controller.layers.items()))
    with torch.no_grad():
        layer.mask[:5] = 0.1
    controller.step()
    assert not controller.alive_masks()[name][:5].any()
    assert (layer.mask[:5] == 0).all()


def test_pruning_is_identical_across_replicas():
    """Two replicas with identical parameters (as DDP keeps them) prune identically."""
    results = []
    for _ in range(2):
        model = tiny_bert()
        controller = prepare(model, TuneCompConfig(target_ratio=0.4, blend_steps=3,
                                                   total_steps=3))
        train(model, torch.optim.AdamW(model.parameters(), lr=1e-3), text_batches(3),
              controller=controller)
        results.append(controller.alive_masks())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
