"""The checkpoint file format, and the one atomic-write helper the library uses.

A checkpoint is a ``torch.save`` archive (a zip file whose every record has a CRC) holding
the model, optimiser, scheduler and controller state dicts, the RNG state of every
generator a run may use, the training loop's position and any extra entries.
:func:`read_checkpoint` verifies the CRCs before unpickling (``torch.load`` alone does not
notice flipped bytes) and unpickles only tensors and plain values. Every file the library
writes goes through :func:`atomic_write`: a temporary file in the same directory, fsynced,
then renamed into place, so a crash or a full disk never leaves a half-written file under
the real name and never damages an older one.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .controller import TuneCompController

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


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's or a directory's entry to disk. Best effort for directories: some
    systems (e.g. Windows) cannot open them, and then nothing is done."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Create or replace ``path`` so that it is never seen half-written: ``write(tmp)``
    writes a temporary file in the same directory, which is fsynced, renamed over ``path``
    with ``os.replace`` and followed by an fsync of the directory. On any error (or
    interrupt) ``path`` is untouched and the temporary file is removed. The file gets the
    permissions a plain ``open(path, "w")`` would (the umask is respected)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        write(Path(tmp))
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`: never a partial file at
    ``path``, and the previous file stays intact on any error."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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


def checkpoint_state(
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
    atomic_torch_save(checkpoint_state(model, optimizer, controller, scheduler, extra), path)


def restore_checkpoint(
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
    restore_checkpoint(state, path, model, optimizer, controller, scheduler)
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


class Checkpointer:
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


def find_resume_state(
    resume: bool | str | os.PathLike[str], saver: Checkpointer | None
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
