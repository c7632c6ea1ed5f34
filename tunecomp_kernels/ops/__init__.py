"""The masked low-rank op: contract, backends, dispatch and the public function."""

from . import reference_distill, reference_op  # noqa: F401  (register the "torch" backend)
from .api import masked_lowrank_linear, masked_lowrank_linear_distill
from .backends import available_backends, known_backends

__all__ = [
    "masked_lowrank_linear",
    "masked_lowrank_linear_distill",
    "available_backends",
    "known_backends",
]
