"""Registers the reference PyTorch implementation as the ``"torch"`` backend's ops."""

from . import reference
from .contract import register_backend_ops

OPS = register_backend_ops("torch", reference.forward, reference.backward)
