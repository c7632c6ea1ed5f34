"""Plots and the markdown table of the CPU benchmarks, from the JSON in ``bench/results/``.

Reads (whatever exists; a missing input skips its plot with a message):

* ``layer_ratio.json`` (``bench/layer_ratio.py``)   -> ``speedup_vs_rank.png``
* ``e2e_minilm.json`` / ``e2e_llama.json`` / ``e2e_minilm_compile.json``
  (``bench/e2e.py``)                               -> ``memory_vs_method.png``
* ``reproduction*.json`` (``bench/reproduce.py``, the TuneComp reproduction)
                                                    -> ``accuracy_vs_params.png``
* ``e2e_minilm_interleaved.json``, ``ops_cpu.json`` -> tables only

and writes ``benchmarks.md``: the measured tables, each goal met or missed with its figure,
and the command that produced every input.

Usage::

    python bench/plots.py [--results bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

GOAL_INFER = 1.6  # exported 50 % MiniLM vs dense at 32x128
GOAL_TRAIN_AFTER = 1.5  # training step after the teacher is dropped vs dense
GOAL_LAYER = 1.1  # low-rank layer time ratio / ideal FLOP ratio
GOAL_MEMORY = 0.8  # joint (blend active) peak RSS / dense full fine-tune, Llama-style


def load(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        print(f"skipping {path}: not valid JSON ({exc})")
        return None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- plots -----------------------------------------------------------------------------


def plot_speedup(layer: dict, out: Path) -> None:
    plt = _plt()
    modes = sorted({r["mode"] for r in layer["rows"]})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in layer["rows"] if r["mode"] == mode]
        for i, shape in enumerate(sorted({(r["in"], r["out"]) for r in rows})):
            rs = sorted((r for r in rows if (r["in"], r["out"]) == shape),
                        key=lambda r: r["rank_fraction"])
            x = [r["rank_fraction"] for r in rs]
            color = f"C{i}"
            ax.plot(x, [1 / r["lowrank_ratio"] for r in rs], "o-", color=color,
                    label=f"{shape[0]}x{shape[1]} measured")
            ax.plot(x, [1 / r["ideal_ratio"] for r in rs], ":", color=color,
                    label=f"{shape[0]}x{shape[1]} ideal (FLOPs)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1 / 8, 1 / 4, 1 / 2], ["d/8", "d/4", "d/2"])
        ax.set_xlabel("rank r (d = min(in, out))")
        ax.set_ylabel("speedup over dense nn.Linear")
        ax.set_title(f"low-rank layer, {mode} ({rows[0]['tokens']} tokens)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    env = layer.get("environment", {})
    fig.suptitle(f"CPU: {env.get('cpu', '?')}, {env.get('torch_threads', '?')} thread(s), "
                 f"torch {env.get('torch', '?')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def _train_entries(e2e: dict) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in e2e["summary"].items() if "tokens_per_s" in v]


def plot_memory(e2es: dict[str, dict], out: Path) -> None:
    plt = _plt()
    models = [m for m in e2es if _train_entries(e2es[m])]
    if not models:
        print("no training results: skipping the memory plot")
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        entries = _train_entries(e2es[model])
        names = [k for k, _ in entries]
        peaks = [(v.get("train_peak_rss_mib") or v["peak_rss_mib"]) / 1024 for _, v in entries]
        base = [v["rss_after_model_mib"] / 1024 for _, v in entries]
        colors = ["k" if n == "train_dense" else "tab:blue" for n in names]
        ax.bar(range(len(names)), peaks, color=colors, alpha=0.8,
               label="peak RSS of the training steps")
        ax.bar(range(len(names)), base, color="grey", alpha=0.5,
               label="RSS after loading the model")
        dense = dict(entries).get("train_dense")
        if dense is not None and model.startswith("llama"):
            dense_peak = dense.get("train_peak_rss_mib") or dense["peak_rss_mib"]
            ax.axhline(GOAL_MEMORY * dense_peak / 1024, color="red", ls="--",
                       lw=1, label=f"goal: {GOAL_MEMORY}x dense")
        ax.set_xticks(range(len(names)), [n.replace("train_", "") for n in names],
                      rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("GiB")
        cfg = e2es[model].get("config", {})
        ckpt = ", activation checkpointing" if cfg.get("grad_ckpt") else ""
        ax.set_title(f"{model.split('_')[0]}: training step, batch {cfg.get('batch')}x"
                     f"{cfg.get('seq')}{ckpt}", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def _repro_rows(data: dict) -> list[dict]:
    rows = data.get("table") or data.get("rows") or []
    return [r for r in rows if "params" in r and ("test_mean" in r or "test_accuracy" in r)]


def plot_accuracy(repro: dict[str, dict], out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, data in repro.items():
        rows = _repro_rows(data)
        methods: dict[str, list[dict]] = {}
        for r in rows:
            methods.setdefault(r.get("title") or r.get("method", "?"), []).append(r)
        for label, rs in methods.items():
            rs = sorted(rs, key=lambda r: r["params"])
            acc = [100 * r.get("test_mean", r.get("test_accuracy")) for r in rs]
            err = [100 * r.get("test_std", 0.0) for r in rs]
            ax.errorbar([r["params"] / 1e6 for r in rs], acc, yerr=err, marker="o", capsize=3,
                        linestyle="-" if len(rs) > 1 else "none",
                        label=label if len(repro) == 1 else f"{label} ({name})")
    ax.set_xlabel("compressed-layer parameters (millions)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("TuneComp reproduction: accuracy vs parameters", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


# --- markdown --------------------------------------------------------------------------


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _fmt(v, spec=".2f", none="—") -> str:
    return none if v is None else format(v, spec)


def md_layer(layer: dict) -> list[str]:
    lines = ["### Low-rank layer vs dense `nn.Linear` (time ratio vs ideal FLOP ratio)", "",
             f"Command: `{layer['environment']['command']}` — "
             f"{layer['environment']['date_utc']} UTC, {layer['environment']['cpu']}, "
             f"{layer['environment']['torch_threads']} thread(s), load average at start "
             f"{_fmt((layer['environment'].get('load_average_at_start') or [None])[0], '.1f')}.",
             "",
             "| shape (in x out) | r | mode | dense ms | low-rank ms | measured ratio | ideal "
             "ratio | measured / ideal | two F.linear / ideal | goal ≤ 1.1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in layer["rows"]:
        frac = round(1 / r["rank_fraction"])
        lines.append(
            f"| {r['in']}x{r['out']} | {r['rank']} (d/{frac}) | {r['mode']} | "
            f"{r['dense_ms']:.1f} | {r['lowrank_ms']:.1f} | {r['lowrank_ratio']:.3f} | "
            f"{r['ideal_ratio']:.3f} | {r['lowrank_vs_ideal']:.2f} | "
            f"{r['two_linear_vs_ideal']:.2f} | {_met(r['goal_met'])} |")
    return lines + [""]


def md_e2e(model: str, e2e: dict) -> list[str]:
    env, cfg, summary = e2e["environment"], e2e["config"], e2e["summary"]
    load_avg = (env.get("load_average_at_start") or [None])[0]
    end_avg = (env.get("load_average_at_end") or [None])[0]
    at_end = f", at end {end_avg:.1f}" if end_avg is not None else ""
    lines = [f"### End to end: {model}", "",
             f"Command: `{env['command']}` — {env['date_utc']} UTC, {env['cpu']}, "
             f"{env['torch_threads']} thread(s), {cfg.get('rounds')} round(s) of fresh "
             f"processes, load average at start {_fmt(load_avg, '.1f')}{at_end}.",
             ""]
    train = [(k, v) for k, v in summary.items() if "tokens_per_s" in v]
    if train:
        ckpt = ", activation checkpointing on every method" if cfg.get("grad_ckpt") else ""
        lines += [f"Training step, batch {cfg['batch']}x{cfg['seq']}{ckpt} (AdamW). Peak "
                  "RSS of the training steps (the kernel's high-water mark reset after "
                  "set-up) and of the whole process (set-up included: loading, `prepare`'s "
                  "SVDs). Tokens/s here come from one fresh process per method at different "
                  "times: use the interleaved table for speed ratios.", "",
                  "| method | peak RSS, training steps (MiB) | vs dense | peak RSS, whole "
                  "process (MiB) | vs dense | trainable params | teacher buffers (MiB) | "
                  "tokens/s |", "|---|---|---|---|---|---|---|---|"]
        for k, v in train:
            lines.append(
                f"| {k} | {_fmt(v.get('train_peak_rss_mib'), '.0f')} | "
                f"{_fmt(v.get('train_memory_vs_dense'))} | {v['peak_rss_mib']:.0f} | "
                f"{_fmt(v.get('memory_vs_dense'))} | {v['trainable_params'] / 1e6:.2f}M | "
                f"{v['buffer_bytes'] / 2**20:.0f} | {v['tokens_per_s']:.0f} |")
        lines.append("")
    infer = [(k, v) for k, v in summary.items() if "latency_ms" in v]
    if infer:
        shapes = list(infer[0][1]["latency_ms"])
        head = " | ".join(f"{s} ms | {s} speedup" for s in shapes)
        lines += ["Inference (eval, `torch.inference_mode`):", "",
                  f"| method | params | {head} | peak RSS MiB |",
                  "|---|---|" + "---|---|" * len(shapes) + "---|"]
        for k, v in infer:
            cells = " | ".join(
                f"{v['latency_ms'][s]:.1f} | {_fmt((v.get('speedup_vs_dense') or {}).get(s))}"
                for s in shapes)
            lines.append(f"| {k} | {v['params_total'] / 1e6:.2f}M | {cells} | "
                         f"{v['peak_rss_mib']:.0f} |")
        for k, v in infer:
            if "graph_break_count" in v:
                lines.append(f"\n`{k}`: torch.compile — {v['graph_count']} graph(s), "
                             f"{v['graph_break_count']} graph break(s), compile "
                             f"{v['compile_s']:.0f} s, max |compiled − eager| = "
                             f"{v['max_abs_diff_vs_eager']:.2e}.")
        lines.append("")
    failed = [k for k, v in summary.items() if v.get("failed")]
    if failed:
        lines += [f"Failed runs: {', '.join(failed)} (see the JSON).", ""]
    return lines


def md_interleaved(model: str, data: dict) -> list[str]:
    env, cfg, res = data["environment"], data["config"], data["result"]
    load_avg = (env.get("load_average_at_start") or [None])[0]
    lines = [f"### Speed side by side in one process: {model}", "",
             f"Command: `{env['command']}` — {env['date_utc']} UTC, {env['cpu']}, "
             f"{env['torch_threads']} thread(s), load average at start "
             f"{_fmt(load_avg, '.1f')}. Every method's model lives in the same process; "
             "steps (calls) run round-robin in a rotating order; ratios are medians of "
             "per-repetition ratios.", ""]
    if "train" in res:
        lines += [f"Training step, batch {cfg['batch']}x{cfg['seq']}, "
                  f"{cfg['train_repeats']} timed steps per method:", "",
                  "| method | median step s | tokens/s | vs dense | trainable params |",
                  "|---|---|---|---|---|"]
        for k, v in res["train"].items():
            lines.append(f"| {k} | {v['median_step_s']:.2f} | {v['tokens_per_s']:.0f} | "
                         f"{v['speed_vs_dense']:.2f} | {v['trainable_params'] / 1e6:.2f}M |")
        lines.append("")
    if "infer" in res:
        lines += [f"Inference, {cfg['infer_repeats']} calls per method and shape:", "",
                  "| shape | method | params | median ms | speedup vs dense |",
                  "|---|---|---|---|---|"]
        for shape, rows in res["infer"].items():
            for k, v in rows.items():
                lines.append(f"| {shape} | {k} | {res['params_total'][k] / 1e6:.2f}M | "
                             f"{v['median_ms']:.1f} | {v['speedup_vs_dense']:.2f} |")
        lines.append("")
    return lines


def md_ops(ops: dict, command: str) -> list[str]:
    """One row per benchmark group of ``pytest bench/ --benchmark-only``: median ms per
    contender and the op's time relative to dense and to unfused PyTorch."""
    groups: dict[str, dict[str, float]] = {}
    for b in ops.get("benchmarks", []):
        groups.setdefault(b["group"], {})[b["params"]["contender"]] = b["stats"]["median"]
    contenders = sorted({c for g in groups.values() for c in g},
                        key=lambda c: (c != "dense", c != "unfused", c))
    ops_names = [c for c in contenders if c.startswith("op-")]
    info = ops.get("machine_info", {})
    lines = ["### Op benchmarks (pytest-benchmark)", "",
             f"Command: `{command}` — {ops.get('datetime', '?')[:19]} UTC, "
             f"{info.get('cpu', {}).get('brand_raw', '?')}. Medians in ms; each contender is "
             "timed after the other (pytest-benchmark does not interleave), so small "
             "differences are noise on this shared machine.", "",
             "| group | " + " | ".join(f"{c} ms" for c in contenders) + " | "
             + " | ".join(f"{o} / dense | {o} / unfused" for o in ops_names) + " |",
             "|---|" + "---|" * (len(contenders) + 2 * len(ops_names))]
    for group, row in groups.items():
        cells = [_fmt(row[c] * 1e3 if c in row else None, ".1f") for c in contenders]
        for o in ops_names:
            for base in ("dense", "unfused"):
                ok = o in row and base in row
                cells.append(_fmt(row[o] / row[base] if ok else None))
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return lines + [""]


def md_goals(layer: dict | None, e2es: dict[str, dict],
             inter: dict[str, dict] | None = None) -> list[str]:
    lines = ["### Goals", ""]
    minilm = (e2es.get("minilm") or {}).get("summary", {})
    fast = ((inter or {}).get("minilm") or {}).get("result", {})
    how = "(interleaved in one process)" if fast else "(fresh processes, paired per round)"
    if "infer" in fast:
        for shape, rows in fast["infer"].items():
            v = rows.get("infer_compressed", {}).get("speedup_vs_dense")
            if v is not None:
                goal = f" (goal ≥ {GOAL_INFER}): {_met(v >= GOAL_INFER)}" \
                    if shape == "32x128" else " (reported)"
                lines.append(f"- Exported 50 %-budget MiniLM vs dense at {shape}: {v:.2f}x "
                             f"{how}{goal}.")
    else:
        inf = minilm.get("infer_compressed", {}).get("speedup_vs_dense", {}).get("32x128")
        if inf is not None:
            lines.append(f"- Exported 50 %-budget MiniLM vs dense at 32x128: {inf:.2f}x {how} "
                         f"(goal ≥ {GOAL_INFER}): {_met(inf >= GOAL_INFER)}.")
    train = fast.get("train") or {k: v for k, v in minilm.items() if "tokens_per_s" in v}
    for key in sorted(k for k in train if k.startswith("train_after")):
        s = train[key].get("speed_vs_dense")
        if s is not None:
            lines.append(f"- MiniLM training step `{key}` vs dense: {s:.2f}x {how} "
                         f"(goal ≥ {GOAL_TRAIN_AFTER}): {_met(s >= GOAL_TRAIN_AFTER)}.")
    if layer is not None:
        worst = max(layer["rows"], key=lambda r: r["lowrank_vs_ideal"])
        bad = [r for r in layer["rows"] if not r["goal_met"]]
        lines.append(f"- Low-rank layer within {GOAL_LAYER}x of the ideal FLOP ratio: "
                     f"{len(layer['rows']) - len(bad)}/{len(layer['rows'])} cases; worst "
                     f"{worst['lowrank_vs_ideal']:.2f}x ({worst['in']}x{worst['out']}, "
                     f"r={worst['rank']}, {worst['mode']}): {_met(not bad)}.")
    for name, note in (("llama", ""), ("llama_ckpt", ", activation checkpointing on both")):
        llama = (e2es.get(name) or {}).get("summary", {})
        for key in sorted((k for k in llama if k.startswith("train_joint")), reverse=True):
            m = llama[key].get("train_memory_vs_dense")
            m2 = llama[key].get("memory_vs_dense")
            if m is not None:
                lines.append(f"- Llama-style memory{note}, `{key}` (blend active) vs dense "
                             f"full fine-tune: {m:.2f}x peak RSS of the training steps "
                             f"(goal ≤ {GOAL_MEMORY}): {_met(m <= GOAL_MEMORY)}; {_fmt(m2)}x "
                             "whole-process peak.")
            elif m2 is not None:
                lines.append(f"- Llama-style memory{note}, `{key}` (blend active) vs dense "
                             f"full fine-tune: {m2:.2f}x whole-process peak RSS (goal ≤ "
                             f"{GOAL_MEMORY}): {_met(m2 <= GOAL_MEMORY)}.")
    for key in sorted((k for k in minilm if k.startswith("train_") and k != "train_dense"),
                      reverse=True):
        m = minilm[key].get("train_memory_vs_dense") or minilm[key].get("memory_vs_dense")
        if m is not None:
            lines.append(f"- MiniLM memory (reported; the embedding table dominates), `{key}` "
                         f"vs dense: {m:.2f}x peak RSS of the training steps.")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    res = args.results

    layer = load(res / "layer_ratio.json")
    e2es = {name: d for name in ("minilm", "llama", "llama_ckpt", "minilm_compile")
            if (d := load(res / f"e2e_{name}.json")) is not None}
    inter = {name: d for name in ("minilm", "llama")
             if (d := load(res / f"e2e_{name}_interleaved.json")) is not None}
    repro = {p.stem: d for p in sorted(res.glob("reproduction*.json"))
             if (d := load(p)) is not None and _repro_rows(d)}

    if layer is not None:
        plot_speedup(layer, res / "speedup_vs_rank.png")
    else:
        print(f"no {res / 'layer_ratio.json'}: skipping the speedup-vs-rank plot "
              "(run bench/layer_ratio.py)")
    if e2es:
        plot_memory({k: v for k, v in e2es.items() if k != "minilm_compile"},
                    res / "memory_vs_method.png")
    else:
        print("no e2e_*.json: skipping the memory-vs-method plot (run bench/e2e.py)")
    if repro:
        plot_accuracy(repro, res / "accuracy_vs_params.png")
    else:
        print(f"no reproduction results ({res}/reproduction*.json with a table): skipping the "
              "accuracy-vs-parameters plot (run bench/reproduce.py)")

    lines = ["## CPU benchmark results", "",
             "Generated by `python bench/plots.py` from the JSON files next to this one. "
             "Ratios are measured side by side in one run; absolute times are from a shared, "
             "busy 2-core machine and are only comparable within a table.", ""]
    if layer is not None or e2es or inter:
        lines += md_goals(layer, e2es, inter)
    if layer is not None:
        lines += md_layer(layer)
    for name, data in inter.items():
        lines += md_interleaved(name, data)
    ops = load(res / "ops_cpu.json")
    if ops is not None:
        lines += md_ops(ops, "pytest bench/ --benchmark-only --benchmark-json "
                             "bench/results/ops_cpu.json")
    for name, data in e2es.items():
        lines += md_e2e(name, data)
    (res / "benchmarks.md").write_text("\n".join(lines))
    print(f"wrote {res / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
