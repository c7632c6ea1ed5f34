"""The four training methods, each written once.

* :func:`dense_finetune` — plain fine-tuning, no compression (the reference).
* :func:`tunecomp_joint` — TuneComp: :func:`~.prepare.prepare` → train with the
  controller → :func:`~.finalize.finalize`.
* :func:`finetune_truncate_finetune` — baseline (a): fine-tune dense for a share of the
  steps, truncate to the budget (:func:`~.baselines.compress_to_budget`), fine-tune the rest.
* :func:`truncate_finetune` — baseline (b): truncate the pretrained model, then fine-tune.

Each takes the model, the batches and one :class:`TrainingPlan`, which holds what every
method shares: the step budget, an optimiser factory, a learning-rate schedule per phase,
gradient clipping, step callbacks (each receives a :class:`~.callbacks.StepState`) and
optional checkpointing. The same plan and batch stream therefore give a fair comparison:
the same number of optimiser steps over the same batches.

The older entry points :func:`run_tunecomp`, :func:`finetune_then_compress` and
:func:`compress_then_finetune` keep their signatures and call these.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .baselines import compress_to_budget
from .callbacks import ProgressBar, StepCallback, legacy_callback
from .checkpoint import list_checkpoints
from .config import TuneCompConfig
from .controller import TuneCompController
from .model_io import call_model
from .report import compression_report
from .training import (
    ForwardFn,
    LossFn,
    OptimizerFactory,
    RunResult,
    TrainResult,
    cycle_batches,
    train,
    trainable_parameters,
)

ModelOptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]


@dataclass
class TrainingPlan:
    """What every method shares.

    Attributes:
        steps: optimiser steps of the whole run (all phases together), >= 1.
        make_optimizer: ``make_optimizer(model) -> optimizer``, called at the start of
            each phase (after any conversion, so it sees the phase's parameters).
        make_scheduler: ``make_scheduler(optimizer, phase_steps) -> scheduler`` (stepped
            after each optimiser step), or None for a constant learning rate.
        max_grad_norm: clip the gradient norm to this value, or None.
        callbacks: called after every step with a :class:`~.callbacks.StepState`.
        loss_fn: ``loss_fn(outputs, batch) -> loss`` (default: ``outputs.loss``).
        forward: ``forward(model, batch) -> outputs`` (default ``model(**batch)``).
        progress: draw one progress bar over the whole run.
        checkpoint_dir: write resumable checkpoints here (a sub-directory per phase for
            the two-phase baseline (a)); None for no checkpoints.
        checkpoint_every: checkpoint every this many steps (required with checkpoint_dir).
        keep_checkpoints: the newest checkpoints kept per phase.
        resume: continue an interrupted run from its checkpoints (same arguments, a fresh
            uncompressed model).
        recovery_warmup: in a joint run, restart the learning-rate schedule (a fresh
            ``make_scheduler(optimizer, rest)``: warm-up and decay) at the step the budget is
            met, so the recovery phase trains at the full learning rate (the optimiser's
            state is kept). Ignored without ``make_scheduler``.

    Raises:
        ValueError / TypeError: on a bad field, when the plan is built.
    """

    steps: int
    make_optimizer: ModelOptimizerFactory
    make_scheduler: SchedulerFactory | None = None
    max_grad_norm: float | None = None
    callbacks: Sequence[StepCallback] = field(default_factory=tuple)
    loss_fn: LossFn | None = None
    forward: ForwardFn = call_model
    progress: bool = False
    checkpoint_dir: str | os.PathLike[str] | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    recovery_warmup: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        for name in ("make_optimizer", "forward"):
            if not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable, got {getattr(self, name)!r}")
        for name in ("make_scheduler", "loss_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable or None, got {value!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        self.callbacks = tuple(self.callbacks)


class _Run:
    """Runs the phases of one method under a plan, and times them."""

    def __init__(self, plan: TrainingPlan, batches: Iterable[Any]) -> None:
        self.plan, self.history = plan, TrainResult()
        # one stream for every phase: each continues where the previous one stopped
        self.stream = cycle_batches(batches)
        self.done = 0
        self.started = time.perf_counter()
        self.bar = ProgressBar(plan.steps) if plan.progress else None

    def phase(self, model: nn.Module, steps: int, name: str, *,
              controller: TuneCompController | None = None, subdir: str | None = None,
              restart_at: int | None = None) -> None:
        """``steps`` optimiser steps with a fresh optimiser and schedule (restarted at step
        ``restart_at`` of the phase when given)."""
        if steps <= 0:
            return
        plan = self.plan
        optimizer = plan.make_optimizer(model)
        scheduler = self._scheduler(optimizer, steps, restart_at)
        hooks = list(plan.callbacks) + ([self.bar] if self.bar is not None else [])
        part = train(model, optimizer, self.stream, controller=controller, steps=steps,
                     loss_fn=plan.loss_fn, forward=plan.forward, scheduler=scheduler,
                     max_grad_norm=plan.max_grad_norm, callbacks=hooks, phase=name,
                     step_offset=self.done, total_steps=plan.steps,
                     **self._checkpointing(subdir))
        self.done += steps
        self.history.steps += part.steps
        self.history.losses.extend(part.losses)
        self.history.stats.extend(part.stats)

    def _scheduler(self, optimizer: Any, steps: int, restart_at: int | None) -> Any:
        make = self.plan.make_scheduler
        if make is None:
            return None
        if restart_at is None or not 0 < restart_at < steps:
            return make(optimizer, steps)
        first, second = make(optimizer, restart_at), make(optimizer, steps - restart_at)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [first, second],
                                                     milestones=[restart_at])

    def _checkpointing(self, subdir: str | None) -> dict[str, Any]:
        plan = self.plan
        if plan.checkpoint_dir is None:
            return {}
        directory = Path(plan.checkpoint_dir) / subdir if subdir else Path(plan.checkpoint_dir)
        resume = plan.resume and bool(list_checkpoints(directory))
        return {"checkpoint_dir": directory, "checkpoint_every": plan.checkpoint_every,
                "keep_checkpoints": plan.keep_checkpoints, "resume": resume}

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def result(self, model: nn.Module, controller: TuneCompController | None = None,
               report: bool = True) -> RunResult:
        return RunResult(model, compression_report(model) if report else None, self.history,
                         time.perf_counter() - self.started, controller)


def dense_finetune(model: nn.Module, batches: Iterable[Any], plan: TrainingPlan) -> RunResult:
    """Fine-tune ``model`` for ``plan.steps`` steps, no compression (``report`` is None)."""
    with _Run(plan, batches) as run:
        run.phase(model, plan.steps, "dense")
    return run.result(model, report=False)


def tunecomp_joint(
    model: nn.Module,
    config: TuneCompConfig,
    batches: Iterable[Any],
    plan: TrainingPlan,
    *,
    calibration: Iterable[Any] | None = None,
) -> RunResult:
    """TuneComp: ``prepare(model, config, calibration)``, ``plan.steps`` steps with the
    controller (the blend, the shrinking budget, the regularisation), then ``finalize``.

    Returns a :class:`~.training.RunResult` with the finalized model, its report and the
    controller. Raises what :func:`~.prepare.prepare` and :func:`~.training.train` raise.
    """
    from .prepare import prepare

    controller = prepare(model, config, calibration, forward=plan.forward)
    if controller.schedule is None:  # the config gives the schedule in fractions of the run
        controller.fit_schedule(plan.steps)
    restart = controller.schedule.prune_end if plan.recovery_warmup else None
    with _Run(plan, batches) as run:
        run.phase(model, plan.steps, "joint", controller=controller, restart_at=restart)
    controller.finalize()
    return run.result(model, controller)


def _check_dense_fraction(dense_fraction: float) -> None:
    if not 0.0 <= dense_fraction <= 1.0:
        raise ValueError(f"dense_fraction must be in [0, 1], got {dense_fraction}")


def finetune_truncate_finetune(
    model: nn.Module,
    config: TuneCompConfig,
    batches: Iterable[Any],
    plan: TrainingPlan,
    *,
    dense_fraction: float = 0.5,
    calibration: Iterable[Any] | None = None,
    dense_model: nn.Module | None = None,
) -> RunResult:
    """Baseline (a): fine-tune dense for ``round(dense_fraction · plan.steps)`` steps,
    truncate to ``config.target_ratio`` with ``config.init`` (calibration statistics come
    from the fine-tuned model), then fine-tune the rest with a fresh optimiser and schedule.
    The batch stream continues across the phases.

    ``dense_model``: the dense phase's result when it is already trained (e.g. shared
    between budgets); it is copied, not modified, ``model`` is not used, and the stream
    skips the batches that phase consumed, so the result equals an unshared run.

    Raises:
        ValueError: ``dense_fraction`` outside [0, 1], or what the phases raise.
    """
    _check_dense_fraction(dense_fraction)
    first = round(plan.steps * dense_fraction)
    with _Run(plan, batches) as run:
        if dense_model is None:
            run.phase(model, first, "dense", subdir="dense")
        else:
            model = copy.deepcopy(dense_model)
            for _ in range(first):
                next(run.stream)
            run.done = first
        compress_to_budget(model, config, calibration, forward=plan.forward)
        run.phase(model, plan.steps - first, "finetune", subdir="finetune")
    return run.result(model)


def truncate_finetune(
    model: nn.Module,
    config: TuneCompConfig,
    batches: Iterable[Any],
    plan: TrainingPlan,
    *,
    calibration: Iterable[Any] | None = None,
) -> RunResult:
    """Baseline (b): truncate the pretrained ``model`` to ``config.target_ratio`` with
    ``config.init``, then fine-tune it for ``plan.steps`` steps."""
    compress_to_budget(model, config, calibration, forward=plan.forward)
    with _Run(plan, batches) as run:
        run.phase(model, plan.steps, "finetune")
    return run.result(model)


# --- the older entry points --------------------------------------------------------------


def _legacy_plan(steps: int, make_optimizer: OptimizerFactory, *,
                 make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
                 callback: Callable[[int, dict[str, Any]], None] | None = None,
                 **fields: Any) -> TrainingPlan:
    """A plan from the older ``make_optimizer(params)`` / ``make_scheduler(optimizer)`` /
    ``callback(step, info)`` arguments."""
    return TrainingPlan(
        steps=steps,
        make_optimizer=lambda model: make_optimizer(trainable_parameters(model)),
        make_scheduler=(lambda opt, _steps: make_scheduler(opt)) if make_scheduler else None,
        callbacks=[legacy_callback(callback)] if callback is not None else (),
        **fields,
    )


def _run_length(config: TuneCompConfig, steps: int | None) -> int:
    if steps is not None:
        return steps
    if config.total_steps is None:
        raise ValueError("pass steps= (the run's optimiser steps): the config's schedule is in "
                         "fractions of the run (TuneCompConfig.total_steps is None)")
    return config.total_steps


def run_tunecomp(
    model: nn.Module,
    config: TuneCompConfig,
    make_optimizer: OptimizerFactory,
    batches: Iterable[Any],
    *,
    calibration: Iterable[Any] | None = None,
    steps: int | None = None,
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    **plan_fields: Any,
) -> RunResult:
    """Joint TuneComp in one call (:func:`tunecomp_joint`) for ``steps`` (default
    ``config.total_steps``; one of the two is needed).

    ``make_optimizer(params)`` builds the optimiser over the prepared model's trainable
    parameters; ``make_scheduler(optimizer)`` optionally an LR scheduler;
    ``callback(step, info)`` runs after every step. Further keyword arguments are
    :class:`TrainingPlan` fields (``loss_fn``, ``forward``, ``max_grad_norm``,
    ``progress``, ``checkpoint_dir``, ``checkpoint_every``, ``keep_checkpoints``,
    ``resume``): to resume an interrupted run, call again with the same arguments, the
    same *uncompressed* starting model and ``resume=True``.
    """
    plan = _legacy_plan(_run_length(config, steps), make_optimizer,
                        make_scheduler=make_scheduler, callback=callback, **plan_fields)
    return tunecomp_joint(model, config, batches, plan, calibration=calibration)


def finetune_then_compress(
    model: nn.Module,
    config: TuneCompConfig,
    make_optimizer: OptimizerFactory,
    batches: Iterable[Any],
    *,
    steps: int | None = None,
    dense_fraction: float = 0.5,
    calibration: Iterable[Any] | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    **plan_fields: Any,
) -> RunResult:
    """Baseline (a) with the older arguments (:func:`finetune_truncate_finetune`); steps
    default to ``config.total_steps``."""
    _check_dense_fraction(dense_fraction)
    plan = _legacy_plan(_run_length(config, steps), make_optimizer, callback=callback,
                        **plan_fields)
    return finetune_truncate_finetune(model, config, batches, plan,
                                      dense_fraction=dense_fraction, calibration=calibration)


def compress_then_finetune(
    model: nn.Module,
    config: TuneCompConfig,
    make_optimizer: OptimizerFactory,
    batches: Iterable[Any],
    *,
    steps: int | None = None,
    calibration: Iterable[Any] | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    **plan_fields: Any,
) -> RunResult:
    """Baseline (b) with the older arguments (:func:`truncate_finetune`); steps default
    to ``config.total_steps``."""
    plan = _legacy_plan(_run_length(config, steps), make_optimizer, callback=callback,
                        **plan_fields)
    return truncate_finetune(model, config, batches, plan, calibration=calibration)


__all__ = [
    "TrainingPlan",
    "compress_then_finetune",
    "dense_finetune",
    "finetune_then_compress",
    "finetune_truncate_finetune",
    "run_tunecomp",
    "truncate_finetune",
    "tunecomp_joint",
]
