"""The public op: ``masked_lowrank_linear``."""

from __future__ import annotations

import torch

from .backends import resolve_backend
from .cuda_tables import shape_key as _shape_key
from .validation import check_inputs


def masked_lowrank_linear(
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_scale: float = 0.0,
    student_scale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Masked low-rank linear map with an optional frozen-teacher blend.

    ``y = student_scale * ((x Vᵀ ⊙ mask) Uᵀ + bias) + teacher_scale * (x W0ᵀ + b0)``

    Args:
        x: ``[..., in]`` input, any number of leading dims.
        U: ``[out, r]``; mask: ``[r]``; V: ``[r, in]``; bias: ``[out]`` or None.
        teacher_weight: frozen dense ``W0 [out, in]`` (no gradient), or None.
        teacher_bias: frozen ``b0 [out]``, or None.
        teacher_scale, student_scale: the blend coefficients ``a`` and ``s``.
        backend: ``"auto"`` or a name from :func:`tunecomp_kernels.available_backends`.

    Returns:
        ``[..., out]`` in ``x``'s dtype; accumulation is fp32 for fp16/bf16 inputs.
        Gradients flow to x, U, mask, V and bias.
    """
    check_inputs(x, U, mask, V, bias, teacher_weight, teacher_bias, teacher_scale, student_scale)
    # Keep floats as they are: torch.compile may pass SymFloats, and float() would pin them.
    teacher_scale = float(teacher_scale) if isinstance(teacher_scale, int) else teacher_scale
    student_scale = float(student_scale) if isinstance(student_scale, int) else student_scale
    if teacher_scale == 0.0:  # the teacher contributes nothing: don't read it
        teacher_weight = teacher_bias = None
    name = resolve_backend(backend, x.device.type, _auto_shape_key(backend, x, U))
    op = getattr(torch.ops.tunecomp, f"masked_lowrank_{name}")
    y, _t = op(x, U, mask, V, bias, teacher_weight, teacher_bias, teacher_scale, student_scale)
    return y


def _auto_shape_key(backend: str, x: torch.Tensor, U: torch.Tensor) -> str:
    """The per-shape key "auto" uses to choose between GPU backends; "" where not needed."""
    if backend != "auto" or x.device.type != "cuda":
        return ""
    return _shape_key(x, U)
