"""HF Trainer: the schedule fitted to max_steps, a mismatched schedule, a missing callback,
distillation without TuneCompTrainer, and load_best_model_at_end (controller state saved
with each checkpoint, restored with the best one, refused from before the blend ended)."""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
from tiny_models import TextRows, tiny_bert, trainer_args

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                reason="transformers.Trainer needs accelerate")

from tunecomp_kernels.compress import (  # noqa: E402
    TuneCompConfig,
    compression_report,
    finalize,
    prepare,
)
from tunecomp_kernels.compress.schedules import ScheduleError  # noqa: E402
from tunecomp_kernels.integrations.hf_trainer import (  # noqa: E402
    STATE_FILE,
    TuneCompCallback,
    TuneCompTrainer,
)


def args(tmp_path, **kw):
    return trainer_args(tmp_path, **{"max_steps": 4, **kw})


def trainer(tmp_path, model, callbacks=(), **kw):
    return transformers.Trainer(model=model, args=args(tmp_path, **kw), train_dataset=TextRows(),
                                callbacks=list(callbacks))


# --- the schedule follows the Trainer ------------------------------------------------------


@pytest.mark.parametrize("max_steps", [3, 20])
def test_default_schedule_fits_max_steps(tmp_path, max_steps):
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5))
    trainer(tmp_path, model, [TuneCompCallback(controller)], max_steps=max_steps).train()
    assert controller.schedule.total_steps == max_steps
    assert controller.schedule.blend_steps == round(max_steps / 2)
    assert controller.step_count == max_steps and controller.schedule_complete
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finalize(model)
    assert compression_report(model).ratio <= 0.5


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"blend_steps": 100, "total_steps": 200},
         "TuneCompConfig(total_steps=200) does not fit a run of 20 optimiser steps"),
        ({"blend_steps": 100}, "blend_steps=100 must be <= total_steps=20"),
    ],
)
def test_mismatched_schedule_is_refused_at_train_begin(tmp_path, kwargs, needle):
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, **kwargs))
    t = trainer(tmp_path, model, [TuneCompCallback(controller)], max_steps=20)
    with pytest.raises(ValueError) as info:
        t.train()
    assert needle in str(info.value) and "HF Trainer's 20 optimiser steps" in str(info.value)
    assert controller.step_count == 0 and t.state.global_step == 0


def test_missing_callback_is_named_at_finalize(tmp_path):
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5))
    trainer(tmp_path, model, max_steps=2).train()  # no TuneCompCallback
    with pytest.raises(ScheduleError, match="never stepped.*TuneCompCallback"):
        finalize(model)
    assert controller.step_count == 0


@pytest.mark.parametrize("mode", ["logits", "hidden"])
def test_distillation_needs_tunecomp_trainer(tmp_path, mode):
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, distill=mode))
    t = trainer(tmp_path, model, [TuneCompCallback(controller)], max_steps=2)
    with pytest.raises(ValueError, match=f"distill='{mode}'.*use TuneCompTrainer"):
        t.train()
    assert controller.step_count == 0
    with pytest.raises(ValueError, match="adds its TuneCompCallback itself"):
        TuneCompTrainer(model=model, args=args(tmp_path), train_dataset=TextRows(),
                        tunecomp=controller, callbacks=[TuneCompCallback(controller)])


def test_tunecomp_trainer_distills_with_the_default_schedule(tmp_path):
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, distill="logits"))
    TuneCompTrainer(model=model, args=args(tmp_path, max_steps=4), train_dataset=TextRows(),
                    tunecomp=controller).train()
    assert controller.distill_terms == 2  # the blend's first half of 4 steps
    finalize(model)
    assert compression_report(model).ratio <= 0.5


# --- load_best_model_at_end ------------------------------------------------------------------


def best_at(step: int):
    """compute_metrics whose "score" is best at ``step`` (evaluations every 2 steps)."""
    calls = []

    def compute_metrics(_):
        calls.append(1)
        return {"score": 1.0 if 2 * len(calls) == step else 0.0}

    return compute_metrics


def best_trainer(tmp_path, model, controller, step: int):
    kw = {"max_steps": 8, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps",
          "save_steps": 2, "load_best_model_at_end": True, "metric_for_best_model": "score",
          "greater_is_better": True, "per_device_eval_batch_size": 12}
    return transformers.Trainer(model=model, args=args(tmp_path, **kw), train_dataset=TextRows(),
                                eval_dataset=TextRows(), compute_metrics=best_at(step),
                                callbacks=[TuneCompCallback(controller)])


def test_best_checkpoint_mid_blend_is_refused(tmp_path):
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.4, blend_steps=4, total_steps=8))
    t = best_trainer(tmp_path, model, controller, step=2)
    warned = pytest.warns(UserWarning, match=r"eval_delay=4")
    with warned, pytest.raises(ScheduleError) as info:
        t.train()
    msg = str(info.value)
    assert "checkpoint-2 is from step 2, before the schedule's end at step 4" in msg
    assert "eval_delay=4" in msg
    out = tmp_path / "out"
    for step in (2, 4, 6, 8):  # the controller state is saved with every checkpoint
        assert torch.load(out / f"checkpoint-{step}" / STATE_FILE)["step"] == step
    assert not [p for p in os.listdir(out / "checkpoint-2") if p.startswith(".")]
    with pytest.raises(ScheduleError, match="over target_ratio=0.4"):
        finalize(model)  # the reloaded weights are over budget: never exported silently


def test_best_checkpoint_after_the_blend_is_restored_and_meets_the_target(tmp_path):
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.4, blend_steps=4, total_steps=8))
    with pytest.warns(UserWarning, match="evaluates checkpoints before step 4"):
        best_trainer(tmp_path, model, controller, step=6).train()
    assert controller.step_count == 6  # the state saved with checkpoint-6
    finalize(model)
    report = compression_report(model)
    assert report.ratio <= 0.4
    assert report.ratio == pytest.approx(controller.ratio)


def test_eval_delay_avoids_the_early_best(tmp_path):
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.4, blend_steps=4, total_steps=8))
    t = best_trainer(tmp_path, model, controller, step=6)
    t.args.eval_delay = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        t.train()
    finalize(model)
    assert compression_report(model).ratio <= 0.4


def test_controller_state_is_written_atomically(tmp_path, monkeypatch):
    from types import SimpleNamespace

    controller = prepare(tiny_bert(), TuneCompConfig(target_ratio=0.5, blend_steps=1,
                                                     total_steps=2))
    callback = TuneCompCallback(controller)
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    hf_args = SimpleNamespace(output_dir=str(tmp_path))
    hf_state = SimpleNamespace(global_step=3, is_world_process_zero=True)
    callback.on_save(hf_args, hf_state, None)
    good = (folder / STATE_FILE).read_bytes()

    def torn_write(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(OSError, match="disk full"):
        callback.on_save(hf_args, hf_state, None)
    assert (folder / STATE_FILE).read_bytes() == good
    assert os.listdir(folder) == [STATE_FILE]
