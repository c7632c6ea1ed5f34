"""Registers the reference PyTorch implementation as the ``"torch"`` backend's ops: the
op pair itself, and its weight-path pair (no t saved; the public function chooses it in
eager mode where it costs fewer multiply-adds, :func:`.reference.takes_weight_path`)."""

from functools import partial

from . import reference
from .contract import register_backend_ops

OPS = register_backend_ops("torch", reference.forward, reference.backward)

#: name of the weight-path op pair (``torch.ops.tunecomp.masked_lowrank_<name>``)
WEIGHT_PATH = "torch_weight_path"

# The schema is given explicitly, so the partial's extra keyword never reaches the op.
WEIGHT_PATH_OPS = register_backend_ops(WEIGHT_PATH, partial(reference.forward, weight_path=True),
                                       reference.backward, saves_t=False)
