"""Lightning: the schedule fitted to the trainer's planned steps, a mismatched schedule, a
missing callback, distillation missing from the loss, and ModelCheckpoint +
``ckpt_path="best"`` (restored after the blend, refused before it)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import block_net, forward_x, vector_batches
from torch import nn

from tunecomp_kernels.compress import TuneCompConfig, compression_report, finalize, prepare
from tunecomp_kernels.compress.schedules import ScheduleError

L = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from tunecomp_kernels.integrations.lightning import TuneCompLightningCallback  # noqa: E402


class Module(L.LightningModule):
    """block_net under TuneComp; ``distill_in_loss`` adds controller.regularization;
    ``best`` makes the logged "score" best at that optimiser step."""

    def __init__(self, cfg: TuneCompConfig, *, distill_in_loss: bool = False,
                 best: int | None = None) -> None:
        super().__init__()
        self.net = block_net(seed=0)
        self.tunecomp = prepare(self.net, cfg, forward=forward_x)
        self.distill_in_loss = distill_in_loss
        self.best = best

    def training_step(self, batch, batch_idx):
        outputs = self.net(batch[0])
        loss = nn.functional.cross_entropy(outputs, batch[1])
        if self.distill_in_loss:
            loss = loss + self.tunecomp.regularization(outputs, batch)
        if self.best is not None:
            self.log("score", 1.0 if self.global_step + 1 == self.best else 0.0)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def loader(n: int = 1):
    return torch.utils.data.DataLoader(vector_batches(n), batch_size=None)


def trainer(tmp_path, callbacks, max_steps: int, **kw):
    base = {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "max_epochs": 100,
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path)}
    base.update(kw)
    return L.Trainer(callbacks=list(callbacks), **base)


@pytest.mark.parametrize("max_steps", [3, 8])
def test_default_schedule_fits_the_trainer(tmp_path, max_steps):
    module = Module(TuneCompConfig(target_ratio=0.4))
    cb = TuneCompLightningCallback(module.tunecomp, log=False)
    trainer(tmp_path, [cb], max_steps).fit(module, loader())
    c = module.tunecomp
    assert c.schedule.total_steps == max_steps and c.schedule.blend_steps == round(max_steps / 2)
    assert c.step_count == max_steps and c.schedule_complete
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finalize(module.net)
    assert compression_report(module.net).ratio <= 0.4


def test_schedule_fits_epochs_without_max_steps(tmp_path):
    module = Module(TuneCompConfig(target_ratio=0.4))
    cb = TuneCompLightningCallback(module.tunecomp, log=False)
    trainer(tmp_path, [cb], -1, max_epochs=2).fit(module, loader(3))
    assert module.tunecomp.schedule.total_steps == 6 and module.tunecomp.schedule_complete


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"blend_steps": 100, "total_steps": 200},
         "TuneCompConfig(total_steps=200) does not fit a run of 6 optimiser steps"),
        ({"blend_steps": 100}, "blend_steps=100 must be <= total_steps=6"),
    ],
)
def test_mismatched_schedule_is_refused_at_train_start(tmp_path, kwargs, needle):
    module = Module(TuneCompConfig(target_ratio=0.4, **kwargs))
    t = trainer(tmp_path, [TuneCompLightningCallback(module.tunecomp)], 6)
    with pytest.raises(ValueError) as info:
        t.fit(module, loader())
    assert needle in str(info.value) and "Lightning Trainer's 6 optimiser steps" in str(info.value)
    assert module.tunecomp.step_count == 0 and t.global_step == 0


def test_missing_callback_is_named_at_finalize(tmp_path):
    module = Module(TuneCompConfig(target_ratio=0.4))
    trainer(tmp_path, [], 4).fit(module, loader())
    with pytest.raises(ScheduleError, match="never stepped.*TuneCompLightningCallback"):
        finalize(module.net)


def test_distillation_missing_from_the_loss_is_refused(tmp_path):
    module = Module(TuneCompConfig(target_ratio=0.4, distill="logits"))
    t = trainer(tmp_path, [TuneCompLightningCallback(module.tunecomp, log=False)], 4)
    with pytest.raises(ValueError, match="contains no distillation term.*regularization"):
        t.fit(module, loader())
    assert module.tunecomp.step_count == 0


def test_distillation_in_the_loss_runs(tmp_path):
    module = Module(TuneCompConfig(target_ratio=0.4, distill="logits"), distill_in_loss=True)
    cb = TuneCompLightningCallback(module.tunecomp, add_l1_gradients=False, log=False)
    trainer(tmp_path, [cb], 4).fit(module, loader())
    assert module.tunecomp.distill_terms == 2 and module.tunecomp.schedule_complete


def best_run(tmp_path, best: int):
    module = Module(TuneCompConfig(target_ratio=0.4, blend_steps=4, total_steps=8), best=best)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="max",
                                  save_top_k=1, every_n_train_steps=2)
    cb = TuneCompLightningCallback(module.tunecomp, log=False)
    t = trainer(tmp_path, [cb, checkpoints], 8, enable_checkpointing=True)
    t.fit(module, loader())
    return module, t, checkpoints


def test_best_checkpoint_mid_blend_is_refused(tmp_path):
    module, t, checkpoints = best_run(tmp_path, best=2)
    assert "step=2" in checkpoints.best_model_path
    with pytest.raises(ScheduleError, match="from step 2, before the schedule's end at step 4"):
        t.validate(module, loader(), ckpt_path="best")
    assert module.tunecomp.step_count == 8  # nothing was restored


def test_best_checkpoint_after_the_blend_is_restored(tmp_path):
    module, t, checkpoints = best_run(tmp_path, best=6)
    assert "step=6" in checkpoints.best_model_path
    t.validate(module, loader(), ckpt_path="best")
    assert module.tunecomp.step_count == 6
    finalize(module.net)
    report = compression_report(module.net)
    assert report.ratio <= 0.4 and report.ratio == pytest.approx(module.tunecomp.ratio)
