"""The distill op (:mod:`.distill_contract`) in plain PyTorch, on any device: the ``"torch"``
backend's implementation and the ground truth of the others.

As in :mod:`.reference`, half-precision inputs are computed in fp32 and rounded once, and a
teacher stored in a narrower dtype is upcast one block of rows at a time
(:func:`.reference._teacher_forward`).

The backward keeps the blend's gradient (from dy) and the feature term (from ``c·D``) as
two products and adds them before the single rounding: with ``feature_weight = 0`` the
feature term is exactly zero, so the gradients are bit for bit those of
:func:`tunecomp_kernels.masked_lowrank_linear` on the same backend. It costs two more
small GEMMs than forming ``G_s = s·dy + c·D`` first, which the Triton backend does.
"""

from __future__ import annotations

import torch

from . import reference
from .distill_contract import feature_coefficient, register_distill_ops
from .reference import _acc, _scale, _teacher_forward


def forward(
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    teacher_scale: torch.Tensor,
    student_scale: torch.Tensor,
    feature_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [..., out], t [N, r], D [N, out], sums [2])``; see the distill contract. t, D and
    sums are in the compute dtype (fp32 for half inputs)."""
    x2 = _acc(x.reshape(-1, x.shape[-1]))
    t = x2 @ _acc(V).t()
    y_t = _teacher_forward(x2, teacher_weight, teacher_bias, 1.0)
    u_masked = _acc(U) * _acc(mask)
    y_s = torch.addmm(_acc(bias), t, u_masked.t()) if bias is not None else t @ u_masked.t()
    D = y_s - y_t
    sums = torch.stack((D.square().sum(), y_t.square().sum()))
    y = y_t.mul_(_scale(teacher_scale)).add_(y_s * _scale(student_scale))
    return y.to(x.dtype).reshape(*x.shape[:-1], U.shape[0]), t, D, sums


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    t: torch.Tensor,
    D: torch.Tensor,
    sums: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_scale: torch.Tensor,
    student_scale: torch.Tensor,
    feature_weight: torch.Tensor,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dU, dmask, dV, dbias), 0-element tensors where not needed. dx is the blend op's
    (no feature term); the student's gradients add ``c·D`` (``c`` from
    :func:`.distill_contract.feature_coefficient`) to ``s·dy``."""
    need_x, need_U, need_mask, need_V, need_bias = (bool(n) for n in needs_grad)
    dx = reference.backward(grad_y, x, U, mask, V, t, teacher_weight, teacher_scale,
                            student_scale, [need_x, False, False, False, False])[0]
    dU, dmask, dV, dbias = (grad_y.new_empty((0,)) for _ in range(4))
    dy = _acc(grad_y.reshape(-1, U.shape[0]))
    cD = D * feature_coefficient(D, sums, feature_weight)
    s = _scale(student_scale)
    mask_a = _acc(mask)
    mask_s = mask_a * s
    u_acc = _acc(U)
    if need_U or need_mask:
        dy_t, f_t = dy.t() @ t, cD.t() @ t  # [out, r] each
        if need_U:
            dU = (dy_t * mask_s + f_t * mask_a).to(U.dtype)
        if need_mask:
            dmask = (s * (u_acc * dy_t).sum(0) + (u_acc * f_t).sum(0)).to(mask.dtype)
    if need_V:
        x2 = _acc(x.reshape(-1, x.shape[-1]))
        g, f = dy @ u_acc, cD @ u_acc  # [N, r] each
        dV = ((g.t() @ x2) * mask_s[:, None] + (f.t() @ x2) * mask_a[:, None]).to(V.dtype)
    if need_bias:
        dbias = (s * dy.sum(0) + cD.sum(0)).to(grad_y.dtype)
    return dx, dU, dmask, dV, dbias


OPS = register_distill_ops("torch", forward, backward)
