"""``load_compressed``: rebuild a model saved by :func:`~.export.save_compressed`.

For a Hugging Face model the architecture is rebuilt from the saved config (no hub
access). Otherwise the caller passes an uncompressed instance of the same architecture,
which must match the saved one before anything is changed: the saved config
(:func:`~.base_model.check_base_config`) or, for models without one, every module's
hyperparameters (:func:`~.base_model.check_module_signature`), then the converted layers'
names and shapes and the whole state dict's. On any mismatch the model is left as it was.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .base_model import base_config_differences, check_module_signature
from .config import TuneCompConfig
from .controller_state import BEFORE_FIELD
from .hf_format import guard_save_pretrained
from .prepare import CONFIG_ATTR
from .targets import INFO_ATTR, TargetInfo, is_supported, layer_dims, set_submodule


def _build_hf(hf: dict[str, Any]) -> nn.Module:
    module_name, class_name = hf.get("module", ""), hf.get("class", "")
    if not module_name.startswith("transformers."):
        raise ValueError(f"refusing to import model class from {module_name!r}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"cannot find {module_name}.{class_name} in the installed transformers"
        ) from exc
    config = cls.config_class.from_dict(hf["config"])
    return cls(config)


def _replace_layers(
    model: nn.Module, layers: dict[str, dict[str, Any]]
) -> list[tuple[str, nn.Module]]:
    """Swap in low-rank layers of the saved ranks; returns the originals for rollback."""
    plan = []
    for name, entry in layers.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"base model mismatch: it has no module {name!r}") from None
        if not is_supported(mod):
            raise ValueError(
                f"base model mismatch: {name!r} is a {type(mod).__name__}, expected an "
                "uncompressed nn.Linear or Conv1D"
            )
        dims = layer_dims(mod)
        saved = (entry["in_features"], entry["out_features"])
        if dims != saved:
            raise ValueError(
                f"base model mismatch: {name!r} has (in, out)={dims}, the saved model {saved}"
            )
        plan.append((name, mod, entry))
    originals = []
    for name, mod, entry in plan:
        info = TargetInfo(name, entry["in_features"], entry["out_features"], bool(entry["bias"]),
                          entry["origin"])
        originals.append((name, mod))
        if entry["kind"] == "lowrank":
            weight = mod.weight
            layer = MaskedLowRankLinear(info.in_features, info.out_features, int(entry["rank"]),
                                        bias=info.bias, device=weight.device, dtype=weight.dtype)
            layer.mask.requires_grad_(False)
            setattr(layer, INFO_ATTR, info)
            set_submodule(model, name, layer)
        else:
            setattr(mod, INFO_ATTR, info)
    return originals


def _rollback(model: nn.Module, originals: list[tuple[str, nn.Module]]) -> None:
    for name, mod in originals:
        set_submodule(model, name, mod)
        if hasattr(mod, INFO_ATTR):
            delattr(mod, INFO_ATTR)


def _full_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], tied: dict[str, str]
) -> dict[str, torch.Tensor]:
    """The saved tensors under every name (tied aliases restored), checked against the
    model's state dict names and shapes."""
    expected = model.state_dict()
    full = dict(tensors)
    for alias, source in tied.items():
        if source in tensors:
            full[alias] = tensors[source]
    missing = sorted(set(expected) - set(full))
    unexpected = sorted(set(full) - set(expected))
    wrong = sorted(k for k in set(full) & set(expected) if full[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch at {k!r}: saved {list(full[k].shape)}, model "
                         f"{list(expected[k].shape)}")
        raise ValueError("base model mismatch: " + "; ".join(parts))
    return full


def _with_config(exc: ValueError, config_diffs: list[str]) -> ValueError:
    """A names/shapes mismatch with the config differences that explain it appended."""
    return ValueError("; ".join([str(exc), *config_diffs])) if config_diffs else exc


def _convert(
    model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor], *, given: bool
) -> None:
    """Swap in the saved layers and load the tensors into ``model``. A ``given`` model is
    first compared with the saved one (config, or module hyperparameters without one);
    every check runs before the first write, and any error restores the model."""
    hf = meta.get("hf_model")
    config_diffs = base_config_differences(hf, model) if given else []
    try:
        originals = _replace_layers(model, meta["layers"])  # checks before it swaps
    except ValueError as exc:
        raise _with_config(exc, config_diffs) from None
    try:
        full = _full_state(model, tensors, meta.get("tied", {}))
    except ValueError as exc:
        _rollback(model, originals)
        raise _with_config(exc, config_diffs) from None
    try:
        if config_diffs:
            raise ValueError("base model mismatch: " + "; ".join(config_diffs))
        if given and hf is None:
            check_module_signature(meta.get("modules"), model, skip=meta["layers"])
        model.load_state_dict(full, strict=True)
    except BaseException:
        _rollback(model, originals)
        raise


def load_compressed(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Load a model written by :func:`save_compressed`.

    Args:
        path: the saved directory.
        model: for a non-HF model, an *uncompressed* instance of the same architecture
            (it is converted in place and returned). For HF models leave it ``None``: the
            model is rebuilt from the saved config (no download), cast to the saved dtype
            and returned in eval mode.

    Raises:
        FileNotFoundError: missing directory or file.
        ValueError: corrupt files, or a base model whose names/shapes or config do not
            match (``base model mismatch: <field>: saved <a>, given <b>``, see
            :mod:`.base_model`); the passed model is then left as it was. Loading never
            writes to disk.
    """
    from .export import WEIGHTS_FILE, read_metadata  # export re-exports this function

    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path / WEIGHTS_FILE} is corrupt: {exc}") from exc

    built_here = model is None
    if built_here:
        if meta.get("hf_model") is None:
            raise ValueError(
                f"{path} holds a non-Hugging-Face model: pass model=<an uncompressed instance "
                "of the same architecture>"
            )
        model = _build_hf(meta["hf_model"])
        if meta.get("dtype"):
            model.to(getattr(torch, meta["dtype"]))
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    elif any(isinstance(getattr(m, INFO_ATTR, None), TargetInfo) for m in model.modules()):
        raise ValueError("model already holds TuneComp layers: pass an uncompressed instance")
    _convert(model, meta, tensors, given=not built_here)
    if meta.get("tunecomp_config") is not None:
        saved = {**BEFORE_FIELD, **meta["tunecomp_config"]}  # as the run behaved
        setattr(model, CONFIG_ATTR, TuneCompConfig.from_dict(saved))
    if built_here:
        model.eval()
    return guard_save_pretrained(model)  # a plain save_pretrained would reload random layers
