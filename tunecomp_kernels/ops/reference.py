"""Reference backend ``"torch"``: the op in plain PyTorch, on any device.

It is the ground truth for the other backends and the CPU default. Half-precision
inputs are computed in fp32 (fp32 accumulation) and rounded once at the end. A teacher
stored in a narrower dtype than the compute dtype (half inputs, or a bf16/fp16 teacher
with fp32 x) is upcast in blocks of at most ``TEACHER_BLOCK_ELEMENTS`` (16 MiB of fp32)
rather than copied whole.

With a batch of more rows than the layer is wide (any training batch), the student is
folded into the teacher's weight, ``W = a·W0 + U·diag(s·mask)·V``, and the blend takes one
product over the rows instead of two (forward, and again for dx); the student's own
gradients come from rank-sized products over the rows, with ``t = x·Vᵀ`` saved by the
forward.

The "weight path" (``forward(..., weight_path=True)``, registered as its own op pair,
``masked_lowrank_torch_weight_path``) forms W for every call and takes the student's
gradients from the weight's, ``G = dyᵀ·x``; it saves no t (a [0, r] tensor), so the blend
keeps no activation beyond x. The public function calls it in eager mode where
:func:`takes_weight_path` says it costs fewer multiply-adds. Each op's output shapes are
fixed by its inputs' shapes alone, so ``torch.compile`` and ``torch.export`` see no
branch on the number of rows (under them the public function keeps the factored op).
"""

from __future__ import annotations

import torch

from .contract import intermediate_dtype


def _acc(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.to(intermediate_dtype(tensor.dtype))


#: Elements of W0 upcast at a time when the teacher is stored in a narrower dtype than the
#: compute dtype (a bf16 teacher with fp32 x, or any half teacher): the transient fp32
#: copy is at most this many elements (16 MiB), never the whole teacher.
TEACHER_BLOCK_ELEMENTS = 1 << 22


def _teacher_rows(teacher_weight: torch.Tensor) -> int:
    """Output rows of W0 [out, in] upcast per block (at least one)."""
    return max(1, TEACHER_BLOCK_ELEMENTS // max(1, teacher_weight.shape[1]))


def _teacher_forward(x2: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None,
                     a: torch.Tensor | float) -> torch.Tensor:
    """``a·(x2 W0ᵀ + b0)`` [N, out] in x2's (compute) dtype. A teacher stored in a narrower
    dtype is upcast one block of output rows at a time, each block's product written into
    its columns, so no full compute-dtype copy of W0 exists (the values are the stored,
    rounded ones: bf16/fp16 -> fp32 is exact). A W0 of one block (up to
    ``TEACHER_BLOCK_ELEMENTS``) is upcast whole: that transient is at most 16 MiB."""
    rows = _teacher_rows(w0)
    if w0.dtype == x2.dtype or w0.shape[0] <= rows:  # no copy, or one block: W0 itself
        w, b = w0.to(x2.dtype).t(), None if b0 is None else b0.to(x2.dtype)
        y = torch.addmm(b, x2, w) if b is not None else x2 @ w
        return y.mul_(a)
    y = x2.new_empty((x2.shape[0], w0.shape[0]))
    for o0 in range(0, w0.shape[0], rows):
        block = w0[o0:o0 + rows].to(x2.dtype).t()
        y[:, o0:o0 + rows] = (torch.addmm(b0[o0:o0 + rows].to(x2.dtype), x2, block)
                              if b0 is not None else x2 @ block)
    return y.mul_(a)


def _teacher_backward(dx2: torch.Tensor, dy_a: torch.Tensor, w0: torch.Tensor) -> None:
    """``dx2 += dy_a W0`` in place (dy_a = a·dy [N, out]); a narrower teacher is upcast
    one block of rows at a time, as in :func:`_teacher_forward`."""
    rows = _teacher_rows(w0)
    if w0.dtype == dx2.dtype or w0.shape[0] <= rows:
        dx2.addmm_(dy_a, w0.to(dx2.dtype))
        return
    for o0 in range(0, w0.shape[0], rows):
        dx2.addmm_(dy_a[:, o0:o0 + rows], w0[o0:o0 + rows].to(dx2.dtype))


def _folds(teacher_weight: torch.Tensor | None, dtype: torch.dtype, rows: int,
           kept_dim: int) -> bool:
    """Whether to fold the student into the teacher's weight, ``a·W0 + U·diag(s·mask)·V``
    [out, in], and do one product with it. Forming it costs ``out·r·in`` multiply-adds;
    it saves the student's own product over the rows: ``rows·r·out`` in the forward
    (``kept_dim = in``), ``rows·r·in`` for dx (``kept_dim = out``). So it pays when
    ``rows > kept_dim``: training batches. A teacher stored in a narrower dtype is folded
    only when the folded weight fits in one upcast block (``TEACHER_BLOCK_ELEMENTS``)."""
    if teacher_weight is None or rows <= kept_dim:
        return False
    return teacher_weight.dtype == dtype or teacher_weight.numel() <= TEACHER_BLOCK_ELEMENTS


def takes_weight_path(teacher_weight: torch.Tensor | None, dtype: torch.dtype, rows: int,
                      U: torch.Tensor, V: torch.Tensor) -> bool:
    """Whether a blend call of ``rows`` rows (compute ``dtype``) goes through the folded
    weight W [out, in] in the forward and the backward: ``y = x·Wᵀ``; ``G = dyᵀ·x``,
    ``dU = G·Vᵀ·diag(s·mask)``, ``dV = diag(s·mask)·Uᵀ·G``, ``dmask = s·Σ_out U ⊙ (G·Vᵀ)``,
    ``dx = dy·W`` (W formed again), the chain rule through W. The forward then saves no
    ``t`` (a [0, r] tensor). Multiply-adds of a training step (N rows, o out, i in):
    ``3·N·o·i + 4·o·r·i``, against the factored path's ``2·N·o·i + 2·N·r·(o + i)`` plus,
    for the forward and dx each, the cheaper of forming W (``o·r·i``) or the student's own
    product over the rows. It is taken when cheaper, only where the fold is allowed
    (a teacher, and a narrower one only within one upcast block, :func:`_folds`)."""
    if not _folds(teacher_weight, dtype, rows, 0):
        return False
    (out, r), inp = U.shape, V.shape[1]
    weight = 3 * rows * out * inp + 4 * out * r * inp
    factored = (2 * rows * out * inp + 2 * rows * r * (out + inp)
                + r * min(out * inp, rows * out) + r * min(out * inp, rows * inp))
    return weight < factored


def _blend_weight(w0: torch.Tensor, a: torch.Tensor | float, U_scaled: torch.Tensor,
                  V: torch.Tensor) -> torch.Tensor:
    """``a·W0 + U_scaled·V`` [out, in], a fresh tensor in U_scaled's (the compute) dtype."""
    w = w0 * a if w0.dtype == U_scaled.dtype else w0.to(U_scaled.dtype).mul_(a)
    return w.addmm_(U_scaled, V)


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
    *,
    weight_path: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y[..., out] and t = x·Vᵀ [N, r]; see :mod:`tunecomp_kernels.ops.contract`. With
    ``weight_path`` (the weight-path op; needs a teacher) t is [0, r] and y = x·Wᵀ.

    The op passes the scales as 0-d tensors, used as tensors (never read on the host)."""
    if weight_path and teacher_weight is None:
        raise ValueError("the weight path needs a teacher_weight (it folds the student "
                         "into it); call the torch op without a teacher instead")
    x2 = _acc(x.reshape(-1, x.shape[-1]))
    t = x2.new_empty((0, V.shape[0])) if weight_path else x2 @ _acc(V).t()
    s = _scale(student_scale)
    # Scale U's columns (out×r) rather than t (N×r): same product, less memory traffic.
    U_scaled = _acc(U) * (_acc(mask) * s)
    if weight_path or _folds(teacher_weight, x2.dtype, x2.shape[0], x2.shape[1]):
        a = _scale(teacher_scale)
        w = _blend_weight(teacher_weight, a, U_scaled, _acc(V))
        b = None if teacher_bias is None else _acc(teacher_bias) * a
        if bias is not None:
            b = _acc(bias) * s if b is None else b.add_(_acc(bias) * s)
        y = torch.addmm(b, x2, w.t()) if b is not None else x2 @ w.t()
    elif teacher_weight is not None:
        # y = a·(x W0ᵀ + b0) first, then the student is accumulated into the same buffer.
        y = _teacher_forward(x2, teacher_weight, teacher_bias, _scale(teacher_scale))
        y.addmm_(t, U_scaled.t())
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
    """(dx, dU, dmask, dV, dbias) from docs/design.md#the-op; 0-element tensors where not needed.

    The mask only scales rank columns, so it is applied to the small [out, r] and
    [r, in] operands instead of the [N, r] intermediates:
    ``dU = (dyᵀ t)·diag(s·mask)``, ``dmask = s·Σ_out U ⊙ (dyᵀ t)`` (= s·Σ_N t ⊙ g),
    ``dV = diag(s·mask)·(gᵀ x)``, ``dx = g·diag(s·mask)·V + a·dy·W0`` with g = dy·U.
    A t of fewer rows than dy (none saved: the forward's weight path) gives them from
    ``G = dyᵀ·x`` instead (:func:`takes_weight_path`).
    """
    dy = _acc(grad_y.reshape(-1, U.shape[0]))
    s = _scale(student_scale)
    operands = (dy, x, U, mask, _acc(mask) * s, s, V, teacher_weight, _scale(teacher_scale))
    if t.shape[0] < dy.shape[0]:  # the forward took the weight path: no t was saved
        dx, dU, dmask, dV = _weight_path_backward(*operands, needs_grad)
    else:
        dx, dU, dmask, dV = _factored_backward(*operands, t, needs_grad)
    # Outputs of a custom op may not alias each other: one fresh empty per slot.
    dbias = (s * dy.sum(0)).to(grad_y.dtype) if needs_grad[4] else grad_y.new_empty((0,))
    return dx, dU, dmask, dV, dbias


def _weight_path_backward(dy, x, U, mask, mask_s, s, V, teacher_weight, a, needs_grad):
    """(dx, dU, dmask, dV) through the folded weight's gradient G = dyᵀ·x [out, in]
    (:func:`takes_weight_path`); 0-element tensors where not needed."""
    need_x, need_U, need_mask, need_V, _ = needs_grad
    dx, dU, dmask, dV = (x.new_empty((0,)) for _ in range(4))  # never aliased
    if need_U or need_mask or need_V:
        G = dy.t() @ _acc(x.reshape(-1, x.shape[-1]))
        if need_U or need_mask:
            G_v = G @ _acc(V).t()  # [out, r]: dyᵀ·t without t
            if need_U:
                dU = (G_v * mask_s).to(U.dtype)
            if need_mask:
                dmask = (s * (_acc(U) * G_v).sum(0)).to(mask.dtype)
        if need_V:
            dV = ((_acc(U).t() @ G) * mask_s[:, None]).to(V.dtype)
    if need_x:
        dx2 = dy @ _blend_weight(teacher_weight, a, _acc(U) * mask_s, _acc(V))
        dx = dx2.to(x.dtype).reshape(x.shape)
    return dx, dU, dmask, dV


def _factored_backward(dy, x, U, mask, mask_s, s, V, teacher_weight, a, t, needs_grad):
    """(dx, dU, dmask, dV) from rank-sized products over the rows with the saved t; dx
    through the folded weight when there are more rows than outputs (:func:`_folds`)."""
    need_x, need_U, need_mask, need_V, _ = needs_grad
    dx, dU, dmask, dV = (x.new_empty((0,)) for _ in range(4))  # never aliased
    if need_U or need_mask:
        dy_t = dy.t() @ t  # [out, r]
        if need_U:
            dU = (dy_t * mask_s).to(U.dtype)
        if need_mask:
            dmask = (s * (_acc(U) * dy_t).sum(0)).to(mask.dtype)
    fold = need_x and _folds(teacher_weight, dy.dtype, dy.shape[0], U.shape[0])
    if need_V or (need_x and not fold):
        g = dy @ _acc(U)  # [N, r]
        if need_V:
            dV = ((g.t() @ _acc(x.reshape(-1, x.shape[-1]))) * mask_s[:, None]).to(V.dtype)
    if need_x:
        if fold:  # dx = dy·(a·W0 + U·diag(s·mask)·V), one product over the rows
            dx2 = dy @ _blend_weight(teacher_weight, a, _acc(U) * mask_s, _acc(V))
        else:
            dx2 = g @ (_acc(V) * mask_s[:, None])
            if teacher_weight is not None:
                _teacher_backward(dx2, dy * a, teacher_weight)
        dx = dx2.to(x.dtype).reshape(x.shape)
    return dx, dU, dmask, dV


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


def reference_distill_float64(
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None = None,
    teacher_scale: float = 0.0,
    student_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distill op (:mod:`.distill_contract`) as plain differentiable float64 PyTorch, for
    tests: ``(y [..., out], ℓ)`` with ``ℓ = Σ D² / (Σ y_t² + eps)`` a 0-d tensor.

    Inside ℓ, x is detached and so is the denominator, so that autograd of
    ``L(y) + feature_weight·ℓ`` gives exactly the gradients the op injects."""
    from .distill_contract import feature_eps

    d = torch.float64
    y = reference_float64(x, U, mask, V, bias, teacher_weight, teacher_bias,
                          teacher_scale, student_scale)
    xd = x.detach().to(d).reshape(-1, x.shape[-1])
    y_s = ((xd @ V.to(d).t()) * mask.to(d)) @ U.to(d).t()
    if bias is not None:
        y_s = y_s + bias.to(d)
    y_t = xd @ teacher_weight.detach().to(d).t()
    if teacher_bias is not None:
        y_t = y_t + teacher_bias.detach().to(d)
    eps = feature_eps(y_t.shape[0], y_t.shape[1])
    loss = (y_s - y_t).square().sum() / (y_t.square().sum().detach() + eps)
    return y, loss
