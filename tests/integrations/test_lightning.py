"""PyTorch Lightning callback: schedule per optimiser step, L1 gradients, logging,
checkpoint resume after the blend. Skips when Lightning is not installed (except the test
of the error message shown then)."""

from __future__ import annotations

import builtins
import importlib
import sys

import pytest
import torch
from tiny_models import (
    lightning_block_module,
    vector_batches,
)
from torch import nn

from tunecomp_kernels.compress import TuneCompConfig

STEPS = 6


def test_missing_lightning_gives_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_lightning(name, *args, **kwargs):
        if name.split(".")[0] in ("lightning", "pytorch_lightning"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lightning)
    monkeypatch.delitem(sys.modules, "tunecomp_kernels.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'tunecomp_kernels\[lightning\]'"):
        importlib.import_module("tunecomp_kernels.integrations.lightning")
    monkeypatch.delitem(sys.modules, "tunecomp_kernels.integrations.lightning", raising=False)


L = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")

from tunecomp_kernels.integrations.lightning import TuneCompLightningCallback  # noqa: E402


def config(**kw) -> TuneCompConfig:
    base = {"target_ratio": 0.4, "blend_steps": 3, "l1_lambda": 1e-3, "l1_schedule": "constant"}
    base.update(kw)
    return TuneCompConfig(**base)


class StopAt(L.Callback):
    """Interrupts a run after ``step`` optimiser steps (as a crash would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def loader(n: int = STEPS):
    """Ready-made batches, yielded as they are (``batch_size=None``), in order."""
    return torch.utils.data.DataLoader(vector_batches(n), batch_size=None)


def trainer(tmp_path, callback, **kw):
    base = {"accelerator": "cpu", "devices": 1, "max_steps": STEPS, "max_epochs": 100,
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path)}
    base.update(kw)
    return L.Trainer(callbacks=[callback], **base)


def test_runs_the_schedule(tmp_path):
    module = lightning_block_module(config())
    callback = TuneCompLightningCallback(module.tunecomp)
    calls = []
    original = module.tunecomp.add_l1_gradients
    module.tunecomp.add_l1_gradients = lambda: (calls.append(1), original())[1]
    t = trainer(tmp_path, callback)
    t.fit(module, loader())
    c = module.tunecomp
    assert c.step_count == t.global_step == STEPS
    assert c.teacher_freed and c.current_params <= c.budget_params
    assert len(calls) == STEPS
    assert {"tunecomp/alpha", "tunecomp/l1", "tunecomp/ratio"} <= set(t.callback_metrics)
    assert float(t.callback_metrics["tunecomp/alpha"]) == 0.0


def test_gradient_accumulation_steps_once_per_optimizer_step(tmp_path):
    module = lightning_block_module(config(blend_steps=1))
    callback = TuneCompLightningCallback(module.tunecomp, log=False)
    t = trainer(tmp_path, callback, max_steps=2, accumulate_grad_batches=3)
    t.fit(module, loader(6))
    assert t.global_step == 2 and module.tunecomp.step_count == 2


def test_l1_gradient_reaches_the_masks(tmp_path):
    module = lightning_block_module(config(l1_lambda=0.5, blend_steps=1))
    layer = next(iter(module.tunecomp.layers.values()))
    seen = {}

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["grad"] = layer.mask.grad.clone()

    callback = TuneCompLightningCallback(module.tunecomp, log=False)
    t = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=str(tmp_path), callbacks=[callback, Spy()])
    reference = lightning_block_module(config(l1_lambda=0.5, blend_steps=1))
    x, y = vector_batches(1)[0]
    nn.functional.cross_entropy(reference.net(x), y).backward()
    ref_layer = next(iter(reference.tunecomp.layers.values()))
    t.fit(module, loader(1))
    expected = ref_layer.mask.grad + 0.5 * torch.sign(ref_layer.mask.detach())
    torch.testing.assert_close(seen["grad"], expected)


def test_resume_after_the_blend_equals_an_uninterrupted_run(tmp_path):
    # uninterrupted: 6 steps
    full = lightning_block_module(config())
    trainer(tmp_path / "a", TuneCompLightningCallback(full.tunecomp, log=False)).fit(
        full, loader(1))
    # interrupted at step 4 (teachers already freed at step 3), resumed in a fresh process
    # state: a newly prepared module (it has teachers again) and the checkpoint
    first = lightning_block_module(config())
    t1 = trainer(tmp_path / "b", TuneCompLightningCallback(first.tunecomp, log=False))
    t1.callbacks.append(StopAt(4))
    t1.fit(first, loader(1))
    assert t1.global_step == 4
    ckpt = tmp_path / "step4.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert "teacher_weight" not in " ".join(saved)
    # pruned ranks were compacted away: the weights are smaller than a fresh module's
    fresh_sizes = {k: v.shape for k, v in lightning_block_module(config()).state_dict().items()}
    assert any(v.shape != fresh_sizes[k] for k, v in saved.items() if k.endswith(".mask"))

    resumed = lightning_block_module(config())
    assert not resumed.tunecomp.teacher_freed
    callback = TuneCompLightningCallback(resumed.tunecomp, log=False)
    trainer(tmp_path / "c", callback).fit(resumed, loader(1), ckpt_path=str(ckpt))
    assert resumed.tunecomp.step_count == STEPS and resumed.tunecomp.teacher_freed
    assert resumed.tunecomp.alive_masks().keys() == full.tunecomp.alive_masks().keys()
    for k, v in full.tunecomp.alive_masks().items():
        assert torch.equal(resumed.tunecomp.alive_masks()[k], v)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    # the hook on the module is removed again after fit
    assert "on_load_checkpoint" not in vars(resumed)


def test_rejects_a_non_controller():
    with pytest.raises(TypeError, match="needs a TuneCompController"):
        TuneCompLightningCallback(object())
