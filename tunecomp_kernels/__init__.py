"""tunecomp_kernels: fused masked low-rank kernels and joint fine-tuning + compression.

Public API:
    masked_lowrank_linear   the op, ``y = s((xVᵀ ⊙ mask)Uᵀ + b) + a(xW0ᵀ + b0)``
    masked_lowrank_linear_distill  the op plus a per-layer feature loss in its gradients
    MaskedLowRankLinear     a drop-in for ``nn.Linear`` built on it
    available_backends      backends that can run on this machine
    build_info              what the native module was compiled with
    deterministic           bit-identical runs: deterministic algorithms and backends
"""

from ._native import build_info
from .determinism import deterministic, is_deterministic, seed_everything
from .nn import MaskedLowRankLinear
from .ops import (
    available_backends,
    known_backends,
    masked_lowrank_linear,
    masked_lowrank_linear_distill,
)

__version__ = "0.1.0"

__all__ = [
    "MaskedLowRankLinear",
    "available_backends",
    "build_info",
    "deterministic",
    "is_deterministic",
    "known_backends",
    "masked_lowrank_linear",
    "masked_lowrank_linear_distill",
    "seed_everything",
]
