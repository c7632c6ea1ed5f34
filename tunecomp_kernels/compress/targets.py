"""Which modules get compressed, and how to read and rebuild them.

Supported layers are ``nn.Linear`` (weight ``[out, in]``) and Hugging Face GPT-2's
``transformers.pytorch_utils.Conv1D`` (weight ``[in, out]``, i.e. transposed, computing
``x @ W + b``). Every layer we convert carries a :class:`TargetInfo` in its
``tunecomp_info`` attribute that records its original dense shape, so reports and exports
know the "before" sizes after the module has been replaced.
"""

from __future__ import annotations

import re
import warnings
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

    Layers that converting would break (see :func:`structure_problems`: tied weights, one
    module under several parents, frozen layers, parents that read ``.weight``/``.bias``
    directly) are left out of the default selection with one ``UserWarning`` per kind
    naming them.

    Raises:
        ValueError: an ``include`` pattern selects such a layer.
    """
    return select_layers(model, include, exclude)[0]


def select_layers(
    model: nn.Module,
    include: Sequence[re.Pattern[str]] | None = None,
    exclude: Sequence[re.Pattern[str]] = (),
) -> tuple[dict[str, nn.Module], dict[str, tuple[str, str]]]:
    """:func:`find_targets`, and the layers it left dense: ``{name: (kind, reason)}``
    (see :func:`structure_problems`)."""
    aliases = module_names(model)

    def matches(patterns: Sequence[re.Pattern[str]], mod: nn.Module) -> bool:
        # a module under several names matches through any of them
        return any(p.search(a) for a in aliases[id(mod)] for p in patterns)

    candidates = [(n, m) for n, m in model.named_modules() if n and is_supported(m)]
    if include is None:
        inside = _in_block_list(model)
        if inside:
            candidates = [(n, m) for n, m in candidates if n in inside]
        candidates = [(n, m) for n, m in candidates if not _is_head(n)]
    else:
        candidates = [(n, m) for n, m in candidates if matches(include, m)]
    selected = {n: m for n, m in candidates if not matches(exclude, m) and _compressible(m)}
    problems = structure_problems(model, selected)
    if not problems:
        return selected, {}
    if include is not None:
        lines = "; ".join(f"{name!r} {why}" for name, (_, why) in problems.items())
        raise ValueError(
            f"cannot convert {len(problems)} explicitly included layer(s): {lines}. "
            "Leave them out of include= or add them to exclude="
        )
    by_kind: dict[str, list[str]] = {}
    for name, (kind, _) in problems.items():
        by_kind.setdefault(kind, []).append(name)
    for kind, names in by_kind.items():
        warnings.warn(
            f"TuneComp leaves {len(names)} layer(s) dense: {', '.join(names)} "
            f"({_PROBLEM_TEXT[kind]}); include them explicitly to get an error with details",
            UserWarning, stacklevel=4,
        )
    return {n: m for n, m in selected.items() if n not in problems}, problems


def make_target_infos(targets: dict[str, nn.Module]) -> dict[str, TargetInfo]:
    """A :class:`TargetInfo` for each selected (still dense) layer, by name."""
    infos = {}
    for name, mod in targets.items():
        in_f, out_f = layer_dims(mod)
        infos[name] = TargetInfo(name, in_f, out_f, getattr(mod, "bias", None) is not None,
                                 origin_of(mod))
    return infos


# --- model structures that converting a layer would break -------------------------------

#: (parent type, child attribute): parents that compute with the child's ``.weight`` and
#: ``.bias`` themselves instead of calling it, so a converted child's forward (and the
#: teacher blend) would be bypassed. nn.MultiheadAttention passes ``out_proj.weight`` to
#: ``F.multi_head_attention_forward`` in training and in eval mode.
DIRECT_READERS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.MultiheadAttention, "out_proj"),
)

_PROBLEM_TEXT = {
    "tied": "their weight is shared with another module (tied weights); converting would "
            "untie it and grow the model",
    "aliased": "the same module is reachable under several names; only one of them would "
               "be converted",
    "frozen": "frozen by the user (weight.requires_grad=False); TuneComp would change them",
    "direct": "their parent reads .weight/.bias directly instead of calling the layer "
              "(nn.MultiheadAttention passes out_proj.weight/.bias to "
              "F.multi_head_attention_forward), which would bypass the teacher blend",
}


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every submodule, by ``id(module)`` (a module registered in several
    places has several)."""
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def _storage_key(t: torch.Tensor) -> tuple | None:
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr())


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage ``t`` can reach: tensors that are views of one storage
    (e.g. loaded from one file) share memory only where these ranges overlap."""
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    start = t.storage_offset() * t.element_size()
    return start, start + span * t.element_size()


def structure_problems(
    model: nn.Module, selected: dict[str, nn.Module]
) -> dict[str, tuple[str, str]]:
    """Why converting each of ``selected`` would be wrong, by name: ``(kind, reason)``
    with kind ``"tied"``, ``"aliased"``, ``"frozen"`` or ``"direct"``; layers that are
    fine are absent."""
    if not selected:
        return {}
    all_names = module_names(model)
    owners: dict[tuple, list[tuple[str, tuple[int, int]]]] = {}
    tensors = [*model.named_parameters(remove_duplicate=False),
               *model.named_buffers(remove_duplicate=False)]
    for tname, t in tensors:
        key = _storage_key(t)
        if key is not None:
            owners.setdefault(key, []).append((tname, _byte_range(t)))
    problems: dict[str, tuple[str, str]] = {}
    for name, mod in selected.items():
        why = _problem_of(model, mod, all_names[id(mod)], owners)
        if why is not None:
            problems[name] = why
    return problems


def _problem_of(
    model: nn.Module, mod: nn.Module, names: list[str],
    owners: dict[tuple, list[tuple[str, tuple[int, int]]]],
) -> tuple[str, str] | None:
    slots = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        slots[(id(parent), child)] = (name, parent, child)
    if len(slots) > 1:
        return "aliased", (f"is one module reachable as {', '.join(repr(n) for n in names)}; "
                           "converting it under one name would leave the others dense")
    own = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    for what in ("weight", "bias"):
        t = getattr(mod, what, None)
        key = None if t is None else _storage_key(t)
        start, end = (0, 0) if key is None else _byte_range(t)
        others = [o for o, (lo, hi) in owners.get(key, []) if o not in own and lo < end
                  and start < hi]
        if others:
            return "tied", (f"shares its {what} with {others[0]!r} (tied weights); converting "
                            "it would untie them and add a matrix to the model")
    if not mod.weight.requires_grad:
        return "frozen", ("is frozen (weight.requires_grad=False); TuneComp would change its "
                          "function, so it stays as it is")
    (_, parent, child), = slots.values()
    for parent_type, attr in DIRECT_READERS:
        if isinstance(parent, parent_type) and child == attr:
            return "direct", (f"is read directly by its parent {type(parent).__name__} "
                              f"({child}.weight/.bias go into the attention kernel without "
                              "calling the layer), which would bypass the teacher blend")
    return None


def _forward_pre_hook_noop(module: nn.Module, args: tuple) -> None:
    """Does nothing; its presence makes nn.TransformerEncoderLayer skip its fast path."""
    return None


def keep_layer_forwards(model: nn.Module, names: Sequence[str]) -> None:
    """Make sure the converted layers ``names`` are called rather than read.

    In eval mode without gradients, ``nn.TransformerEncoderLayer`` runs a fused kernel on
    ``linear1.weight``/``linear2.weight`` instead of calling those layers. The layer skips
    that path when any submodule has a forward hook, so each converted ``linear1``/
    ``linear2`` gets a no-op forward pre-hook (once); and ``nn.TransformerEncoder`` stops
    turning padded batches into nested tensors (``use_nested_tensor = False``), which only
    the fused path accepts.
    """
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.TransformerEncoderLayer) and child in ("linear1", "linear2"):
            layer = getattr(parent, child)
            if _forward_pre_hook_noop not in layer._forward_pre_hooks.values():
                layer.register_forward_pre_hook(_forward_pre_hook_noop)
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder) and any(
                _forward_pre_hook_noop in m._forward_pre_hooks.values() for m in mod.modules()):
            mod.use_nested_tensor = False


def target_infos(model: nn.Module) -> dict[str, TargetInfo]:
    """Every module of ``model`` carrying a :class:`TargetInfo`, by its current name."""
    return {
        name: getattr(mod, INFO_ATTR)
        for name, mod in model.named_modules()
        if isinstance(getattr(mod, INFO_ATTR, None), TargetInfo)
    }
