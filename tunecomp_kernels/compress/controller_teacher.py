"""The frozen teacher's own outputs while the blend runs: a mixin of
:class:`~.controller.TuneCompController` (for output distillation)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .calibration import eval_mode


class TeacherOutputs:
    """``teacher_mode`` / ``teacher_forward`` over the controller's layers (``_mods``),
    model, schedule and ``forward``."""

    @contextlib.contextmanager
    def teacher_mode(self) -> Iterator[None]:
        """Within the block the converted layers compute their frozen teacher only
        (``x W₀ᵀ + b₀``, as with α = 1, α' = 0) and the model is in eval mode; everything
        else in the model (e.g. embeddings, heads, norms) is shared with the student, i.e.
        the fine-tuned ones. Use it under ``torch.no_grad()`` to get teacher outputs for
        distillation. The layers' blend scales are left alone, so a student graph built
        before the block (``regularization(outputs, inputs)``) still backpropagates."""
        if self.teacher_freed:
            end = "the end of the blend" if self.schedule is None else (
                f"step {self.schedule.blend_steps} (the end of the blend)")
            raise RuntimeError(
                f"the teacher was freed at {end}; teacher outputs are only available while "
                "the blend runs"
            )
        try:
            for m in self._mods:
                # an instance attribute shadows the class's forward for this block only
                m.forward = functools.partial(_teacher_only, m)
            with eval_mode(self.model):
                yield
        finally:
            for m in self._mods:
                vars(m).pop("forward", None)

    def teacher_forward(self, inputs: Any) -> Any:
        """The teacher's outputs on ``inputs`` (no gradient), via :meth:`teacher_mode`."""
        with torch.no_grad(), self.teacher_mode():
            return self.forward(self.model, inputs)


def _teacher_only(layer: MaskedLowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """The frozen teacher of ``layer`` alone: ``x W₀ᵀ + b₀`` (a teacher stored in a lower
    precision, ``TuneCompConfig.teacher_dtype``, is upcast to the activations' dtype)."""
    bias = layer.teacher_bias
    return torch.nn.functional.linear(x, layer.teacher_weight.to(x.dtype),
                                      None if bias is None else bias.to(x.dtype))
