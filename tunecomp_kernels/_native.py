"""Thin Python interface to the compiled module ``tunecomp_kernels._C``.

The native module is built by CMake (see setup.py) and never links libtorch:
it receives raw data pointers, shapes, element strides, a dtype code and a
CUDA stream handle. This file turns tensors into those arguments and checks
them first, so a bad call raises a Python error instead of reading garbage.
Importing this module never fails; without the compiled module,
``native_available()`` is False and ``build_info()`` says why.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_IMPORT_ERROR: ImportError | None = None
try:
    from tunecomp_kernels import _C
except ImportError as e:  # not built, or built for another Python
    _C = None
    _IMPORT_ERROR = e

__all__ = [
    "build_info",
    "cuda_kernels_compiled",
    "mask_grad",
    "masked_lowrank_backward_cuda",
    "masked_lowrank_forward_cuda",
    "mlr_backward_plan",
    "mlr_forward_plan",
    "native_available",
]

# dtype codes shared with csrc/common/dtype.h
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}


def native_available() -> bool:
    """True when the compiled module ``tunecomp_kernels._C`` imported."""
    return _C is not None


def build_info() -> dict[str, Any]:
    """How the native module was built.

    Keys: ``native`` (module importable), ``version``, ``cuda`` (CUDA kernels
    compiled in), ``cuda_archs`` (e.g. ``["sm_80", "sm_90a"]``),
    ``cuda_version`` (nvcc version or None), ``openmp``, ``compiler``,
    ``build_type``. Without the module: ``native`` False and ``error``.
    """
    if _C is None:
        return {
            "native": False,
            "cuda": False,
            "cuda_archs": [],
            "cuda_version": None,
            "openmp": False,
            "error": str(_IMPORT_ERROR),
        }
    info = dict(_C.build_info())
    info["native"] = True
    return info


def cuda_kernels_compiled() -> bool:
    """True when the native module contains the CUDA kernels (a GPU may still be absent)."""
    return _C is not None and bool(_C.build_info()["cuda"])


def _require_native() -> Any:
    if _C is None:
        raise RuntimeError(
            "tunecomp_kernels native module (_C) is not available: "
            f"{_IMPORT_ERROR}. Build it with `pip install -e .` (needs CMake and pybind11)."
        )
    return _C


def mask_grad(t: torch.Tensor, g: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Fused mask gradient ``scale * (t * g).sum(0)`` in one pass.

    Args:
        t: ``[N, r]`` activations ``x · Vᵀ``; any strides.
        g: ``[N, r]`` ``dy · U``; same dtype and device as ``t``; any strides.
        scale: the student scale ``s``.

    Returns:
        ``[r]`` contiguous tensor on the inputs' device, float32 for float32 /
        float16 / bfloat16 inputs (fp32 accumulation), float64 for float64.

    Runs the C++/OpenMP kernel for CPU tensors and the CUDA kernel, on the
    current stream, for CUDA tensors. Not differentiable (a raw kernel call).
    """
    native = _require_native()
    if not isinstance(t, torch.Tensor) or not isinstance(g, torch.Tensor):
        raise ValueError(
            f"mask_grad: t and g must be tensors, got {type(t).__name__} and {type(g).__name__}"
        )
    if t.dim() != 2 or g.dim() != 2:
        raise ValueError(
            f"mask_grad: t and g must be 2-D [N, r], got t{tuple(t.shape)} and g{tuple(g.shape)}"
        )
    if t.shape != g.shape:
        raise ValueError(
            f"mask_grad: t and g must have the same shape, got t{tuple(t.shape)} "
            f"and g{tuple(g.shape)}"
        )
    if t.dtype != g.dtype:
        raise ValueError(f"mask_grad: t and g dtypes differ: t {t.dtype}, g {g.dtype}")
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(
            f"mask_grad: unsupported dtype {t.dtype} for t{tuple(t.shape)}; "
            "expected float32, float16, bfloat16 or float64"
        )
    if t.device != g.device:
        raise ValueError(f"mask_grad: t is on {t.device} but g is on {g.device}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"mask_grad: unsupported device {t.device} (expected cpu or cuda)")

    n, r = t.shape
    out_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    out = torch.empty(r, dtype=out_dtype, device=t.device)
    args = (
        t.data_ptr(),
        g.data_ptr(),
        out.data_ptr(),
        n,
        r,
        t.stride(0),
        t.stride(1),
        g.stride(0),
        g.stride(1),
        _DTYPE_CODES[t.dtype],
        float(scale),
    )
    if t.device.type == "cpu":
        native.mask_grad_cpu(*args)
    else:
        # The module's own CUDA runtime follows the thread's current device,
        # so make it the inputs' device for the launch.
        with torch.cuda.device(t.device):
            stream = torch.cuda.current_stream(t.device).cuda_stream
            native.mask_grad_cuda(*args, stream)
    return out


# --- masked low-rank op on CUDA (csrc/cuda/mlr_*.cu, csrc/common/mlr.h) -------------

#: Forward kernels by name; "auto" lets the native plan choose from n, r and the SM count.
FORWARD_PATHS: dict[str, int] = {"auto": 0, "fused": 1, "split": 2, "decode": 3}
#: dtypes the CUDA kernels run (float64 is served by the reference in the cuda backend).
CUDA_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GRAD_NAMES = ("dx", "dU", "dmask", "dV", "dbias")


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1024)
def _cached_forward_plan(n: int, k: int, m: int, r: int, code: int, path: int,
                         sms: int) -> tuple[str, int]:
    # Pure host function of its arguments: caching saves a native call per step.
    return tuple(_require_native().mlr_forward_plan(n, k, m, r, code, path, sms))


@functools.lru_cache(maxsize=1024)
def _cached_backward_plan(n: int, k: int, m: int, r: int, code: int, needs: int,
                          sms: int) -> int:
    return _require_native().mlr_backward_plan(n, k, m, r, code, needs, sms)


def mlr_forward_plan(n: int, in_features: int, out_features: int, rank: int,
                     dtype: torch.dtype, path: str = "auto", sms: int = 132) -> tuple[str, int]:
    """(forward kernel name, workspace bytes) the CUDA launcher would use; host-only, no GPU.

    ``path`` is ``"auto"``, ``"fused"``, ``"split"`` or ``"decode"``; ``sms`` the device's
    streaming-multiprocessor count (the plan's split counts depend on it).
    """
    native = _require_native()
    if path not in FORWARD_PATHS:
        raise ValueError(f"unknown forward path {path!r}; choose one of {list(FORWARD_PATHS)}")
    if dtype not in CUDA_KERNEL_DTYPES:
        raise ValueError(f"the CUDA kernels run float32, float16 and bfloat16, not {dtype}")
    name, ws = native.mlr_forward_plan(n, in_features, out_features, rank, _DTYPE_CODES[dtype],
                                       FORWARD_PATHS[path], sms)
    return name, ws


def mlr_backward_plan(n: int, in_features: int, out_features: int, rank: int,
                      dtype: torch.dtype, needs: list[bool], sms: int = 132) -> int:
    """Workspace bytes of the CUDA backward for the given ``needs`` (dx, dU, dmask, dV, dbias)."""
    native = _require_native()
    if dtype not in CUDA_KERNEL_DTYPES:
        raise ValueError(f"the CUDA kernels run float32, float16 and bfloat16, not {dtype}")
    return native.mlr_backward_plan(n, in_features, out_features, rank, _DTYPE_CODES[dtype],
                                    _needs_bits(needs), sms)


def _needs_bits(needs) -> int:
    needs = [bool(v) for v in needs]
    if len(needs) != 5:
        raise ValueError(f"needs must list 5 flags (dx, dU, dmask, dV, dbias), got {len(needs)}")
    return sum(1 << i for i, v in enumerate(needs) if v)


def _check_cuda_tensors(who: str, named: dict[str, torch.Tensor | None],
                        dims: dict[str, int]) -> tuple[torch.dtype, torch.device]:
    present = {k: v for k, v in named.items() if v is not None}
    for name, tensor in present.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{who}: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() != dims[name]:
            raise ValueError(f"{who}: {name} must be {dims[name]}-D, got shape "
                             f"{tuple(tensor.shape)}")
    first = next(iter(present.values()))
    devices = {name: t.device for name, t in present.items()}
    if len(set(devices.values())) != 1:
        listed = ", ".join(f"{k}={v}" for k, v in devices.items())
        raise ValueError(f"{who}: all tensors must be on one device, got {listed}")
    if first.device.type != "cuda":
        raise ValueError(f"{who}: the CUDA kernels need CUDA tensors, got {first.device}")
    return first.dtype, first.device


def _check_dtypes(who: str, dtype: torch.dtype, named: dict[str, torch.Tensor | None]) -> None:
    if dtype not in CUDA_KERNEL_DTYPES:
        raise ValueError(f"{who}: the CUDA kernels run float32, float16 and bfloat16, "
                         f"not {dtype}")
    for name, tensor in named.items():
        if tensor is not None and tensor.dtype != dtype:
            raise ValueError(f"{who}: {name} has dtype {tensor.dtype}, expected {dtype}")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def masked_lowrank_forward_cuda(
    x2: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_scale: float,
    student_scale: float,
    path: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Run the CUDA forward kernels: ``(y [N, out], t [N, r] float32, kernel path name)``.

    ``x2`` is the input flattened to ``[N, in]``. All tensors share one CUDA device and
    one dtype (float32, float16 or bfloat16); any layout (copied to contiguous if needed).
    Launches on the current stream of x's device. ``path`` forces a kernel
    (``"fused"``, ``"split"``, ``"decode"``), for tests; ``"auto"`` picks by shape.
    """
    native = _require_native()
    who = "masked_lowrank_forward_cuda"
    named = {"x": x2, "U": U, "mask": mask, "V": V, "bias": bias,
             "teacher_weight": teacher_weight, "teacher_bias": teacher_bias}
    dims = {"x": 2, "U": 2, "mask": 1, "V": 2, "bias": 1, "teacher_weight": 2,
            "teacher_bias": 1}
    dtype, device = _check_cuda_tensors(who, named, dims)
    _check_dtypes(who, dtype, named)
    n, k = x2.shape
    m, r = U.shape
    if tuple(V.shape) != (r, k) or tuple(mask.shape) != (r,):
        raise ValueError(f"{who}: expected V [{r}, {k}] and mask [{r}] for x {tuple(x2.shape)} "
                         f"and U {tuple(U.shape)}, got V {tuple(V.shape)}, "
                         f"mask {tuple(mask.shape)}")
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"{who}: bias must be [{m}], got {tuple(bias.shape)}")
    if teacher_weight is not None and tuple(teacher_weight.shape) != (m, k):
        raise ValueError(f"{who}: teacher_weight must be [{m}, {k}], got "
                         f"{tuple(teacher_weight.shape)}")
    if teacher_bias is not None and (teacher_weight is None or tuple(teacher_bias.shape) != (m,)):
        raise ValueError(f"{who}: teacher_bias must be [{m}] and needs teacher_weight")
    if path not in FORWARD_PATHS:
        raise ValueError(f"{who}: unknown path {path!r}; choose one of {list(FORWARD_PATHS)}")
    if teacher_scale == 0.0:  # like the reference: a zero-weight teacher is not read
        teacher_weight = teacher_bias = None

    x2, U, mask, V = x2.contiguous(), U.contiguous(), mask.contiguous(), V.contiguous()
    bias, teacher_weight, teacher_bias = map(_contig, (bias, teacher_weight, teacher_bias))
    sms = _sm_count(device)
    path_name, ws_bytes = _cached_forward_plan(n, k, m, r, _DTYPE_CODES[dtype],
                                               FORWARD_PATHS[path], sms)
    y = torch.empty((n, m), dtype=dtype, device=device)
    t = torch.empty((n, r), dtype=torch.float32, device=device)
    ws = torch.empty((ws_bytes,), dtype=torch.uint8, device=device) if ws_bytes else None
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        native.mlr_forward_cuda(
            _ptr(x2), _ptr(U), _ptr(mask), _ptr(V), _ptr(bias), _ptr(teacher_weight),
            _ptr(teacher_bias), _ptr(y), _ptr(t), _ptr(ws), ws_bytes, n, k, m, r,
            _DTYPE_CODES[dtype], float(teacher_scale), float(student_scale),
            FORWARD_PATHS[path], sms, stream)
    return y, t, path_name


def masked_lowrank_backward_cuda(
    grad_y: torch.Tensor,
    x2: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    t: torch.Tensor,
    teacher_weight: torch.Tensor | None,
    teacher_scale: float,
    student_scale: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the CUDA backward kernels: ``(dx [N, in], dU, dmask, dV, dbias)``.

    ``grad_y`` is ``[N, out]``, ``x2`` ``[N, in]`` and ``t`` the float32 ``[N, r]`` saved by
    the forward. Gradients not asked for in ``needs`` come back as fresh 0-element tensors.
    """
    native = _require_native()
    who = "masked_lowrank_backward_cuda"
    named = {"grad_y": grad_y, "x": x2, "U": U, "mask": mask, "V": V, "t": t,
             "teacher_weight": teacher_weight}
    dims = {"grad_y": 2, "x": 2, "U": 2, "mask": 1, "V": 2, "t": 2, "teacher_weight": 2}
    dtype, device = _check_cuda_tensors(who, named, dims)
    _check_dtypes(who, dtype, {k: v for k, v in named.items() if k != "t"})
    if t.dtype != torch.float32:
        raise ValueError(f"{who}: t must be the float32 [N, r] saved by the forward, "
                         f"got {t.dtype}")
    n, k = x2.shape
    m, r = U.shape
    expected = {"grad_y": (n, m), "V": (r, k), "mask": (r,), "t": (n, r)}
    if teacher_weight is not None:
        expected["teacher_weight"] = (m, k)
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{who}: {name} must be {list(shape)} for x {tuple(x2.shape)} and "
                             f"U {tuple(U.shape)}, got {tuple(named[name].shape)}")
    bits = _needs_bits(needs)
    if teacher_scale == 0.0:
        teacher_weight = None

    grad_y, x2, U, mask, V, t = (a.contiguous() for a in (grad_y, x2, U, mask, V, t))
    teacher_weight = _contig(teacher_weight)
    sms = _sm_count(device)
    ws_bytes = _cached_backward_plan(n, k, m, r, _DTYPE_CODES[dtype], bits, sms)
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
            _ptr(ws), ws_bytes, n, k, m, r, _DTYPE_CODES[dtype], float(teacher_scale),
            float(student_scale), bits, sms, stream)
    return dx, dU, dmask, dV, dbias
