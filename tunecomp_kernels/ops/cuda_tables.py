"""What "auto" may do with the CUDA backend: verified kernels and measured per-shape winners.

Two small tables ship inside the package, both written on a GPU by
``bench/cuda_verify.py`` (run by ``bench/gpu_check.sh``), never by hand:

* ``cuda_verified.json``: which CUDA kernels (``forward_fused``, ``forward_split``,
  ``forward_decode``, ``backward``, each per dtype) passed the GPU checks against the
  float64 reference, on which GPU (by name), with which torch / CUDA / module versions
  and when. ``backend="auto"`` never picks a CUDA kernel missing from it for the current
  GPU; ``backend="cuda"`` still runs it, with one :class:`UnverifiedKernelWarning` per
  kernel, dtype and GPU.
* ``backend_choice.json``: rows ``(gpu, n_bucket, in, out, r, dtype) -> winner``
  ("cuda" or "triton") measured side by side. No row: Triton when it is available.

``shape_key`` packs what the choice needs into one string so that
:func:`tunecomp_kernels.ops.backends.resolve_backend` (an
``assume_constant_result`` function under ``torch.compile``) can take it as an argument.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import torch

#: Every CUDA kernel family a verification run must cover, per dtype.
KERNELS = ("forward_fused", "forward_split", "forward_decode", "backward")
#: dtypes the CUDA kernels run (float64 falls back to the reference inside the backend).
DTYPES = ("float32", "float16", "bfloat16")
#: Rows served by the CUDA decode kernels (must match kDecodeMaxRows in csrc/common/mlr.h).
#: The Triton backend's decode path has its own limit (triton_backend.TRITON_DECODE_MAX_N).
CUDA_DECODE_MAX_N = 16
#: Former name of CUDA_DECODE_MAX_N, kept for imports (the module uses the new name).
DECODE_MAX_N = CUDA_DECODE_MAX_N

_HERE = Path(__file__).resolve().parent
VERIFIED_PATH = _HERE / "cuda_verified.json"
CHOICE_PATH = _HERE / "backend_choice.json"

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


class UnverifiedKernelWarning(UserWarning):
    """A CUDA kernel ran that has not passed the GPU checks on this GPU."""


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def n_bucket(n: int) -> str:
    """Row-count bucket of the choice table: le16 (decode), le256, le4096, gt4096."""
    if n <= CUDA_DECODE_MAX_N:
        return "le16"
    if n <= 256:
        return "le256"
    if n <= 4096:
        return "le4096"
    return "gt4096"


def shape_key(x: torch.Tensor, U: torch.Tensor) -> str:
    """``"<n_bucket>/<in>/<out>/<r>/<dtype>"`` for input ``x [..., in]`` and ``U [out, r]``.

    Traceable by torch.compile: the row count only enters through comparisons (guards),
    never as a value.
    """
    n = 1
    for d in x.shape[:-1]:
        n = n * d
    return f"{n_bucket(n)}/{x.shape[-1]}/{U.shape[0]}/{U.shape[1]}/{dtype_name(x.dtype)}"


def parse_shape_key(key: str) -> dict[str, Any] | None:
    """The fields of a :func:`shape_key` string, or None if it is empty or malformed."""
    parts = key.split("/") if key else []
    if len(parts) != 5:
        return None
    bucket, in_f, out_f, r, dtype = parts
    try:
        return {"n_bucket": bucket, "in": int(in_f), "out": int(out_f), "r": int(r),
                "dtype": dtype}
    except ValueError:
        return None


def kernels_for(n_bucket_name: str) -> tuple[str, ...]:
    """Kernel families a call in this bucket may run (forward choice depends on N and SMs)."""
    if n_bucket_name == "le16":
        return ("forward_decode", "backward")
    return ("forward_fused", "forward_split", "backward")


def _read_json(path: Path, empty: dict[str, Any]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return empty


@functools.lru_cache(maxsize=8)
def _load(path: str, kind: str) -> dict[str, Any]:
    key = "entries" if kind == "verified" else "rows"
    data = _read_json(Path(path), {"schema": 1, key: []})
    if not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected a list under {key!r}")
    return data


def load_verified() -> dict[str, Any]:
    """The parsed ``cuda_verified.json`` (``{"schema": 1, "entries": [...]}``)."""
    return _load(str(VERIFIED_PATH), "verified")


def load_choice() -> dict[str, Any]:
    """The parsed ``backend_choice.json`` (``{"schema": 1, "rows": [...]}``)."""
    return _load(str(CHOICE_PATH), "choice")


def reload_tables() -> None:
    """Forget cached tables (after a verification run rewrote them)."""
    _load.cache_clear()


def is_verified(kernel: str, dtype: str, gpu: str) -> bool:
    """Whether ``kernel`` in ``dtype`` passed the GPU checks on a GPU named ``gpu``."""
    return any(
        e.get("kernel") == kernel and e.get("dtype") == dtype and e.get("gpu") == gpu
        and e.get("passed") is True
        for e in load_verified()["entries"]
    )


def choice_for(gpu: str, key: str) -> str | None:
    """The measured winner ("cuda" / "triton") for this GPU and shape key, or None."""
    fields = parse_shape_key(key)
    if fields is None:
        return None
    for row in load_choice()["rows"]:
        if (row.get("gpu") == gpu and row.get("n_bucket") == fields["n_bucket"]
                and row.get("in") == fields["in"] and row.get("out") == fields["out"]
                and row.get("r") == fields["r"] and row.get("dtype") == fields["dtype"]):
            return row.get("winner")
    return None


def current_gpu_name() -> str | None:
    """Name of the current CUDA device, or None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.cuda.current_device())


def cuda_auto_allowed(key: str, *, triton_available: bool, gpu: str | None = None) -> bool:
    """May ``backend="auto"`` pick CUDA for a call with this shape key?

    Only if every kernel the call may run is verified on this GPU for its dtype, and then
    only if the choice table says CUDA wins for the shape, or has no row for it and
    Triton is unavailable.
    """
    fields = parse_shape_key(key)
    if fields is None or fields["dtype"] not in DTYPES:
        return False
    gpu = gpu if gpu is not None else current_gpu_name()
    if gpu is None:
        return False
    if not all(is_verified(k, fields["dtype"], gpu) for k in kernels_for(fields["n_bucket"])):
        return False
    winner = choice_for(gpu, key)
    if winner is None:
        return not triton_available
    return winner == "cuda"


_WARNED: set[tuple[str, str, str]] = set()


def warn_if_unverified(kernel: str, dtype: str, gpu: str | None = None) -> bool:
    """Warn once per (kernel, dtype, GPU) when ``kernel`` has not passed the GPU checks here.

    Returns True when the kernel is verified.
    """
    gpu = gpu if gpu is not None else (current_gpu_name() or "unknown GPU")
    if is_verified(kernel, dtype, gpu):
        return True
    if (kernel, dtype, gpu) not in _WARNED:
        _WARNED.add((kernel, dtype, gpu))
        warnings.warn(
            f"tunecomp_kernels: the CUDA kernel {kernel!r} ({dtype}) has not passed the GPU "
            f"checks on {gpu!r} (see tunecomp_kernels/ops/cuda_verified.json; run "
            "bench/gpu_check.sh to verify it). backend='auto' will not pick it.",
            UnverifiedKernelWarning,
            stacklevel=3,
        )
    return False
