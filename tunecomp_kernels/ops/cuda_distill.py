"""The distill op (:mod:`.distill_contract`) for backend ``"cuda"``, delegated to Triton.

The CUDA backend has no kernels of its own for the feature loss: its distill ops run the
Triton implementation (:mod:`.triton_distill`; Triton is installed wherever the CUDA
backend runs), registered as opaque ``custom_op``s under the CUDA backend's name, so that
``backend="cuda"`` (or "auto" choosing it) serves the distill function too.
"""

from __future__ import annotations

from . import triton_distill
from .contract import BackendOps
from .distill_contract import register_distill_ops

OPS: BackendOps = register_distill_ops("cuda", triton_distill.forward, triton_distill.backward)
