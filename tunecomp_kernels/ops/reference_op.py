"""Registers the reference PyTorch implementation as the ``"torch"`` backend's ops: the
op pair itself, and its weight-path pair (no t saved; the public function chooses it in
eager mode where it costs fewer multiply-adds, :func:`.reference.takes_weight_path`)."""

import torch

from . import reference
from .contract import register_backend_ops

OPS = register_backend_ops("torch", reference.forward, reference.backward)

#: name of the weight-path op pair (``torch.ops.tunecomp.masked_lowrank_<name>``)
WEIGHT_PATH = "torch_weight_path"


def _weight_path_forward(
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_scale: torch.Tensor,
    student_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.forward(x, U, mask, V, bias, teacher_weight, teacher_bias,
                             teacher_scale, student_scale, weight_path=True)


def _no_rows(*_inputs: object) -> int:
    return 0


WEIGHT_PATH_OPS = register_backend_ops(WEIGHT_PATH, _weight_path_forward, reference.backward,
                                       saved_rows=_no_rows)
