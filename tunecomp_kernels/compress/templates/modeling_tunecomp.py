"""Load a TuneComp-compressed model with plain PyTorch and ``transformers``.

This file is copied into every model directory that ``tunecomp_kernels`` saves and is
referenced from that directory's ``config.json`` (``auto_map``), so
``AutoModel*.from_pretrained(directory, trust_remote_code=True)`` works on a machine
where ``tunecomp_kernels`` is not installed. It imports only ``torch`` and
``transformers``.

How it works: ``config.json`` holds the original model's configuration plus a
``tunecomp`` entry naming the original model class and, per compressed layer, its rank
and shape. The class ``TuneComp<Original>`` (e.g. ``TuneCompBertForSequenceClassification``)
builds the original architecture from the configuration and then replaces each
compressed layer by a :class:`LowRankLinear` of the saved rank, before the weights load.
A low-rank layer computes ``y = (x Vᵀ ⊙ mask) Uᵀ + b``: two small matrix products.
The classes are made on first access (module ``__getattr__``), so one file serves every
architecture.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

FORMAT_VERSION = 1
PREFIX = "TuneComp"
_MADE: dict[str, type] = {}


class LowRankLinear(nn.Module):
    """``y = (x Vᵀ ⊙ mask) Uᵀ + bias``; x ``[..., in]`` -> y ``[..., out]``.

    Parameters ``U [out, rank]``, ``V [rank, in]``, ``bias [out]`` (optional) and the
    buffer ``mask [rank]`` (ones after compression; kept so the saved weights load as
    they are). Half-precision inputs are computed in float32 and rounded once at the end.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.U = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.V = nn.Parameter(torch.zeros(rank, in_features, **factory))
        self.register_buffer("mask", torch.ones(rank, **factory))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("bias", None)

    @property
    def rank(self) -> int:
        """Number of rank-1 components."""
        return self.V.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in]`` -> ``[..., out]``."""
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        x2 = x.reshape(-1, self.in_features).to(acc)
        t = x2 @ self.V.to(acc).t()
        u = self.U.to(acc) * self.mask.to(acc)
        y = t @ u.t() if self.bias is None else torch.addmm(self.bias.to(acc), t, u.t())
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


def _dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def swap_lowrank_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Replace every ``"lowrank"`` entry of ``layers`` (``{name: {"kind", "rank",
    "in_features", "out_features", "bias"}}``) by a :class:`LowRankLinear` of its rank,
    on the replaced layer's device and dtype.

    Raises:
        ValueError: a named layer is missing, is not a Linear/Conv1D, or has another shape.
    """
    for name, entry in layers.items():
        if entry.get("kind") != "lowrank":
            continue
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r} listed in config.json") from None
        dims = _dims(old)
        saved = (entry["in_features"], entry["out_features"])
        if dims != saved:
            raise ValueError(f"layer {name!r} is {type(old).__name__} with (in, out)={dims}; "
                             f"config.json says {saved}")
        new = LowRankLinear(saved[0], saved[1], int(entry["rank"]), bias=bool(entry["bias"]),
                            device=old.weight.device, dtype=old.weight.dtype)
        _set_submodule(model, name, new)


def _tunecomp_entry(config: Any) -> dict[str, Any]:
    entry = getattr(config, "tunecomp", None)
    if not isinstance(entry, dict) or not isinstance(entry.get("layers"), dict):
        raise ValueError("config.json has no 'tunecomp' entry with the compressed layers")
    if entry.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"config.json's tunecomp format_version is "
                         f"{entry.get('format_version')!r}; this file reads {FORMAT_VERSION}")
    return entry


def _config_class(base: type) -> type:
    name = PREFIX + base.__name__
    if name not in _MADE:
        model_type = "tunecomp_" + (getattr(base, "model_type", "") or "model")
        _MADE[name] = type(name, (base,), {"model_type": model_type, "__module__": __name__})
    return _MADE[name]


def _model_class(base: type) -> type:
    name = PREFIX + base.__name__

    def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        swap_lowrank_layers(self, _tunecomp_entry(config)["layers"])

    if name not in _MADE:
        _MADE[name] = type(name, (base,), {
            "__init__": __init__, "__module__": __name__,
            "config_class": _config_class(base.config_class),
        })
    return _MADE[name]


def __getattr__(name: str) -> type:
    """``TuneComp<X>`` for a ``transformers`` config or model class ``X``."""
    base = getattr(transformers, name[len(PREFIX):], None) if name.startswith(PREFIX) else None
    if isinstance(base, type) and issubclass(base, transformers.PretrainedConfig):
        return _config_class(base)
    if isinstance(base, type) and issubclass(base, transformers.PreTrainedModel):
        return _model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
