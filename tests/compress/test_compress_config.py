"""TuneCompConfig validation and the α / λ / budget schedule values."""

from __future__ import annotations

import math

import pytest

from tunecomp_kernels.compress import TuneCompConfig, blend_scales, budget_fraction, l1_weight
from tunecomp_kernels.compress.config import BLENDS, RECIPE, Schedule

# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "needle"),
    [
        ({"target_ratio": 0.0}, ValueError, "target_ratio must be in (0, 1], got 0.0"),
        ({"target_ratio": 1.5}, ValueError, "target_ratio must be in (0, 1], got 1.5"),
        ({"target_ratio": -0.2}, ValueError, "target_ratio"),
        ({"target_ratio": float("nan")}, ValueError, "target_ratio must be finite"),
        ({"target_ratio": "half"}, TypeError, "target_ratio must be a number"),
        ({"target_ratio": True}, TypeError, "target_ratio"),
        ({"init": "pca"}, ValueError,
         "unknown init 'pca'; choose one of ['svd', 'asvd', 'svd_llm']"),
        ({"blend": "step"}, ValueError, "unknown blend 'step'; choose one of ['sine_power'"),
        ({"l1_schedule": "exp"}, ValueError, "unknown l1_schedule 'exp'"),
        ({"budget_schedule": "x"}, ValueError, "unknown budget_schedule 'x'"),
        ({"score": "fisher"}, ValueError, "unknown score 'fisher'"),
        ({"distill": "attention"}, ValueError, "unknown distill 'attention'; choose one of"),
        ({"init_rank_ratio": 0.0}, ValueError, "init_rank_ratio must be in (0, 1]"),
        ({"init_rank_ratio": 1.2}, ValueError, "init_rank_ratio"),
        ({"blend_steps": -1}, ValueError, "blend_steps must be >= 0, got -1"),
        ({"blend_steps": 2.5}, TypeError, "blend_steps must be an int"),
        ({"total_steps": 0}, ValueError, "total_steps must be >= 1"),
        ({"blend_steps": 300, "total_steps": 200}, ValueError,
         "blend_steps=300 must be <= total_steps=200"),
        ({"l1_lambda": -1.0}, ValueError, "l1_lambda must be >= 0"),
        ({"shrink_threshold": -0.1}, ValueError, "shrink_threshold must be >= 0"),
        ({"prune_start": 50, "prune_end": 10}, ValueError,
         "prune_start=50 must be <= prune_end=10"),
        ({"prune_end": 500, "total_steps": 200}, ValueError,
         "prune_end=500 must be <= total_steps=200"),
        ({"blend_fraction": 1.5}, ValueError, "blend_fraction must be in [0, 1], got 1.5"),
        ({"blend_fraction": "half"}, TypeError, "blend_fraction must be a number"),
        ({"prune_end_fraction": -0.1}, ValueError, "prune_end_fraction must be in [0, 1]"),
        ({"prune_end_fraction": 0.5, "prune_end": 3}, ValueError,
         "give prune_end=3 (steps) or prune_end_fraction=0.5 (of the run), not both"),
        ({"prune_start": 3, "prune_end_fraction": 0.0}, ValueError,
         "prune_start=3 must be <= prune_end=0"),
        ({"total_steps": 2.0}, TypeError, "total_steps must be an int"),
        ({"min_rank": 0}, ValueError, "min_rank must be >= 1"),
        ({"distill_weight": -1.0}, ValueError, "distill_weight must be >= 0"),
        ({"distill_temperature": 0.0}, ValueError, "distill_temperature must be > 0"),
        ({"include": ["("]}, ValueError, "include pattern '(' is not a valid regex"),
        ({"exclude": [3]}, TypeError, "exclude patterns must be str"),
        ({"score_per_param": 1}, TypeError, "score_per_param must be a bool"),
        ({"asvd_alpha": -1.0}, ValueError, "asvd_alpha must be >= 0"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, exc, needle):
    with pytest.raises(exc) as info:
        TuneCompConfig(**kwargs)
    assert needle in str(info.value)


def test_defaults_are_the_validated_recipe():
    cfg = TuneCompConfig()
    # bench/results/reproduction_pilots.md: the recipe chosen on val
    assert (cfg.init, cfg.init_rank_ratio, cfg.blend, cfg.l1_lambda, cfg.score) == (
        "svd", 0.75, "sine_affine", 1e-4, "magnitude")
    assert (cfg.allocation, cfg.feature_weight, cfg.prune_fraction) == ("adaptive", 0.0, None)
    # the same recipe with and without calibration data
    assert cfg.resolved(calibrated=True) == cfg.resolved(calibrated=False) == cfg
    assert cfg.total_steps is None and cfg.blend_steps is None and cfg.blend_fraction == 0.5
    assert all(getattr(cfg, k) == v for k, v in RECIPE.items())
    # blend over the first half of the run, budget met there, whatever the run length
    for steps, half in ((20, 10), (200, 100), (3, 2), (1, 1)):
        assert cfg.resolve_schedule(steps) == Schedule(steps, half, 0, half, half)
    # the CLI / reproduction read the same values
    from tunecomp_kernels.tasks.recipes import JOINT_DEFAULTS
    assert {k: JOINT_DEFAULTS[k] for k in ("init", "init_rank_ratio", "blend", "blend_fraction",
                                           "l1_lambda")} == {
        k: RECIPE[k] for k in ("init", "init_rank_ratio", "blend", "blend_fraction", "l1_lambda")}


def test_explicit_steps_keep_their_meaning():
    old = TuneCompConfig(blend_steps=100, total_steps=200)  # the former defaults
    assert old.resolve_schedule() == old.resolve_schedule(200) == Schedule(200, 100, 0, 100, 100)
    assert old.resolved_prune_end == old.resolved_l1_decay_steps == 100
    cfg = TuneCompConfig(blend_steps=30, prune_end=60, l1_decay_steps=45)
    assert cfg.resolve_schedule(80) == Schedule(80, 30, 0, 60, 45)
    frac = TuneCompConfig(blend_fraction=0.25, prune_end_fraction=0.75)
    assert frac.resolve_schedule(40) == Schedule(40, 10, 0, 30, 30)
    assert TuneCompConfig(blend_fraction=0.0).resolve_schedule(9).blend_steps == 0
    assert not TuneCompConfig(blend_fraction=0.0).keeps_teacher
    assert not TuneCompConfig(blend_steps=0).keeps_teacher and TuneCompConfig().keeps_teacher


@pytest.mark.parametrize(
    ("kwargs", "steps", "needle"),
    [
        ({"total_steps": 200}, 20,
         "TuneCompConfig(total_steps=200) does not fit a run of 20 optimiser steps: set "
         "total_steps=20, or leave total_steps=None"),
        ({"blend_steps": 100}, 20,
         "blend_steps=100 must be <= total_steps=20 (the run's optimiser steps)"),
        ({"blend_steps": 5, "prune_end": 30}, 20,
         "prune_end=30 must be <= total_steps=20 (the run's optimiser steps)"),
        ({}, None, "the run length is not known: TuneCompConfig(total_steps=None)"),
    ],
)
def test_schedule_that_does_not_fit_the_run(kwargs, steps, needle):
    cfg = TuneCompConfig(**kwargs)
    with pytest.raises(ValueError) as info:
        cfg.resolve_schedule(steps)
    assert needle in str(info.value)
    if steps is None:
        with pytest.raises(ValueError, match="the run length is not known"):
            l1_weight(cfg, 1)
        with pytest.raises(ValueError, match="the run length is not known"):
            _ = cfg.resolved_prune_end


def test_round_trip():
    cfg2 = TuneCompConfig(target_ratio=0.3, include=("layer",), exclude=["attn"], prune_end=150)
    assert cfg2.exclude == ("attn",)
    assert TuneCompConfig.from_dict(cfg2.to_dict()) == cfg2
    with pytest.raises(ValueError, match="unknown TuneCompConfig field"):
        TuneCompConfig.from_dict({"target_ratio": 0.5, "bogus": 1})


def test_needs_calibration():
    assert not TuneCompConfig().needs_calibration
    assert not TuneCompConfig(score="auto").needs_calibration
    assert TuneCompConfig(init="asvd").needs_calibration
    assert TuneCompConfig(init="svd_llm").needs_calibration
    assert TuneCompConfig(score="activation").needs_calibration


# --- schedules ---------------------------------------------------------------------------

T = 8


@pytest.mark.parametrize(
    ("blend", "t", "alpha", "student"),
    [
        ("sine_power", 0, 1.0, 0.0),
        ("sine_power", 4, 1 - math.sin(math.pi / 4),
         math.sqrt(1 - (1 - math.sin(math.pi / 4)) ** 2)),
        ("sine_power", 8, 0.0, 1.0),
        ("sine_affine", 0, 1.0, 0.0),
        ("sine_affine", 4, 1 - math.sin(math.pi / 4), math.sin(math.pi / 4)),
        ("sine_affine", 2, 1 - math.sin(math.pi / 8), math.sin(math.pi / 8)),
        ("linear", 0, 1.0, 0.0),
        ("linear", 2, 0.75, 0.25),
        ("linear", 6, 0.25, 0.75),
        ("cosine", 0, 1.0, 0.0),
        ("cosine", 4, 0.5, 0.5),
        ("cosine", 2, (1 + math.cos(math.pi / 4)) / 2, 1 - (1 + math.cos(math.pi / 4)) / 2),
    ],
)
def test_blend_values(blend, t, alpha, student):
    a, s = blend_scales(blend, t, T)
    assert a == pytest.approx(alpha, abs=1e-12)
    assert s == pytest.approx(student, abs=1e-12)


@pytest.mark.parametrize("blend", BLENDS)
def test_blend_shape(blend):
    values = [blend_scales(blend, t, T) for t in range(T + 5)]
    alphas = [a for a, _ in values]
    students = [s for _, s in values]
    assert alphas[0] == 1.0 and students[0] == 0.0
    assert all(a == 0.0 for a in alphas[T:]) and all(s == 1.0 for s in students[T:])
    assert all(x >= y for x, y in zip(alphas, alphas[1:]))  # teacher share decays
    assert all(x <= y for x, y in zip(students, students[1:]))  # student share grows
    for a, s in values:
        if blend == "sine_power":
            assert a * a + s * s == pytest.approx(1.0)
        else:
            assert a + s == pytest.approx(1.0)


def test_no_blend_means_student_only():
    assert blend_scales("sine_power", 0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="step t must be >= 0"):
        blend_scales("linear", -1, 4)


def test_l1_schedules():
    const = TuneCompConfig(l1_lambda=0.1, l1_schedule="constant", blend_steps=10, total_steps=20)
    assert [l1_weight(const, t) for t in (0, 5, 10, 20)] == [0.1] * 4
    lin = TuneCompConfig(l1_lambda=0.1, l1_schedule="linear", blend_steps=10, total_steps=20)
    assert [l1_weight(lin, t) for t in (0, 5, 10, 15)] == pytest.approx([0.1, 0.05, 0.0, 0.0])
    cos = TuneCompConfig(l1_lambda=0.1, l1_schedule="cosine", l1_decay_steps=4, total_steps=20,
                         blend_steps=10)
    expected = [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.0, 0.0]
    assert [l1_weight(cos, t) for t in (0, 1, 2, 4, 9)] == pytest.approx(expected)


def test_budget_fraction():
    cub = TuneCompConfig(prune_start=2, prune_end=6, blend_steps=8, total_steps=10)
    assert [budget_fraction(cub, t) for t in (0, 2, 4, 6, 9)] == pytest.approx(
        [1.0, 1.0, 0.125, 0.0, 0.0])
    lin = TuneCompConfig(budget_schedule="linear", blend_steps=4, total_steps=10)
    assert [budget_fraction(lin, t) for t in range(6)] == pytest.approx(
        [1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    instant = TuneCompConfig(blend_steps=0, total_steps=10)
    assert budget_fraction(instant, 0) == 0.0
