"""A plain PyTorch training loop that runs the TuneComp schedule, and checkpoint helpers.

:func:`train` is the loop (usable with or without a controller, so the sequential
baselines share it); :func:`run_tunecomp` is prepare → train → finalize in one call;
:func:`save_checkpoint` / :func:`load_checkpoint` store and restore model, optimiser,
scheduler, controller and RNG state so that a resumed run equals an uninterrupted one.

Resumable runs: ``train(..., checkpoint_dir=d, checkpoint_every=K)`` writes
``d/ckpt-<step>.pt`` every K steps and at the end, keeping the newest
``keep_checkpoints``; ``resume=True`` continues from the newest readable one (skipping,
with a warning, any that is truncated or corrupt). Every write goes to a temporary file
in the same directory, is fsynced and then renamed over the target, so a crash or a full
disk never leaves a half-written checkpoint under a checkpoint's name and never damages
an older one; a non-finite loss or parameter stops the run before anything is written.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import re
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    resume: bool | str | os.PathLike[str] = False,
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
        checkpoint_dir: directory for checkpoints (created if missing); it must not hold
            checkpoints of an earlier run unless ``resume`` is set.
        checkpoint_every: write a checkpoint every this many steps (and after the last
            step); required with ``checkpoint_dir``.
        keep_checkpoints: how many of the newest checkpoints to keep (>= 1; default 2, the
            last good one and the one before it).
        resume: ``True``: continue from the newest readable checkpoint in
            ``checkpoint_dir`` (start from step 0, with a warning, if there is none); a
            path: continue from that checkpoint file. Call ``train`` with the same
            arguments as the interrupted run, on a freshly prepared model: model,
            optimiser, scheduler, controller, RNG state (torch, CUDA, ``random``, NumPy),
            the data position and the history are restored, so the result equals an
            uninterrupted run. The data position is restored by skipping the batches the
            run had consumed, which is exact when ``batches`` yields the same sequence
            again (a list, a DataLoader without shuffling, a recreated iterator).

    Returns:
        :class:`TrainResult` (with a resumed run: the whole run's history). Ends early
        (with a warning) if an iterator runs out.

    Raises:
        FloatingPointError: the loss became NaN/inf (before the optimiser step, so the
            model and the checkpoints keep the last finite state).
        CheckpointError: ``resume`` names a truncated or corrupt checkpoint, or every
            checkpoint in ``checkpoint_dir`` is.
    """
    _check_train_args(model, optimizer, steps, checkpoint_dir, checkpoint_every,
                      keep_checkpoints, resume)
    if isinstance(batches, Mapping) or not isinstance(batches, Iterable):
        raise TypeError(
            "batches must be an iterable of batches, got "
            + ("a single dict; wrap one batch in a list: [batch]" if isinstance(batches, Mapping)
               else type(batches).__name__)
        )
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
    saver = (_Checkpointer(Path(checkpoint_dir), checkpoint_every, keep_checkpoints)
             if checkpoint_dir is not None else None)
    start, position, rng = 0, 0, None
    if resume:
        state = _find_resume_state(resume, saver)
        if state is not None:
            train_state = state.get("train")
            if not isinstance(train_state, dict) or not {"step", "position"} <= set(train_state):
                raise ValueError(
                    f"{state['_path']} was not written by train(checkpoint_dir=...): it has no "
                    "step / data position; restore it with load_checkpoint instead"
                )
            start, position = int(train_state["step"]), int(train_state["position"])
            if start > steps:
                raise ValueError(
                    f"cannot resume: the checkpoint {state['_path']} is at step {start}, "
                    f"past steps={steps}"
                )
            _restore(state, state["_path"], model, optimizer, controller, scheduler,
                     restore_rng=False)
            rng = state.get("rng")
            result.steps = start
            result.losses = list(train_state.get("losses", []))
            result.stats = list(train_state.get("stats", []))
    elif saver is not None and saver.checkpoints():
        raise FileExistsError(
            f"{saver.directory} already holds checkpoints of an earlier run "
            f"({saver.checkpoints()[-1].name}); pass resume=True to continue it, or use an "
            "empty directory"
        )
    stream = _resumed_stream(batches, position)
    if rng is not None:  # after skipping: the training steps see the checkpoint's RNG
        restore_rng_state(rng)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="tunecomp" if controller else "train",
                   leave=False)
    model.train()
    try:
        for step in range(start, steps):
            try:
                batch = move_to_device(next(stream), device)
            except StopIteration:
                warnings.warn(f"batches ran out after {step} of {steps} steps", stacklevel=2)
                break
            position += 1
            optimizer.zero_grad(set_to_none=True)
            outputs = forward(model, batch)
            task = loss_fn(outputs, batch)
            loss = task if controller is None else task + controller.regularization(outputs,
                                                                                    batch)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"the loss is {loss_value} at step {step + 1} (task loss "
                    f"{float(task.detach())}); stopped before the optimiser step, the model "
                    "keeps the previous step's parameters"
                    + (f"; last checkpoint: {saver.checkpoints()[-1]}"
                       if saver is not None and saver.checkpoints() else "")
                )
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
            if saver is not None and ((step + 1) % saver.every == 0 or step + 1 == steps):
                train_state = {"step": step + 1, "position": position, "steps": steps,
                               "losses": list(result.losses), "stats": list(result.stats)}
                saver.save(step + 1, _checkpoint_state(model, optimizer, controller,
                                                       scheduler, {}, train_state))
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
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    resume: bool | str | os.PathLike[str] = False,
) -> RunResult:
    """Joint TuneComp in one call: :func:`~.prepare.prepare` → :func:`train` for
    ``steps`` (default ``config.total_steps``) → :func:`~.finalize.finalize`.

    ``make_optimizer(params)`` builds the optimiser over the prepared model's trainable
    parameters; ``make_scheduler(optimizer)`` optionally an LR scheduler.
    ``checkpoint_dir`` / ``checkpoint_every`` / ``keep_checkpoints`` / ``resume`` are
    passed to :func:`train`: to resume an interrupted run, call ``run_tunecomp`` again
    with the same arguments, the same *uncompressed* starting model and ``resume=True``.
    """
    from .prepare import prepare

    start = time.perf_counter()
    controller = prepare(model, config, calibration, forward=forward)
    optimizer = make_optimizer(trainable_parameters(model))
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    history = train(model, optimizer, batches, controller=controller, steps=steps,
                    loss_fn=loss_fn, forward=forward, scheduler=scheduler,
                    max_grad_norm=max_grad_norm, callback=callback, progress=progress,
                    checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                    keep_checkpoints=keep_checkpoints, resume=resume)
    controller.finalize()
    return RunResult(model, compression_report(model), history, time.perf_counter() - start)


# --- checkpoints ----------------------------------------------------------------------

CHECKPOINT_FORMAT = "tunecomp_kernels.checkpoint"
CHECKPOINT_VERSION = 2
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt or not a TuneComp checkpoint."""


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator a run may use: torch (CPU, and CUDA when it is
    initialised), Python's ``random`` and NumPy's global generator."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    return state


def restore_rng_state(state: Any) -> None:
    """Inverse of :func:`capture_rng_state` (also accepts the bare torch CPU state of
    checkpoints written by older versions)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    if not isinstance(state, dict) or not isinstance(state.get("torch"), torch.Tensor):
        raise CheckpointError(f"invalid RNG state in checkpoint: {type(state).__name__}")
    torch.set_rng_state(state["torch"])
    if state.get("python") is not None:
        random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("numpy") is not None:
        import numpy as np

        npy = state["numpy"]
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached"]))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``: write to a
    temporary file in the same directory, fsync it, ``os.replace`` it over ``path`` and
    fsync the directory. On any error (or interrupt) ``path`` is untouched and the
    temporary file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and verify a checkpoint file: every record's CRC is checked before unpickling
    (``torch.load`` alone does not notice flipped bytes), and only tensors and plain
    Python values are unpickled (``weights_only=True``).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CheckpointError: the file is truncated, corrupt or not a TuneComp checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({path.stat().st_size} bytes, not a "
            f"complete torch.save archive: {exc})"
        ) from exc
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: record {bad!r} fails its CRC check")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a TuneComp checkpoint (written by save_checkpoint)")
    if state.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has format {state.get('format')!r}, not a TuneComp "
                              "checkpoint")
    version = state.get("version", 1)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version!r}; this library reads "
                              f"versions up to {CHECKPOINT_VERSION}")
    return state


def _checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    controller: TuneCompController | None,
    scheduler: Any,
    extra: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            raise FloatingPointError(
                f"parameter {name!r} holds NaN/inf: refusing to write it over a good checkpoint"
            )
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "controller": controller.state_dict() if controller is not None else None,
        "rng": capture_rng_state(),
        "train": train_state,
        "extra": extra,
    }


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    controller: TuneCompController | None = None,
    scheduler: Any = None,
    **extra: Any,
) -> None:
    """Write model, optimiser, scheduler, controller and RNG state (torch, CUDA, ``random``,
    NumPy) to ``path`` atomically (:func:`atomic_torch_save`). ``extra`` entries (plain
    values and tensors) are stored too.

    Raises:
        FloatingPointError: a parameter holds NaN/inf (nothing is written).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    atomic_torch_save(_checkpoint_state(model, optimizer, controller, scheduler, extra), path)


def _restore(
    state: dict[str, Any],
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    controller: TuneCompController | None,
    scheduler: Any,
    restore_rng: bool = True,
) -> None:
    if controller is not None:
        if state.get("controller") is None:
            raise ValueError(f"{path} holds no controller state")
        controller.load_state_dict(state["controller"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not fit this model: {exc}") from exc
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        restore_rng_state(state["rng"])


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
    then the model, optimiser, scheduler and RNG. Returns the ``extra`` entries.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupt or not a checkpoint.
        ValueError: it was made for another model or config.
    """
    state = read_checkpoint(path)
    _restore(state, path, model, optimizer, controller, scheduler)
    return state.get("extra") or {}


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The ``ckpt-<step>.pt`` files :func:`train` wrote to ``directory``, oldest first
    (unverified; :func:`read_checkpoint` verifies one)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return [p for _, p in sorted(found)]


class _Checkpointer:
    """Writes ``ckpt-<step>.pt`` files into one directory and keeps the newest ``keep``."""

    def __init__(self, directory: Path, every: int, keep: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.every, self.keep = directory, every, keep
        for stale in directory.glob(".ckpt-*.pt.*.tmp"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.directory)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        path = self.directory / f"ckpt-{step:08d}.pt"
        atomic_torch_save(state, path)
        for old in self.checkpoints()[:-self.keep]:  # only once the new one is in place
            if old != path:
                old.unlink(missing_ok=True)
        return path


def _find_resume_state(
    resume: bool | str | os.PathLike[str], saver: _Checkpointer | None
) -> dict[str, Any] | None:
    """The verified state to resume from, with its path under ``"_path"``; None to start
    from step 0."""
    if resume is not True:
        state = read_checkpoint(resume)
        state["_path"] = Path(resume)
        return state
    assert saver is not None
    candidates = saver.checkpoints()
    if not candidates:
        warnings.warn(f"resume=True but {saver.directory} holds no checkpoint: starting from "
                      "step 0", stacklevel=3)
        return None
    errors = []
    for path in reversed(candidates):
        try:
            state = read_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping unreadable checkpoint: {exc}", stacklevel=3)
            errors.append(str(exc))
            continue
        state["_path"] = path
        return state
    raise CheckpointError(f"no readable checkpoint in {saver.directory}: " + "; ".join(errors))


def _resumed_stream(batches: Iterable[Any], position: int) -> Iterator[Any]:
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
