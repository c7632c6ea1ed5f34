"""The plain PyTorch training loop that every method shares.

:func:`train` runs optimiser steps over a batch stream, with or without a TuneComp
controller; :func:`run_tunecomp` (prepare → train → finalize) lives in
:mod:`.pipelines` with the other methods (its old import path here keeps working).
Checkpoints are written by :mod:`.checkpoint`; this module only decides when.

Resumable runs: ``train(..., checkpoint_dir=d, checkpoint_every=K)`` writes
``d/ckpt-<step>.pt`` every K steps and after the last step, keeping the newest
``keep_checkpoints`` (default 2: the last good one and the one before it); ``d`` is
created if missing and must not hold an earlier run's checkpoints unless ``resume`` is
set. ``resume=True`` continues from the newest readable checkpoint in ``d`` (skipping,
with a warning, any that is truncated or corrupt; starting at step 0, with a warning, if
there is none); ``resume=path`` continues from that file. Call ``train`` with the same
arguments as the interrupted run, on a freshly prepared model: model, optimiser,
scheduler, controller, RNG state (torch, CUDA, ``random``, NumPy), the data position and
the history are restored, so the result equals an uninterrupted run. The data position is
restored by skipping the batches the run had consumed, which is exact when ``batches``
yields the same sequence again (a list, a DataLoader without shuffling, a recreated
iterator). A non-finite loss or parameter stops the run before anything is written.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .callbacks import ProgressBar, StepCallback, StepState, legacy_callback
from .checkpoint import (  # noqa: F401  (re-exported: these lived here before)
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    Checkpointer,
    CheckpointError,
    atomic_torch_save,
    capture_rng_state,
    checkpoint_state,
    find_resume_state,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .controller import TuneCompController
from .model_io import call_model, model_device, move_to_device, output_loss
from .report import CompressionReport

LossFn = Callable[[Any, Any], torch.Tensor]
ForwardFn = Callable[[nn.Module, Any], Any]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class TrainResult:
    """What :func:`train` did: steps run, the task loss per step and, with a controller,
    its :meth:`~TuneCompController.stats` per step."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunResult:
    """A finished run: the (finalized) model, its compression report, the training
    history, the wall time in seconds and, for a TuneComp run, its controller."""

    model: nn.Module
    report: CompressionReport | None
    history: TrainResult
    wall_time: float
    controller: TuneCompController | None = None


def cycle_batches(batches: Iterable[Any]) -> Iterator[Any]:
    """Yield from ``batches`` forever, restarting it when it is re-iterable (a list, a
    DataLoader); a one-shot iterator simply ends. An empty iterable ends at once."""
    if isinstance(batches, Iterator):
        # a for loop (not ``yield from``): closing this generator must not close a stream
        # that several phases share
        for batch in batches:
            yield batch
        return
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad``, in module order."""
    return [p for p in model.parameters() if p.requires_grad]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    *,
    controller: TuneCompController | None = None,
    steps: int | None = None,
    loss_fn: LossFn | None = None,
    forward: ForwardFn | None = None,
    scheduler: Any = None,
    max_grad_norm: float | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    callbacks: Sequence[StepCallback] = (),
    progress: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    resume: bool | str | os.PathLike[str] = False,
    phase: str | None = None,
    step_offset: int = 0,
    total_steps: int | None = None,
) -> TrainResult:
    """Run ``steps`` optimiser steps; with a ``controller`` the TuneComp schedule runs too.

    Each step: ``outputs = forward(model, batch)``; ``loss = loss_fn(outputs, batch)``
    (default: the model's own ``outputs.loss``) ``+ controller.regularization(outputs,
    batch)``; backward; optional gradient clipping; ``optimizer.step()``;
    ``scheduler.step()``; ``controller.step()``; then every callback.

    Args:
        model: the model (put in train mode).
        optimizer: built over the model's parameters *after* ``prepare``.
        batches: model inputs (see :func:`~.model_io.call_model`); a re-iterable
            (list, DataLoader) is restarted when exhausted, an iterator is consumed.
        controller: the :class:`TuneCompController` from ``prepare``, or None (plain
            fine-tuning).
        steps: number of steps; default: what is left of the controller's schedule, or
            one pass over ``batches`` without a controller. With a controller whose
            schedule is in fractions of the run (``total_steps=None``), ``steps`` fixes
            the run's length (:meth:`~TuneCompController.fit_schedule`).
        loss_fn: ``loss_fn(outputs, batch) -> loss``.
        forward: ``forward(model, batch) -> outputs`` (default: the controller's, or
            :func:`~.model_io.call_model`).
        scheduler: an LR scheduler stepped after the optimiser.
        max_grad_norm: clip the gradient norm to this value.
        callback: called after every step as ``callback(step, info)`` with the task loss
            and the controller's stats in ``info`` (kept for existing code).
        callbacks: called after every step with a :class:`~.callbacks.StepState`.
        progress: show a progress bar (:class:`~.callbacks.ProgressBar`).
        checkpoint_dir, checkpoint_every, keep_checkpoints, resume: resumable runs, see
            the module's docstring (checkpoint_every is required with checkpoint_dir;
            keep_checkpoints >= 1; resume is ``True`` or a checkpoint file).
        phase, step_offset, total_steps: how this call sits in a multi-phase run (see
            :mod:`.pipelines`), as reported in each :class:`~.callbacks.StepState`.

    Returns :class:`TrainResult` (with a resumed run: the whole run's history); ends
    early, with a warning, if an iterator runs out. Raises ``FloatingPointError`` when the
    loss becomes NaN/inf (before the optimiser step: the model and checkpoints keep the
    last finite state), ``CheckpointError`` when the checkpoint to resume from is corrupt.
    """
    _check_train_args(model, optimizer, steps, checkpoint_dir, checkpoint_every,
                      keep_checkpoints, resume)
    _check_batches(batches)
    steps = _resolve_steps(steps, controller, batches)
    saver = (Checkpointer(Path(checkpoint_dir), checkpoint_every, keep_checkpoints)
             if checkpoint_dir is not None else None)
    loop = _Loop(model, optimizer, controller, scheduler, max_grad_norm,
                 forward or (controller.forward if controller is not None else call_model),
                 loss_fn or (lambda outputs, _batch: output_loss(outputs)), saver)
    result, start, position = loop.start(resume, steps)
    stream = resumed_stream(batches, position)
    if loop.rng is not None:  # after skipping: the training steps see the checkpoint's RNG
        restore_rng_state(loop.rng)
    hooks = list(callbacks) + ([legacy_callback(callback)] if callback is not None else [])
    with _progress(progress, steps, start, controller) as bar:
        report = _Reporter(hooks + ([bar] if bar else []), model, controller,
                           phase or ("joint" if controller is not None else "dense"),
                           step_offset, total_steps or steps)
        loop.run(stream, start, steps, position, result, report)
    return result


@contextlib.contextmanager
def _progress(enabled: bool, steps: int, start: int,
              controller: TuneCompController | None) -> Iterator[ProgressBar | None]:
    if not enabled:
        yield None
        return
    with ProgressBar(steps, initial=start, desc="tunecomp" if controller else "train") as bar:
        yield bar


@dataclass
class _Reporter:
    """Builds the :class:`StepState` of a step and hands it to every callback."""

    hooks: list[StepCallback]
    model: nn.Module
    controller: TuneCompController | None
    phase: str
    offset: int
    total: int

    def __call__(self, step: int, loss: float, stats: dict[str, Any]) -> None:
        state = StepState(self.offset + step, self.total, self.phase, loss, stats, self.model,
                          self.controller)
        for hook in self.hooks:
            hook(state)


class _Loop:
    """One training run's moving parts, and the named steps of :func:`train`."""

    def __init__(self, model, optimizer, controller, scheduler, max_grad_norm, forward,
                 loss_fn, saver: Checkpointer | None) -> None:
        self.model, self.optimizer, self.controller = model, optimizer, controller
        self.scheduler, self.max_grad_norm = scheduler, max_grad_norm
        self.forward, self.loss_fn, self.saver = forward, loss_fn, saver
        self.device = model_device(model)
        self.rng: Any = None
        if controller is not None:  # its state then follows the ranks compacted away
            controller.attach_optimizer(optimizer)

    def start(self, resume, steps: int) -> tuple[TrainResult, int, int]:
        """The history, first step and data position: fresh, or from a checkpoint."""
        result = TrainResult()
        if not resume:
            if self.saver is not None and self.saver.checkpoints():
                raise FileExistsError(
                    f"{self.saver.directory} already holds checkpoints of an earlier run "
                    f"({self.saver.checkpoints()[-1].name}); pass resume=True to continue it, "
                    "or use an empty directory"
                )
            return result, 0, 0
        state = find_resume_state(resume, self.saver)
        if state is None:
            return result, 0, 0
        train_state = state.get("train")
        if not isinstance(train_state, dict) or not {"step", "position"} <= set(train_state):
            raise ValueError(
                f"{state['_path']} was not written by train(checkpoint_dir=...): it has no "
                "step / data position; restore it with load_checkpoint instead"
            )
        start, position = int(train_state["step"]), int(train_state["position"])
        if start > steps:
            raise ValueError(f"cannot resume: the checkpoint {state['_path']} is at step "
                             f"{start}, past steps={steps}")
        restore_checkpoint(state, state["_path"], self.model, self.optimizer, self.controller,
                           self.scheduler, restore_rng=False)
        self.rng = state.get("rng")
        result.steps = start
        result.losses = list(train_state.get("losses", []))
        result.stats = list(train_state.get("stats", []))
        return result, start, position

    def run(self, stream: Iterator[Any], start: int, steps: int, position: int,
            result: TrainResult, report: _Reporter) -> None:
        self.model.train()
        for step in range(start, steps):
            try:
                batch = move_to_device(next(stream), self.device)
            except StopIteration:
                warnings.warn(f"batches ran out after {step} of {steps} steps", stacklevel=3)
                break
            position += 1
            loss = self.optimizer_step(batch, step)
            stats = self.controller_step()
            if stats is not None:
                result.stats.append(stats)
            result.losses.append(loss)
            result.steps += 1
            report(step + 1, loss, stats or {})
            self.maybe_checkpoint(step + 1, steps, position, result)

    def optimizer_step(self, batch: Any, step: int) -> float:
        """Forward, loss, backward, clipping, optimiser and scheduler; the task loss."""
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.forward(self.model, batch)
        task = self.loss_fn(outputs, batch)
        loss = task if self.controller is None else (
            task + self.controller.regularization(outputs, batch))
        self._check_finite(loss, task, step)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return float(task.detach())

    def controller_step(self) -> dict[str, Any] | None:
        if self.controller is None:
            return None
        self.controller.step()
        return self.controller.stats()

    def _check_finite(self, loss: torch.Tensor, task: torch.Tensor, step: int) -> None:
        value = float(loss.detach())
        if math.isfinite(value):
            return
        last = (f"; last checkpoint: {self.saver.checkpoints()[-1]}"
                if self.saver is not None and self.saver.checkpoints() else "")
        raise FloatingPointError(
            f"the loss is {value} at step {step + 1} (task loss {float(task.detach())}); "
            "stopped before the optimiser step, the model keeps the previous step's "
            "parameters" + last
        )

    def maybe_checkpoint(self, step: int, steps: int, position: int,
                         result: TrainResult) -> None:
        if self.saver is None or (step % self.saver.every and step != steps):
            return
        train_state = {"step": step, "position": position, "steps": steps,
                       "losses": list(result.losses), "stats": list(result.stats)}
        self.saver.save(step, checkpoint_state(self.model, self.optimizer, self.controller,
                                               self.scheduler, {}, train_state))


def _check_batches(batches: Any) -> None:
    if isinstance(batches, Mapping) or not isinstance(batches, Iterable):
        raise TypeError(
            "batches must be an iterable of batches, got "
            + ("a single dict; wrap one batch in a list: [batch]" if isinstance(batches, Mapping)
               else type(batches).__name__)
        )


def _resolve_steps(steps: int | None, controller: TuneCompController | None,
                   batches: Any) -> int:
    """The steps to run. With a controller whose schedule is in fractions of the run, a
    given ``steps`` fits the schedule (to ``steps`` more than it has taken)."""
    if controller is not None:
        if steps is None:
            if controller.schedule is None:
                raise ValueError(
                    "the TuneComp schedule is in fractions of the run and its length is not "
                    "known: pass steps= (the run's optimiser steps) or "
                    "TuneCompConfig(total_steps=...)")
            return max(controller.schedule.total_steps - controller.step_count, 0)
        if controller.schedule is None:
            controller.fit_schedule(controller.step_count + steps)
        return steps
    if steps is not None:
        return steps
    if hasattr(batches, "__len__"):
        return len(batches)
    raise ValueError("pass steps= when batches has no length and there is no controller")


def resumed_stream(batches: Iterable[Any], position: int) -> Iterator[Any]:
    """:func:`cycle_batches` advanced past the first ``position`` batches."""
    if position == 0:
        return cycle_batches(batches)
    if isinstance(batches, Sequence) and not isinstance(batches, (str, bytes)) and batches:
        offset = position % len(batches)  # a sequence: jump there without drawing batches
        return itertools.chain(itertools.islice(batches, offset, None), cycle_batches(batches))
    stream = cycle_batches(batches)
    for drawn in range(position):
        try:
            next(stream)
        except StopIteration:
            raise ValueError(
                f"cannot resume: batches ran out after {drawn} batches, but the checkpoint "
                f"had consumed {position}"
            ) from None
    return stream


def _check_train_args(
    model: Any,
    optimizer: Any,
    steps: Any,
    checkpoint_dir: Any,
    checkpoint_every: Any,
    keep_checkpoints: Any,
    resume: Any,
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not (callable(getattr(optimizer, "step", None))
            and callable(getattr(optimizer, "zero_grad", None))):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    for name, value, minimum in (("steps", steps, 0), ("checkpoint_every", checkpoint_every, 1),
                                 ("keep_checkpoints", keep_checkpoints, 1)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if (checkpoint_dir is None) != (checkpoint_every is None):
        raise ValueError(
            "pass checkpoint_dir and checkpoint_every together (got checkpoint_dir="
            f"{checkpoint_dir!r}, checkpoint_every={checkpoint_every!r})"
        )
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() \
            and not Path(checkpoint_dir).is_dir():
        raise NotADirectoryError(f"checkpoint_dir {checkpoint_dir} exists and is not a directory")
    if resume is True and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (or pass the checkpoint file: "
                         "resume=path)")
    if not isinstance(resume, (bool, str, os.PathLike)):
        raise TypeError(f"resume must be a bool or a checkpoint path, got "
                        f"{type(resume).__name__}")


def __getattr__(name: str) -> Any:
    if name == "run_tunecomp":  # moved to .pipelines; the old import path keeps working
        from .pipelines import run_tunecomp

        return run_tunecomp
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
