"""The schedule fitted to the run, and finalize refusing unfinished runs, as a plain training
loop drives the controller: fit_schedule, a mismatched schedule, a missing controller.step
and a best-checkpoint reload (state saved mid-blend vs after the schedule's end)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import block_net, vector_batches
from torch import nn

from tunecomp_kernels.compress import TuneCompConfig, finalize, prepare
from tunecomp_kernels.compress.config import Schedule
from tunecomp_kernels.compress.finalize import unfinished_reason
from tunecomp_kernels.compress.schedules import ScheduleError


def run(model: nn.Module, controller, steps: int, *, step_controller: bool = True,
        keep: dict | None = None) -> None:
    """The plain loop: AdamW, cross-entropy; ``keep[t]`` gets (weights, controller state)
    after step t, like a checkpoint."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for t, (x, y) in enumerate(vector_batches(steps), start=1):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if step_controller:
            controller.step()
        if keep is not None:
            keep[t] = (copy.deepcopy(model.state_dict()), controller.state_dict())


def kept_ratio(model: nn.Module) -> float:
    """The exported model's share of the targeted parameters (after finalize)."""
    from tunecomp_kernels.compress import compression_report

    return compression_report(model).ratio


# --- fit_schedule ------------------------------------------------------------------------


def test_default_schedule_is_fitted_to_the_run_and_meets_the_budget():
    model = block_net()
    controller = prepare(model, TuneCompConfig(target_ratio=0.4))
    assert controller.schedule is None
    schedule = controller.fit_schedule(8)
    assert schedule == Schedule(8, 4, 0, 4, 4)  # blend over the first half, budget met there
    assert controller.fit_schedule(8) is not None and controller.schedule == schedule
    run(model, controller, 8)
    assert controller.teacher_freed and controller.schedule_complete
    assert controller.current_params <= controller.budget_params
    finalize(model)
    assert kept_ratio(model) <= 0.4


@pytest.mark.parametrize("steps", [3, 20])
def test_same_config_stays_sound_for_any_run_length(steps):
    model = block_net()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5))
    controller.fit_schedule(steps)
    run(model, controller, steps)
    finalize(model)
    assert kept_ratio(model) <= 0.5


def test_step_before_the_schedule_is_known_is_a_clear_error():
    controller = prepare(block_net(), TuneCompConfig())
    with pytest.raises(ScheduleError, match=r"Call controller.fit_schedule\(total_steps\)"):
        controller.step()
    assert controller.step_count == 0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"blend_steps": 100, "total_steps": 200},
         "TuneCompConfig(total_steps=200) does not fit a run of 20 optimiser steps"),
        ({"blend_steps": 100}, "blend_steps=100 must be <= total_steps=20"),
    ],
)
def test_mismatched_explicit_schedule_is_refused(kwargs, needle):
    controller = prepare(block_net(), TuneCompConfig(target_ratio=0.5, **kwargs))
    with pytest.raises(ValueError) as info:
        controller.fit_schedule(20)
    assert needle in str(info.value)


def test_explicit_steps_work_as_before_without_fitting():
    model = block_net()
    controller = prepare(model, TuneCompConfig(target_ratio=0.4, blend_steps=2, total_steps=4))
    assert controller.schedule == Schedule(4, 2, 0, 2, 2)
    run(model, controller, 4)
    finalize(model)
    assert kept_ratio(model) <= 0.4


def test_refit_to_another_length_after_stepping_is_refused():
    model = block_net()
    controller = prepare(model, TuneCompConfig())
    controller.fit_schedule(10)
    controller.fit_schedule(6)  # before the first step: allowed
    run(model, controller, 1)
    controller.fit_schedule(6)  # the same length: nothing happens
    with pytest.raises(ScheduleError, match="fitted to 6 optimiser steps and 1 of them"):
        controller.fit_schedule(12)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        controller.fit_schedule(0)
    with pytest.raises(TypeError, match="total_steps must be an int"):
        controller.fit_schedule(6.0)


def test_state_dict_carries_the_fitted_length():
    model = block_net()
    controller = prepare(model, TuneCompConfig())
    controller.fit_schedule(6)
    run(model, controller, 2)
    fresh = prepare(block_net(), TuneCompConfig())
    fresh.load_state_dict(controller.state_dict())
    assert fresh.schedule == controller.schedule and fresh.step_count == 2


# --- finalize on an unfinished run ---------------------------------------------------------


def test_missing_step_calls_make_finalize_name_the_cause():
    model = block_net()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5))
    controller.fit_schedule(6)
    run(model, controller, 6, step_controller=False)  # the loop forgot controller.step()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ScheduleError) as info:
        finalize(model)
    msg = str(info.value)
    assert "never stepped (step 0, 6 planned" in msg and "TuneCompCallback" in msg
    assert "target_ratio=0.5" in msg and "allow_partial=True" in msg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # unchanged


def test_never_fitted_controller_names_the_callback():
    model = block_net()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5))
    with pytest.raises(ScheduleError, match="never stepped .*its run length was never set"):
        finalize(model)
    del controller  # dropped: finalize still sees the masks over budget and names the cause
    with pytest.raises(ScheduleError, match="keep 1.000 of the targeted parameters .*over "
                                            "target_ratio=0.5.*callback was missing"):
        finalize(model)


def test_stopped_early_gives_the_numbers_and_partial_export_warns_once():
    model = block_net()
    controller = prepare(model, TuneCompConfig(target_ratio=0.4, l1_lambda=0.0))
    controller.fit_schedule(8)
    run(model, controller, 2)
    with pytest.raises(ScheduleError) as info:
        finalize(model)
    msg = str(info.value)
    assert "stopped at step 2 of 8 planned, before its end at step 4" in msg
    assert f"kept ratio {controller.ratio:.3f} against target_ratio=0.4" in msg
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        controller.finalize(allow_partial=True)
    assert len(caught) == 1 and "allow_partial=True" in str(caught[0].message)
    assert controller.finalized


def test_finished_run_finalizes_without_warnings():
    model = block_net()
    controller = prepare(model, TuneCompConfig(target_ratio=0.4))
    controller.fit_schedule(4)
    run(model, controller, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finalize(model)
    finalize(model)  # idempotent
    assert unfinished_reason(model) is None


# --- a best-checkpoint reload --------------------------------------------------------------


def test_reload_of_a_mid_blend_checkpoint_is_refused():
    model = block_net()
    controller = prepare(model, TuneCompConfig(target_ratio=0.4, blend_steps=4, total_steps=8))
    keep: dict = {}
    run(model, controller, 8, keep=keep)
    weights, state = keep[2]  # "best" at step 2, mid-blend
    with pytest.raises(ScheduleError, match=r"from step 2, before the end of the blend \(step 4\)"):
        controller.load_state_dict(state)
    # weights alone reloaded (controller state forgotten): finalize sees the masks over budget
    model.load_state_dict(weights, strict=False)
    with pytest.raises(ScheduleError) as info:
        finalize(model)
    assert "over target_ratio=0.4" in str(info.value)
    assert f"controller counts {controller.ratio:.3f}" in str(info.value)


def test_reload_of_a_checkpoint_after_the_schedule_meets_the_target():
    model = block_net()
    controller = prepare(model, TuneCompConfig(target_ratio=0.4, blend_steps=4, total_steps=8))
    keep: dict = {}
    run(model, controller, 8, keep=keep)
    weights, state = keep[6]
    controller.load_state_dict(state)
    model.load_state_dict(weights)
    assert controller.step_count == 6
    finalize(model)
    assert kept_ratio(model) <= 0.4
