"""The summary of a ``tunecomp compress`` run: the table printed at the end, the one-line
headline (:func:`headline`) and the ``summary.json`` saved with the model, whose numbers
carry their units in their names (:func:`with_units`, :data:`UNITS`)."""

from __future__ import annotations

import json
from typing import Any

COLUMNS = [("model", "model"), ("val", "val acc"), ("test", "test acc"),
           ("params", "block linears"), ("model_params", "all params"),
           ("size", "size on disk"), ("latency", "CPU latency")]


def fmt_params(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[title for _, title in columns]]
    cells += [[str(row.get(key, "-")) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


NOT_MEASURED = "not measured"


def _fmt_latency(row: dict[str, Any]) -> str:
    if row.get("latency") is None:
        return "-"
    iqr = row.get("latency_ms_iqr")
    return f"{row['latency']:.1f} ms" + ("" if iqr is None else f" (IQR {iqr:.1f})")


def _row(row: dict[str, Any]) -> dict[str, str]:
    def acc(key: str) -> str:
        if row.get(key) is None:
            return NOT_MEASURED if row.get("accuracy") == NOT_MEASURED else "-"
        return f"{row[key]:.4f}"

    return {"model": row["model"], "val": acc("val"), "test": acc("test"),
            "params": fmt_params(row.get("params")),
            "model_params": fmt_params(row.get("model_params")),
            "size": fmt_bytes(row.get("size")), "latency": _fmt_latency(row)}


def summary_table(dense_row: dict[str, Any], comp_row: dict[str, Any],
                  majority_row: dict[str, Any] | None = None) -> str:
    """The dense (original), compressed and (if given) majority-class rows as a table."""
    rows = [dense_row, comp_row] + ([majority_row] if majority_row is not None else [])
    return table([_row(r) for r in rows], COLUMNS)


def footnotes(compare_dense: bool, latency_shape: tuple[int, int], threads: int,
              batches: int = 1, repeats: int = 20) -> list[str]:
    """What the table's rows and its latency column mean (``latency_shape``: the
    first timed batch's (texts, tokens))."""
    dense = ("dense (original): the starting architecture, uncompressed (safetensors size, "
             "same latency batches)")
    dense += ("; its accuracy is a dense fine-tune with the same data and steps "
              "(--compare-dense)" if compare_dense else
              "; its accuracy is not measured: run with --compare-dense for a dense "
              "fine-tune with the same data and steps (doubles the time)")
    majority = ("majority class: the share of each split in the train split's most "
                "frequent class (what always guessing it scores)")
    plural = "thread" if threads == 1 else "threads"
    latency = (f"CPU latency: median and interquartile range over {repeats} repeats of the "
               f"mean forward time on {batches} test batch{'es' if batches != 1 else ''} "
               f"of up to {latency_shape[0]} texts (the first padded to {latency_shape[1]} "
               f"tokens), the two models interleaved batch by batch, {threads} {plural}")
    return [dense, majority, latency]


def with_units(row: dict[str, Any], latency: dict[str, float] | None) -> dict[str, Any]:
    """``row`` plus its values under names that carry their unit: ``size_bytes``,
    ``size_mib``, ``latency_ms`` (median) with ``latency_ms_iqr``, ``_q1``, ``_q3``,
    ``_min``, ``_max`` from ``latency`` (see :func:`~.classifier.spread`). The older
    keys (``size`` in bytes, ``latency`` in ms) are kept."""
    out = dict(row)
    if row.get("size") is not None:
        out["size_bytes"] = row["size"]
        out["size_mib"] = row["size"] / 2**20
    if latency is not None:
        out["latency"] = latency["median"]
        out["latency_ms"] = latency["median"]
        for key in ("iqr", "q1", "q3", "min", "max"):
            out[f"latency_ms_{key}"] = latency[key]
    return out


#: The unit of every number in summary.json's ``dense`` and ``compressed`` rows.
UNITS = {
    "size": "bytes (older name of size_bytes)", "size_bytes": "bytes on disk",
    "size_mib": "MiB (2**20 bytes)", "latency": "ms, median (older name of latency_ms)",
    "latency_ms": "ms per batch, median over the repeats",
    "latency_ms_iqr": "ms, q3 - q1 over the repeats", "latency_ms_q1": "ms",
    "latency_ms_q3": "ms", "latency_ms_min": "ms", "latency_ms_max": "ms",
    "params": "weights of the targeted block linears (count)",
    "model_params": "all parameters of the model (count)",
    "val": "accuracy (fraction correct)", "test": "accuracy (fraction correct)",
}


def _speed(ratio: float) -> str:
    return f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"


def _accuracy_text(points: float | None, dense_row: dict[str, Any],
                   comp_row: dict[str, Any]) -> str:
    if points is None:
        return ("accuracy against dense not measured (run with --compare-dense); "
                f"test {comp_row['test']:.4f}")
    return (f"{points:+.1f} points against dense (test {comp_row['test']:.4f} vs "
            f"{dense_row['test']:.4f})").replace("+-", "-")


def headline(dense_row: dict[str, Any], comp_row: dict[str, Any],
             ratio: dict[str, float], majority: dict[str, Any]) -> dict[str, Any]:
    """Was it worth it, in numbers and one line (``text``): size on disk (compressed vs
    dense, MiB and %), the speed-up (dense / compressed median latency; its spread: the
    quartiles and range of the paired per-repeat ratios), test accuracy against dense in
    points (None without a dense reference) and the majority-class rate of the test split.

    ``ratio``: :func:`~.classifier.spread` of the per-repeat dense / compressed times;
    ``majority``: ``{"label", "test"}`` (see the job's majority row)."""
    dense_mib, comp_mib = dense_row["size"] / 2**20, comp_row["size"] / 2**20
    smaller = 100.0 * (1.0 - comp_row["size"] / dense_row["size"])
    points = (None if dense_row.get("test") is None
              else 100.0 * (comp_row["test"] - dense_row["test"]))
    size = (f"{abs(smaller):.0f} % {'smaller' if smaller >= 0 else 'larger'} on disk "
            f"({comp_mib:.2f} vs {dense_mib:.2f} MiB)")
    speedup = dense_row["latency_ms"] / comp_row["latency_ms"]
    speed = (f"{_speed(speedup)} ({comp_row['latency_ms']:.1f} vs "
             f"{dense_row['latency_ms']:.1f} ms median; paired per-repeat speed-up IQR "
             f"{ratio['q1']:.2f}–{ratio['q3']:.2f}, min–max {ratio['min']:.2f}–"
             f"{ratio['max']:.2f})")
    text = (f"headline: {size}, {speed}, {_accuracy_text(points, dense_row, comp_row)}, "
            f"majority-class rate {majority['test']:.4f} ({majority['label']!r})")
    return {"text": text, "size_mib": comp_mib, "dense_size_mib": dense_mib,
            "smaller_pct": smaller, "speedup": speedup, "speedup_paired_median": ratio["median"],
            "speedup_q1": ratio["q1"], "speedup_q3": ratio["q3"],
            "speedup_min": ratio["min"], "speedup_max": ratio["max"],
            "accuracy_points": points, "majority_label": majority["label"],
            "majority_test": majority["test"]}


def summary_json(summary: dict[str, Any]) -> bytes:
    """``summary.json``'s contents."""
    return json.dumps(summary, indent=1).encode("utf-8")
