"""What a training loop tells the code around it after every optimiser step.

:class:`StepState` is the one object every step callback receives; :class:`ProgressBar`
is the progress bar, itself a callback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .controller import TuneCompController


@dataclass
class StepState:
    """The state after one optimiser step.

    Attributes:
        step: optimiser steps done in the whole run, this one included (1-based).
        total_steps: the steps the whole run plans.
        phase: ``"dense"``, ``"joint"`` or ``"finetune"`` (see :mod:`.pipelines`).
        loss: this step's task loss (without regularisation).
        stats: the controller's :meth:`~TuneCompController.stats` (empty without one).
        model: the model being trained.
        controller: the TuneComp controller, or None in a phase without one.
    """

    step: int
    total_steps: int
    phase: str
    loss: float
    stats: Mapping[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None
    controller: TuneCompController | None = None

    def info(self) -> dict[str, Any]:
        """The loss and the controller's stats in one dict (the legacy callback's view)."""
        return {"loss": self.loss, **self.stats}


StepCallback = Callable[[StepState], None]


def legacy_callback(callback: Callable[[int, dict[str, Any]], None]) -> StepCallback:
    """Adapt a ``callback(step, info)`` function to the :class:`StepState` protocol."""

    def call(state: StepState) -> None:
        callback(state.step, state.info())

    return call


class ProgressBar:
    """A tqdm progress bar over the whole run: loss, α and the targeted parameters.

    Use it as a step callback; :meth:`note` adds a value (e.g. the latest val accuracy)
    to the bar's line. With ``enabled=False`` nothing is drawn, and ``log_every`` steps
    (if set) a plain line goes to stdout instead, for logs.
    """

    def __init__(self, total: int, *, desc: str = "tunecomp", enabled: bool = True,
                 initial: int = 0, log_every: int | None = None) -> None:
        from tqdm.auto import tqdm

        self.total, self.log_every = total, log_every
        self._notes: dict[str, str] = {}
        self._bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                         dynamic_ncols=True, leave=False)

    def note(self, key: str, value: str) -> None:
        self._notes[key] = value

    def __call__(self, state: StepState) -> None:
        post = {"loss": f"{state.loss:.3f}"}
        if state.stats:
            post["α"] = f"{state.stats.get('alpha', 0.0):.2f}"
            post["params"] = (f"{state.stats.get('params', 0) / 1e6:.2f}M "
                              f"({state.stats.get('ratio', 1.0):.0%})")
        post.update(self._notes)
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)
        if self.log_every and self._bar.disable and (
                state.step % self.log_every == 0 or state.step == self.total):
            print(f"step {state.step}/{self.total}: "
                  + ", ".join(f"{k} {v}" for k, v in post.items()), flush=True)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
