"""The public ops: ``masked_lowrank_linear`` and ``masked_lowrank_linear_distill``."""

from __future__ import annotations

import importlib
import math

import torch

from .backends import resolve_backend
from .contract import intermediate_dtype, scale_dtype
from .cuda_tables import shape_key as _shape_key
from .distill_contract import feature_loss
from .reference import takes_weight_path
from .reference_op import WEIGHT_PATH
from .transforms import distill_functorch_function, functorch_active, functorch_function
from .validation import check_inputs

#: Module registering each backend's distill ops (``OPS``). CUDA's delegates to Triton's.
DISTILL_MODULES = {
    "torch": "tunecomp_kernels.ops.reference_distill",
    "triton": "tunecomp_kernels.ops.triton_distill",
    "cuda": "tunecomp_kernels.ops.cuda_distill",
}


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
    args = (x, U, mask, V, bias, teacher_weight, teacher_bias, a, s)
    if functorch_active():  # torch.func.grad & co. cannot run a custom op's own autograd
        y, _t = functorch_function(name).apply(*args)
        return y
    if name == "torch" and _weight_path_pays(x, U, V, teacher_weight):
        name = WEIGHT_PATH
    y, _t = getattr(torch.ops.tunecomp, f"masked_lowrank_{name}")(*args)
    return y


def _weight_path_pays(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                      teacher_weight: torch.Tensor | None) -> bool:
    """Eager only: the choice depends on the number of rows, and under ``torch.compile`` /
    ``torch.export`` it would put a guard on it (recompiles per range of batch sizes, no
    dynamic or data-dependent batch dimension)."""
    if torch.compiler.is_compiling() or x.shape[-1] == 0:
        return False
    rows = x.numel() // x.shape[-1]
    return takes_weight_path(teacher_weight, intermediate_dtype(x.dtype), rows, U, V)


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


def masked_lowrank_linear_distill(
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None = None,
    teacher_scale: float | torch.Tensor,
    student_scale: float | torch.Tensor,
    feature_weight: float | torch.Tensor,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`masked_lowrank_linear` with a per-layer feature loss injected into the
    student's gradients (docs/design.md#the-method; contract: :mod:`.distill_contract`).

    y is the blend ``a·(x W0ᵀ + b0) + s·((x Vᵀ ⊙ mask) Uᵀ + bias)``. With the teacher branch
    ``y_t = x W0ᵀ + b0`` and the unscaled student branch ``y_s`` of the same call,
    ``D = y_s − y_t`` and the loss ``ℓ = Σ D² / (Σ y_t² + eps)`` (eps:
    :func:`.distill_contract.feature_eps`, 1e-12 per output element). The backward of y adds
    ``feature_weight·∂ℓ/∂(U, mask, V, bias)`` to those gradients, with x and the
    denominator held constant, so the caller's loss needs no change: the gradients are
    those of ``L(y) + feature_weight·ℓ``. dx has no feature term; the teacher gets none.

    Args:
        x: ``[..., in]``; U: ``[out, r]``; mask: ``[r]``; V: ``[r, in]``; bias: ``[out]``
            or None; all one dtype (float16, bfloat16, float32, float64) and device.
        teacher_weight: frozen ``W0 [out, in]``, required (no teacher, no feature loss):
            x's dtype, or bfloat16/float16 with float32 x. teacher_bias: ``[out]`` or None.
        teacher_scale, student_scale: the blend's ``a`` and ``s``: floats or 0-d floating
            tensors (not differentiated).
        feature_weight: a float >= 0, or a 0-d floating tensor (its value is not read).
        backend: ``"auto"`` or a name from :func:`tunecomp_kernels.available_backends`,
            resolved as for :func:`masked_lowrank_linear`.

    Returns:
        ``(y, loss)``: y ``[..., out]`` in x's dtype (gradients flow to x, U, mask, V and
        bias); loss ℓ of this call, a detached 0-d float32 tensor, for logging. The op
        saves D ``[N, out]`` (fp32 for half inputs) for the backward: one activation of
        y's size (twice it for half inputs) beyond what the blend op keeps. Under
        ``torch.func`` transforms grad and vjp work (per-sample under vmap, each sample
        with its own ℓ); forward-mode AD raises NotImplementedError.

    Raises:
        TypeError / ValueError: a missing teacher, or a tensor, shape, dtype, device, scale
            or feature weight that does not fit. RuntimeError: a backend that cannot run.
    """
    if teacher_weight is None:
        raise ValueError("masked_lowrank_linear_distill needs teacher_weight: the feature "
                         "loss compares the student branch with the teacher's")
    x, U, mask, V, bias, teacher_weight, teacher_bias = _autocast(
        x, U, mask, V, bias, teacher_weight, teacher_bias)
    check_inputs(x, U, mask, V, bias, teacher_weight, teacher_bias, teacher_scale, student_scale)
    _check_feature_weight(feature_weight)
    scales = (_scale_tensor(v, x) for v in (teacher_scale, student_scale, feature_weight))
    name = _resolve_distill_backend(backend, x.device.type, _auto_shape_key(backend, x, U))
    args = (x, U, mask, V, bias, teacher_weight, teacher_bias, *scales)
    if functorch_active():  # torch.func.grad & co. cannot run a custom op's own autograd
        y, _t, D, sums = distill_functorch_function(name).apply(*args)
    else:
        y, _t, D, sums = getattr(torch.ops.tunecomp, f"masked_lowrank_distill_{name}")(*args)
    return y, feature_loss(D, sums).detach().to(torch.float32)


def _check_feature_weight(value: object) -> None:
    """A float >= 0 (finite), or a 0-d floating tensor whose value is not read (a GPU sync)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"feature_weight must be a float or a 0-d floating tensor, got a "
                             f"{value.dtype} tensor of shape {list(value.shape)}")
        return
    if torch.compiler.is_compiling():
        return  # may be symbolic under torch.compile; eager calls check it
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"feature_weight must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"feature_weight must be a finite float >= 0, got {value}")


@torch.compiler.assume_constant_result
def _resolve_distill_backend(requested: str, device_type: str, shape_key: str) -> str:
    """:func:`resolve_backend`, then the chosen backend's distill ops registered."""
    name = resolve_backend(requested, device_type, shape_key)
    if name not in DISTILL_MODULES:
        raise RuntimeError(f"backend {name!r} has no distill op; use one of "
                           f"{sorted(DISTILL_MODULES)}")
    importlib.import_module(DISTILL_MODULES[name])
    return name
