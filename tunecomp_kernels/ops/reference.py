"""Reference backend ``"torch"``: the op in plain PyTorch, on any device.

It is the ground truth for the other backends and the CPU default. Half-precision
inputs are computed in fp32 (fp32 accumulation) and rounded once at the end.
"""

from __future__ import annotations

import torch

from .contract import intermediate_dtype


def _acc(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.to(intermediate_dtype(tensor.dtype))


def forward(
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_scale: float,
    student_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y[..., out] and t = x·Vᵀ [N, r]; see :mod:`tunecomp_kernels.ops.contract`."""
    x2 = _acc(x.reshape(-1, x.shape[-1]))
    t = x2 @ _acc(V).t()
    # Scale U's columns (out×r) rather than t (N×r): same product, less memory traffic.
    U_scaled = _acc(U) * (_acc(mask) * student_scale)
    if bias is not None:
        y = torch.addmm(_acc(bias), t, U_scaled.t(), beta=student_scale)
    else:
        y = t @ U_scaled.t()
    if teacher_weight is not None and teacher_scale != 0.0:
        y = torch.addmm(y, x2, _acc(teacher_weight).t(), alpha=teacher_scale)
        if teacher_bias is not None:
            y = y.add(_acc(teacher_bias), alpha=teacher_scale)
    y = y.to(x.dtype).reshape(*x.shape[:-1], U.shape[0])
    return y, t


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    t: torch.Tensor,
    teacher_weight: torch.Tensor | None,
    teacher_scale: float,
    student_scale: float,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dU, dmask, dV, dbias) from DESIGN §2; 0-element tensors where not needed.

    The mask only scales rank columns, so it is applied to the small [out, r] and
    [r, in] operands instead of the [N, r] intermediates:
    ``dU = (dyᵀ t)·diag(s·mask)``, ``dmask = s·Σ_out U ⊙ (dyᵀ t)`` (= s·Σ_N t ⊙ g),
    ``dV = diag(s·mask)·(gᵀ x)``, ``dx = g·diag(s·mask)·V + a·dy·W0`` with g = dy·U.
    """
    need_x, need_U, need_mask, need_V, need_bias = needs_grad
    dy = _acc(grad_y.reshape(-1, U.shape[0]))
    mask_s = _acc(mask) * student_scale
    # Outputs of a custom op may not alias each other: one fresh empty per slot.
    dx, dU, dmask, dV, dbias = (grad_y.new_empty((0,)) for _ in range(5))

    if need_U or need_mask:
        dy_t = dy.t() @ t  # [out, r]
        if need_U:
            dU = (dy_t * mask_s).to(U.dtype)
        if need_mask:
            dmask = (student_scale * (_acc(U) * dy_t).sum(0)).to(mask.dtype)
    if need_x or need_V:
        g = dy @ _acc(U)  # [N, r]
        if need_V:
            x2 = _acc(x.reshape(-1, x.shape[-1]))
            dV = ((g.t() @ x2) * mask_s[:, None]).to(V.dtype)
        if need_x:
            dx2 = g @ (_acc(V) * mask_s[:, None])
            if teacher_weight is not None and teacher_scale != 0.0:
                dx2 = torch.addmm(dx2, dy, _acc(teacher_weight), alpha=teacher_scale)
            dx = dx2.to(x.dtype).reshape(x.shape)
    if need_bias:
        dbias = (student_scale * dy.sum(0)).to(grad_y.dtype)
    return dx, dU, dmask, dV, dbias


def reference_float64(
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_scale: float = 0.0,
    student_scale: float = 1.0,
) -> torch.Tensor:
    """The op written as plain differentiable float64 PyTorch, for tests: y[..., out]."""
    d = torch.float64
    t = x.to(d) @ V.to(d).t()
    y = (t * mask.to(d)) @ U.to(d).t()
    if bias is not None:
        y = y + bias.to(d)
    y = student_scale * y
    if teacher_weight is not None:
        teacher = x.to(d) @ teacher_weight.to(d).t()
        if teacher_bias is not None:
            teacher = teacher + teacher_bias.to(d)
        y = y + teacher_scale * teacher
    return y
