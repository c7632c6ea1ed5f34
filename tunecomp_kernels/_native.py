"""Thin Python interface to the compiled module ``tunecomp_kernels._C``.

The native module is built by CMake (see setup.py) and never links libtorch:
it receives raw data pointers, shapes, a dtype code and a CUDA stream handle.
This file loads it and reports how it was built; turning tensors into kernel
arguments lives beside the CUDA backend, in ``tunecomp_kernels.ops.cuda_marshal``
(its names stay importable from here). Importing this module never fails;
without the compiled module, ``native_available()`` is False and
``build_info()`` says why.
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

__all__ = ["build_info", "cuda_kernels_compiled", "native_available", "require_native"]

#: dtype codes shared with csrc/common/dtype.h
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}
_DTYPE_CODES = DTYPE_CODES


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


def require_native() -> Any:
    """The compiled module ``_C``; RuntimeError (saying how to build it) without it."""
    if _C is None:
        raise RuntimeError(
            "tunecomp_kernels native module (_C) is not available: "
            f"{_IMPORT_ERROR}. Build it with `pip install -e .` (needs CMake and pybind11)."
        )
    return _C


_require_native = require_native

# Names that moved to tunecomp_kernels.ops.cuda_marshal; imported on first use, since
# that module imports this one.
_MOVED = ("CUDA_KERNEL_DTYPES", "FORWARD_PATHS", "masked_lowrank_backward_cuda",
          "masked_lowrank_forward_cuda", "mlr_backward_plan", "mlr_forward_plan")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from .ops import cuda_marshal

        return getattr(cuda_marshal, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
