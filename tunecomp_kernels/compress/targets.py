"""Which modules get compressed, and how to read and rebuild them.

Supported layers are ``nn.Linear`` (weight ``[out, in]``) and Hugging Face GPT-2's
``transformers.pytorch_utils.Conv1D`` (weight ``[in, out]``, i.e. transposed, computing
``x @ W + b``). Every layer we convert carries a :class:`TargetInfo` in its
``tunecomp_info`` attribute that records its original dense shape, so reports and exports
know the "before" sizes after the module has been replaced.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

#: Name components that mark task heads / poolers; the default selection leaves them dense.
HEAD_NAMES = frozenset(
    {"classifier", "pre_classifier", "lm_head", "pooler", "score", "head", "heads",
     "qa_outputs", "cls", "seq_relationship", "output_projection"}
)

INFO_ATTR = "tunecomp_info"


@dataclass(frozen=True)
class TargetInfo:
    """The original dense layer a converted module stands for."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    origin: str  # "linear" or "conv1d"

    @property
    def dense_params(self) -> int:
        """``in·out``: what the layer cost before compression (bias excluded)."""
        return self.in_features * self.out_features

    @property
    def rank_cost(self) -> int:
        """``in + out``: parameters one rank of the low-rank form costs (U column + V row)."""
        return self.in_features + self.out_features

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (checked without importing transformers)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_supported(module: nn.Module) -> bool:
    """``nn.Linear`` (any subclass) or HF ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f)
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in]`` (a view for Conv1D, no copy)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def origin_of(module: nn.Module) -> str:
    """``"conv1d"`` for HF Conv1D, else ``"linear"``."""
    return "conv1d" if is_conv1d(module) else "linear"


def make_dense(
    weight: torch.Tensor, bias: torch.Tensor | None, origin: str
) -> nn.Module:
    """A dense layer of the original kind computing ``x Wᵀ + b`` for ``weight [out, in]``.

    ``origin="conv1d"`` rebuilds an HF ``Conv1D`` (weight stored ``[in, out]``) so that the
    model keeps its original structure and state-dict shapes; otherwise an ``nn.Linear``.
    """
    out_f, in_f = weight.shape
    with torch.no_grad():
        if origin == "conv1d":
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(out_f, in_f)
            layer.to(device=weight.device, dtype=weight.dtype)
            layer.weight.copy_(weight.t())
            if bias is None:  # Conv1D always has a bias
                layer.bias.zero_()
            else:
                layer.bias.copy_(bias)
            return layer
        layer = nn.Linear(in_f, out_f, bias=bias is not None,
                          device=weight.device, dtype=weight.dtype)
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (works inside ModuleList / Sequential)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def _in_block_list(model: nn.Module) -> set[str]:
    """Names of modules that live (strictly) inside some ``nn.ModuleList``."""
    inside: set[str] = set()
    for list_name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            prefix = f"{list_name}." if list_name else ""
            for sub_name, _ in mod.named_modules():
                if sub_name:
                    inside.add(prefix + sub_name)
    return inside


def _is_head(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


def _compressible(module: nn.Module) -> bool:
    """A layer whose rank-1 form is smaller than its dense form (else nothing to gain)."""
    in_f, out_f = layer_dims(module)
    return in_f + out_f < in_f * out_f


def find_targets(
    model: nn.Module,
    include: Sequence[re.Pattern[str]] | None = None,
    exclude: Sequence[re.Pattern[str]] = (),
) -> dict[str, nn.Module]:
    """The supported layers to compress, by qualified name, in module order.

    ``include=None`` is the default rule: layers inside an ``nn.ModuleList`` (the repeated
    transformer blocks; all linear layers if the model has no ModuleList), except names
    with a :data:`HEAD_NAMES` component. Otherwise a layer is selected when one ``include``
    pattern matches (``re.search``). ``exclude`` patterns always remove layers. Layers that
    cannot get smaller at any rank (e.g. ``out_features == 1``) are skipped.
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and is_supported(m)]
    if include is None:
        inside = _in_block_list(model)
        if inside:
            candidates = [(n, m) for n, m in candidates if n in inside]
        candidates = [(n, m) for n, m in candidates if not _is_head(n)]
    else:
        candidates = [(n, m) for n, m in candidates if any(p.search(n) for p in include)]
    return {
        n: m for n, m in candidates
        if not any(p.search(n) for p in exclude) and _compressible(m)
    }


def target_infos(model: nn.Module) -> dict[str, TargetInfo]:
    """Every module of ``model`` carrying a :class:`TargetInfo`, by its current name."""
    return {
        name: getattr(mod, INFO_ATTR)
        for name, mod in model.named_modules()
        if isinstance(getattr(mod, INFO_ATTR, None), TargetInfo)
    }
