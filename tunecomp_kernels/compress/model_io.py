"""Calling a model on a batch and reading its outputs, whatever their form.

A *batch* is what the model is called with: a dict of keyword arguments (Hugging Face
style, ``model(**batch)``), a tensor (``model(batch)``) or a tuple/list of positional
arguments (``model(*batch)``). Outputs may be a tensor, a tuple, a dict or a HF
``ModelOutput``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (mappings become dicts; lists and
    tuples are recursed)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list, else
    ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def _field(outputs: Any, name: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


def output_loss(outputs: Any) -> torch.Tensor:
    """The ``loss`` a HF model returns when given labels."""
    loss = _field(outputs, "loss")
    if loss is None:
        raise ValueError(
            "the model output has no 'loss' (pass labels in the batch, or give a loss_fn)"
        )
    return loss


def output_logits(outputs: Any) -> torch.Tensor:
    """Logits: ``outputs.logits``, a bare tensor, or the first tensor of a tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = _field(outputs, "logits")
    if logits is not None:
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ValueError(f"cannot find logits in a model output of type {type(outputs).__name__}")


def output_hidden(outputs: Any) -> list[torch.Tensor]:
    """Hidden states to distil: all of ``hidden_states`` when present (call the model with
    ``output_hidden_states=True``), else ``last_hidden_state``, else a bare tensor output."""
    hidden = _field(outputs, "hidden_states")
    if hidden is not None:
        return list(hidden)
    last = _field(outputs, "last_hidden_state")
    if last is not None:
        return [last]
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    raise ValueError(
        f"cannot find hidden states in a model output of type {type(outputs).__name__}; "
        "call the model with output_hidden_states=True"
    )
