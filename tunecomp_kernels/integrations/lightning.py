"""PyTorch Lightning integration: :class:`TuneCompLightningCallback`.

Usage (prepare the model inside your ``LightningModule`` before ``configure_optimizers``
builds the optimiser, e.g. in ``__init__``)::

    class Module(L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.tunecomp = prepare(self.net, TuneCompConfig(target_ratio=0.5))
        ...

    module = Module(net)
    trainer = L.Trainer(max_steps=1000, callbacks=[TuneCompLightningCallback(module.tunecomp)])
    trainer.fit(module, loader)
    finalize(module.net)

At train start it fits the schedule to the trainer's planned optimiser steps
(``trainer.estimated_stepping_batches``; explicit step counts in the config that do not
fit are an error). Then, per optimiser step (gradient accumulation counts once):

* before the step, adds the L1 gradient ``λ_t·sign(mask)`` to the masks (like
  ``controller.add_l1_gradients``; turn off with ``add_l1_gradients=False`` when your
  ``training_step`` adds ``controller.regularization(...)`` to the loss — which you need
  for distillation; a configured distillation missing from the first step's loss is an
  error). Lightning clips gradients after this hook, so the L1 term is clipped with the
  rest;
* after the step, ``controller.step()`` (α, λ, hard shrinkage, budget, teacher freeing,
  and compaction: pruned ranks leave the parameters and the trainer's optimiser state,
  which the callback attaches to the controller);
* logs ``tunecomp/alpha``, ``tunecomp/l1`` and ``tunecomp/ratio`` (``log=False`` to stop);
* saves the controller state in every Lightning checkpoint and restores it on
  ``trainer.fit(..., ckpt_path=...)`` — *before* the model weights are loaded, so a
  checkpoint taken after the blend (teachers already freed, hence absent from its state
  dict) loads into a freshly prepared model. Reloading a checkpoint to keep its weights
  (``trainer.validate/test/predict(ckpt_path="best")`` after ``ModelCheckpoint``) restores
  the controller saved with it too, and is refused for a checkpoint from before the end of
  the schedule (the blend over, the budget met): its teachers are gone from the model.

Under Lightning's DDP strategy the callback needs nothing more (every rank prunes alike,
see :mod:`tunecomp_kernels.integrations.distributed`; pruned ranks stay stored, masked,
until ``finalize`` there); pass ``DDPStrategy(broadcast_buffers=False)`` so the frozen
teachers are not broadcast from rank 0 at every forward.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone ``pytorch_lightning`` package works as well
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError:
        raise ImportError(
            "TuneCompLightningCallback needs PyTorch Lightning, which is not installed: "
            "pip install 'tunecomp_kernels[lightning]' (or pip install lightning)"
        ) from None

from ..compress.controller import TuneCompController
from .driver import ControllerDriver

_ADD_DISTILLATION = (
    "add controller.regularization(outputs, batch) to training_step's loss (and pass "
    "add_l1_gradients=False to TuneCompLightningCallback, as regularization() includes "
    "the L1 term), or set distill='none'"
)


class TuneCompLightningCallback(Callback):
    """Runs a :class:`~tunecomp_kernels.compress.TuneCompController` inside a Lightning
    ``Trainer`` (see the module docstring).

    Args:
        controller: from ``prepare`` on (a submodule of) the trained ``LightningModule``.
        add_l1_gradients: add ``λ_t·sign(mask)`` to the mask gradients before each
            optimiser step.
        log: log α, λ and the parameter ratio with ``pl_module.log_dict`` every step.

    Raises:
        TypeError: ``controller`` is not a ``TuneCompController``.
        ValueError: at train start, the config's explicit step counts do not fit the
            trainer's planned steps; at the first step, a configured distillation is not
            in the loss.
        ScheduleError: a checkpoint from before the schedule's end is reloaded for
            validate/test/predict, or into a model whose teachers were already freed.
    """

    def __init__(self, controller: TuneCompController, *, add_l1_gradients: bool = True,
                 log: bool = True) -> None:
        self.driver = ControllerDriver(controller, owner="TuneCompLightningCallback",
                                       add_l1_gradients=add_l1_gradients,
                                       distill_hint=_ADD_DISTILLATION)
        self.controller = controller
        self.log = log
        self._stage = "fit"
        self._restored_step: int | None = None
        self._patched: Any = None

    # --- checkpoint restore before the model weights ----------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Hook ``pl_module.on_load_checkpoint`` (Lightning calls it before loading the
        weights) to restore the controller first."""
        self._stage = str(stage)
        if self._patched is not None:
            return
        original = pl_module.on_load_checkpoint
        key = self.state_key

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> Any:
            state = (checkpoint.get("callbacks") or {}).get(key)
            if state is not None:
                self._restore(state, f"at global step {checkpoint.get('global_step')}")
            return original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint
        self._patched = pl_module

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._patched is not None:
            vars(self._patched).pop("on_load_checkpoint", None)
            self._patched = None

    def _restore(self, state: dict[str, Any], where: str) -> None:
        if self._restored_step == state.get("step") == self.controller.step_count:
            return
        hint = ("Reload a checkpoint saved at or after the end of the schedule (e.g. log the "
                "metric that ModelCheckpoint monitors only from then on, or pass that "
                "checkpoint's path as ckpt_path)")
        self.driver.restore(state, for_export=self._stage != "fit", where=where, hint=hint)
        self._restored_step = self.controller.step_count

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore(state_dict, "being loaded")

    # --- the schedule -----------------------------------------------------------------

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Fit the schedule to the trainer's planned optimiser steps and align the
        controller's step with the trainer's optimiser-step counter."""
        planned = trainer.estimated_stepping_batches
        self.driver.begin(planned, trainer.global_step,
                          source=f"the Lightning Trainer's {planned} optimiser steps "
                          "(estimated_stepping_batches)")
        self.driver.attach(list(getattr(trainer, "optimizers", None) or []))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.driver.attach(optimizer)
        self.driver.before_optimizer_step()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stepped = self.driver.after_optimizer_step(trainer.global_step)
        if stepped and self.log:
            pl_module.log_dict({f"tunecomp/{k}": v for k, v in self.driver.log_values().items()},
                               on_step=True, on_epoch=False, prog_bar=False)
