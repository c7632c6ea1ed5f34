"""``finalize``: turn a trained TuneComp model into the genuinely smaller model.

First it checks that the run is finished: the controller's schedule reached its end
(blend over, budget met) and the masks keep no more than ``target_ratio`` of the targeted
parameters. Otherwise it raises :class:`~.schedules.ScheduleError` with the numbers,
before changing anything; ``allow_partial=True`` exports such a model deliberately (one
warning). Then, for every converted layer:

* the teacher is dropped (with ``allow_partial``, the teacher's share α_t is discarded
  and the student is used alone at scale 1);
* pruned ranks (mask exactly 0) are removed (``compact``); those the controller already
  compacted away during training (:mod:`.compaction`) are gone, so the result is the
  same either way;
* the mask is folded into U (``U ← U·diag(mask)``), the mask becomes a frozen vector of
  ones (``requires_grad=False``) and the student scale becomes 1, so the layer computes
  ``x Vᵀ Uᵀ + b`` — two small matmuls;
* a layer whose remaining low-rank form is not smaller than dense
  (``k·(in + out) >= in·out``) becomes dense again: an ``nn.Linear`` with weight
  ``U·diag(mask)·V``, or an HF ``Conv1D`` if that is what it was, so the model keeps
  its original structure there.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .budget import effective_cost, lowrank_is_smaller
from .controller import TuneCompController, controller_of
from .prepare import CONFIG_ATTR
from .schedules import ScheduleError
from .targets import INFO_ATTR, TargetInfo, make_dense, set_submodule


@torch.no_grad()
def finalize_layer(layer: MaskedLowRankLinear) -> nn.Module:
    """Finalize one converted layer (see the module docstring); returns the layer itself
    (low-rank) or a new dense module carrying the same ``tunecomp_info``."""
    info: TargetInfo = getattr(layer, INFO_ATTR)
    if layer.teacher_weight is not None:
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


def finalize(model: nn.Module, *, allow_partial: bool = False) -> nn.Module:
    """Finalize every converted layer of ``model`` in place and return ``model``.

    Afterwards the model needs no teacher and no controller: low-rank layers are
    :class:`~tunecomp_kernels.MaskedLowRankLinear` of their kept rank with a mask of ones,
    the others are dense. Idempotent. Rebuild any optimiser afterwards (parameters change).

    Args:
        model: a model converted by ``prepare`` (or ``compress_to_budget``).
        allow_partial: export a run that did not finish its schedule (blend still on,
            budget not met) as it is, with one warning, instead of raising.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the model has no TuneComp layers.
        ScheduleError: the run is unfinished (see the module docstring); the message
            gives the step reached and planned and the kept ratio against the target.
            The model is left unchanged.
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
    controller = controller_of(model)
    problem = unfinished_reason(model, controller)
    if problem is not None:
        if not allow_partial:
            raise ScheduleError(
                f"{problem}. Finalizing now would export this model; to export it as it is "
                "anyway, pass allow_partial=True"
            )
        warnings.warn(f"{problem}; exporting it as it is (allow_partial=True)", stacklevel=2)
    if controller is not None:
        controller.finalized = True
    for name, mod in todo:
        new = finalize_layer(mod)
        if new is not mod:
            set_submodule(model, name, new)
    return model


def unfinished_reason(model: nn.Module, controller: TuneCompController | None = None) -> str | None:
    """Why ``model`` is not ready to export, or ``None``: its ``controller`` (if given) has
    not reached the end of its schedule, the masks keep more than ``target_ratio`` of the
    targeted parameters, or a teacher is still blended in."""
    if controller is not None and not controller.finalized:
        reason = _schedule_reason(controller)
        if reason is not None:
            return reason
    config = controller.config if controller is not None else getattr(model, CONFIG_ATTR, None)
    kept = original = 0
    blending = []
    for mod in model.modules():
        info = getattr(mod, INFO_ATTR, None)
        if not isinstance(info, TargetInfo):
            continue
        original += info.dense_params
        if isinstance(mod, MaskedLowRankLinear):
            kept += effective_cost(mod.active_rank, info)
            if mod.teacher_weight is not None and mod.teacher_scale != 0.0:
                blending.append(mod.teacher_scale)
        else:
            kept += info.dense_params
    target = getattr(config, "target_ratio", None)
    if target is not None and original and kept > math.floor(target * original):
        if controller is not None:
            counted = (f" (the controller counts {controller.ratio:.3f}: were the weights "
                       "reloaded from a checkpoint without the controller state saved with it?)")
        else:
            counted = (" (no TuneComp controller of this model is alive; if it never stepped, "
                       "the training callback was missing: TuneCompCallback, "
                       "TuneCompLightningCallback, or controller.step() after each optimiser "
                       "step)")
        return (f"the model's masks keep {kept / original:.3f} of the targeted parameters "
                f"({kept} of {original}), over target_ratio={target}{counted}: the budget "
                "is not met")
    if blending:
        return (f"{len(blending)} layer(s) still blend in their teacher (teacher scale up to "
                f"{max(blending):.4g}): the blend did not end")
    return None


def _schedule_reason(controller: TuneCompController) -> str | None:
    schedule, t = controller.schedule, controller.step_count
    if schedule is not None and t >= schedule.end:
        return None
    numbers = (f"kept ratio {controller.ratio:.3f} against target_ratio="
               f"{controller.config.target_ratio}")
    if t == 0:
        planned = ("its run length was never set" if schedule is None
                   else f"{schedule.total_steps} planned")
        return (f"the TuneComp controller never stepped (step 0, {planned}; {numbers}). Was "
                "the callback missing? Pass TuneCompCallback(controller) to the HF Trainer "
                "(or use TuneCompTrainer), TuneCompLightningCallback(controller) to the "
                "Lightning Trainer, or call controller.step() after every optimiser step")
    return (f"the schedule stopped at step {t} of {schedule.total_steps} planned, before "
            f"its end at step {schedule.end} (blend until step {schedule.blend_steps}, "
            f"budget met at step {schedule.prune_end}); {numbers}")
