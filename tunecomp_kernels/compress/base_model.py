"""Is a given model the same base model a saved TuneComp model was made from?

Names and shapes of tensors are not enough: two Hugging Face models can share every
tensor shape and still compute differently (another activation, norm eps, rope base,
position embedding type, head count with the same hidden size...). ``load_compressed``
therefore compares the saved config with the given model's config, field by field
(nested configs and dicts included), ignoring the fields that do not change what the
model computes from its weights: names and paths, versions, dtype, label names, output
and cache flags, and initialisation settings (the weights are loaded, not initialised).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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


def check_base_config(saved_hf: Mapping[str, Any] | None, model: nn.Module) -> None:
    """Raise if ``model``'s config differs from the saved one (``hf_model`` of
    ``tunecomp.json``) in a field that changes the computation. Models without an HF
    config on either side are not compared here (their names and shapes still are).

    Raises:
        ValueError: ``base model mismatch: <field>: saved <a>, given <b>`` (every differing
            field, joined by ``"; "``).
    """
    saved = None if saved_hf is None else saved_hf.get("config")
    given = model_config_dict(model)
    if not isinstance(saved, Mapping) or given is None:
        return
    diffs = config_differences(saved, given)
    if diffs:
        raise ValueError("base model mismatch: " + "; ".join(
            f"{field}: saved {_show(a)}, given {_show(b)}" for field, a, b in diffs))


def _show(value: Any) -> str:
    return str(value)
