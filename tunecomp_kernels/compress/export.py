"""Save and load finalized TuneComp models.

A saved model is a directory holding

* ``model.safetensors``: the model's state dict (tied tensors stored once);
* ``tunecomp.json``: per converted layer its kind (``"lowrank"`` or ``"dense"``), rank and
  original shape, the :class:`TuneCompConfig`, the tied-tensor aliases, the dtype and,
  for Hugging Face models, the model class and its config (``config.to_json_string()``);
  for other models the hyperparameters of their modules (``modules``), which
  :func:`load_compressed` (in :mod:`.load`) compares with the model it is given.

Loading needs no training code path: for HF models :func:`load_compressed` rebuilds the
architecture from the saved config (no hub access), swaps in
:class:`~tunecomp_kernels.MaskedLowRankLinear` layers of the saved ranks and loads the
weights; for any other model the caller passes an uncompressed instance of the same
architecture, checked against the saved one first. Saving is atomic: files go to a
temporary sibling directory and are moved into place only when complete and read back
equal, so a failure never leaves a half-written directory nor touches an existing good
one; files in the directory that the library did not write are never touched
(:mod:`.output_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .base_model import module_signature
from .budget import lowrank_is_smaller
from .checkpoint import atomic_write, fsync_path
from .config import TuneCompConfig
from .hf_format import with_hf_files
from .load import load_compressed  # noqa: F401  (re-exported: callers import it here)
from .output_dir import META_FILE, check_destination, install_files, staging_dir
from .prepare import CONFIG_ATTR
from .targets import INFO_ATTR, TargetInfo

WEIGHTS_FILE = "model.safetensors"
FORMAT = "tunecomp_kernels.compressed"
FORMAT_VERSION = 1


# --- saving ---------------------------------------------------------------------------


def _layer_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        info = getattr(mod, INFO_ATTR, None)
        if not isinstance(info, TargetInfo):
            continue
        entry = {"in_features": info.in_features, "out_features": info.out_features,
                 "bias": info.bias, "origin": info.origin}
        if isinstance(mod, MaskedLowRankLinear):
            zero_mask = bool((mod.mask == 0).any())
            if mod.teacher_weight is not None or zero_mask or not lowrank_is_smaller(
                    mod.rank, info):
                raise ValueError(
                    f"layer {name!r} is not finalized (teacher, pruned ranks or a rank that "
                    "is not smaller than dense): call finalize(model) before save_compressed"
                )
            entry.update(kind="lowrank", rank=mod.rank)
        else:
            entry.update(kind="dense", rank=None)
        table[name] = entry
    if not table:
        raise ValueError("the model has no TuneComp layers: prepare, train and finalize it first")
    return table


def _hf_info(model: nn.Module) -> dict[str, Any] | None:
    cls = type(model)
    config = getattr(model, "config", None)
    if not cls.__module__.startswith("transformers.") or not hasattr(config, "to_json_string"):
        return None
    return {"module": cls.__module__, "class": cls.__name__,
            "config": _portable_config(config)}


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors identical to an earlier one (tied weights) and make the rest
    independent, contiguous CPU tensors. Returns ``(tensors, {alias: kept_name})``."""
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        t = t.detach()
        if t.numel():
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(),
                   tuple(t.shape), t.stride(), t.dtype)
            if key in seen:
                tied[name] = seen[key]
                continue
            seen[key] = name
        kept[name] = t
    owners: dict[tuple, int] = {}
    for t in kept.values():
        if t.numel():
            k = (t.device, t.untyped_storage().data_ptr())
            owners[k] = owners.get(k, 0) + 1
    out = {}
    for name, t in kept.items():
        whole = t.numel() * t.element_size() == t.untyped_storage().nbytes()
        shared = t.numel() and owners[(t.device, t.untyped_storage().data_ptr())] > 1
        t = t.to("cpu")
        out[name] = t.clone() if (shared or not whole or not t.is_contiguous()) else t
    return out, tied


def _float_dtype(model: nn.Module) -> str | None:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return None


def _portable_config(config: Any) -> dict[str, Any]:
    """The HF config as JSON, without the machine path it was loaded from."""
    data = json.loads(config.to_json_string(use_diff=False))
    name = data.get("_name_or_path")
    if isinstance(name, str) and os.path.isabs(name):
        data["_name_or_path"] = Path(name).name
    return data


def _write_model_files(tmp: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                       extra_files: dict[str, bytes]) -> list[str]:
    """Write, fsync and verify every file of a saved model into ``tmp``; their names."""
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    fsync_path(tmp / WEIGHTS_FILE)
    back = load_file(str(tmp / WEIGHTS_FILE))
    bad = [n for n, t in tensors.items() if n not in back or not torch.equal(back[n], t)]
    if bad or len(back) != len(tensors):
        raise OSError(f"the weights written to {tmp} do not read back equal ({bad[:3]})")
    for name, data in extra_files.items():
        (tmp / name).write_bytes(data)
        fsync_path(tmp / name)
    with open(tmp / META_FILE, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    return meta["files"]


def _check_extra_files(extra_files: dict[str, bytes]) -> None:
    for name, data in extra_files.items():
        if name in (WEIGHTS_FILE, META_FILE) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"extra file name {name!r} is reserved or not a plain file name")
        if not isinstance(data, bytes):
            raise TypeError(f"extra file {name!r} must be bytes, got {type(data).__name__}")


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    config: TuneCompConfig | None = None,
    overwrite: bool = True,
    extra_files: dict[str, bytes] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Save a finalized model to directory ``path`` atomically; returns the path.

    Args:
        model: a model after :func:`~.finalize.finalize`.
        path: target directory, created if missing. An existing saved model there is
            replaced (with ``overwrite``) only once the new files are complete and read
            back equal; files in it that this library did not write are kept. Any other
            non-empty directory is refused.
        config: the run's config to record (default: the one ``prepare`` attached).
        overwrite: replace a saved model at ``path`` (default True); False refuses.
        extra_files: more files to save with the model, ``{file name: contents}`` (e.g.
            a run summary); they are owned by the saved model and replaced with it.
        tokenizer: saved too (anything with ``save_pretrained``); see :mod:`.hf_format`.

    Raises:
        ValueError: the model is not finalized or has no TuneComp layers; ``path`` is the
            current, a parent or the home directory.
        FileExistsError: ``path`` is an unrelated non-empty directory, or a saved model
            and ``overwrite`` is False.
        NotADirectoryError / PermissionError: ``path`` cannot be created or written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = Path(path)
    extra_files = with_hf_files(model, dict(extra_files or {}), tokenizer)  # checks names
    layers = _layer_table(model)
    config = config if config is not None else getattr(model, CONFIG_ATTR, None)
    tensors, tied = _dedupe(model.state_dict())
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "files": [WEIGHTS_FILE, META_FILE, *sorted(extra_files)],
        "layers": layers,
        "tied": tied,
        "dtype": _float_dtype(model),
        "tunecomp_config": config.to_dict() if isinstance(config, TuneCompConfig) else None,
        "hf_model": _hf_info(model),
    }
    # a model without an HF config is checked on load by its modules' hyperparameters
    meta["modules"] = None if meta["hf_model"] else module_signature(model, skip=layers)
    check_destination(path, overwrite=overwrite, allow_foreign=(path / META_FILE).is_file())
    tmp = staging_dir(path)
    try:
        names = _write_model_files(tmp, tensors, meta, extra_files)
        install_files(tmp, path, names)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own staging directory
        raise
    return path


def add_files(path: str | os.PathLike[str], files: dict[str, bytes]) -> None:
    """Add (or replace) files beside a saved model, e.g. a run summary written after the
    model was saved; each is written atomically and recorded as the model's own, so a
    later ``save_compressed(..., overwrite=True)`` replaces or removes it.

    Raises:
        FileNotFoundError: no saved model at ``path``.
        ValueError / TypeError: a reserved name or non-bytes contents.
    """
    path = Path(path)
    _check_extra_files(files)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no saved TuneComp model at {path}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    for name, data in files.items():
        atomic_write(path / name, lambda tmp, data=data: tmp.write_bytes(data))
    meta["files"] = sorted(set(meta.get("files", [WEIGHTS_FILE, META_FILE])) | set(files))
    text = json.dumps(meta, indent=1, sort_keys=True)
    atomic_write(meta_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --- loading --------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``tunecomp.json`` of a saved model, validated."""
    path = Path(path)
    if not path.is_dir():
        backups = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        hint = (f"; an interrupted save left the previous model at {backups[-1]}: rename it "
                f"back to {path.name}" if backups and not path.exists() else "")
        raise FileNotFoundError(f"no saved TuneComp model at {path} (not a directory){hint}")
    for fname in (META_FILE, WEIGHTS_FILE):
        if not (path / fname).is_file():
            raise FileNotFoundError(f"{path} is missing {fname}: not a complete saved model")
    try:
        with open(path / META_FILE, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path / META_FILE} is corrupt: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path / META_FILE} is not a TuneComp model description")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / META_FILE} has format version {meta.get('version')}; "
            f"this library reads version {FORMAT_VERSION}"
        )
    if not isinstance(meta.get("layers"), dict) or not meta["layers"]:
        raise ValueError(f"{path / META_FILE} lists no layers")
    for name, entry in meta["layers"].items():
        _check_layer_entry(path / META_FILE, name, entry)
    _check_meta_fields(path / META_FILE, meta)
    return meta


def _check_layer_entry(where: Path, name: str, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: layer {name!r} is described by a "
                         f"{type(entry).__name__}, not an object")
    for key, kind in (("in_features", int), ("out_features", int), ("bias", bool),
                      ("origin", str), ("kind", str)):
        value = entry.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where}: layer {name!r} has a missing or invalid {key!r}: "
                             f"{value!r}")
    in_f, out_f = entry["in_features"], entry["out_features"]
    if min(in_f, out_f) < 1:
        raise ValueError(f"{where}: layer {name!r} has (in, out)=({in_f}, {out_f})")
    if entry["origin"] not in ("linear", "conv1d"):
        raise ValueError(f"{where}: layer {name!r} has unknown origin {entry['origin']!r}")
    if entry["kind"] == "lowrank":
        rank = entry.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_f,
                                                                                       out_f):
            raise ValueError(f"{where}: layer {name!r} has rank {rank!r}, expected an int in "
                             f"[1, {min(in_f, out_f)}]")
    elif entry["kind"] != "dense":
        raise ValueError(f"{where}: layer {name!r} has unknown kind {entry['kind']!r}")


def _check_meta_fields(where: Path, meta: dict[str, Any]) -> None:
    dtype = meta.get("dtype")
    if dtype is not None and not (isinstance(dtype, str)
                                  and isinstance(getattr(torch, dtype, None), torch.dtype)):
        raise ValueError(f"{where}: unknown dtype {dtype!r}")
    tied = meta.get("tied", {})
    if not isinstance(tied, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise ValueError(f"{where}: 'tied' must map tensor names to tensor names")
    hf = meta.get("hf_model")
    if hf is not None and not (isinstance(hf, dict) and isinstance(hf.get("module"), str)
                               and isinstance(hf.get("class"), str)
                               and isinstance(hf.get("config"), dict)):
        raise ValueError(f"{where}: 'hf_model' must hold 'module', 'class' and 'config'")
    config = meta.get("tunecomp_config")
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{where}: 'tunecomp_config' must be an object")
