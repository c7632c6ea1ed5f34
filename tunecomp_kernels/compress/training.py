"""A plain PyTorch training loop that runs the TuneComp schedule, and checkpoint helpers.

:func:`train` is the loop (usable with or without a controller, so the sequential
baselines share it); :func:`run_tunecomp` is prepare → train → finalize in one call;
:func:`save_checkpoint` / :func:`load_checkpoint` store and restore model, optimiser,
scheduler, controller and RNG state so that a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TuneCompConfig
from .controller import TuneCompController
from .model_io import call_model, model_device, move_to_device, output_loss
from .report import CompressionReport, compression_report

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
    history and the wall time in seconds."""

    model: nn.Module
    report: CompressionReport | None
    history: TrainResult
    wall_time: float


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
    progress: bool = False,
) -> TrainResult:
    """Run ``steps`` optimiser steps; with a ``controller`` the TuneComp schedule runs too.

    Each step: ``outputs = forward(model, batch)``; ``loss = loss_fn(outputs, batch)``
    (default: the model's own ``outputs.loss``) ``+ controller.regularization(outputs,
    batch)``; backward; optional gradient clipping; ``optimizer.step()``;
    ``scheduler.step()``; ``controller.step()``; ``callback(step, info)``.

    Args:
        model: the model (put in train mode).
        optimizer: built over the model's parameters *after* ``prepare``.
        batches: model inputs (see :func:`~.model_io.call_model`); a re-iterable
            (list, DataLoader) is restarted when exhausted, an iterator is consumed.
        controller: the :class:`TuneCompController` from ``prepare``, or None (plain
            fine-tuning).
        steps: number of steps; default ``config.total_steps − controller.step_count``
            with a controller, else one pass over ``batches``.
        loss_fn: ``loss_fn(outputs, batch) -> loss``.
        forward: ``forward(model, batch) -> outputs`` (default: the controller's, or
            :func:`~.model_io.call_model`).
        scheduler: an LR scheduler stepped after the optimiser.
        max_grad_norm: clip the gradient norm to this value.
        callback: called after every step with the step number and a dict of the task
            loss and the controller's stats.
        progress: show a tqdm progress bar with loss, α, parameters.

    Returns:
        :class:`TrainResult`. Ends early (with a warning) if an iterator runs out.
    """
    if steps is None:
        if controller is not None:
            steps = max(controller.config.total_steps - controller.step_count, 0)
        elif hasattr(batches, "__len__"):
            steps = len(batches)  # type: ignore[arg-type]
        else:
            raise ValueError("pass steps= when batches has no length and there is no controller")
    if forward is None:
        forward = controller.forward if controller is not None else call_model
    loss_fn = loss_fn or (lambda outputs, _batch: output_loss(outputs))
    device = model_device(model)
    result = TrainResult()
    stream = cycle_batches(batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="tunecomp" if controller else "train", leave=False)
    model.train()
    try:
        for step in range(steps):
            try:
                batch = move_to_device(next(stream), device)
            except StopIteration:
                warnings.warn(f"batches ran out after {step} of {steps} steps", stacklevel=2)
                break
            optimizer.zero_grad(set_to_none=True)
            outputs = forward(model, batch)
            task = loss_fn(outputs, batch)
            loss = task if controller is None else task + controller.regularization(outputs,
                                                                                    batch)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            info: dict[str, Any] = {"loss": float(task.detach())}
            if controller is not None:
                controller.step()
                stats = controller.stats()
                result.stats.append(stats)
                info.update(stats)
            result.losses.append(info["loss"])
            result.steps += 1
            if callback is not None:
                callback(step + 1, info)
            if bar is not None:
                post = {"loss": f"{info['loss']:.4f}"}
                if controller is not None:
                    post.update(alpha=f"{info['alpha']:.3f}", params=f"{info['ratio']:.1%}")
                bar.set_postfix(post, refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return result


def run_tunecomp(
    model: nn.Module,
    config: TuneCompConfig,
    make_optimizer: OptimizerFactory,
    batches: Iterable[Any],
    *,
    calibration: Iterable[Any] | None = None,
    steps: int | None = None,
    loss_fn: LossFn | None = None,
    forward: ForwardFn = call_model,
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    max_grad_norm: float | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> RunResult:
    """Joint TuneComp in one call: :func:`~.prepare.prepare` → :func:`train` for
    ``steps`` (default ``config.total_steps``) → :func:`~.finalize.finalize`.

    ``make_optimizer(params)`` builds the optimiser over the prepared model's trainable
    parameters; ``make_scheduler(optimizer)`` optionally an LR scheduler.
    """
    from .prepare import prepare

    start = time.perf_counter()
    controller = prepare(model, config, calibration, forward=forward)
    optimizer = make_optimizer(trainable_parameters(model))
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    history = train(model, optimizer, batches, controller=controller, steps=steps,
                    loss_fn=loss_fn, forward=forward, scheduler=scheduler,
                    max_grad_norm=max_grad_norm, callback=callback, progress=progress)
    controller.finalize()
    return RunResult(model, compression_report(model), history, time.perf_counter() - start)


# --- checkpoints ----------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    controller: TuneCompController | None = None,
    scheduler: Any = None,
    **extra: Any,
) -> None:
    """Write model, optimiser, scheduler, controller and CPU RNG state to ``path``
    (``torch.save``, atomically via a temporary file). ``extra`` entries are stored too."""
    state: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "controller": controller.state_dict() if controller is not None else None,
        "rng": torch.get_rng_state(),
        "extra": extra,
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    controller: TuneCompController | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Restore :func:`save_checkpoint` into a freshly prepared model (``prepare`` on the
    original model with the same config), its new optimiser/scheduler and controller.
    The controller goes first (it frees the teachers if the checkpoint is past the blend),
    then the model, optimiser, scheduler and RNG. Returns the ``extra`` entries."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if controller is not None:
        if state.get("controller") is None:
            raise ValueError(f"{path} holds no controller state")
        controller.load_state_dict(state["controller"])
    model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state.get("extra", {})
