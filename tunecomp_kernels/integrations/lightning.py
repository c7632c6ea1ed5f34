"""PyTorch Lightning integration: :class:`TuneCompLightningCallback`.

Usage (prepare the model inside your ``LightningModule`` before ``configure_optimizers``
builds the optimiser, e.g. in ``__init__``)::

    class Module(L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.tunecomp = prepare(self.net, TuneCompConfig(target_ratio=0.5,
                                                            total_steps=1000))
        ...

    module = Module(net)
    trainer = L.Trainer(max_steps=1000, callbacks=[TuneCompLightningCallback(module.tunecomp)])
    trainer.fit(module, loader)
    finalize(module.net)

What it does, per optimiser step (gradient accumulation counts once per optimiser step):

* before the step, adds the L1 gradient ``λ_t·sign(mask)`` to the masks (like
  ``controller.add_l1_gradients``; turn off with ``add_l1_gradients=False`` when your
  ``training_step`` adds ``controller.regularization(...)`` to the loss — which you need
  for distillation). Lightning clips gradients after this hook, so the L1 term is clipped
  with the rest;
* after the step, ``controller.step()`` (α, λ, hard shrinkage, budget, teacher freeing);
* logs ``tunecomp/alpha``, ``tunecomp/l1`` and ``tunecomp/ratio`` (``log=False`` to stop);
* saves the controller state in every Lightning checkpoint and restores it on
  ``trainer.fit(..., ckpt_path=...)`` — *before* the model weights are loaded, so a
  checkpoint taken after the blend (teachers already freed, hence absent from its state
  dict) loads into a freshly prepared model.

Under Lightning's DDP strategy the callback needs nothing more (every rank prunes alike,
see :mod:`tunecomp_kernels.integrations.distributed`); pass
``DDPStrategy(broadcast_buffers=False)`` so the frozen teachers are not broadcast from
rank 0 at every forward.
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


class TuneCompLightningCallback(Callback):
    """Runs a :class:`~tunecomp_kernels.compress.TuneCompController` inside a Lightning
    ``Trainer`` (see the module docstring).

    Args:
        controller: from ``prepare`` on (a submodule of) the trained ``LightningModule``.
        add_l1_gradients: add ``λ_t·sign(mask)`` to the mask gradients before each
            optimiser step.
        log: log α, λ and the parameter ratio with ``pl_module.log_dict`` every step.
    """

    def __init__(self, controller: TuneCompController, *, add_l1_gradients: bool = True,
                 log: bool = True) -> None:
        if not isinstance(controller, TuneCompController):
            raise TypeError("TuneCompLightningCallback needs a TuneCompController, got "
                            f"{type(controller).__name__}")
        self.controller = controller
        self.add_l1_gradients = add_l1_gradients
        self.log = log
        self._offset = 0
        self._restored_step: int | None = None
        self._patched: Any = None

    # --- checkpoint restore before the model weights ----------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Hook ``pl_module.on_load_checkpoint`` (Lightning calls it before loading the
        weights) to restore the controller first."""
        if self._patched is not None:
            return
        original = pl_module.on_load_checkpoint
        key = self.state_key

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> Any:
            state = (checkpoint.get("callbacks") or {}).get(key)
            if state is not None:
                self._restore(state)
            return original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint
        self._patched = pl_module

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._patched is not None:
            vars(self._patched).pop("on_load_checkpoint", None)
            self._patched = None

    def _restore(self, state: dict[str, Any]) -> None:
        if self._restored_step == state.get("step") == self.controller.step_count:
            return
        self.controller.load_state_dict(state)
        self._restored_step = self.controller.step_count

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore(state_dict)

    # --- the schedule -----------------------------------------------------------------

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Align the controller's step with the trainer's optimiser-step counter."""
        self._offset = trainer.global_step - self.controller.step_count

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.add_l1_gradients:
            self.controller.add_l1_gradients()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stepped = False
        while self.controller.step_count + self._offset < trainer.global_step:
            self.controller.step()
            stepped = True
        if stepped and self.log:
            stats = self.controller.stats()
            pl_module.log_dict({"tunecomp/alpha": float(stats["alpha"]),
                                "tunecomp/l1": float(stats["l1_lambda"]),
                                "tunecomp/ratio": float(stats["ratio"])},
                               on_step=True, on_epoch=False, prog_bar=False)
