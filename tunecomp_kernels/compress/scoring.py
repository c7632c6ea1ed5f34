"""The importance of every rank, as the controller's pruning reads it.

Scores (``TuneCompConfig.score``), per rank i of a layer:

* ``"magnitude"``: ``|mask_i|·‖U[:, i]‖·‖V[i, :]‖`` — at an SVD start, σ_i;
* ``"activation"``: the same with V's columns weighted by the calibration inputs' RMS
  per channel;
* ``"sensitivity"``: AdaLoRA's smoothed sensitivity of the task loss to the rank's
  entries (:class:`~.importance.SensitivityScore`), accumulated from the gradients of
  every backward pass through hooks, so it works under any trainer. Task-aware: it
  needs the joint run's gradients, which sequential compression does not have.

Scores are float64 CPU tensors over each layer's original ranks (0 for ranks compacted
away); the sensitivity agrees bit for bit across data-parallel processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .importance import SensitivityScore, rank_positions
from .sharded import full_tensor as _full


class RankScorer:
    """Computes ``kind`` scores for ``layers`` (see the module docstring).

    Args:
        layers: the converted layers, in the controller's order.
        names: their names (keys of ``activation_rms``).
        kind: ``"magnitude"``, ``"activation"`` or ``"sensitivity"`` (resolved, not
            ``"auto"``).
        activation_rms: per layer name, the inputs' RMS ``[in]`` (``"activation"``).

    Raises:
        ValueError: ``"activation"`` without statistics for every layer.
    """

    def __init__(self, layers: Sequence[MaskedLowRankLinear], names: Sequence[str], kind: str,
                 activation_rms: dict[str, torch.Tensor]) -> None:
        self.layers, self.names, self.kind = list(layers), list(names), kind
        self.activation_rms = activation_rms
        if kind == "activation":
            missing = [n for n in self.names if n not in activation_rms]
            if missing:
                raise ValueError(
                    f"score='activation' needs calibration statistics; missing for {missing[0]!r}")
        self.sensitivity = None
        if kind == "sensitivity":
            self.sensitivity = SensitivityScore(self.layers)
            self.sensitivity.attach()

    def step_end(self) -> None:
        """Fold the step's gradients into the sensitivity (after each optimiser step)."""
        if self.sensitivity is not None and self.sensitivity.pending:
            self.sensitivity.step_end()

    @torch.no_grad()
    def local_scores(self) -> list[torch.Tensor]:
        """Per layer, float64 CPU ``[k]`` over the ranks it stores now."""
        if self.sensitivity is not None:
            return [s.to("cpu", torch.float64) for s in self.sensitivity.scores()]
        out = []
        for name, m in zip(self.names, self.layers):
            u = _full(m.U.detach()).float().norm(dim=0)
            v_mat = _full(m.V.detach()).float()
            if self.kind == "activation":
                v_mat = v_mat * self.activation_rms[name].to(v_mat.device, v_mat.dtype)
            score = _full(m.mask.detach()).float().abs() * u * v_mat.norm(dim=1)
            out.append(score.to("cpu", torch.float64))
        return out

    def compacted(self, i: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """Layer ``i``'s stored original ranks went from ``before`` to ``after``."""
        if self.sensitivity is not None:
            self.sensitivity.compact(i, rank_positions(before, after))

    def state_dict(self) -> dict[str, Any] | None:
        """The sensitivity's state (None for the parameter-only scores)."""
        return None if self.sensitivity is None else self.sensitivity.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (after the layers took the checkpoint's ranks).

        Raises:
            ValueError: the checkpoint has no sensitivity state for a sensitivity run.
        """
        if self.sensitivity is None:
            return
        if state is None:
            raise ValueError("the checkpoint has no sensitivity state, but the config "
                             "scores ranks by score='sensitivity'")
        self.sensitivity.load_state_dict(state)
