"""The public op: ``masked_lowrank_linear``."""

from __future__ import annotations

import torch

from .backends import resolve_backend
from .contract import scale_dtype
from .cuda_tables import shape_key as _shape_key
from .transforms import functorch_active, functorch_function
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
    teacher_scale: float | torch.Tensor = 0.0,
    student_scale: float | torch.Tensor = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Masked low-rank linear map with an optional frozen-teacher blend.

    ``y = student_scale * ((x Vᵀ ⊙ mask) Uᵀ + bias) + teacher_scale * (x W0ᵀ + b0)``

    Args:
        x: ``[..., in]`` input, any number of leading dims.
        U: ``[out, r]``; mask: ``[r]``; V: ``[r, in]``; bias: ``[out]`` or None.
        teacher_weight: frozen dense ``W0 [out, in]`` (no gradient), or None. In x's
            dtype, or, with float32 x, stored in bfloat16 or float16 (half the memory; the
            blend still accumulates in fp32 with the stored values).
        teacher_bias: frozen ``b0 [out]`` in W0's dtype, or None.
        teacher_scale, student_scale: the blend coefficients ``a`` and ``s``: floats, or
            0-d floating tensors (not differentiated). Tensors reach the kernels as data,
            so under ``torch.compile`` a new value does not recompile (floats are
            constants of the graph); their values are not checked, and a tensor
            teacher_scale without a teacher_weight is ignored.
        backend: ``"auto"`` or a name from :func:`tunecomp_kernels.available_backends`.

    Returns:
        ``[..., out]`` in ``x``'s dtype; accumulation is fp32 for fp16/bf16 inputs.
        Gradients flow to x, U, mask, V and bias. Under ``torch.autocast`` the tensors
        are first cast to the autocast dtype (as ``nn.Linear``'s are; float64 stays).

    Raises:
        TypeError / ValueError: a tensor, shape, dtype, device or scale that does not fit.
    """
    x, U, mask, V, bias, teacher_weight, teacher_bias = _autocast(
        x, U, mask, V, bias, teacher_weight, teacher_bias)
    check_inputs(x, U, mask, V, bias, teacher_weight, teacher_bias, teacher_scale, student_scale)
    if not isinstance(teacher_scale, torch.Tensor) and teacher_scale == 0.0:
        teacher_weight = teacher_bias = None  # the teacher contributes nothing: don't read it
    a = _scale_tensor(teacher_scale, x)
    s = _scale_tensor(student_scale, x)
    name = resolve_backend(backend, x.device.type, _auto_shape_key(backend, x, U))
    op = getattr(torch.ops.tunecomp, f"masked_lowrank_{name}")
    args = (x, U, mask, V, bias, teacher_weight, teacher_bias, a, s)
    if functorch_active():  # torch.func.grad & co. cannot run a custom op's own autograd
        y, _t = functorch_function(name).apply(*args)
    else:
        y, _t = op(*args)
    return y


def _autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The op's tensors cast as autocast casts nn.Linear's (the ops' autocast rule does
    the same for direct op calls); unchanged outside autocast."""
    x = tensors[0]
    if not (isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)):
        return tensors
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
        and t.dtype not in (dtype, torch.float64) else t
        for t in tensors)


def _scale_tensor(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A blend scale as the 0-d tensor the ops take (``scale_dtype`` on x's device)."""
    dtype = scale_dtype(x.dtype)
    if isinstance(value, torch.Tensor):
        return value.to(device=x.device, dtype=dtype)  # no copy (no op) when it already fits
    # torch.compile may pass a SymFloat here: float() would pin it, full() keeps it.
    return torch.full((), value, dtype=dtype, device=x.device)


def _auto_shape_key(backend: str, x: torch.Tensor, U: torch.Tensor) -> str:
    """The per-shape key "auto" uses to choose between GPU backends; "" where not needed."""
    if backend != "auto" or x.device.type != "cuda":
        return ""
    return _shape_key(x, U)
