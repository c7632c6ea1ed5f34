"""Back to a plain dense model: multiply every compressed layer out.

:func:`merge_and_unload` (named after PEFT's function of the same purpose) turns a
TuneComp model back into the original architecture: each converted layer becomes the
layer type the model was built with (``nn.Linear``, or Hugging Face ``Conv1D`` for
GPT-2) holding the weight the compressed layer computes, so plain ``save_pretrained``
writes a checkpoint that plain ``transformers`` loads with no custom code. The dense
model is larger again; it is for tools that only take dense models.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .hf_format import unguard_save_pretrained
from .prepare import CONFIG_ATTR
from .targets import INFO_ATTR, TargetInfo, make_dense, set_submodule

logger = logging.getLogger(__name__)


class MergeCounts(NamedTuple):
    """Parameter counts around :func:`merge_and_unload` (shared tensors counted once)."""

    compressed: int
    dense: int


def parameter_count(model: nn.Module) -> int:
    """Number of parameters of ``model``, tied (shared) parameters counted once."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def merge_layer(layer: nn.Module) -> nn.Module:
    """The dense layer of its original kind (``TargetInfo.origin``) computing what the
    converted ``layer`` computes, teacher blend included: ``W = s·U·diag(mask)·V + a·W0``
    ``[out, in]`` and bias ``s·b + a·b0``, in the layer's dtype and device. A layer kept
    dense (already ``nn.Linear``/``Conv1D``) is returned as it is, without its
    ``tunecomp_info``.

    Raises:
        ValueError: ``layer`` is not a converted TuneComp layer.
    """
    info = getattr(layer, INFO_ATTR, None)
    if not isinstance(info, TargetInfo):
        raise ValueError(f"{type(layer).__name__} is not a converted TuneComp layer")
    if not isinstance(layer, MaskedLowRankLinear):
        delattr(layer, INFO_ATTR)
        return layer
    linear = layer.to_linear()
    dense = make_dense(linear.weight, linear.bias, info.origin)
    return dense.train(layer.training).requires_grad_(layer.U.requires_grad)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every TuneComp layer of ``model`` by its dense product, in place; returns
    ``model``, now the original architecture with no TuneComp state.

    Each low-rank layer ``U·diag(mask)·V`` (teacher blend included, for a model still
    in training) becomes the layer type the model expects: ``nn.Linear`` (weight
    ``[out, in]``) or HF ``Conv1D`` (weight ``[in, out]``). Outputs equal the compressed
    model's to floating-point rounding of the product. The parameter counts before and
    after are logged (INFO) and stored on the model's ``tunecomp_merge_counts``
    attribute (:class:`MergeCounts`). ``model.save_pretrained`` then writes a plain
    checkpoint. Rebuild any optimiser afterwards.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no TuneComp layers (nothing to merge).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    todo = [(name, mod) for name, mod in model.named_modules()
            if isinstance(getattr(mod, INFO_ATTR, None), TargetInfo)]
    if not todo:
        raise ValueError("the model has no TuneComp layers: nothing to merge")
    compressed = parameter_count(model)
    for name, mod in todo:
        new = merge_layer(mod)
        if new is not mod:
            set_submodule(model, name, new)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    unguard_save_pretrained(model)
    counts = MergeCounts(compressed, parameter_count(model))
    model.tunecomp_merge_counts = counts
    logger.info("merge_and_unload: %d parameters dense (the compressed model has %d, "
                "%.1f%% of it)", counts.dense, counts.compressed,
                100.0 * counts.compressed / max(counts.dense, 1))
    return model
