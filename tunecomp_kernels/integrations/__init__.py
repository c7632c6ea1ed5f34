"""Integrations with training frameworks.

* :mod:`.lightning` — :class:`TuneCompLightningCallback` for PyTorch Lightning (needs
  ``pip install 'tunecomp_kernels[lightning]'``; imported on first access).
* :mod:`.distributed` — DDP / FSDP2 helpers: :func:`ddp_ignore_teachers`,
  :func:`check_in_sync`, :func:`broadcast_controller`.
* :mod:`.hf_trainer` — Hugging Face ``Trainer``: :class:`TuneCompCallback` and
  :class:`TuneCompTrainer` (needs ``transformers``; imported on first access; also
  available as ``tunecomp_kernels.compress.TuneCompCallback`` / ``TuneCompTrainer``).
* :mod:`.driver` — :class:`ControllerDriver`, what both trainer callbacks do with the
  controller (schedule fitting, L1 gradients, stepping, checkpoint restore).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ControllerDriver": "driver",
    "TuneCompCallback": "hf_trainer",
    "TuneCompLightningCallback": "lightning",
    "TuneCompTrainer": "hf_trainer",
    "broadcast_controller": "distributed",
    "check_in_sync": "distributed",
    "controller_fingerprint": "distributed",
    "ddp_ignore_teachers": "distributed",
    "model_fingerprint": "distributed",
    "teacher_buffer_names": "distributed",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
