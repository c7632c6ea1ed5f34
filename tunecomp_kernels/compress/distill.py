"""Distillation losses between the student's and the frozen teacher's outputs, and the
loss terms of the controller (:class:`LossTerms`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .model_io import output_hidden, output_logits
from .sharded import full_tensor


def logits_kd(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over all positions
    (every leading dim is a position; the last dim is the classes)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {list(student.shape)} and teacher logits {list(teacher.shape)} differ"
        )
    classes = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)
    t = F.log_softmax(teacher.detach().reshape(-1, classes).float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def hidden_kd(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the MSE between matching hidden states."""
    if len(student) != len(teacher):
        raise ValueError(
            f"student has {len(student)} hidden states, teacher {len(teacher)}"
        )
    terms = [F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def distillation_loss(
    mode: str, student_outputs: Any, teacher_outputs: Any, temperature: float = 1.0
) -> torch.Tensor:
    """``"logits"`` → :func:`logits_kd`, ``"hidden"`` → :func:`hidden_kd` (unweighted)."""
    if mode == "logits":
        return logits_kd(output_logits(student_outputs), output_logits(teacher_outputs),
                         temperature)
    if mode == "hidden":
        return hidden_kd(output_hidden(student_outputs), output_hidden(teacher_outputs))
    raise ValueError(f"unknown distillation mode {mode!r}; choose 'logits' or 'hidden'")


class LossTerms:
    """The loss terms of :class:`~.controller.TuneCompController` (a base class of it:
    the methods read its ``config``, ``l1_lambda``, ``teacher_freed``, layers and teacher
    forward)."""

    if TYPE_CHECKING:
        from ..nn.masked_lowrank_linear import MaskedLowRankLinear
        from .config import TuneCompConfig

        config: TuneCompConfig
        l1_lambda: float
        teacher_freed: bool
        distill_terms: int
        _mods: list[MaskedLowRankLinear]

        def teacher_forward(self, inputs: Any) -> Any: ...

    @property
    def distill_active(self) -> bool:
        """Whether :meth:`regularization` includes a distillation term at this step."""
        cfg = self.config
        return cfg.distill != "none" and cfg.distill_weight > 0 and not self.teacher_freed

    def l1_penalty(self) -> torch.Tensor:
        """``λ_t · Σ_layers Σ_i |mask_i|`` (a 0-d tensor; no graph when λ_t = 0)."""
        device = self._mods[0].mask.device
        if self.l1_lambda == 0.0:
            return torch.zeros((), device=device)
        total = sum(full_tensor(m.mask.abs().sum()).to(device) for m in self._mods)
        return self.l1_lambda * total

    def distillation_loss(self, student_outputs: Any, teacher_outputs: Any) -> torch.Tensor:
        """``distill_weight ×`` the configured distillation loss (logits KL or hidden MSE)."""
        cfg = self.config
        if cfg.distill == "none":
            raise ValueError("distill='none' in the config: there is no distillation loss")
        self.distill_terms += 1
        return cfg.distill_weight * distillation_loss(
            cfg.distill, student_outputs, teacher_outputs, cfg.distill_temperature
        )

    def regularization(self, outputs: Any = None, inputs: Any = None) -> torch.Tensor:
        """The term to add to the task loss: the L1 penalty, plus — when distillation is
        configured and the teacher is still alive — the distillation loss against the
        teacher's outputs on ``inputs`` (which then must be given with the student's
        ``outputs``)."""
        loss = self.l1_penalty()
        if self.distill_active:
            if outputs is None or inputs is None:
                raise ValueError(
                    f"distill={self.config.distill!r}: pass the student's outputs and the "
                    "model inputs: controller.regularization(outputs, inputs)"
                )
            teacher = self.teacher_forward(inputs)
            loss = loss + self.distillation_loss(outputs, teacher)
        return loss

    @torch.no_grad()
    def add_l1_gradients(self) -> None:
        """Add ``λ_t·sign(mask)`` to every mask's ``.grad``: the gradient of
        :meth:`l1_penalty`, for trainers where the loss cannot be changed (the HF
        callback calls this right before the optimiser step)."""
        if self.l1_lambda == 0.0:
            return
        for m in self._mods:
            g = self.l1_lambda * torch.sign(m.mask)
            if m.mask.grad is None:
                m.mask.grad = g
            else:
                m.mask.grad.add_(g)
