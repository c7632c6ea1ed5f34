"""``finalize``: turn a trained TuneComp model into the genuinely smaller model.

For every converted layer:

* the teacher is dropped (if finalize runs before the blend ended, the teacher's share
  α_t is discarded with a warning, and the student is used alone at scale 1);
* pruned ranks (mask exactly 0) are removed (``compact``);
* the mask is folded into U (``U ← U·diag(mask)``), the mask becomes a frozen vector of
  ones (``requires_grad=False``) and the student scale becomes 1, so the layer computes
  ``x Vᵀ Uᵀ + b`` — two small matmuls;
* a layer whose remaining low-rank form is not smaller than dense
  (``k·(in + out) >= in·out``) becomes dense again: an ``nn.Linear`` with weight
  ``U·diag(mask)·V``, or an HF ``Conv1D`` if that is what it was, so the model keeps
  its original structure there.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .budget import lowrank_is_smaller
from .targets import INFO_ATTR, TargetInfo, make_dense, set_submodule


@torch.no_grad()
def finalize_layer(layer: MaskedLowRankLinear) -> nn.Module:
    """Finalize one converted layer (see the module docstring); returns the layer itself
    (low-rank) or a new dense module carrying the same ``tunecomp_info``."""
    info: TargetInfo = getattr(layer, INFO_ATTR)
    if layer.teacher_weight is not None:
        if layer.teacher_scale != 0.0:
            warnings.warn(
                f"{info.name}: finalizing before the blend ended (teacher scale "
                f"{layer.teacher_scale:.4g}); the teacher's share is discarded",
                stacklevel=3,
            )
        layer.drop_teacher()
    layer.teacher_scale = 0.0
    layer.student_scale = 1.0
    layer.compact()
    rank = layer.active_rank
    if rank == 0 or not lowrank_is_smaller(rank, info):
        weight = (layer.U * layer.mask) @ layer.V if rank else layer.U.new_zeros(
            info.out_features, info.in_features)
        dense = make_dense(weight, layer.bias, info.origin)
        setattr(dense, INFO_ATTR, info)
        return dense
    layer.U.mul_(layer.mask)
    layer.mask.fill_(1.0)
    layer.mask.requires_grad_(False)
    return layer


def finalize(model: nn.Module) -> nn.Module:
    """Finalize every converted layer of ``model`` in place and return ``model``.

    Afterwards the model needs no teacher and no controller: low-rank layers are
    :class:`~tunecomp_kernels.MaskedLowRankLinear` of their kept rank with a mask of ones,
    the others are dense. Idempotent. Rebuild any optimiser afterwards (parameters change).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    todo = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, MaskedLowRankLinear) and isinstance(getattr(mod, INFO_ATTR, None),
                                                               TargetInfo)
    ]
    if not todo and not any(
        isinstance(getattr(m, INFO_ATTR, None), TargetInfo) for m in model.modules()
    ):
        raise ValueError("the model has no TuneComp layers: call prepare(model, config) first")
    for name, mod in todo:
        new = finalize_layer(mod)
        if new is not mod:
            set_submodule(model, name, new)
    return model
