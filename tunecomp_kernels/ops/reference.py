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


def _scale(value: torch.Tensor | float) -> torch.Tensor | float:
    """A blend scale in the compute dtype: the ops pass 0-d tensors; direct callers of
    these functions (tests, bench/cuda_verify.py) may pass Python floats."""
    return _acc(value) if isinstance(value, torch.Tensor) else value


def forward(
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_scale: torch.Tensor,
    student_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y[..., out] and t = x·Vᵀ [N, r]; see :mod:`tunecomp_kernels.ops.contract`.

    The op passes the scales as 0-d tensors, used as tensors (never read on the host)."""
    x2 = _acc(x.reshape(-1, x.shape[-1]))
    t = x2 @ _acc(V).t()
    s = _scale(student_scale)
    # Scale U's columns (out×r) rather than t (N×r): same product, less memory traffic.
    U_scaled = _acc(U) * (_acc(mask) * s)
    if teacher_weight is not None:
        # y = a·(x W0ᵀ + b0) first, then the student is accumulated into the same buffer.
        w0 = _acc(teacher_weight).t()
        y = torch.addmm(_acc(teacher_bias), x2, w0) if teacher_bias is not None else x2 @ w0
        y.mul_(_scale(teacher_scale)).addmm_(t, U_scaled.t())
        if bias is not None:
            y.add_(_acc(bias) * s)
    elif bias is not None:
        y = torch.addmm(_acc(bias) * s, t, U_scaled.t())
    else:
        y = t @ U_scaled.t()
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
    teacher_scale: torch.Tensor,
    student_scale: torch.Tensor,
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
    s = _scale(student_scale)
    mask_s = _acc(mask) * s
    # Outputs of a custom op may not alias each other: one fresh empty per slot.
    dx, dU, dmask, dV, dbias = (grad_y.new_empty((0,)) for _ in range(5))

    if need_U or need_mask:
        dy_t = dy.t() @ t  # [out, r]
        if need_U:
            dU = (dy_t * mask_s).to(U.dtype)
        if need_mask:
            dmask = (s * (_acc(U) * dy_t).sum(0)).to(mask.dtype)
    if need_x or need_V:
        g = dy @ _acc(U)  # [N, r]
        if need_V:
            x2 = _acc(x.reshape(-1, x.shape[-1]))
            dV = ((g.t() @ x2) * mask_s[:, None]).to(V.dtype)
        if need_x:
            dx2 = g @ (_acc(V) * mask_s[:, None])
            if teacher_weight is not None:
                dx2.addmm_(dy * _scale(teacher_scale), _acc(teacher_weight))
            dx = dx2.to(x.dtype).reshape(x.shape)
    if need_bias:
        dbias = (s * dy.sum(0)).to(grad_y.dtype)
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
