"""Tensors -> raw arguments of the CUDA kernels in ``tunecomp_kernels._C``.

The public op (:mod:`.validation`) has already checked shapes, dtypes and devices when
the CUDA backend runs, so this module checks only what that does not cover: CUDA
tensors, a dtype the kernels run, the saved ``t`` of the backward and the path and
``needs`` arguments. It makes the operands contiguous, allocates outputs and the
workspace with torch's allocator and launches on the current stream. The blend scales
reach the kernels as one device array ``[a, s]`` (fp32) that they load, so no value is
read on the host (no sync, and nothing for torch.compile to specialise on).
"""

from __future__ import annotations

import functools

import torch

from .. import _native

#: Forward kernels by name; "auto" lets the native plan choose from n, r and the SM count.
FORWARD_PATHS: dict[str, int] = {"auto": 0, "fused": 1, "split": 2, "decode": 3}
#: dtypes the CUDA kernels run (float64 is served by the reference in the cuda backend).
CUDA_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GRAD_NAMES = ("dx", "dU", "dmask", "dV", "dbias")
Scale = float | torch.Tensor


def _code(dtype: torch.dtype) -> int:
    return _native.DTYPE_CODES[dtype]


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1024)
def _cached_forward_plan(n: int, k: int, m: int, r: int, code: int, path: int,
                         sms: int) -> tuple[str, int]:
    # Pure host function of its arguments: caching saves a native call per step.
    return tuple(_native.require_native().mlr_forward_plan(n, k, m, r, code, path, sms))


@functools.lru_cache(maxsize=1024)
def _cached_backward_plan(n: int, k: int, m: int, r: int, code: int, needs: int,
                          sms: int) -> int:
    return _native.require_native().mlr_backward_plan(n, k, m, r, code, needs, sms)


def _check_kernel_dtype(who: str, dtype: torch.dtype) -> None:
    if dtype not in CUDA_KERNEL_DTYPES:
        raise ValueError(f"{who}: the CUDA kernels run float32, float16 and bfloat16, "
                         f"not {dtype}")


def mlr_forward_plan(n: int, in_features: int, out_features: int, rank: int,
                     dtype: torch.dtype, path: str = "auto", sms: int = 132) -> tuple[str, int]:
    """(forward kernel name, workspace bytes) the CUDA launcher would use; host-only, no GPU.

    ``path`` is ``"auto"``, ``"fused"``, ``"split"`` or ``"decode"``; ``sms`` the device's
    streaming-multiprocessor count (the plan's split counts depend on it).
    Raises ValueError for an unknown path, a dtype the kernels do not run or bad sizes.
    """
    native = _native.require_native()
    if path not in FORWARD_PATHS:
        raise ValueError(f"unknown forward path {path!r}; choose one of {list(FORWARD_PATHS)}")
    _check_kernel_dtype("mlr_forward_plan", dtype)
    name, ws = native.mlr_forward_plan(n, in_features, out_features, rank, _code(dtype),
                                       FORWARD_PATHS[path], sms)
    return name, ws


def mlr_backward_plan(n: int, in_features: int, out_features: int, rank: int,
                      dtype: torch.dtype, needs: list[bool], sms: int = 132) -> int:
    """Workspace bytes of the CUDA backward for the given ``needs`` (dx, dU, dmask, dV, dbias).
    Raises ValueError for a dtype the kernels do not run or a wrong ``needs``."""
    native = _native.require_native()
    _check_kernel_dtype("mlr_backward_plan", dtype)
    return native.mlr_backward_plan(n, in_features, out_features, rank, _code(dtype),
                                    _needs_bits(needs), sms)


def _needs_bits(needs) -> int:
    needs = [bool(v) for v in needs]
    if len(needs) != 5:
        raise ValueError(f"needs must list 5 flags (dx, dU, dmask, dV, dbias), got {len(needs)}")
    return sum(1 << i for i, v in enumerate(needs) if v)


def _check_cuda(who: str, x: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{who}: x must be a tensor, got {type(x).__name__}")
    if x.device.type != "cuda":
        raise ValueError(f"{who}: the CUDA kernels need CUDA tensors, got {x.device}")
    if x.dim() != 2:
        raise ValueError(f"{who}: x must be the 2-D [N, in] input, got shape {tuple(x.shape)}")
    _check_kernel_dtype(who, x.dtype)
    return x.dtype, x.device


def _scales(teacher_scale: Scale, student_scale: Scale, device: torch.device) -> torch.Tensor:
    """``[a, s]`` as one contiguous fp32 device array (a device-side copy, no host read)."""
    parts = [torch.as_tensor(v, device=device).reshape(()).to(torch.float32)
             for v in (teacher_scale, student_scale)]
    return torch.stack(parts)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _teacher_as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The teacher contiguous in the kernels' dtype. The kernels take one dtype for every
    operand, so a teacher stored narrower than x (bf16/fp16 W0 with fp32 x, which the op
    allows) is upcast here: a transient full copy of W0 in x's dtype for the duration of
    the launch (2x the stored teacher's bytes), freed when the call returns. The stored
    teacher still takes half the memory between calls."""
    if t is None:
        return None
    return t.to(dtype).contiguous()


def masked_lowrank_forward_cuda(
    x2: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_scale: Scale,
    student_scale: Scale,
    path: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Run the CUDA forward kernels: ``(y [N, out], t [N, r] float32, kernel path name)``.

    ``x2`` is the input flattened to ``[N, in]``; the other tensors as the public op
    checked them (one CUDA device, one dtype: float32, float16 or bfloat16, except a
    bf16/fp16 teacher with float32 x, upcast here; any layout, copied to contiguous if
    needed). Scales: floats or 0-d tensors. Launches on the current
    stream of x's device. ``path`` forces a kernel (``"fused"``, ``"split"``,
    ``"decode"``), for tests; ``"auto"`` picks by shape. A present teacher is always read.
    Raises ValueError for non-CUDA tensors, an unsupported dtype or an unknown path.
    """
    native = _native.require_native()
    who = "masked_lowrank_forward_cuda"
    dtype, device = _check_cuda(who, x2)
    if path not in FORWARD_PATHS:
        raise ValueError(f"{who}: unknown path {path!r}; choose one of {list(FORWARD_PATHS)}")
    n, k = x2.shape
    m, r = U.shape
    x2, U, mask, V = x2.contiguous(), U.contiguous(), mask.contiguous(), V.contiguous()
    bias = _contig(bias)
    teacher_weight, teacher_bias = (_teacher_as(w, dtype) for w in (teacher_weight, teacher_bias))
    scales = _scales(teacher_scale, student_scale, device)
    sms = _sm_count(device)
    path_name, ws_bytes = _cached_forward_plan(n, k, m, r, _code(dtype), FORWARD_PATHS[path],
                                               sms)
    y = torch.empty((n, m), dtype=dtype, device=device)
    t = torch.empty((n, r), dtype=torch.float32, device=device)
    ws = torch.empty((ws_bytes,), dtype=torch.uint8, device=device) if ws_bytes else None
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        native.mlr_forward_cuda(
            _ptr(x2), _ptr(U), _ptr(mask), _ptr(V), _ptr(bias), _ptr(teacher_weight),
            _ptr(teacher_bias), _ptr(y), _ptr(t), _ptr(ws), ws_bytes, n, k, m, r,
            _code(dtype), _ptr(scales), FORWARD_PATHS[path], sms, stream)
    return y, t, path_name


def masked_lowrank_backward_cuda(
    grad_y: torch.Tensor,
    x2: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    t: torch.Tensor,
    teacher_weight: torch.Tensor | None,
    teacher_scale: Scale,
    student_scale: Scale,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the CUDA backward kernels: ``(dx [N, in], dU, dmask, dV, dbias)``.

    ``grad_y`` is ``[N, out]``, ``x2`` ``[N, in]`` and ``t`` the float32 ``[N, r]`` saved by
    the forward. Gradients not asked for in ``needs`` come back as fresh 0-element tensors.
    Raises ValueError for non-CUDA tensors, an unsupported dtype, a wrong ``t`` or ``needs``.
    """
    native = _native.require_native()
    who = "masked_lowrank_backward_cuda"
    dtype, device = _check_cuda(who, x2)
    n, k = x2.shape
    m, r = U.shape
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (n, r):
        got = (f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise ValueError(f"{who}: t must be the float32 [{n}, {r}] saved by the forward, "
                         f"got {got}")
    if tuple(grad_y.shape) != (n, m):
        raise ValueError(f"{who}: grad_y must be [{n}, {m}], got {list(grad_y.shape)}")
    bits = _needs_bits(needs)
    grad_y, x2, U, mask, V, t = (a.contiguous() for a in (grad_y, x2, U, mask, V, t))
    teacher_weight = _teacher_as(teacher_weight, dtype)
    scales = _scales(teacher_scale, student_scale, device)
    sms = _sm_count(device)
    ws_bytes = _cached_backward_plan(n, k, m, r, _code(dtype), bits, sms)
    like = {"dx": (n, k), "dU": (m, r), "dmask": (r,), "dV": (r, k), "dbias": (m,)}
    grads = [torch.empty(like[name] if bits & (1 << i) else (0,), dtype=dtype, device=device)
             for i, name in enumerate(_GRAD_NAMES)]
    ws = torch.empty((ws_bytes,), dtype=torch.uint8, device=device) if ws_bytes else None
    dx, dU, dmask, dV, dbias = grads
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        native.mlr_backward_cuda(
            _ptr(grad_y), _ptr(x2), _ptr(U), _ptr(mask), _ptr(V), _ptr(t),
            _ptr(teacher_weight), _ptr(dx), _ptr(dU), _ptr(dmask), _ptr(dV), _ptr(dbias),
            _ptr(ws), ws_bytes, n, k, m, r, _code(dtype), _ptr(scales), bits, sms, stream)
    return dx, dU, dmask, dV, dbias
