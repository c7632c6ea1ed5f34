"""The old import path of the Hugging Face ``Trainer`` callbacks, which now live in
:mod:`tunecomp_kernels.integrations.hf_trainer` (resolved on first access)."""

from __future__ import annotations

from typing import Any

_MOVED = ("TuneCompCallback", "TuneCompTrainer")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from ..integrations import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
