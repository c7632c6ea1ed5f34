"""Activation statistics of the targeted layers' inputs, collected with forward hooks.

ASVD needs mean |x| per input channel, SVD-LLM the Gram matrix XᵀX, and the
``"activation"`` pruning score the RMS per channel. One pass over the calibration
batches fills all of them: the model runs in eval mode under ``torch.no_grad()`` and the
hooks are removed afterwards (also on error). Sums are accumulated in float64; the Gram
matrix costs ``in²`` float64 per layer, so collect it only when needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .model_io import call_model, model_device, move_to_device
from .targets import layer_dims


@dataclass
class ActivationStats:
    """Input statistics of one layer over ``count`` calibration rows (tokens)."""

    count: int
    abs_sum: torch.Tensor  # [in] float64, Σ|x|
    sq_sum: torch.Tensor  # [in] float64, Σx²
    gram: torch.Tensor | None = None  # [in, in] float64, Σ xᵀx

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean |x| per input channel ``[in]`` (ASVD's scaling statistic)."""
        return self.abs_sum / max(self.count, 1)

    @property
    def rms(self) -> torch.Tensor:
        """Root-mean-square of x per input channel ``[in]``."""
        return (self.sq_sum / max(self.count, 1)).sqrt()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's own training flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def collect_statistics(
    model: nn.Module,
    modules: dict[str, nn.Module],
    calibration: Iterable[Any],
    *,
    gram: bool = False,
    forward: Callable[[nn.Module, Any], Any] = call_model,
) -> dict[str, ActivationStats]:
    """Run ``model`` over ``calibration`` and return the input statistics of ``modules``.

    Args:
        model: the model to run (in eval mode, without gradients).
        modules: the layers to observe, by name (``nn.Linear`` or HF ``Conv1D``).
        calibration: an iterable of model inputs (dicts of tensors, tensors, or tuples of
            positional arguments); tensors are moved to the model's device.
        gram: also accumulate the ``[in, in]`` Gram matrix (SVD-LLM).
        forward: how to call the model on one batch.

    Raises:
        TypeError: ``calibration`` is not iterable.
        ValueError: it is empty, or a layer never saw an input.
    """
    if calibration is None or isinstance(calibration, (str, bytes)):
        raise TypeError("calibration must be an iterable of model inputs")
    try:
        batches = iter(calibration)
    except TypeError as exc:
        raise TypeError(
            f"calibration must be an iterable of model inputs, got {type(calibration).__name__}"
        ) from exc

    stats: dict[str, ActivationStats] = {}
    for name, mod in modules.items():
        in_f, _ = layer_dims(mod)
        dev = mod.weight.device
        stats[name] = ActivationStats(
            count=0,
            abs_sum=torch.zeros(in_f, dtype=torch.float64, device=dev),
            sq_sum=torch.zeros(in_f, dtype=torch.float64, device=dev),
            gram=torch.zeros(in_f, in_f, dtype=torch.float64, device=dev) if gram else None,
        )

    def make_hook(name: str) -> Callable[..., None]:
        entry = stats[name]

        def hook(_module: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            entry.count += x.shape[0]
            entry.abs_sum += x.abs().sum(0)
            entry.sq_sum += x.square().sum(0)
            if entry.gram is not None:
                entry.gram += x.t() @ x

        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in modules.items()]
    seen = 0
    device = model_device(model)
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                forward(model, move_to_device(batch, device))
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("calibration is empty: it yielded no batches")
    silent = [name for name, s in stats.items() if s.count == 0]
    if silent:
        raise ValueError(
            f"{len(silent)} targeted layer(s) saw no calibration input, e.g. {silent[0]!r}; "
            "they are not on the forward path of these inputs"
        )
    return stats
