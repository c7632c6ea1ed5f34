"""A saved compressed model as a Hugging Face model directory.

:func:`~.export.save_compressed` writes, beside ``model.safetensors`` and
``tunecomp.json``, for a ``transformers`` model:

* ``config.json``: the model's configuration with ``model_type`` ``"tunecomp_<type>"``
  (so plain ``transformers`` never mistakes it for the dense model and fills the
  low-rank layers with random weights), a ``tunecomp`` entry (original class, per
  layer its rank and shape) and an ``auto_map`` pointing at
* ``modeling_tunecomp.py``: plain PyTorch + ``transformers`` code (package data,
  :data:`TEMPLATE`) that rebuilds the original architecture and swaps in the low-rank
  layers, so ``AutoModel*.from_pretrained(dir, trust_remote_code=True)`` loads the
  exact compressed model without ``tunecomp_kernels`` installed;
* the tokenizer's (or image processor's) files, when one is given.

:func:`guard_save_pretrained` makes ``model.save_pretrained`` safe on a TuneComp model.
"""

from __future__ import annotations

import functools
import json
import tempfile
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from .targets import INFO_ATTR, TargetInfo

CONFIG_FILE = "config.json"
MODELING_FILE = "modeling_tunecomp.py"
#: The modelling file shipped with every saved model (package data).
TEMPLATE = resources.files("tunecomp_kernels.compress") / "templates" / MODELING_FILE
CLASS_PREFIX = "TuneComp"
HF_FORMAT_VERSION = 1


def modeling_source() -> bytes:
    """The bytes of ``modeling_tunecomp.py`` as shipped in the package."""
    return TEMPLATE.read_bytes()


def auto_classes(model_type: str, class_name: str) -> list[str]:
    """Names of the ``transformers`` ``AutoModel*`` classes that map ``model_type`` to
    ``class_name`` (e.g. ``("bert", "BertForSequenceClassification")`` ->
    ``["AutoModelForSequenceClassification"]``)."""
    from transformers.models.auto import modeling_auto

    found = []
    for name in sorted(dir(modeling_auto)):
        auto = getattr(modeling_auto, name)
        mapping = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", None)
        if not (name.startswith("AutoModel") and isinstance(mapping, dict)):
            continue
        target = mapping.get(model_type)
        names = target if isinstance(target, (list, tuple)) else (target,)
        if class_name in names:
            found.append(name)
    return found


def hf_config_json(hf: dict[str, Any], layers: dict[str, dict[str, Any]],
                   dtype: str | None) -> bytes:
    """``config.json`` for a saved model: ``hf`` is export's ``hf_model`` entry
    (``module``, ``class``, ``config`` dict), ``layers`` its layer table.

    The class must be one ``transformers`` exports at top level (the modelling file
    looks it up there): see :func:`rebuildable`.
    """
    import transformers

    class_name = hf["class"]
    config = dict(hf["config"])
    base_type = config.get("model_type") or ""
    config_class = getattr(transformers, class_name).config_class.__name__
    auto_map = {"AutoConfig": f"modeling_tunecomp.{CLASS_PREFIX}{config_class}"}
    for auto in auto_classes(base_type, class_name):
        auto_map[auto] = f"modeling_tunecomp.{CLASS_PREFIX}{class_name}"
    config.update(
        model_type=f"tunecomp_{base_type or 'model'}",
        architectures=[f"{CLASS_PREFIX}{class_name}"],
        auto_map=auto_map,
        tunecomp={"format_version": HF_FORMAT_VERSION, "base_class": class_name,
                  "base_model_type": base_type,
                  "layers": {n: {k: e[k] for k in ("kind", "rank", "in_features",
                                                   "out_features", "bias", "origin")}
                             for n, e in layers.items()}},
    )
    if dtype is not None:
        config["dtype" if "torch_dtype" not in config else "torch_dtype"] = dtype
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def rebuildable(hf: dict[str, Any]) -> bool:
    """Whether the shipped modelling file can rebuild the model class of ``hf`` (a class
    ``transformers`` exports at top level, as all of its model classes are)."""
    import transformers

    return isinstance(getattr(transformers, hf["class"], None), type)


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files ``tokenizer.save_pretrained`` writes, ``{name: bytes}`` (any object with
    ``save_pretrained``: tokenizer, image processor, processor).

    Raises:
        TypeError: ``tokenizer`` has no ``save_pretrained``.
        ValueError: it wrote sub-directories (a saved model holds plain files only).
    """
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer must have a save_pretrained method (a transformers "
                        f"tokenizer or processor), got {type(tokenizer).__name__}")
    with tempfile.TemporaryDirectory(prefix="tunecomp-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        entries = sorted(Path(tmp).iterdir())
        nested = [p.name for p in entries if not p.is_file()]
        if nested:
            raise ValueError(f"the tokenizer wrote sub-directories {nested}: only plain files "
                             "can be saved with the model")
        return {p.name: p.read_bytes() for p in entries}


def hf_directory_files(meta_hf: dict[str, Any] | None, layers: dict[str, dict[str, Any]],
                       dtype: str | None, *, tokenizer: Any = None,
                       taken: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """The files that make a saved model a Hugging Face model directory:
    ``config.json`` and ``modeling_tunecomp.py`` for a ``transformers`` model
    (``meta_hf`` not None), and the tokenizer's files when ``tokenizer`` is given.

    Raises:
        ValueError: one of these names is already in ``taken`` (the caller's extra
            files), or the tokenizer writes a file named like a model file.
    """
    files: dict[str, bytes] = {}
    if meta_hf is not None and not rebuildable(meta_hf):
        warnings.warn(f"transformers has no top-level class {meta_hf['class']!r}: saving "
                      "without config.json (load_compressed loads it; AutoModel cannot)",
                      UserWarning, stacklevel=4)
    elif meta_hf is not None:
        files[CONFIG_FILE] = hf_config_json(meta_hf, layers, dtype)
        files[MODELING_FILE] = modeling_source()
    if tokenizer is not None:
        tok = tokenizer_files(tokenizer)
        clash = sorted(set(tok) & (set(files) | {"model.safetensors", "tunecomp.json"}))
        if clash:
            raise ValueError(f"the tokenizer writes {clash}, which the model itself uses")
        files.update(tok)
    clash = sorted(set(files) & set(taken or {}))
    if clash:
        raise ValueError(f"extra_files {clash} clash with the files of the Hugging Face model "
                         "directory; rename them")
    return files


def with_hf_files(model: nn.Module, extra_files: dict[str, bytes],
                  tokenizer: Any = None) -> dict[str, bytes]:
    """``extra_files`` (names and contents checked first) plus :func:`hf_directory_files`
    for ``model``: what :func:`~.export.save_compressed` writes beside the weights.

    Raises:
        ValueError / TypeError: a reserved or non-plain extra file name, non-bytes
            contents, or as :func:`hf_directory_files`; ValueError for a model that is
            not finalized.
    """
    from . import export  # export imports this module

    export._check_extra_files(extra_files)
    hf = export._hf_info(model)
    if hf is None and tokenizer is None:
        return extra_files
    layers = export._layer_table(model) if hf is not None else {}
    files = hf_directory_files(hf, layers, export._float_dtype(model), tokenizer=tokenizer,
                               taken=extra_files)
    return {**extra_files, **files}


# --- model.save_pretrained on a TuneComp model ------------------------------------------

GUARD_ATTR = "_tunecomp_save_guard"


def has_tunecomp_layers(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a converted TuneComp layer."""
    return any(isinstance(getattr(m, INFO_ATTR, None), TargetInfo) for m in model.modules())


def _is_exportable(model: nn.Module) -> bool:
    """Whether :func:`~.export.save_compressed` takes ``model`` (finalized layers) and no
    live controller is still training it (a compacted model mid-run has finalized-looking
    layers, but it is a training checkpoint)."""
    from . import export
    from .controller import controller_of

    controller = controller_of(model)
    if controller is not None and not controller.finalized:
        return False
    try:
        export._layer_table(model)
    except ValueError:
        return False
    return True


def _mark_not_loadable(directory: Path) -> None:
    """Rewrite the ``config.json`` HF wrote for an unfinished TuneComp model so that plain
    ``transformers`` refuses it instead of loading it with random layers."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tunecomp_base_model_type"] = config.get("model_type")
    config["model_type"] = "tunecomp_unfinalized_checkpoint"
    config["tunecomp_note"] = (
        "A TuneComp model saved during training (a training checkpoint: low-rank layers "
        "with masks and teachers). It resumes training, but is not a loadable model: "
        "call tunecomp_kernels.compress.finalize(model) then save_compressed(model, dir).")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _guarded_save_pretrained(model: nn.Module, save_directory: Any, *args: Any,
                             **kwargs: Any) -> Any:
    from .export import save_compressed

    original = type(model).save_pretrained  # looked up per call: the model stays picklable
    if not has_tunecomp_layers(model):  # e.g. after merge_and_unload
        return original(model, save_directory, *args, **kwargs)
    if _is_exportable(model):
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub is not supported for a TuneComp model: "
                             "save_compressed(model, dir) then upload dir")
        if kwargs.get("is_main_process", True) is False:  # other ranks write nothing
            return None
        return save_compressed(model, save_directory, overwrite=True)
    # A Trainer checkpoint of a model in training: keep HF's files (resuming reads the
    # weights), but make the directory unloadable by plain transformers.
    result = original(model, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True) is not False:
        _mark_not_loadable(Path(save_directory))
    return result


def guard_save_pretrained(model: nn.Module) -> nn.Module:
    """Make ``model.save_pretrained(dir)`` safe on a TuneComp model (in place; returns it).

    Plain ``save_pretrained`` writes low-rank weights under a config that plain
    ``transformers`` loads as the dense model, with the compressed layers silently
    random. Guarded, a finalized model is written by :func:`~.export.save_compressed`
    (the same loadable directory; ``state_dict=`` and other saving options are not
    used, ``push_to_hub=True`` raises ValueError); a model still in training keeps HF's
    files (Trainer checkpoints resume from them) but its ``config.json`` gets a model
    type that plain ``transformers`` refuses. A model without TuneComp layers (e.g.
    after :func:`~.merge.merge_and_unload`) saves as usual. Models without
    ``save_pretrained`` are returned unchanged. Idempotent.
    """
    original = getattr(type(model), "save_pretrained", None)
    if original is None or getattr(model, GUARD_ATTR, False):
        return model
    wrapper = functools.partial(_guarded_save_pretrained, model)
    object.__setattr__(model, "save_pretrained", functools.update_wrapper(wrapper, original))
    object.__setattr__(model, GUARD_ATTR, True)
    return model


def unguard_save_pretrained(model: nn.Module) -> None:
    """Undo :func:`guard_save_pretrained` (no-op when not guarded)."""
    if model.__dict__.pop(GUARD_ATTR, False):
        model.__dict__.pop("save_pretrained", None)
