"""The summary of a ``tunecomp compress`` run: the table printed at the end and the
``summary.json`` saved with the model."""

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


def _row(row: dict[str, Any]) -> dict[str, str]:
    def acc(key: str) -> str:
        return "-" if row.get(key) is None else f"{row[key]:.4f}"

    latency = row.get("latency")
    return {"model": row["model"], "val": acc("val"), "test": acc("test"),
            "params": fmt_params(row.get("params")),
            "model_params": fmt_params(row.get("model_params")),
            "size": fmt_bytes(row.get("size")),
            "latency": "-" if latency is None else f"{latency:.1f} ms"}


def summary_table(dense_row: dict[str, Any], comp_row: dict[str, Any]) -> str:
    """The dense (original) and compressed rows as a table."""
    return table([_row(dense_row), _row(comp_row)], COLUMNS)


def footnotes(compare_dense: bool, latency_shape: tuple[int, int], threads: int) -> list[str]:
    """What the table's rows and its latency column mean."""
    dense = ("dense (original): the starting architecture, uncompressed (safetensors size, "
             "same latency batch)")
    dense += ("; its accuracy is a dense fine-tune with the same data and steps "
              "(--compare-dense)" if compare_dense else
              "; run with --compare-dense for its fine-tuned accuracy")
    plural = "thread" if threads == 1 else "threads"
    latency = (f"CPU latency: median forward time (the two models timed alternately) of one "
               f"batch of {latency_shape[0]} test texts (padded to {latency_shape[1]} tokens), "
               f"{threads} {plural}")
    return [dense, latency]


def summary_json(summary: dict[str, Any]) -> bytes:
    """``summary.json``'s contents."""
    return json.dumps(summary, indent=1).encode("utf-8")
