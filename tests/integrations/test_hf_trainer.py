"""Hugging Face Trainer integration: one callback, or TuneCompTrainer for distillation."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from tiny_models import TextRows, tiny_bert, trainer_args

transformers = pytest.importorskip("transformers")
needs_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="transformers.Trainer needs accelerate",
)

from tunecomp_kernels.compress import TuneCompConfig, finalize, prepare  # noqa: E402
from tunecomp_kernels.integrations.hf_trainer import (  # noqa: E402
    STATE_FILE,
    TuneCompCallback,
    TuneCompTrainer,
)


def test_old_import_path_is_an_alias():
    import tunecomp_kernels.compress as compress
    import tunecomp_kernels.integrations as integrations

    assert compress.TuneCompCallback is integrations.TuneCompCallback is TuneCompCallback
    assert compress.TuneCompTrainer is integrations.TuneCompTrainer is TuneCompTrainer


def args(tmp_path, **kw):
    return trainer_args(tmp_path, **kw)


@needs_accelerate
def test_callback_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.4, blend_steps=2, total_steps=3))
    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=TextRows(),
                                   callbacks=[TuneCompCallback(controller)])
    trainer.train()
    assert controller.step_count == 3 and controller.teacher_freed
    assert controller.current_params <= controller.budget_params
    finalize(model)
    assert sorted(os.listdir(tmp_path)) in ([], ["out"])  # nothing outside tmp_path


def test_callback_adds_the_l1_gradient():
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(l1_lambda=0.5, l1_schedule="constant",
                                               total_steps=3))
    layer = next(iter(controller.layers.values()))
    layer.mask.grad = torch.zeros_like(layer.mask)
    with torch.no_grad():
        layer.mask[0] = -2.0
    TuneCompCallback(controller).on_pre_optimizer_step(None, None, None)
    assert layer.mask.grad[0] == -0.5 and layer.mask.grad[1] == 0.5
    off = TuneCompCallback(controller, add_l1_gradients=False)
    off.on_pre_optimizer_step(None, None, None)
    assert layer.mask.grad[0] == -0.5
    with pytest.raises(TypeError, match="needs a TuneCompController"):
        TuneCompCallback(object())


@needs_accelerate
def test_trainer_with_distillation(tmp_path):
    model = tiny_bert()
    cfg = TuneCompConfig(target_ratio=0.4, blend_steps=2, total_steps=3, distill="logits")
    controller = prepare(model, cfg)
    calls = []
    original = controller.teacher_forward

    def spy(inputs):
        calls.append(sorted(inputs))
        return original(inputs)

    controller.teacher_forward = spy
    trainer = TuneCompTrainer(model=model, args=args(tmp_path), train_dataset=TextRows(),
                              tunecomp=controller)
    trainer.train()
    assert controller.step_count == 3
    assert len(calls) == 2  # teacher outputs during the blend only (t = 0, 1)


@needs_accelerate
def test_trainer_checkpoint_resume_restores_controller(tmp_path):
    kw = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "save_only_model": False}
    model = tiny_bert()
    cfg = TuneCompConfig(target_ratio=0.4, blend_steps=3, total_steps=4)
    controller = prepare(model, cfg)
    trainer = transformers.Trainer(model=model, args=args(tmp_path, **kw), train_dataset=TextRows(),
                                   callbacks=[TuneCompCallback(controller)])
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    saved = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert saved["step"] == 2

    model2 = tiny_bert()
    controller2 = prepare(model2, cfg)
    trainer2 = transformers.Trainer(model=model2, args=args(tmp_path, **kw),
                                    train_dataset=TextRows(),
                                    callbacks=[TuneCompCallback(controller2)])
    trainer2.train(resume_from_checkpoint=str(ckpt))
    assert controller2.step_count == 4
    assert all(torch.equal(controller2.alive_masks()[k], v)
               for k, v in controller.alive_masks().items())
