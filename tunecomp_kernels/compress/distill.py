"""Distillation losses between the student's and the frozen teacher's outputs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .model_io import output_hidden, output_logits


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
