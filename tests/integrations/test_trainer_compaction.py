"""Compaction during training under the HF Trainer and Lightning: the callbacks hand the
trainer's optimiser to the controller, pruned ranks leave the parameters, gradients and
optimiser state, and the run equals one with compaction switched off to rounding."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import (
    TextRows,
    lightning_block_module,
    tiny_bert,
    trainer_args,
    vector_batches,
)
from torch import nn

from tunecomp_kernels.compress import TuneCompConfig, finalize, prepare
from tunecomp_kernels.compress.compaction import unwrap_optimizer


def _assert_alive_sized(controller, optimizer) -> None:
    alive = controller.alive_masks()
    opt = unwrap_optimizer(optimizer)
    for name, m in controller.layers.items():
        k = int(alive[name].sum())
        assert m.U.shape[1] == m.mask.shape[0] == m.V.shape[0] == k, name
        for p in (m.U, m.mask, m.V):
            assert p.grad is None or p.grad.shape == p.shape, name
            state = opt.state.get(p, {})
            assert state, f"{name}: the optimiser holds no state for this parameter"
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim():
                    assert value.shape == p.shape, (name, key)


def _assert_same_model(a: nn.Module, b: nn.Module, tol: float) -> None:
    sa, sb = finalize(a).state_dict(), finalize(b).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


class Recorder:
    """Per optimiser step, the stored rank count of every layer (after the controller)."""

    def __init__(self, controller) -> None:
        self.controller, self.sizes = controller, []
        self.start = {n: m.rank for n, m in controller.layers.items()}

    def record(self) -> None:
        self.sizes.append({n: m.rank for n, m in self.controller.layers.items()})

    def compacted_mid_run(self) -> bool:
        """Some layer shrank at a step after which training went on."""
        return any(a != b for a, b in zip(self.sizes[:-1], self.sizes[1:-1]))


# --- Hugging Face Trainer -------------------------------------------------------------------

needs_hf_trainer = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("accelerate") is None,
    reason="the HF Trainer needs transformers and accelerate")


def _hf_args(tmp_path, **kw):
    # no gradient clipping: in the masked run the dead masks' gradients count in the norm
    return trainer_args(tmp_path, **{"max_steps": 6, "max_grad_norm": 0.0, **kw})


def _hf_run(tmp_path, compact: bool, resume: str | None = None, **kw):
    import transformers

    from tunecomp_kernels.integrations.hf_trainer import TuneCompCallback

    model = tiny_bert().double()
    cfg = TuneCompConfig(target_ratio=0.4, blend_steps=3, total_steps=6,
                         compact_during_training=compact)
    controller = prepare(model, cfg)
    recorder = Recorder(controller)

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            recorder.record()

    trainer = transformers.Trainer(model=model, args=_hf_args(tmp_path, **kw),
                                   train_dataset=TextRows(24),
                                   callbacks=[TuneCompCallback(controller), Record()])
    trainer.train(resume_from_checkpoint=resume)
    return model, controller, trainer, recorder


@needs_hf_trainer
def test_hf_trainer_compacts_and_equals_the_masked_run(tmp_path):
    model, controller, trainer, recorder = _hf_run(tmp_path / "a", compact=True)
    ref, ref_controller, _, ref_recorder = _hf_run(tmp_path / "b", compact=False)
    assert controller.compaction_blocker is None and recorder.compacted_mid_run()
    assert ref_recorder.sizes[-1] == ref_recorder.start  # the masked run kept every rank
    _assert_alive_sized(controller, trainer.optimizer)
    assert controller.alive_masks().keys() == ref_controller.alive_masks().keys()
    for name, alive in ref_controller.alive_masks().items():
        assert torch.equal(controller.alive_masks()[name], alive), name
    _assert_same_model(model, ref, 1e-9)


@needs_hf_trainer
def test_hf_trainer_resumes_from_a_compacted_checkpoint(tmp_path):
    """HF loads the weights before any callback runs: the layers take the saved rank
    count on load, and the callback's controller restore says which ranks they are."""
    kw = {"save_strategy": "steps", "save_steps": 3, "save_only_model": False}
    model, controller, _, recorder = _hf_run(tmp_path, compact=True, **kw)
    assert recorder.sizes[2] != recorder.start  # compacted by step 3
    resumed, resumed_controller, trainer, _ = _hf_run(
        tmp_path, compact=True, resume=str(tmp_path / "out" / "checkpoint-3"), **kw)
    assert resumed_controller.step_count == 6
    for name, alive in controller.alive_masks().items():
        assert torch.equal(resumed_controller.alive_masks()[name], alive), name
    _assert_alive_sized(resumed_controller, trainer.optimizer)
    _assert_same_model(resumed, model, 1e-9)


# --- Lightning ------------------------------------------------------------------------------


def _lightning():
    return pytest.importorskip("lightning.pytorch", reason="lightning is not installed")


def _lightning_run(tmp_path, compact: bool):
    L = _lightning()
    from tunecomp_kernels.integrations.lightning import TuneCompLightningCallback

    cfg = TuneCompConfig(target_ratio=0.4, blend_steps=3, l1_lambda=1e-3,
                         l1_schedule="constant", compact_during_training=compact)

    module = lightning_block_module(
        cfg, lambda params: torch.optim.SGD(params, lr=5e-2, momentum=0.9))
    recorder = Recorder(module.tunecomp)

    class Record(L.Callback):
        def on_train_batch_end(self, *args):
            recorder.record()

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, max_epochs=100,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path),
                        precision="64-true",
                        callbacks=[TuneCompLightningCallback(module.tunecomp, log=False),
                                   Record()])
    batches = [(x.double(), y) for x, y in vector_batches(6)]
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return module, trainer, recorder


def test_lightning_compacts_and_equals_the_masked_run(tmp_path):
    module, trainer, recorder = _lightning_run(tmp_path / "a", compact=True)
    ref, _, ref_recorder = _lightning_run(tmp_path / "b", compact=False)
    c = module.tunecomp
    assert c.compaction_blocker is None and recorder.compacted_mid_run()
    assert ref_recorder.sizes[-1] == ref_recorder.start
    _assert_alive_sized(c, trainer.optimizers[0])
    for name, alive in ref.tunecomp.alive_masks().items():
        assert torch.equal(c.alive_masks()[name], alive), name
    _assert_same_model(module.net, ref.net, 1e-9)
