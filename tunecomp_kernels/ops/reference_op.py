"""Registers the reference PyTorch implementation as the ``"torch"`` backend's ops."""

from . import reference
from .contract import register_backend_ops

# The op may take the weight path (a [0, r] t): its fake asks reference.saved_rows.
OPS = register_backend_ops("torch", reference.forward, reference.backward,
                           saved_rows=reference.saved_rows)
