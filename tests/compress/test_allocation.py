"""Planned rank allocation (compress/allocation.py), the per-layer pruning it drives, and
the schedule fields that go with it (prune_start_fraction, recovery_warmup)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tunecomp_kernels import MaskedLowRankLinear
from tunecomp_kernels.compress import TuneCompConfig, compression_report, prepare
from tunecomp_kernels.compress.allocation import (
    DENSE,
    plan_ranks,
    start_rank,
    uniform_rank,
)
from tunecomp_kernels.compress.budget import max_lowrank_rank, prune_within_layer
from tunecomp_kernels.compress.pipelines import TrainingPlan, tunecomp_joint
from tunecomp_kernels.compress.targets import INFO_ATTR, TargetInfo


def _info(name: str, n_in: int, n_out: int) -> TargetInfo:
    return TargetInfo(name, n_in, n_out, True, "linear")


MINILM = [_info("q", 384, 384), _info("ffn_in", 384, 1536), _info("ffn_out", 1536, 384)]


def _cost(ranks, infos):
    return sum(i.dense_params if k == DENSE else k * i.rank_cost for k, i in zip(ranks, infos))


def test_uniform_rank_is_svd_llm_rule():
    # floor(r·in·out/(in+out)): the ranks SVD-LLM's uniform rule gives MiniLM's layers
    assert [uniform_rank(i, 0.25) for i in MINILM] == [48, 76, 76]
    assert [uniform_rank(i, 0.5) for i in MINILM] == [96, 153, 153]
    assert uniform_rank(_info("x", 4, 4), 1e-6, min_rank=2) == 2


@pytest.mark.parametrize("rule", ["global", "uniform", "floor", "sigma2"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_plan_meets_budget_and_no_dense_layer_is_lowrank(rule, ratio):
    g = torch.Generator().manual_seed(1)
    spectra = [torch.rand(min(i.in_features, i.out_features), generator=g).sort(
        descending=True).values * (1 + k) for k, i in enumerate(MINILM)]
    ranks = plan_ranks(spectra, MINILM, rule, ratio)
    budget = math.floor(ratio * sum(i.dense_params for i in MINILM))
    assert _cost(ranks, MINILM) <= budget
    for k, info in zip(ranks, MINILM):
        assert k == DENSE or 1 <= k <= max_lowrank_rank(info)


def test_global_keeps_a_dominant_layer_dense_and_floor_protects_the_others():
    infos = [_info("a", 64, 64), _info("b", 64, 64)]
    spectra = [torch.full((64,), 100.0), torch.linspace(1.0, 0.01, 64)]
    # at 60 %, the 100x stronger layer keeps all its ranks (dense), the other pays
    ranks = plan_ranks(spectra, infos, "global", 0.6)
    assert ranks[0] == DENSE and 1 <= ranks[1] <= max_lowrank_rank(infos[1])
    floored = plan_ranks(spectra, infos, "floor", 0.6, floor=0.5)
    assert floored[1] >= math.floor(0.5 * uniform_rank(infos[1], 0.6))
    assert _cost(floored, infos) <= math.floor(0.6 * 2 * 64 * 64)


def test_sigma2_is_scale_free_and_global_is_not():
    infos = [_info("a", 32, 32), _info("b", 32, 32)]
    s = torch.linspace(2.0, 0.1, 32)
    base = plan_ranks([s, s], infos, "sigma2", 0.3)
    assert plan_ranks([s, 50 * s], infos, "sigma2", 0.3) == base
    assert plan_ranks([s, 50 * s], infos, "global", 0.3) != plan_ranks([s, s], infos, "global",
                                                                       0.3)


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown allocation"):
        plan_ranks([torch.ones(4)], [_info("a", 4, 4)], "adaptive", 0.5)
    with pytest.raises(ValueError, match="2 spectra for 1 layers"):
        plan_ranks([torch.ones(4)] * 2, [_info("a", 4, 4)], "uniform", 0.5)


def test_start_rank_leaves_the_fraction_to_prune():
    info = _info("q", 384, 384)
    assert start_rank(48, info, 0.3) == math.ceil(48 / 0.7)
    assert start_rank(48, info, 0.0) == 48
    assert start_rank(300, info, 0.5) == 384  # capped at full rank


def test_prune_within_layer_drops_lowest_scores_deterministically():
    alive = torch.tensor([True, True, False, True, True])
    score = torch.tensor([3.0, 1.0, 9.0, 1.0, 2.0])
    kept = prune_within_layer(alive, score, 2)
    # lowest scores go first; of the tied 1.0s the higher index goes first
    assert kept.tolist() == [True, False, False, False, True]
    assert prune_within_layer(alive, score, 4).tolist() == alive.tolist()


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 24)) for _ in range(2)])
        self.head = nn.Linear(24, 3)

    def forward(self, x):  # noqa: ANN001, ANN201
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def _batches(n: int = 40):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 24, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def _plan(steps: int, **kw) -> TrainingPlan:
    return TrainingPlan(
        steps=steps, make_optimizer=lambda m: torch.optim.AdamW(
            [p for p in m.parameters() if p.requires_grad], lr=1e-3),
        forward=lambda m, b: m(b[0]), loss_fn=lambda out, b: nn.functional.cross_entropy(out, b[1]),
        **kw)


@pytest.mark.parametrize("rule", ["uniform", "global", "floor", "sigma2"])
def test_a_planned_run_ends_at_the_planned_ranks_within_budget(rule):
    torch.manual_seed(0)
    model = _Blocks()
    config = TuneCompConfig(target_ratio=0.4, allocation=rule, prune_fraction=0.3,
                            prune_start_fraction=0.2, prune_end_fraction=0.6)
    result = tunecomp_joint(model, config, _batches(), _plan(12))
    planned = result.controller.final_ranks()
    ranks = {n: m.active_rank for n, m in model.named_modules()
             if isinstance(m, MaskedLowRankLinear)}
    assert ranks == planned
    assert result.report.within_budget


def test_a_layer_planned_dense_stays_an_nn_linear_and_trains():
    torch.manual_seed(0)
    model = _Blocks()
    with torch.no_grad():  # one layer carries most of the energy: global keeps it dense
        model.blocks[0][0].weight.mul_(100.0)
    before = model.blocks[0][0].weight.detach().clone()
    controller = prepare(model, TuneCompConfig(target_ratio=0.8, allocation="global",
                                               prune_fraction=0.3, total_steps=4))
    kept = model.blocks[0][0]
    assert type(kept) is nn.Linear and isinstance(getattr(kept, INFO_ATTR), TargetInfo)
    assert "blocks.0.0" in controller.dense_layers
    # the budget covers every targeted layer, the dense ones included
    assert controller.original_params == 4 * 24 * 48
    assert controller.budget_params == math.floor(0.8 * 4 * 24 * 48)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for x, y in _batches(4):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        controller.step()
    assert not torch.equal(kept.weight, before)
    controller.finalize()
    rows = {r.name: r for r in compression_report(model).layers}
    assert rows["blocks.0.0"].kind == "dense" and rows["blocks.0.0"].params_after == 24 * 48


def _dominant_first_layer() -> _Blocks:
    torch.manual_seed(0)
    model = _Blocks()
    with torch.no_grad():  # one layer carries most of the energy: global keeps it dense
        model.blocks[0][0].weight.mul_(100.0)
    return model


def test_adaptive_plans_which_layers_stay_dense_and_shares_the_rest():
    model = _dominant_first_layer()
    config = TuneCompConfig(target_ratio=0.6, prune_end_fraction=0.6)
    assert config.allocation == "adaptive" and config.plan_dense
    result = tunecomp_joint(model, config, _batches(), _plan(12))
    controller = result.controller
    # the global plan on the spectrum keeps the dominant layer dense: never converted
    assert type(model.blocks[0][0]) is nn.Linear and list(controller.dense_layers) == ["blocks.0.0"]
    assert controller.final_ranks() is None  # the other layers' ranks are decided in training
    converted = [m for m in model.modules() if isinstance(m, MaskedLowRankLinear)]
    assert len(converted) == 3
    # the converted layers fit into what the dense layer leaves of the budget
    budget = math.floor(0.6 * 4 * 24 * 48)
    assert controller.budget_params == budget
    assert sum(m.active_rank * (24 + 48) for m in converted) <= budget - 24 * 48
    assert result.report.within_budget
    rows = {r.name: r for r in compression_report(model).layers}
    assert rows["blocks.0.0"].kind == "dense" and rows["blocks.0.0"].params_after == 24 * 48


def test_a_gpt2_layer_kept_dense_stays_conv1d_through_save_and_load(tmp_path):
    from tiny_models import text_batches, tiny_gpt2
    from transformers.pytorch_utils import Conv1D

    from tunecomp_kernels.compress import finalize, load_compressed, save_compressed, train

    model = tiny_gpt2()
    with torch.no_grad():  # a dominant layer: the global plan keeps it dense
        model.transformer.h[0].mlp.c_fc.weight.mul_(100.0)
    controller = prepare(model, TuneCompConfig(target_ratio=0.6, blend_steps=2,
                                               total_steps=4))
    assert list(controller.dense_layers) == ["transformer.h.0.mlp.c_fc"]
    kept = model.transformer.h[0].mlp.c_fc
    assert type(kept) is Conv1D
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
          text_batches(4, classes=None), controller=controller)
    finalize(model)
    assert compression_report(model).within_budget
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    assert type(loaded.transformer.h[0].mlp.c_fc) is Conv1D
    ids = torch.arange(8).reshape(1, 8)
    model.eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("init", ["svd", "svd_llm"])
def test_prepare_factors_each_weight_once_and_builds_what_from_dense_builds(monkeypatch, init):
    """With the default allocation the plan's SVD also gives the students' starting
    factors: one SVD per targeted layer (it was two per converted layer), and the same
    students as factoring again (plan_dense=False builds every student by from_dense)."""
    calibration = ([torch.randn(8, 24, generator=torch.Generator().manual_seed(3))]
                   if init == "svd_llm" else None)
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd",
                        lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    planned, plain = _dominant_first_layer(), _dominant_first_layer()
    controller = prepare(planned, TuneCompConfig(target_ratio=0.6, init=init), calibration)
    assert len(calls) == 4  # the four targeted layers, once each
    prepare(plain, TuneCompConfig(target_ratio=0.6, init=init, plan_dense=False), calibration)
    monkeypatch.undo()
    if init == "svd":  # (the whitened spectrum does not single the layer out)
        assert list(controller.dense_layers) == ["blocks.0.0"]
    students = dict(plain.named_modules())
    converted = [(n, m) for n, m in planned.named_modules() if isinstance(m, MaskedLowRankLinear)]
    assert len(converted) == 4 - len(controller.dense_layers)
    for name, layer in converted:
        assert torch.equal(layer.U, students[name].U), name
        assert torch.equal(layer.V, students[name].V), name


def _calibrated(plan_dense: bool = True):
    model = _dominant_first_layer()
    calibration = [torch.randn(8, 24, generator=torch.Generator().manual_seed(3))]
    controller = prepare(model, TuneCompConfig(target_ratio=0.6, plan_dense=plan_dense),
                         calibration=calibration)
    controller.fit_schedule(6)
    return controller


def test_a_calibrated_run_with_a_layer_kept_dense_resumes():
    controller = _calibrated()
    assert "blocks.0.0" in controller.dense_layers
    # statistics are kept for the converted layers only, so the state loads back
    assert "blocks.0.0" not in controller.activation_rms
    state = controller.state_dict()
    fresh = _calibrated()
    fresh.load_state_dict(state)
    assert fresh.alive_masks().keys() == controller.alive_masks().keys()


def test_a_checkpoint_from_before_plan_dense_resumes_with_plan_dense_false():
    state = _calibrated(plan_dense=False).state_dict()
    del state["config"]["plan_dense"]  # saved before the field existed: it converted all
    _calibrated(plan_dense=False).load_state_dict(state)
    with pytest.raises(ValueError, match=r"plan_dense=False \(now True\)"):
        _calibrated(plan_dense=True).load_state_dict(state)


def test_preparing_twice_never_converts_a_layer_kept_dense():
    model = _dominant_first_layer()
    prepare(model, TuneCompConfig(target_ratio=0.6))
    with pytest.raises(ValueError, match="prepared twice"):
        prepare(model, TuneCompConfig(target_ratio=0.6))
    assert type(model.blocks[0][0]) is nn.Linear


def test_adaptive_without_plan_dense_converts_every_layer():
    model = _dominant_first_layer()
    controller = prepare(model, TuneCompConfig(target_ratio=0.6, plan_dense=False,
                                               total_steps=4))
    assert controller.dense_layers == {}
    assert sum(isinstance(m, MaskedLowRankLinear) for m in model.modules()) == 4


def test_plan_dense_checks():
    with pytest.raises(TypeError, match="plan_dense must be a bool"):
        TuneCompConfig(plan_dense="yes")
    import numpy as np

    with pytest.raises(TypeError, match=r"got numpy\.bool"):  # not "must be a bool, got bool"
        TuneCompConfig(plan_dense=np.bool_(True))
    # at a ratio of 1 the plan would keep every layer: all are converted instead, with a
    # warning, as with plan_dense=False (such a run still blends)
    model = _Blocks()
    with pytest.warns(UserWarning, match="plan_dense keeps none"):
        controller = prepare(model, TuneCompConfig(target_ratio=1.0, total_steps=2))
    assert controller.dense_layers == {}
    assert sum(isinstance(m, MaskedLowRankLinear) for m in model.modules()) == 4


def test_prepare_refuses_a_plan_that_keeps_everything_dense():
    with pytest.raises(ValueError, match="keeps every targeted layer dense"):
        prepare(_Blocks(), TuneCompConfig(target_ratio=1.0, allocation="uniform",
                                          total_steps=2))


def test_allocation_config_checks():
    with pytest.raises(ValueError, match="prune_fraction needs a planned allocation"):
        TuneCompConfig(prune_fraction=0.3)
    with pytest.raises(ValueError, match=r"prune_fraction must be in \[0, 1\)"):
        TuneCompConfig(allocation="uniform", prune_fraction=1.0)
    with pytest.raises(ValueError, match="unknown allocation 'best'"):
        TuneCompConfig(allocation="best")
    with pytest.raises(ValueError, match="not both"):
        TuneCompConfig(prune_start=3, prune_start_fraction=0.2)
    sched = TuneCompConfig(prune_start_fraction=0.2, prune_end_fraction=0.6).resolve_schedule(200)
    assert (sched.prune_start, sched.prune_end, sched.blend_steps) == (40, 120, 100)
    with pytest.raises(ValueError, match=r"prune_start_fraction=0.8 must be <= blend_fraction"):
        TuneCompConfig(prune_start_fraction=0.8)
    with pytest.raises(ValueError, match="prune_start=160 must be <= prune_end=100"):
        TuneCompConfig(prune_start_fraction=0.8, prune_end=100).resolve_schedule(200)


def test_recovery_warmup_restarts_the_learning_rate_when_the_budget_is_met():
    torch.manual_seed(0)
    optimizers, lrs = [], []

    def make_optimizer(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        optimizers.append(opt)
        return opt

    def make_scheduler(opt, steps):  # linear decay to 0 over the phase
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (steps - s) / steps)

    plan = TrainingPlan(
        steps=10, make_optimizer=make_optimizer, make_scheduler=make_scheduler,
        forward=lambda m, b: m(b[0]), loss_fn=lambda out, b: nn.functional.cross_entropy(out, b[1]),
        recovery_warmup=True,
        callbacks=[lambda st: lrs.append(optimizers[-1].param_groups[0]["lr"])])
    tunecomp_joint(_Blocks(), TuneCompConfig(target_ratio=0.5, prune_end_fraction=0.6),
                   _batches(), plan)
    # the lr after step s (1-based): a 6-step decay, then at step 6 (the budget is met) a
    # fresh 4-step decay from the full rate
    expected = [(6 - s) / 6 for s in range(1, 6)] + [(4 - s) / 4 for s in range(0, 4)] + [0.0]
    assert lrs == pytest.approx(expected[:len(lrs)], abs=1e-12) and len(lrs) == 10


def test_init_auto_is_svd_llm_with_calibration_and_svd_without():
    assert TuneCompConfig(init="auto").resolved(calibrated=True).init == "svd_llm"
    assert TuneCompConfig(init="auto").resolved(calibrated=False).init == "svd"
    assert TuneCompConfig(init="asvd").resolved(calibrated=False).init == "asvd"
    torch.manual_seed(0)
    batches = _batches(3)
    calibrated = prepare(_Blocks(), TuneCompConfig(init="auto", total_steps=2),
                         calibration=[x for x, _ in batches], forward=lambda m, b: m(b))
    plain = prepare(_Blocks(), TuneCompConfig(init="auto", total_steps=2))
    assert calibrated.config.init == "svd_llm" and plain.config.init == "svd"
    # with calibration the student is exactly the explicit svd_llm one
    torch.manual_seed(0)
    reference = prepare(_Blocks(), TuneCompConfig(init="svd_llm", total_steps=2),
                        calibration=[x for x, _ in batches], forward=lambda m, b: m(b))
    for a, b in zip(calibrated.layers.values(), reference.layers.values()):
        assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
