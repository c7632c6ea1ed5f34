"""Hugging Face ``Trainer`` integration (imports ``transformers``; loaded lazily).

One line for ``Trainer`` users::

    controller = prepare(model, TuneCompConfig(target_ratio=0.5))
    trainer = Trainer(model, args, ..., callbacks=[TuneCompCallback(controller)])

At train begin the callback fits the schedule to the Trainer's planned optimiser steps
(``state.max_steps``): by default the blend takes the first half of the run and the budget
is met when it ends. Explicit step counts in the config that do not fit the Trainer's
steps are an error. It needs no change to the loss: right before each optimiser step
(after the Trainer's gradient clipping) it adds the L1 penalty's gradient
``λ_t·sign(mask)`` to the masks' gradients — the same update as adding ``λ_t Σ|mask|`` to
the loss, except that this term is not clipped — and after each step it steps the
controller, to which it hands the Trainer's optimiser (pruned ranks are compacted out of
the parameters and of that optimiser's state). It writes the controller state
atomically into every Trainer checkpoint, restores it when training resumes from one in
``args.output_dir``, and adds α, λ and the parameter ratio to logs. With
``load_best_model_at_end`` it restores the controller state saved with the best
checkpoint, and refuses one from before the schedule's end (set
``eval_delay`` so that no earlier checkpoint is evaluated).

With distillation (``config.distill != "none"``) the loss itself changes: use
:class:`TuneCompTrainer` (a ``Trainer`` taking ``tunecomp=controller``), which adds the
callback itself and the distillation term in ``compute_loss``; the plain callback refuses
such a config at train begin.

Note: with fp16 mixed precision *and* ``max_grad_norm=0`` the gradients are still scaled
when the callback runs; keep gradient clipping on (the default) or use bf16.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..compress.controller import TuneCompController
from ..compress.schedules import ScheduleError
from .driver import ControllerDriver

try:
    from ..compress.checkpoint import atomic_torch_save
except ImportError:  # older layout: the writer lived in the training loop's module
    from ..compress.training import atomic_torch_save

STATE_FILE = "tunecomp_controller.pt"

_USE_TRAINER = ("use TuneCompTrainer(model=..., args=..., tunecomp=controller) instead of "
                "Trainer + TuneCompCallback: it adds the distillation term to the loss")


class TuneCompCallback(TrainerCallback):
    """Runs a :class:`TuneCompController` inside ``transformers.Trainer``.

    Args:
        controller: from :func:`~tunecomp_kernels.compress.prepare` on the model given
            to the Trainer.
        add_l1_gradients: add ``λ_t·sign(mask)`` to the mask gradients before each
            optimiser step (turn off if your loss already includes
            ``controller.l1_penalty()``).

    Raises:
        TypeError: ``controller`` is not a ``TuneCompController``.
        ValueError: at train begin, the config's explicit step counts do not fit the
            Trainer's ``max_steps``, or distillation is configured (use
            :class:`TuneCompTrainer`).
        ScheduleError: at train end, ``load_best_model_at_end`` reloaded a checkpoint from
            before the end of the schedule.
    """

    def __init__(self, controller: TuneCompController, *, add_l1_gradients: bool = True) -> None:
        self.driver = ControllerDriver(controller, owner="TuneCompCallback",
                                       add_l1_gradients=add_l1_gradients,
                                       distill_hint=_USE_TRAINER)
        self.controller = controller
        self._distill_in_loss = False  # set by TuneCompTrainer, whose loss distills

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Restore the controller when resuming (``global_step > 0``), fit the schedule to
        ``state.max_steps`` and check the configuration."""
        c = self.controller
        if c.distill_active and not self._distill_in_loss:
            raise ValueError(
                f"TuneCompConfig(distill={c.config.distill!r}) needs the distillation term "
                f"in the loss, which a callback cannot add: {_USE_TRAINER}"
            )
        if state.global_step > 0 and c.step_count != state.global_step:
            folder = _checkpoint_dir(args, state.global_step)
            self.driver.restore(_read_state(folder, "resuming"), for_export=False,
                                where=folder)
        self.driver.begin(state.max_steps, state.global_step,
                          source=f"the HF Trainer's {state.max_steps} optimiser steps")
        self.driver.attach(kwargs.get("optimizer"))
        _warn_early_best(args, c)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Add the L1 gradient to the masks (and check distillation on the first step)."""
        self.driver.attach(kwargs.get("optimizer"))
        self.driver.before_optimizer_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Advance the schedule: α, λ, hard shrink, budget, teacher freeing, compaction
        (of the parameters and of the Trainer's optimiser state)."""
        self.driver.attach(kwargs.get("optimizer"))
        self.driver.after_optimizer_step(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Store the controller state next to the Trainer's checkpoint (atomically)."""
        if not state.is_world_process_zero:
            return
        folder = _checkpoint_dir(args, state.global_step)
        if os.path.isdir(folder):
            atomic_torch_save(self.controller.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After ``load_best_model_at_end`` reloaded the best checkpoint's weights, restore
        the controller state saved with it (refused if it is from before the schedule's
        end)."""
        best = getattr(state, "best_model_checkpoint", None)
        if not (getattr(args, "load_best_model_at_end", False) and best):
            return
        hint = (f"Set TrainingArguments(eval_delay={self._end()}) so that no checkpoint "
                "before the end of the schedule is evaluated (and so none can be the best), "
                "or load_best_model_at_end=False")
        self.driver.restore(_read_state(best, "load_best_model_at_end reloaded"),
                            for_export=True, where=best, hint=hint)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        """Add the schedule's α, λ and parameter ratio to the Trainer's logs."""
        if logs is not None:
            logs.update({f"tunecomp_{k}": v for k, v in self.driver.log_values().items()})

    def _end(self) -> int | str:
        schedule = self.controller.schedule
        return "<end of the blend>" if schedule is None else schedule.end


def _checkpoint_dir(args: Any, step: int) -> str:
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def _read_state(folder: str, why: str) -> dict[str, Any]:
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise ScheduleError(
            f"{why} {folder}, but it has no TuneComp controller state ({STATE_FILE}; was the "
            "checkpoint written without TuneCompCallback?): load the matching state yourself "
            "with controller.load_state_dict before continuing"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _warn_early_best(args: Any, controller: TuneCompController) -> None:
    """One warning when ``load_best_model_at_end`` may pick a checkpoint from before the
    schedule's end (the reload would then be refused at train end)."""
    schedule = controller.schedule
    if not getattr(args, "load_best_model_at_end", False) or schedule is None:
        return
    strategy = getattr(args, "eval_strategy", None)
    delay = getattr(args, "eval_delay", 0) or 0
    if getattr(strategy, "value", strategy) == "steps" and delay < schedule.end:
        warnings.warn(
            f"load_best_model_at_end=True evaluates checkpoints before step {schedule.end}, "
            "the end of the TuneComp schedule; if one of them is the best, reloading it will "
            f"be refused at train end. Set TrainingArguments(eval_delay={schedule.end})",
            stacklevel=2,
        )


class TuneCompTrainer(Trainer):
    """``transformers.Trainer`` that runs TuneComp, distillation term included.

    Use it in place of ``Trainer`` with ``tunecomp=controller``; it registers a
    :class:`TuneCompCallback` and, while the teacher is alive and distillation is
    configured, adds ``controller.distillation_loss`` against the teacher's outputs on the
    same inputs to the training loss.

    Raises:
        ValueError: ``callbacks`` already holds a ``TuneCompCallback`` (it would add the
            L1 gradient twice).
    """

    def __init__(self, *args: Any, tunecomp: TuneCompController, **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if any(isinstance(cb, TuneCompCallback) for cb in callbacks):
            raise ValueError("TuneCompTrainer adds its TuneCompCallback itself: remove the "
                             "TuneCompCallback from callbacks")
        callback = TuneCompCallback(tunecomp)
        callback._distill_in_loss = True
        callbacks.append(callback)
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
        teacher = self.tunecomp.teacher_forward(dict(inputs))
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        loss = loss + self.tunecomp.distillation_loss(outputs, teacher)
        return (loss, outputs) if return_outputs else loss
