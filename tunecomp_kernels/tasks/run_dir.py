"""Where a ``tunecomp compress`` run writes: the model directory and, beside it, the
hidden checkpoint directory the run owns.

Everything is checked before any training (:func:`check_run_paths`). The checkpoint
directory ``<parent>/.<name>.tunecomp-run`` holds only files this module names
(checkpoints per phase, ``job.json``, ``val_curve.json``); :func:`remove_run_files`
deletes exactly those and removes a directory only when it is then empty.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compress.checkpoint import atomic_write, list_checkpoints
from ..compress.output_dir import check_destination

PHASES = ("dense", "tunecomp")
JOB_FILE = "job.json"
CURVE_FILE = "val_curve.json"
#: Settings that may differ between an interrupted run and its resumption.
RESUME_FREE = ("resume", "overwrite", "progress", "threads")


class RunPathError(ValueError):
    """An output path that cannot be used; the message names the setting."""


@dataclass
class RunPaths:
    output: Path
    checkpoints: Path

    def phase_dir(self, phase: str) -> Path:
        return self.checkpoints / phase

    def checkpoint_files(self) -> list[Path]:
        return [p for phase in PHASES for p in list_checkpoints(self.phase_dir(phase))]

    def last_step(self, phase: str) -> int:
        """The step of ``phase``'s newest checkpoint (0: none)."""
        found = list_checkpoints(self.phase_dir(phase))
        return int(found[-1].stem.split("-")[1]) if found else 0

    def last_checkpoint(self) -> tuple[str, int] | None:
        """(phase, step) of the newest checkpoint, None when there is none."""
        for phase in reversed(PHASES):
            if self.last_step(phase):
                return phase, self.last_step(phase)
        return None


def checkpoint_dir_for(output: Path) -> Path:
    return output.parent / f".{output.name}.tunecomp-run"


def check_run_paths(output: str | Path, *, overwrite: bool, resume: bool) -> RunPaths:
    """Check, before any training, that the model can be saved at ``output`` and that
    the checkpoint directory beside it can be used.

    Raises:
        RunPathError: ``output`` is refused (see
            :func:`~tunecomp_kernels.compress.output_dir.check_destination`); the checkpoint
            path is not a directory; checkpoints of an earlier run exist without
            ``resume`` or ``overwrite``; ``resume`` without checkpoints.
    """
    output = Path(output)
    try:
        check_destination(output, overwrite=overwrite)
    except (OSError, ValueError) as exc:
        raise RunPathError(f"output: {exc}") from None
    paths = RunPaths(output, checkpoint_dir_for(output))
    ckpt = paths.checkpoints
    if ckpt.exists() and not ckpt.is_dir():
        raise RunPathError(f"output: the run's checkpoint path {ckpt} exists and is not a "
                           "directory")
    found = paths.checkpoint_files()
    if resume and not found:
        raise RunPathError(f"resume: no checkpoints of an interrupted run in {ckpt}")
    if found and not resume and not overwrite:
        raise RunPathError(f"output: {ckpt} holds checkpoints of an interrupted run; pass "
                           "resume=True to continue it, or overwrite=True to start afresh")
    return paths


def check_same_job(paths: RunPaths, settings: dict[str, Any]) -> None:
    """On resume: the settings must be those of the interrupted run.

    Raises:
        RunPathError: naming the first setting that differs.
    """
    path = paths.checkpoints / JOB_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    for key, value in _comparable(settings).items():
        if key in saved and saved[key] != value:
            raise RunPathError(f"resume: the interrupted run had {key}={saved[key]!r}, this "
                               f"one has {value!r}; use the same settings to resume")


def record_job(paths: RunPaths, settings: dict[str, Any]) -> None:
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_comparable(settings), indent=1)
    atomic_write(paths.checkpoints / JOB_FILE, lambda tmp: tmp.write_text(text))


def load_curve(paths: RunPaths) -> dict[int, dict[str, Any]]:
    path = paths.checkpoints / CURVE_FILE
    if not path.is_file():
        return {}
    return {int(e["step"]): e for e in json.loads(path.read_text(encoding="utf-8"))}


def save_curve(paths: RunPaths, curve: dict[int, dict[str, Any]]) -> None:
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    text = json.dumps([curve[k] for k in sorted(curve)], indent=1)
    atomic_write(paths.checkpoints / CURVE_FILE, lambda tmp: tmp.write_text(text))


def remove_run_files(paths: RunPaths) -> None:
    """Delete the files this run wrote into its checkpoint directory, then the
    directories that are left empty (anything else in them stays)."""
    for path in paths.checkpoint_files():
        path.unlink(missing_ok=True)
    for name in (JOB_FILE, CURVE_FILE):
        (paths.checkpoints / name).unlink(missing_ok=True)
    for directory in [paths.phase_dir(p) for p in PHASES] + [paths.checkpoints]:
        with contextlib.suppress(OSError):  # missing, or holds files that are not ours
            directory.rmdir()


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in settings.items() if k not in RESUME_FREE}
    return json.loads(json.dumps(out))  # tuples as lists, like the saved copy
