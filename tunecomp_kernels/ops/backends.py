"""Backend registry: which implementations exist, which can run here, and ``"auto"``.

Each backend lives in its own module and registers its ops through
:func:`tunecomp_kernels.ops.contract.register_backend_ops` when first loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .contract import BackendOps


@dataclass(frozen=True)
class BackendSpec:
    """A backend: where its code lives, which devices it serves and when it can run."""

    name: str
    module: str  # module with a module-level ``OPS: BackendOps``
    device_types: Callable[[], tuple[str, ...]]  # devices it runs on here; empty: any
    auto_device_types: tuple[str, ...]  # devices where "auto" may choose it; empty: any
    priority: int  # higher wins under "auto"
    unavailable_reason: Callable[[], str | None]  # None when it can run on this machine
    deterministic: bool = True  # bit-identical from run to run (no atomic reductions)


def _always() -> str | None:
    return None


def _any_device() -> tuple[str, ...]:
    return ()


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_devices() -> tuple[str, ...]:
    # The interpreter runs kernels on CPU tensors (slowly): for tests, never for "auto".
    return ("cuda", "cpu") if _triton_interpreted() else ("cuda",)


def _triton_unavailable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'tunecomp_kernels[triton]')"
    if importlib.util.find_spec("tunecomp_kernels.ops.triton_backend") is None:
        return "this build has no Triton backend module"
    if not (torch.cuda.is_available() or _triton_interpreted()):
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels in the CPU interpreter)"
    return None


def _cuda_unavailable() -> str | None:
    from .._native import cuda_kernels_compiled

    if importlib.util.find_spec("tunecomp_kernels.ops.cuda_backend") is None:
        return "this build has no CUDA backend module"
    if not cuda_kernels_compiled():
        return "tunecomp_kernels._C was built without CUDA kernels (no nvcc at build time)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def _cuda_auto_accepts(device_type: str, shape_key: str) -> bool:
    # "auto" takes CUDA only for shapes whose kernels passed the GPU checks on this GPU,
    # and then where it measured faster than Triton or Triton cannot run (cuda_tables).
    from .cuda_tables import cuda_auto_allowed

    triton = _REGISTRY.get("triton")
    triton_ok = (triton is not None and triton.unavailable_reason() is None
                 and _auto_may_pick(triton, device_type))
    return cuda_auto_allowed(shape_key, triton_available=triton_ok)


#: Extra conditions for "auto", per backend: (device_type, shape_key) -> may it pick it.
_AUTO_GUARDS: dict[str, Callable[[str, str], bool]] = {"cuda": _cuda_auto_accepts}


_REGISTRY: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> None:
    """Add a backend to the registry (used by backend modules and tests)."""
    _REGISTRY[spec.name] = spec


register_backend(BackendSpec(
    "torch", "tunecomp_kernels.ops.reference_op", _any_device, (), 0, _always))
register_backend(BackendSpec(
    "triton", "tunecomp_kernels.ops.triton_backend", _triton_devices, ("cuda",), 10,
    _triton_unavailable, deterministic=False))  # atomic adds in split-K / dmask / dbias
register_backend(BackendSpec(
    "cuda", "tunecomp_kernels.ops.cuda_backend", lambda: ("cuda",), ("cuda",), 20,
    _cuda_unavailable))


def known_backends() -> list[str]:
    """Every backend name the library knows, runnable here or not."""
    return list(_REGISTRY)


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or None if it can."""
    return _REGISTRY[name].unavailable_reason()


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, best first; ``"torch"`` is always in."""
    names = [n for n, spec in _REGISTRY.items() if spec.unavailable_reason() is None]
    return sorted(names, key=lambda n: -_REGISTRY[n].priority)


def load_backend(name: str) -> BackendOps:
    """Import backend ``name`` (registering its ops) and return its ops."""
    return importlib.import_module(_REGISTRY[name].module).OPS


def _serves(spec: BackendSpec, device_type: str) -> bool:
    devices = spec.device_types()
    return not devices or device_type in devices


def _auto_may_pick(spec: BackendSpec, device_type: str) -> bool:
    devices = spec.auto_device_types
    return _serves(spec, device_type) and (not devices or device_type in devices)


def backend_serves(name: str, device_type: str) -> bool:
    """Whether backend ``name`` accepts tensors on ``device_type`` ("cpu", "cuda", ...)."""
    return _serves(_REGISTRY[name], device_type)


def check_backend_name(name: object) -> str:
    """``name`` if it is ``"auto"`` or a known backend (runnable here or not), else a clear
    TypeError / ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__} ({name!r})")
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {known_backends()}")
    return name


@torch.compiler.assume_constant_result
def resolve_backend(requested: str, device_type: str, shape_key: str = "") -> str:
    """Map a requested backend name (or ``"auto"``) to a runnable backend for ``device_type``.

    ``shape_key`` (:func:`tunecomp_kernels.ops.cuda_tables.shape_key`, given by the public
    op for ``"auto"`` on CUDA tensors) lets "auto" choose per shape: it picks ``"cuda"``
    only when the kernels that shape runs passed the GPU checks on this GPU (and measured
    faster than Triton, or Triton cannot run); without a key it never picks ``"cuda"``.

    Raises ValueError for an unknown name and RuntimeError for one that cannot run here.
    In deterministic mode (``torch.are_deterministic_algorithms_enabled()``, see
    :func:`tunecomp_kernels.deterministic`) ``"auto"`` skips nondeterministic backends and
    naming one raises RuntimeError (warns under torch's ``warn_only``).
    """
    check_backend_name(requested)
    strict = torch.are_deterministic_algorithms_enabled()
    if requested == "auto":
        for name in available_backends():
            if strict and not _REGISTRY[name].deterministic:
                continue
            guard = _AUTO_GUARDS.get(name)
            if _auto_may_pick(_REGISTRY[name], device_type) and (
                    guard is None or guard(device_type, shape_key)):
                load_backend(name)
                return name
        return "torch"
    if requested not in _REGISTRY:
        raise ValueError(
            f"unknown backend {requested!r}; choose 'auto' or one of {known_backends()}"
        )
    spec = _REGISTRY[requested]
    reason = spec.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend {requested!r} is not available on this machine: {reason}")
    if not _serves(spec, device_type):
        raise RuntimeError(
            f"backend {requested!r} runs on {list(spec.device_types())} tensors, "
            f"not on {device_type!r}"
        )
    if strict and not spec.deterministic:
        message = (
            f"backend {requested!r} is nondeterministic (atomic reductions) and deterministic "
            "mode is on; use backend='auto' or 'torch', or tunecomp_kernels.deterministic(False)"
        )
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=3)
    load_backend(requested)
    return requested
