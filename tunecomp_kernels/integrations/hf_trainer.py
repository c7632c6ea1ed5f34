"""Hugging Face ``Trainer`` integration (imports ``transformers``; loaded lazily).

One line for ``Trainer`` users::

    controller = prepare(model, TuneCompConfig(target_ratio=0.5, total_steps=args.max_steps))
    trainer = Trainer(model, args, ..., callbacks=[TuneCompCallback(controller)])

The callback needs no change to the loss: right before each optimiser step (after the
Trainer's gradient clipping) it adds the L1 penalty's gradient ``λ_t·sign(mask)`` to the
masks' gradients — the same update as adding ``λ_t Σ|mask|`` to the loss, except that
this term is not clipped — and after each step it calls ``controller.step()``. It also
writes the controller state into every Trainer checkpoint and restores it when training
resumes from one in ``args.output_dir``, and adds α, λ and the parameter ratio to logs.

With distillation (``config.distill != "none"``) the loss itself changes: use
:class:`TuneCompTrainer` (a ``Trainer`` taking ``tunecomp=controller``), which adds the
callback itself and the distillation term in ``compute_loss``.

Note: with fp16 mixed precision *and* ``max_grad_norm=0`` the gradients are still scaled
when the callback runs; keep gradient clipping on (the default) or use bf16.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .controller import TuneCompController

STATE_FILE = "tunecomp_controller.pt"


class TuneCompCallback(TrainerCallback):
    """Runs a :class:`TuneCompController` inside ``transformers.Trainer``.

    Args:
        controller: from :func:`~.prepare.prepare` on the model given to the Trainer.
        add_l1_gradients: add ``λ_t·sign(mask)`` to the mask gradients before each
            optimiser step (turn off if your loss already includes
            ``controller.l1_penalty()``).
    """

    def __init__(self, controller: TuneCompController, *, add_l1_gradients: bool = True) -> None:
        if not isinstance(controller, TuneCompController):
            raise TypeError(
                f"TuneCompCallback needs a TuneCompController, got {type(controller).__name__}"
            )
        self.controller = controller
        self.add_l1_gradients = add_l1_gradients

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """When resuming (``global_step > 0``), restore the controller from the checkpoint."""
        if state.global_step == 0 or self.controller.step_count == state.global_step:
            return
        path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}",
                            STATE_FILE)
        if not os.path.isfile(path):
            raise RuntimeError(
                f"resuming at step {state.global_step} but {path} does not exist: load the "
                "controller state yourself (controller.load_state_dict) before trainer.train()"
            )
        self.controller.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Add the L1 gradient to the masks."""
        if self.add_l1_gradients:
            self.controller.add_l1_gradients()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Advance the schedule: α, λ, hard shrink, budget, teacher freeing."""
        self.controller.step()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Store the controller state next to the Trainer's checkpoint."""
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.controller.state_dict(), os.path.join(folder, STATE_FILE))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        """Add the schedule's α, λ and parameter ratio to the Trainer's logs."""
        if logs is not None:
            stats = self.controller.stats()
            logs.update({"tunecomp_alpha": stats["alpha"], "tunecomp_l1": stats["l1_lambda"],
                         "tunecomp_ratio": stats["ratio"]})


class TuneCompTrainer(Trainer):
    """``transformers.Trainer`` that runs TuneComp, distillation term included.

    Use it in place of ``Trainer`` with ``tunecomp=controller``; it registers a
    :class:`TuneCompCallback` and, while the teacher is alive and distillation is
    configured, adds ``controller.distillation_loss`` against the teacher's outputs on the
    same inputs to the training loss.
    """

    def __init__(self, *args: Any, tunecomp: TuneCompController, **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        callbacks.append(TuneCompCallback(tunecomp))
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.tunecomp = tunecomp

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The Trainer's loss, plus the distillation term during the blend (training only)."""
        if not (model.training and self.tunecomp.distill_active):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        teacher_inputs = dict(inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        teacher = self.tunecomp.teacher_forward(teacher_inputs)
        loss = loss + self.tunecomp.distillation_loss(outputs, teacher)
        return (loss, outputs) if return_outputs else loss
