"""The masked low-rank op: contract, backends, dispatch and the public function."""

from . import reference_op  # noqa: F401  (registers the always-available "torch" backend)
from .api import masked_lowrank_linear
from .backends import available_backends, known_backends

__all__ = ["masked_lowrank_linear", "available_backends", "known_backends"]
