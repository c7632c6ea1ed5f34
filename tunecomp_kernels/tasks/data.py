"""Text-classification data: read a CSV/TSV/JSONL file, split it (seeded, stratified),
tokenise and batch it.

Errors the user can fix (a missing file, an unknown column, too few rows) raise
:class:`DataError` with a one-line message that names the setting by its field name
(``train_size``, ``max_length``), never by a command-line flag: this layer does not know
which command drives it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


class DataError(ValueError):
    """A problem with the user's data or model path, phrased for the command line."""


#: The data file types :func:`load_dataset` reads.
SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".ndjson")


# --- loading -------------------------------------------------------------------------------

@dataclass
class Dataset:
    """Texts with string labels and optional per-row label confidences."""

    texts: list[str]
    labels: list[str]
    confidences: list[float | None] = field(default_factory=list)
    source: str = ""
    #: rows read but not kept, by reason (e.g. ``{"no text": 2}``)
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def dropped_summary(self) -> str:
        """One line: how many rows were dropped and why ('' when none were)."""
        total = sum(self.dropped.values())
        if not total:
            return ""
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items()))
        return f"dropped {total} of {total + len(self)} rows ({reasons})"


def normalize_label(value: object) -> str | None:
    """The class name of a raw label: numbers that are equal name one class (``5``,
    ``"5"``, ``5.0`` and ``"5.0"`` all give ``"5"``); other values are stripped strings.
    None for a missing or empty label."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def _parse_confidence(value: object, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{where}: confidence {text!r} is not a number") from None


def _read_rows(path: Path) -> tuple[list[str], Iterator[dict]]:
    """Column names and an iterator of row dicts for a .csv/.tsv or .jsonl file."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(unsupported_type(path))
    if suffix in (".csv", ".tsv"):
        handle = open(path, encoding="utf-8", errors="replace", newline="")  # noqa: SIM115
        reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
        columns = list(reader.fieldnames or [])

        def rows():
            with handle:
                yield from reader

        return columns, rows()
    records = []  # .jsonl, .json, .ndjson: one JSON object per line
    with open(path, encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            records.append(record)
    columns: list[str] = []
    for record in records:
        columns.extend(k for k in record if k not in columns)
    return columns, iter(records)


def unsupported_type(path: Path) -> str | None:
    """Why ``path`` cannot be read as data (its file type), or None if it can."""
    if path.suffix.lower() in SUFFIXES:
        return None
    return (f"{path}: unsupported file type {path.suffix.lower() or '(none)'!r}; "
            "use .csv, .tsv or .jsonl")


def _check_columns(path: Path, columns: list[str], wanted: list[tuple[str, str]]) -> None:
    for what, name in wanted:
        if name not in columns:
            raise DataError(f"{path}: no {what} column {name!r}; columns are "
                            f"{', '.join(repr(c) for c in columns) or '(none)'}")


def _row_problem(text: object, label: str | None) -> str | None:
    if text is None:
        return "with no text"
    if not str(text).strip():
        return "with an empty text"
    if label is None:
        return "with no or an empty label"
    return None


def load_dataset(
    path: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    confidence_column: str | None = None,
) -> Dataset:
    """Read a CSV/TSV (header row) or JSONL file of text/label rows.

    Labels are normalised with :func:`normalize_label` (equal numbers are one class).
    Rows with a missing or empty text or label are dropped and counted by reason in
    :attr:`Dataset.dropped`. ``confidence_column`` is optional; an empty cell there reads
    as "unknown" (``None``).

    Raises:
        DataError: the file is missing, not a file, of an unknown type or not parseable;
            a column is missing; a confidence is not a number; no row is usable.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    columns, rows = _read_rows(path)
    wanted = [("text", text_column), ("label", label_column)]
    if confidence_column is not None:
        wanted.append(("confidence", confidence_column))
    _check_columns(path, columns, wanted)
    data = Dataset([], [], [], source=str(path))
    for i, row in enumerate(rows):
        text, label = row.get(text_column), normalize_label(row.get(label_column))
        problem = _row_problem(text, label)
        if problem is not None:
            data.dropped[problem] = data.dropped.get(problem, 0) + 1
            continue
        data.texts.append(str(text).strip())
        data.labels.append(label)
        data.confidences.append(
            _parse_confidence(row.get(confidence_column), f"{path} row {i + 1}")
            if confidence_column is not None else None)
    if not data.texts:
        raise DataError(f"{path}: no rows with both a {text_column!r} and a "
                        f"{label_column!r} value")
    return data


# --- splitting -----------------------------------------------------------------------------

@dataclass
class Split:
    """One split: texts, integer labels, and the row indices in the source data set."""

    texts: list[str]
    labels: list[int]
    indices: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def summary(self) -> str:
        def counts(split: Split) -> str:
            c = Counter(split.labels)
            return "/".join(str(c.get(i, 0)) for i in range(self.num_labels))
        return (f"train {len(self.train)}, val {len(self.val)}, test {len(self.test)} "
                f"(per class {'/'.join(self.label_names)}: train {counts(self.train)}, "
                f"val {counts(self.val)}, test {counts(self.test)})")


def _sort_labels(labels: Sequence[str]) -> list[str]:
    unique = set(labels)
    try:
        return sorted(unique, key=float)
    except ValueError:
        return sorted(unique)


def _allocate(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split ``total`` into integer parts proportional to ``sizes`` (largest remainder)."""
    n = sum(sizes.values())
    exact = {k: total * v / n for k, v in sizes.items()}
    parts = {k: math.floor(x) for k, x in exact.items()}
    left = total - sum(parts.values())
    for k in sorted(exact, key=lambda k: (parts[k] - exact[k], k))[:left]:
        parts[k] += 1
    return parts


def resolve_sizes(
    available: int,
    train: int | None,
    val: int | None,
    test: int | None,
    default_train: int | None = None,
    default_val: int | None = None,
    default_test: int | None = None,
) -> tuple[int, int, int]:
    """Fill in split sizes left as ``None``: the defaults (those of
    :attr:`~.settings.JobSettings.split_sizes` unless given), shrunk to 80/10/10 of what
    there is when the data set is smaller. Sizes the caller gave are kept, and must fit.

    Raises:
        DataError: a size < 1, or more rows asked for than ``available``.
    """
    if None in (default_train, default_val, default_test):
        from .settings import full

        sizes = full().split_sizes
        default_train = sizes[0] if default_train is None else default_train
        default_val = sizes[1] if default_val is None else default_val
        default_test = sizes[2] if default_test is None else default_test
    for name, value in (("train", train), ("val", val), ("test", test)):
        if value is not None and value < 1:
            raise DataError(f"{name}_size must be >= 1, got {value}")
    val = val if val is not None else max(1, min(default_val, available // 10))
    test = test if test is not None else max(1, min(default_test, available // 10))
    if train is None:
        train = min(default_train, available - val - test)
        if train < 1:
            raise DataError(f"only {available} usable rows: too few for a train/val/test split")
    if train + val + test > available:
        raise DataError(f"train+val+test = {train}+{val}+{test} = {train + val + test} rows "
                        f"asked for, but only {available} usable rows")
    return train, val, test


def confident_rows(data: Dataset, min_confidence: float | None) -> list[int]:
    """Indices of the rows whose confidence is known and ``>= min_confidence`` (all rows
    when it is None).

    Raises:
        DataError: a filter without confidence values, or no row passes it.
    """
    keep = list(range(len(data)))
    if min_confidence is None:
        return keep
    if not data.confidences or all(c is None for c in data.confidences):
        raise DataError("a confidence filter needs a confidence column with values")
    keep = [i for i in keep
            if data.confidences[i] is not None and data.confidences[i] >= min_confidence]
    if not keep:
        raise DataError(f"no rows left after the confidence filter (>= {min_confidence})")
    return keep


def _fit_parts(parts: dict[str, int], remaining: dict[str, int],
               label_names: list[str]) -> dict[str, int]:
    """Proportions can ask for more of a small class than is left: move the excess to
    the classes with the most rows to spare."""
    for n in label_names:
        over = parts[n] - remaining[n]
        if over > 0:
            parts[n] = remaining[n]
            for m in sorted(label_names, key=lambda m: remaining[m] - parts[m], reverse=True):
                take = min(over, remaining[m] - parts[m])
                parts[m] += take
                over -= take
    return parts


def stratified_split(
    data: Dataset,
    train_size: int,
    val_size: int,
    test_size: int,
    seed: int = 0,
    min_confidence: float | None = None,
) -> Splits:
    """A seeded, stratified train/val/test split with no overlap.

    With ``min_confidence`` set, only rows whose confidence is known and ``>=`` it are used.
    Rows are shuffled per class with ``seed``; the test set is drawn first, then val, then
    train, each with the filtered data's class proportions — so the test set depends only
    on the data, the filter, the seed and ``test_size``, not on the train size.
    """
    keep = confident_rows(data, min_confidence)
    label_names = _sort_labels([data.labels[i] for i in keep])
    if len(label_names) < 2:
        raise DataError(f"need at least 2 classes, found {len(label_names)} "
                        f"({', '.join(label_names)})")
    label_id = {name: k for k, name in enumerate(label_names)}
    by_class: dict[str, list[int]] = {name: [] for name in label_names}
    for i in keep:
        by_class[data.labels[i]].append(i)
    rng = random.Random(seed)
    for name in label_names:
        rng.shuffle(by_class[name])
    total = train_size + val_size + test_size
    if total > len(keep):
        raise DataError(f"train+val+test = {total} rows asked for, but only {len(keep)} "
                        "usable rows")
    class_sizes = {name: len(rows) for name, rows in by_class.items()}
    cursor = dict.fromkeys(label_names, 0)
    chosen: dict[str, list[int]] = {}
    for split_name, size in (("test", test_size), ("val", val_size), ("train", train_size)):
        remaining = {n: class_sizes[n] - cursor[n] for n in label_names}
        parts = _fit_parts(_allocate(size, {n: class_sizes[n] for n in label_names}),
                           remaining, label_names)
        rows = []
        for n in label_names:
            rows.extend(by_class[n][cursor[n]:cursor[n] + parts[n]])
            cursor[n] += parts[n]
        random.Random(f"{seed}-{split_name}").shuffle(rows)
        chosen[split_name] = rows

    def make(rows: list[int]) -> Split:
        return Split([data.texts[i] for i in rows], [label_id[data.labels[i]] for i in rows],
                     rows)

    splits = Splits(make(chosen["train"]), make(chosen["val"]), make(chosen["test"]),
                    label_names)
    for split_name in ("train", "val", "test"):
        if len(set(getattr(splits, split_name).labels)) < 2:
            raise DataError(f"the {split_name} split has fewer than 2 classes; use more rows "
                            f"or a larger {split_name}_size")
    return splits


# --- tokenisation and batching -----------------------------------------------------------

@dataclass
class Encoded:
    """Token ids (unpadded) and labels of one split."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def encode(tokenizer, split: Split, max_length: int) -> Encoded:
    """Tokenise without padding (padding happens per batch)."""
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    out = tokenizer(split.texts, truncation=True, max_length=max_length, padding=False)
    return Encoded([list(ids) for ids in out["input_ids"]], list(split.labels))


def collate(
    input_ids: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch; returns input_ids, attention_mask, labels."""
    width = max(len(ids) for ids in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, seq in enumerate(input_ids):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[row, :len(seq)] = 1
    return {"input_ids": ids, "attention_mask": attn,
            "labels": torch.tensor(list(labels), dtype=torch.long)}


def epoch_batches(
    data: Encoded, batch_size: int, pad_id: int, seed: int, bucket: int = 50
) -> list[dict[str, torch.Tensor]]:
    """One shuffled epoch with length bucketing: shuffle, cut into chunks of
    ``bucket × batch_size``, sort each chunk by length, cut into batches, shuffle batches.
    Keeps padding low while every batch still mixes examples from across the data."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(data)))
    rng.shuffle(order)
    chunk = max(1, bucket) * batch_size
    batches_idx = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(data.input_ids[i]))
        batches_idx.extend(part[j:j + batch_size] for j in range(0, len(part), batch_size))
    rng.shuffle(batches_idx)
    return [collate([data.input_ids[i] for i in idx], [data.labels[i] for i in idx], pad_id)
            for idx in batches_idx]


def train_batches(
    data: Encoded, batch_size: int, pad_id: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of training batches, a fresh seeded shuffle each epoch."""
    epoch = 0
    while True:
        yield from epoch_batches(data, batch_size, pad_id, seed=seed * 1000 + epoch)
        epoch += 1


def eval_batches(data: Encoded, batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Batches sorted by length (least padding) for evaluation."""
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    return [collate([data.input_ids[i] for i in order[j:j + batch_size]],
                    [data.labels[i] for i in order[j:j + batch_size]], pad_id)
            for j in range(0, len(order), batch_size)]
