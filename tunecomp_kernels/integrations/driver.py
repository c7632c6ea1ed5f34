"""What every trainer integration does with a TuneComp controller, in one place.

The Hugging Face ``Trainer`` callback (:mod:`.hf_trainer`) and the Lightning callback
(:mod:`.lightning`) translate their framework's hooks into the calls of one
:class:`ControllerDriver`:

* ``begin`` (train begin): fit the schedule to the trainer's planned optimiser steps
  (:meth:`~tunecomp_kernels.compress.TuneCompController.fit_schedule`; explicit step
  counts in the config that do not fit are an error naming both numbers), and align the
  controller's step with the trainer's optimiser-step counter;
* ``before_optimizer_step``: add the L1 gradient ``λ_t·sign(mask)`` to the masks, and on
  the run's first step refuse a configured distillation that the loss does not contain;
* ``after_optimizer_step``: step the controller up to the trainer's optimiser-step count,
  so gradient accumulation (several batches per optimiser step) counts once;
* ``attach``: hand the trainer's optimiser to the controller (from any hook that has
  it), so that ranks compacted away during training leave its state too
  (:mod:`~tunecomp_kernels.compress.compaction`);
* ``restore``: load a controller state saved with a checkpoint, either to resume training
  or, for a best-checkpoint reload at the end, only when that checkpoint is from after the
  blend and with the budget met (its teachers are gone from the model by then, so an
  earlier one cannot be finished correctly).
"""

from __future__ import annotations

import math
from typing import Any

from ..compress.controller import TuneCompController
from ..compress.schedules import ScheduleError


class ControllerDriver:
    """Drives one controller from a trainer's hooks (see the module docstring).

    Args:
        controller: from ``prepare`` on the trained model.
        owner: the integration's name, for error messages (e.g. ``"TuneCompCallback"``).
        add_l1_gradients: add the L1 gradient before each optimiser step.
        distill_hint: what to do when distillation is configured but missing from the loss.

    Raises:
        TypeError: ``controller`` is not a ``TuneCompController``.
    """

    def __init__(self, controller: TuneCompController, *, owner: str,
                 add_l1_gradients: bool = True, distill_hint: str = "") -> None:
        if not isinstance(controller, TuneCompController):
            raise TypeError(f"{owner} needs a TuneCompController, got {type(controller).__name__}")
        self.controller = controller
        self.owner = owner
        self.add_l1_gradients = add_l1_gradients
        self.distill_hint = distill_hint
        self.offset = 0
        self._distill_mark: int | None = None

    # --- train begin ------------------------------------------------------------------

    def begin(self, planned_steps: float | None, global_step: int, *, source: str) -> None:
        """Fit the schedule to ``planned_steps`` optimiser steps (``None`` or infinite: not
        known, then the config must give ``total_steps``) and align the step counters.

        Raises:
            ValueError: the run length is unknown and the config does not fix it, or the
                config's explicit step counts do not fit ``planned_steps`` (the message
                names ``source``, e.g. ``"Trainer(max_steps=20)"``).
        """
        c = self.controller
        if planned_steps is None or not math.isfinite(planned_steps) or planned_steps < 1:
            if c.config.total_steps is None:
                raise ValueError(
                    f"{self.owner}: the trainer does not say how many optimiser steps it will "
                    f"take ({source}), so the TuneComp schedule cannot be fitted to it: set "
                    "max_steps, or TuneCompConfig(total_steps=...)"
                )
            planned_steps = c.config.total_steps
        try:
            c.fit_schedule(int(planned_steps))
        except (ValueError, ScheduleError) as exc:
            raise type(exc)(f"{self.owner}, fitting the schedule to {source}: {exc}") from exc
        self.offset = global_step - c.step_count
        self._distill_mark = c.distill_terms

    # --- every optimiser step ---------------------------------------------------------

    def attach(self, optimizer: Any) -> None:
        """Attach the trainer's optimiser(s) to the controller (``None`` and repeats are
        ignored; a list or tuple attaches each)."""
        for opt in optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]:
            if opt is not None:
                self.controller.attach_optimizer(opt)

    def before_optimizer_step(self) -> None:
        """Add the L1 gradient; on the first step, check that distillation is in the loss.

        Raises:
            ValueError: distillation is configured but no distillation term was computed
                for this step.
        """
        if self.add_l1_gradients:
            self.controller.add_l1_gradients()
        if self._distill_mark is not None:
            c, mark = self.controller, self._distill_mark
            self._distill_mark = None
            if c.distill_active and c.distill_terms == mark:
                raise ValueError(
                    f"TuneCompConfig(distill={c.config.distill!r}) is set, but the first "
                    f"optimiser step's loss contains no distillation term: {self.distill_hint}"
                )

    def after_optimizer_step(self, global_step: int) -> bool:
        """Step the controller until it has taken as many steps as the trainer
        (``global_step`` optimiser steps); returns whether it stepped."""
        stepped = False
        while self.controller.step_count + self.offset < global_step:
            self.controller.step()
            stepped = True
        return stepped

    def log_values(self) -> dict[str, float]:
        """α, λ and the kept parameter ratio, under neutral keys."""
        stats = self.controller.stats()
        return {"alpha": float(stats["alpha"]), "l1": float(stats["l1_lambda"]),
                "ratio": float(stats["ratio"])}

    # --- checkpoints ------------------------------------------------------------------

    def restore(self, state: Any, *, for_export: bool, where: str, hint: str = "") -> None:
        """Load ``state`` (a controller ``state_dict`` saved with checkpoint ``where``).

        With ``for_export`` (the trainer reloads a checkpoint's weights to keep them,
        e.g. the best one at the end) the checkpoint must be from the end of the schedule
        or later.

        Raises:
            ScheduleError: ``for_export`` and the checkpoint is from before the blend ended
                or the budget was met; or its teachers are needed but already freed.
            ValueError: ``state`` is not a state of this controller.
        """
        c = self.controller
        if for_export:
            saved = state.get("schedule_steps") if isinstance(state, dict) else None
            schedule = c.schedule if saved is None else c.config.resolve_schedule(saved)
            step = state.get("step") if isinstance(state, dict) else None
            if schedule is None or not isinstance(step, int) or step < schedule.end:
                end = "its end" if schedule is None else f"step {schedule.end}"
                detail = "" if schedule is None else (
                    f" (the blend ends at step {schedule.blend_steps}, the budget is met at "
                    f"step {schedule.prune_end})")
                raise ScheduleError(
                    f"{self.owner}: the reloaded checkpoint {where} is from step {step}, "
                    f"before the schedule's end at {end}{detail}: its weights are over "
                    "budget, and the teachers it would need to finish the blend are already "
                    f"freed, so it cannot be exported correctly. {hint}".rstrip()
                )
        c.load_state_dict(state)
