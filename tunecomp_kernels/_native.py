"""Thin Python interface to the compiled module ``tunecomp_kernels._C``.

The native module is built by CMake (see setup.py) and never links libtorch:
it receives raw data pointers, shapes, element strides, a dtype code and a
CUDA stream handle. This file turns tensors into those arguments and checks
them first, so a bad call raises a Python error instead of reading garbage.
Importing this module never fails; without the compiled module,
``native_available()`` is False and ``build_info()`` says why.
"""

from __future__ import annotations

from typing import Any

import torch

_IMPORT_ERROR: ImportError | None = None
try:
    from tunecomp_kernels import _C
except ImportError as e:  # not built, or built for another Python
    _C = None
    _IMPORT_ERROR = e

__all__ = ["build_info", "cuda_kernels_compiled", "mask_grad", "native_available"]

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
