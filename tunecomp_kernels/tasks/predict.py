"""``tunecomp predict``: label the texts of a file with a model saved by ``tunecomp compress``.

The model directory holds the model and its tokenizer (``save_compressed(...,
tokenizer=...)``); the predictions (source row, text, predicted label, its probability)
go to a new ``.csv``, ``.tsv`` or ``.jsonl`` file, written atomically, or to stdout as CSV.
Every path is checked before the model is loaded: an existing output file is replaced
only with ``--overwrite``; the data file itself, a directory and a file inside the model
directory (which holds only the library's files) are never written.

Exit status: 0 done; 2 bad input (one line on stderr, prefixed ``tunecomp predict: error:``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..compress.checkpoint import atomic_write
from ..compress.output_dir import _probe_writable
from . import classifier as clf
from . import data as td

PROG = "tunecomp predict"
OUTPUT_SUFFIXES = (".csv", ".tsv", ".jsonl")
#: Max tokens per text when the model directory's summary.json does not say.
DEFAULT_MAX_LENGTH = 128
COLUMNS = ("row", "text", "label", "probability")


class PredictError(ValueError):
    """Bad input to ``tunecomp predict``: reported as one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tunecomp predict``."""
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a model directory saved by tunecomp compress")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help=".csv, .tsv or .jsonl file of texts")
    parser.add_argument("--text-column", default="text", metavar="NAME",
                        help="the column of the texts (default 'text')")
    parser.add_argument("--output", metavar="FILE",
                        help="new .csv, .tsv or .jsonl file of the predictions (row, text, "
                             "label, probability); default: CSV on stdout")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output file")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N",
                        help="texts per forward pass (default 64)")
    parser.add_argument("--max-length", type=int, default=None, metavar="N",
                        help="max tokens per text (default: the training run's, from the "
                             f"model's summary.json, else {DEFAULT_MAX_LENGTH})")


def check_output(output: Path, *, overwrite: bool, data: Path, model_dir: Path) -> None:
    """Refuse an output path before any prediction.

    Raises:
        PredictError: an unknown suffix; the data file itself; a path inside the model
            directory; a directory; a missing or unwritable parent; an existing file
            without ``overwrite``.
    """
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise PredictError(f"--output: {output}: unsupported file type "
                           f"{output.suffix.lower() or '(none)'!r}; use .csv, .tsv or .jsonl")
    resolved = output.resolve()
    if resolved == data.resolve():
        raise PredictError(f"--output: {output} is the data file; choose a new file")
    if resolved.parent == model_dir.resolve():
        raise PredictError(f"--output: {output} lies in the model directory, which holds "
                           "only the library's files; choose a file elsewhere")
    if output.is_dir():
        raise PredictError(f"--output: {output} is a directory; name a file")
    if not output.parent.is_dir():
        raise PredictError(f"--output: the directory {output.parent} does not exist")
    if output.exists() and not overwrite:
        raise PredictError(f"--output: {output} exists; pass --overwrite to replace it")
    try:
        _probe_writable(output.parent, output)
    except PermissionError as exc:
        raise PredictError(f"--output: {exc}") from None


def read_texts(path: Path, column: str) -> tuple[list[int], list[str], int]:
    """(1-based row numbers, texts, rows skipped for an empty text) of a data file.

    Raises:
        PredictError: an unreadable file, an unknown type or a missing column.
    """
    if not path.is_file():
        raise PredictError(f"--data: file not found: {path}")
    try:
        columns, rows = td._read_rows(path)
        td._check_columns(path, columns, [("text", column)])
    except td.DataError as exc:
        raise PredictError(f"--data: {exc}") from None
    numbers, texts, skipped = [], [], 0
    for number, row in enumerate(rows, 1):
        text = row.get(column)
        if text is None or not str(text).strip():
            skipped += 1
            continue
        numbers.append(number)
        texts.append(str(text).strip())
    if not texts:
        raise PredictError(f"--data: {path} has no row with a {column!r} text")
    return numbers, texts, skipped


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    pad_id: int
    max_length: int


def _load(model_dir: Path, max_length: int | None) -> _Loaded:
    from transformers.utils import logging as hf_logging

    from ..compress.export import load_compressed, read_metadata

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the saved config's model_type is ours, on purpose
    try:
        read_metadata(model_dir)
        model = load_compressed(model_dir)
        tokenizer = load_saved_tokenizer(model_dir)
        pad_id = clf.padding_token_id(tokenizer, model_dir)
    except (OSError, ValueError) as exc:
        raise PredictError(f"--model: {str(exc).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if max_length is None:
        max_length = _trained_max_length(model_dir) or DEFAULT_MAX_LENGTH
    return _Loaded(model.eval(), tokenizer, pad_id, max_length)


def load_saved_tokenizer(model_dir: Path) -> Any:
    """The tokenizer saved beside a compressed model, by the class its
    ``tokenizer_config.json`` names (``AutoTokenizer`` would read the model's
    ``config.json`` and ask to run its modelling code).

    Raises:
        PredictError: the directory holds no tokenizer or it cannot be loaded.
    """
    import transformers

    config_path = model_dir / "tokenizer_config.json"
    if not config_path.is_file() and not (model_dir / "tokenizer.json").is_file():
        raise PredictError(f"--model: {model_dir} holds no tokenizer (saved without one); "
                           "save it again with tunecomp compress")
    name = ""
    if config_path.is_file():
        name = json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class") or ""
    fast = (model_dir / "tokenizer.json").is_file()
    candidates = ([name + "Fast"] if fast and not name.endswith("Fast") else []) + [name]
    found = [getattr(transformers, c) for c in candidates if c and hasattr(transformers, c)]
    cls = found[0] if found else transformers.PreTrainedTokenizerFast
    try:
        return cls.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise PredictError(f"--model: {model_dir}: cannot load its tokenizer "
                           f"({str(exc).splitlines()[0]})") from None


def _trained_max_length(model_dir: Path) -> int | None:
    try:
        summary = json.loads((model_dir / "summary.json").read_text(encoding="utf-8"))
        return int(summary["settings"]["max_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def predict_texts(loaded: _Loaded, texts: list[str],
                  batch_size: int) -> list[tuple[str, float]]:
    """(label name, its probability) per text, in order."""
    ids = loaded.tokenizer(texts, truncation=True, max_length=loaded.max_length,
                           padding=False)["input_ids"]
    names = loaded.model.config.id2label
    out: list[tuple[str, float]] = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            batch = td.collate(chunk, [0] * len(chunk), loaded.pad_id)
            logits = loaded.model(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).logits
            probs = torch.softmax(logits.float(), dim=-1)
            best, index = probs.max(dim=-1)
            out.extend((str(names.get(int(k), k)), float(p))
                       for k, p in zip(index.tolist(), best.tolist()))
    return out


def format_rows(rows: list[dict[str, Any]], suffix: str) -> str:
    """The predictions as CSV/TSV (header row) or JSONL text."""
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, delimiter="\t" if suffix == ".tsv" else ",",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _check_args(args: argparse.Namespace) -> tuple[Path, Path, Path | None]:
    model_dir, data = Path(args.model), Path(args.data)
    if args.batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 2:
        raise PredictError(f"--max-length must be >= 2, got {args.max_length}")
    if not model_dir.is_dir():
        raise PredictError(f"--model: directory not found: {model_dir}")
    output = Path(args.output) if args.output else None
    if output is not None:
        check_output(output, overwrite=args.overwrite, data=data, model_dir=model_dir)
    return model_dir, data, output


def run(args: argparse.Namespace) -> int:
    """Run ``tunecomp predict``; returns the exit status."""
    try:
        model_dir, data, output = _check_args(args)
        numbers, texts, skipped = read_texts(data, args.text_column)
        loaded = _load(model_dir, args.max_length)
        predictions = predict_texts(loaded, texts, args.batch_size)
    except PredictError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    rows = [{"row": n, "text": t, "label": label, "probability": round(p, 6)}
            for n, t, (label, p) in zip(numbers, texts, predictions)]
    if skipped:
        print(f"{PROG}: skipped {skipped} row{'s' if skipped != 1 else ''} with no "
              f"{args.text_column!r} text",
              file=sys.stderr)
    if output is None:
        sys.stdout.write(format_rows(rows, ".csv"))
        return 0
    text = format_rows(rows, output.suffix.lower())
    atomic_write(output, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))
    print(f"{len(rows)} predictions written to {output}")
    return 0
