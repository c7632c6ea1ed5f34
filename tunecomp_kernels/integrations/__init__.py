"""Integrations with training frameworks.

* :mod:`.lightning` — :class:`TuneCompLightningCallback` for PyTorch Lightning (needs
  ``pip install 'tunecomp_kernels[lightning]'``; imported on first access).
* :mod:`.distributed` — DDP / FSDP2 helpers: :func:`ddp_ignore_teachers`,
  :func:`check_in_sync`, :func:`broadcast_controller`.
* Hugging Face ``Trainer``: :class:`tunecomp_kernels.compress.TuneCompCallback`.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TuneCompLightningCallback": "lightning",
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
