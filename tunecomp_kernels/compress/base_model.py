"""Is a given model the same base model a saved TuneComp model was made from?

Names and shapes of tensors are not enough: two Hugging Face models can share every
tensor shape and still compute differently (another activation, norm eps, rope base,
position embedding type, head count with the same hidden size...). ``load_compressed``
therefore compares the saved config with the given model's config, field by field
(nested configs and dicts included), ignoring the fields that do not change what the
model computes from its weights: names and paths, versions, dtype, label names, output
and cache flags, and initialisation settings (the weights are loaded, not initialised).

A model without such a config (any ``nn.Module``) is compared by its modules'
hyperparameters instead (:func:`module_signature`: class, activation functions, eps,
head counts, dropout, ... of every module that is not a converted layer), which
``save_compressed`` records.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

#: Config fields that never change the computation of a model with given weights.
IGNORED_CONFIG_FIELDS = frozenset({
    # names, paths, versions, provenance
    "_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "architectures",
    "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    # dtype: the saved weights carry their own, and loading casts
    "dtype", "torch_dtype",
    # label names and the loss type HF fills in on the first call with labels
    "id2label", "label2id", "problem_type",
    # output and cache flags: what is returned, not how it is computed
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict",
    "use_cache", "torchscript",
    # kernels and chunking compute the same function
    "_attn_implementation", "_attn_implementation_internal", "_attn_implementation_autoset",
    "_experts_implementation", "chunk_size_feed_forward",
    # initialisation only
    "initializer_range", "initializer_factor", "init_std", "logit_scale_init_value",
})

_ABSENT = "<absent>"


def model_config_dict(model: nn.Module) -> dict[str, Any] | None:
    """``model.config`` as the JSON dict ``save_compressed`` records (Hugging Face
    configs; ``None`` for a model without one)."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_json_string"):
        return None
    return json.loads(config.to_json_string(use_diff=False))


def config_differences(
    saved: Mapping[str, Any], given: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, given value)`` for every field that differs and changes the
    computation, in sorted order; nested mappings give dotted names (``text_config.
    hidden_act``); a field present on one side only reads ``"<absent>"`` on the other."""
    diffs = []
    for key in sorted(set(saved) | set(given)):
        if key in IGNORED_CONFIG_FIELDS:
            continue
        a, b = saved.get(key, _ABSENT), given.get(key, _ABSENT)
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs.extend(config_differences(a, b, f"{name}."))
        elif a != b:
            diffs.append((name, a, b))
    return diffs


def base_config_differences(saved_hf: Mapping[str, Any] | None, model: nn.Module) -> list[str]:
    """``"<field>: saved <a>, given <b>"`` for every field where ``model``'s config differs
    from the saved one (``hf_model`` of ``tunecomp.json``) and changes the computation.
    Empty when either side has no HF config (names and shapes are still compared)."""
    saved = None if saved_hf is None else saved_hf.get("config")
    given = model_config_dict(model)
    if not isinstance(saved, Mapping) or given is None:
        return []
    return [f"{field}: saved {_show(a)}, given {_show(b)}"
            for field, a, b in config_differences(saved, given)]


def check_base_config(saved_hf: Mapping[str, Any] | None, model: nn.Module) -> None:
    """Raise if ``model``'s config differs from the saved one in a field that changes the
    computation (see :func:`base_config_differences`).

    Raises:
        ValueError: ``base model mismatch: <field>: saved <a>, given <b>`` (every differing
            field, joined by ``"; "``).
    """
    diffs = base_config_differences(saved_hf, model)
    if diffs:
        raise ValueError("base model mismatch: " + "; ".join(diffs))


def _show(value: Any) -> str:
    return str(value)


# --- models without a config: their modules' hyperparameters -------------------------------

#: Module attributes that pick a code path or a memory strategy, not the function.
IGNORED_MODULE_ATTRS = frozenset({
    "training", "inplace", "use_nested_tensor", "gradient_checkpointing",
})

_SIMPLE = (bool, int, float, str, type(None))
_LIBRARIES = ("torch.", "transformers.")


def _attr_value(value: Any) -> Any:
    """A JSON-ready form of a hyperparameter, or ``None`` when it is not one."""
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value):
        return list(value)
    if callable(value) and not isinstance(value, nn.Module) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"  # e.g. F.relu
    return None


def module_signature(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Per submodule name (``"<model>"`` for the root), its class name and, for PyTorch and
    Hugging Face modules, its hyperparameters: public attributes that are numbers, strings,
    booleans, None, tuples of these, or functions (by qualified name, e.g. an activation).
    Attributes of user-defined classes are not compared (they may hold run state, such as
    counters); their submodules are. Modules named in ``skip`` (the converted layers, which
    differ by design) and everything under them are left out."""
    skipped = tuple(f"{name}." for name in skip)
    skip = set(skip)
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if name in skip or name.startswith(skipped):
            continue
        attrs: dict[str, Any] = {"class": type(mod).__name__}
        library = type(mod).__module__.startswith(_LIBRARIES)
        for key, value in sorted(vars(mod).items()) if library else ():
            if key.startswith("_") or key in IGNORED_MODULE_ATTRS:
                continue
            shown = _attr_value(value)
            if shown is not None or value is None:
                attrs[key] = shown
        out[name or "<model>"] = attrs
    return out


def check_module_signature(
    saved: Mapping[str, Any] | None, model: nn.Module, skip: Iterable[str]
) -> None:
    """Raise if ``model``'s modules differ from the saved :func:`module_signature` (class,
    activation, eps, head count, dropout, ... or a module added or missing). Nothing is
    compared when the saved model recorded no signature.

    Raises:
        ValueError: ``base model mismatch: <module>.<attribute>: saved <a>, given <b>``.
    """
    if not isinstance(saved, Mapping):
        return
    given = module_signature(model, skip)
    diffs = []
    for name in sorted(set(saved) | set(given)):
        a, b = saved.get(name, _ABSENT), given.get(name, _ABSENT)
        if isinstance(a, Mapping) and isinstance(b, Mapping) and a.get("class") != b.get("class"):
            diffs.append((f"{name}.class", a.get("class"), b.get("class")))  # nothing else
        else:
            diffs.extend(config_differences({name: a}, {name: b}))
    if diffs:
        raise ValueError("base model mismatch: " + "; ".join(
            f"{field}: saved {_show(a)}, given {_show(b)}" for field, a, b in diffs))
