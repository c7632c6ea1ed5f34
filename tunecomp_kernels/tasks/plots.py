"""The PNG plots of a ``tunecomp compress`` run, as bytes to save beside the model.

Drawn on matplotlib ``Figure`` objects, which render PNG with the Agg canvas: no display,
and pyplot's global backend and figure list are left alone. When matplotlib is not
installed :func:`run_plots` returns ``None`` and the caller says so in one line.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

CURVE_FILE = "val_curve.png"
RANKS_FILE = "ranks.png"


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def curve_png(figure_class: type, curve: Sequence[dict[str, Any]]) -> bytes:
    """Val accuracy over the steps, the targeted layers' parameters on a second axis.
    ``curve``: the job's val-curve entries (``step``, ``val_accuracy``, ``params``)."""
    fig = figure_class(figsize=(6.4, 4.0))
    ax = fig.subplots()
    steps = [e["step"] for e in curve]
    ax.plot(steps, [e["val_accuracy"] for e in curve], "o-", color="tab:blue")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("val accuracy", color="tab:blue")
    with_params = [(e["step"], e["params"]) for e in curve if e.get("params") is not None]
    if with_params:
        right = ax.twinx()
        right.plot([s for s, _ in with_params], [p / 1e6 for _, p in with_params], "s--",
                   color="tab:orange")
        right.set_ylabel("targeted parameters (millions)", color="tab:orange")
    ax.set_title("TuneComp: val accuracy and targeted parameters")
    fig.tight_layout()
    return _png(fig)


def _common_prefix(names: Sequence[str]) -> str:
    """The dotted prefix that every name shares (``"bert.encoder.layer."``), so the axis
    shows only what differs."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    shared = []
    for pieces in zip(*(p[:-1] for p in parts)):
        if len(set(pieces)) != 1:
            break
        shared.append(pieces[0])
    return ".".join(shared) + "." if shared else ""


def ranks_png(figure_class: type, layers: Sequence[dict[str, Any]]) -> bytes:
    """Per targeted layer its kept rank beside its full rank ``min(in, out)``; a layer
    kept dense shows its full rank as kept. ``layers``: ``CompressionReport.to_dict()``'s
    ``layers`` entries."""
    prefix = _common_prefix([entry["name"] for entry in layers])
    names = [entry["name"][len(prefix):] for entry in layers]
    full = [min(entry["in_features"], entry["out_features"]) for entry in layers]
    kept = [f if entry["rank"] is None else entry["rank"] for entry, f in zip(layers, full)]
    fig = figure_class(figsize=(max(6.4, 0.22 * len(names) + 2), 4.4))
    ax = fig.subplots()
    positions = list(range(len(names)))
    ax.bar([p - 0.2 for p in positions], full, width=0.4, label="full rank",
           color="lightgray")
    ax.bar([p + 0.2 for p in positions], kept, width=0.4, label="kept rank", color="tab:green")
    ax.set_xticks(positions)
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("rank")
    ax.set_xlabel(f"layer (after {prefix})" if prefix else "layer")
    ax.set_title("kept rank per layer (dense layers: full rank)")
    ax.set_ylim(0, 1.25 * max(full))  # room for the legend above the bars
    ax.legend(loc="upper right", ncol=2)
    fig.tight_layout()
    return _png(fig)


def run_plots(curve: Sequence[dict[str, Any]],
              layers: Sequence[dict[str, Any]]) -> dict[str, bytes] | None:
    """``{file name: PNG bytes}`` of the val curve and of the ranks (a plot with no data
    is left out); None when matplotlib is not installed."""
    figure_class = _figure_class()
    if figure_class is None:
        return None
    files = {}
    if curve:
        files[CURVE_FILE] = curve_png(figure_class, curve)
    if layers:
        files[RANKS_FILE] = ranks_png(figure_class, layers)
    return files
