"""Input checks for the op: every mismatch is a ValueError that names the tensors."""

from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_inputs(
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_scale: float | torch.Tensor,
    student_scale: float | torch.Tensor,
) -> None:
    """Raise ``ValueError`` unless the op's inputs agree (shapes: docs/design.md#the-op);
    never broadcast.

    Every tensor shares x's dtype, except that with float32 x the frozen teacher
    (``teacher_weight`` and ``teacher_bias`` together) may be stored in bfloat16 or
    float16 (:data:`REDUCED_TEACHER_DTYPES`)."""
    named = {"x": x, "U": U, "mask": mask, "V": V, "bias": bias,
             "teacher_weight": teacher_weight, "teacher_bias": teacher_bias}
    for name, tensor in named.items():
        required = name in ("x", "U", "mask", "V")
        if (tensor is not None or required) and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    present = {k: v for k, v in named.items() if v is not None}
    _check_shapes(x, U, mask, V, bias, teacher_weight, teacher_bias)
    _check_dtypes_and_devices(x, present)
    for name, value in (("teacher_scale", teacher_scale), ("student_scale", student_scale)):
        _check_scale(name, value)
    if (not isinstance(teacher_scale, torch.Tensor) and teacher_scale != 0.0
            and teacher_weight is None):
        raise ValueError(f"teacher_scale={teacher_scale} but no teacher_weight was given")


def _check_shapes(x, U, mask, V, bias, teacher_weight, teacher_bias) -> None:  # noqa: ANN001
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension [..., in], got shape {_shape(x)}")
    if U.dim() != 2:
        raise ValueError(f"U must be 2-D [out, r], got shape {_shape(U)}")
    if V.dim() != 2:
        raise ValueError(f"V must be 2-D [r, in], got shape {_shape(V)}")
    if mask.dim() != 1:
        raise ValueError(f"mask must be 1-D [r], got shape {_shape(mask)}")
    out_f, rank = U.shape
    if V.shape[0] != rank or mask.shape[0] != rank:
        raise ValueError(
            f"rank mismatch: U {_shape(U)} has r={rank}, V {_shape(V)} has r={V.shape[0]}, "
            f"mask {_shape(mask)} has r={mask.shape[0]}"
        )
    in_f = V.shape[1]
    if x.shape[-1] != in_f:
        raise ValueError(
            f"x {_shape(x)} has {x.shape[-1]} input features but V {_shape(V)} expects {in_f}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_f):
        raise ValueError(f"bias must be [out]=[{out_f}] to match U {_shape(U)}, got {_shape(bias)}")
    if teacher_weight is not None and tuple(teacher_weight.shape) != (out_f, in_f):
        raise ValueError(
            f"teacher_weight must be [out, in]=[{out_f}, {in_f}] to match U {_shape(U)} and "
            f"V {_shape(V)}, got {_shape(teacher_weight)}"
        )
    if teacher_bias is not None:
        if teacher_weight is None:
            raise ValueError("teacher_bias was given without teacher_weight")
        if teacher_bias.dim() != 1 or teacher_bias.shape[0] != out_f:
            raise ValueError(
                f"teacher_bias must be [out]=[{out_f}], got {_shape(teacher_bias)}"
            )



#: Lower-precision dtypes a frozen teacher may be stored in, per dtype of x: the op
#: upcasts it to x's compute dtype block by block and accumulates in fp32.
REDUCED_TEACHER_DTYPES: dict[torch.dtype, tuple[torch.dtype, ...]] = {
    torch.float32: (torch.bfloat16, torch.float16),
}
_TEACHER = ("teacher_weight", "teacher_bias")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_dtypes_and_devices(x: torch.Tensor, present: dict[str, torch.Tensor]) -> None:
    dtypes = {name: t.dtype for name, t in present.items()}
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    student = {k: v for k, v in dtypes.items() if k not in _TEACHER}
    teacher = {k: v for k, v in dtypes.items() if k in _TEACHER}
    if len(set(student.values())) != 1:
        listed = ", ".join(f"{k}={_name(v)}" for k, v in dtypes.items())
        raise ValueError(f"dtype mismatch: all tensors must share one dtype, got {listed}")
    _check_teacher_dtype(x.dtype, teacher)
    devices = {name: t.device for name, t in present.items()}
    if len(set(devices.values())) != 1:
        listed = ", ".join(f"{k}={v}" for k, v in devices.items())
        raise ValueError(f"device mismatch: all tensors must be on one device, got {listed}")


def _check_teacher_dtype(dtype: torch.dtype, teacher: dict[str, torch.dtype]) -> None:
    """The teacher shares x's dtype, or (both of its tensors) one of
    ``REDUCED_TEACHER_DTYPES[x.dtype]``: a bf16/fp16 teacher with fp32 x."""
    kinds = set(teacher.values())
    if not kinds or kinds == {dtype}:
        return
    listed = ", ".join(f"{k}={_name(v)}" for k, v in teacher.items())
    allowed = REDUCED_TEACHER_DTYPES.get(dtype, ())
    if len(kinds) == 1 and kinds <= set(allowed):
        return
    if allowed:
        options = " or ".join(_name(d) for d in allowed)
        hint = (f"with x in {_name(dtype)} the teacher (weight and bias alike) must be "
                f"{_name(dtype)} or {options}")
    else:
        hint = (f"with x in {_name(dtype)} the teacher must be {_name(dtype)} too (a "
                "lower-precision teacher is supported with float32 x only)")
    raise ValueError(f"dtype mismatch: {hint}, got x={_name(dtype)}, {listed}")


def _check_scale(name: str, value: object) -> None:
    """A scale is a real number or a 0-d floating tensor. A tensor's value is not read
    (that would sync a GPU, and break graphs under torch.compile), so neither its
    finiteness nor a non-zero teacher_scale without a teacher can be checked."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a 0-d floating tensor, got a "
                             f"{value.dtype} tensor of shape {_shape(value)}")
        return
    if torch.compiler.is_compiling():
        return  # scales may be symbolic under torch.compile; eager calls check them
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
