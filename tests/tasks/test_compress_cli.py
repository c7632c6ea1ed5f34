"""``tunecomp compress`` loses no work and gives no silent wrong result: output paths are
checked before training and only our own files are replaced; a save error keeps the
model; Ctrl-C leaves a checkpoint that resumes to the same model; decoder models get a
padding token; odd labels and dropped rows are handled and reported.

Every test runs the command in-process on a tiny BERT (or GPT-2 / Llama) directory and a
150-row CSV, a few seconds each.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny_task import compress_argv, make_decoder_dir

from tunecomp_kernels.cli import main


def _one_error_line(capsys, needle: str):
    """The captured (stdout, stderr); stderr must be one line holding ``needle``."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return captured.out, err


def _listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any training (or even data loading) starts."""
    import tunecomp_kernels.tasks.job as job

    def refuse(*args, **kwargs):
        raise AssertionError("the job started although a path was refused")

    monkeypatch.setattr(job, "run_job", refuse)


# --- 1. and 2.: every output path is checked before training ----------------------------


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case", ["dot", "home", "file", "under_file", "foreign",
                                  "model_and_foreign", "checkpoint_path_is_file"])
def test_bad_output_is_refused_before_training(case, overwrite, bert_dir, rows_csv, tmp_path,
                                               monkeypatch, capsys, no_training):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    output = {"dot": ".", "home": str(work), "file": "keep.txt", "under_file": "keep.txt/sub",
              "foreign": str(work), "model_and_foreign": "model",
              "checkpoint_path_is_file": "fresh"}[case]
    if case in ("foreign", "home"):
        monkeypatch.chdir(tmp_path)  # not the current directory: refused for its files
    if case == "model_and_foreign":
        (work / "model").mkdir()
        (work / "model" / "tunecomp.json").write_text(json.dumps({"files": ["tunecomp.json"]}))
        (work / "model" / "notes.txt").write_text("the user's")
    if case == "checkpoint_path_is_file":
        (work / ".fresh.tunecomp-run").write_text("not a directory")
    before = _listing(work)
    argv = compress_argv(bert_dir, rows_csv, output, *(["--overwrite"] if overwrite else []))
    assert main(argv) == 2
    out, _ = _one_error_line(capsys, "tunecomp compress: error: --output")
    assert out == ""  # nothing started: not even the data was read
    assert _listing(work) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_is_refused(bert_dir, rows_csv, tmp_path, capsys, no_training):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(compress_argv(bert_dir, rows_csv, locked / "run")) == 2
        _one_error_line(capsys, "not writable")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("option", ["--model", "--data"])
@pytest.mark.parametrize("case", ["dot", "file", "foreign_dir", "missing"])
def test_bad_input_paths_are_refused(option, case, bert_dir, rows_csv, tmp_path, monkeypatch,
                                     capsys, no_training):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.bin").write_bytes(b"\0")
    (tmp_path / "note.txt").write_text("hello")
    value = {"dot": ".", "file": "note.txt", "foreign_dir": "other", "missing": "nope"}[case]
    argv = compress_argv(bert_dir, rows_csv, tmp_path / "run") + [option, value]
    assert main(argv) == 2
    _one_error_line(capsys, f"error: {option}:")


def test_data_file_of_unknown_type_is_one_line(bert_dir, tmp_path, capsys):
    bad = tmp_path / "rows.txt"
    bad.write_text("review,stars\n")
    assert main(compress_argv(bert_dir, bad, tmp_path / "run")) == 2
    _one_error_line(capsys, "unsupported file type")
    assert not (tmp_path / "run").exists()


def test_read_only_model_dir_is_enough_and_untouched(bert_dir, rows_csv, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(bert_dir, model)
    before = _listing(model)
    for p in [model, *model.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        assert main(compress_argv(model, rows_csv, tmp_path / "run", steps=2)) == 0
    finally:
        for p in [model, *model.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert _listing(model) == before


def test_overwrite_replaces_only_our_model(bert_dir, rows_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(compress_argv(bert_dir, rows_csv, out, steps=2)) == 0
    first = _weights(out)
    owned = set(json.loads((out / "tunecomp.json").read_text())["files"])
    assert {"model.safetensors", "summary.json", "tunecomp.json"} <= owned
    assert {p.name for p in out.iterdir()} == owned  # only the saved model's own files
    assert not (tmp_path / ".run.tunecomp-run").exists()  # the run's own files are gone
    capsys.readouterr()
    # Without --overwrite an existing model is kept.
    assert main(compress_argv(bert_dir, rows_csv, out, "--ratio", "0.25", steps=2)) == 2
    _one_error_line(capsys, "--overwrite")
    assert all(torch.equal(first[k], v) for k, v in _weights(out).items())
    # With --overwrite it is replaced, and nothing else appears or stays behind.
    assert main(compress_argv(bert_dir, rows_csv, out, "--ratio", "0.25", "--overwrite",
                              steps=2)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["ratio"] == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # A file of the user's in the model directory: refused before training, kept.
    (out / "notes.txt").write_text("the user's")
    capsys.readouterr()
    assert main(compress_argv(bert_dir, rows_csv, out, "--overwrite", steps=2)) == 2
    _one_error_line(capsys, "notes.txt")
    assert (out / "notes.txt").read_text() == "the user's"


def test_save_error_keeps_the_model_and_says_where(bert_dir, rows_csv, tmp_path, monkeypatch,
                                                   capsys):
    import tunecomp_kernels.tasks.job as job
    from tunecomp_kernels.compress import load_compressed

    out = tmp_path / "run"
    real = job.save_compressed

    def disk_full(model, path, **kwargs):
        if Path(path) == out:
            raise OSError(28, "No space left on device")
        return real(model, path, **kwargs)

    monkeypatch.setattr(job, "save_compressed", disk_full)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert main(compress_argv(bert_dir, rows_csv, out, steps=2)) == 1
    _, err = _one_error_line(capsys, "No space left on device")
    rescued = list((tmp_path / "tmp").glob("tunecomp-rescued-*/model"))
    assert len(rescued) == 1 and f"saved to {rescued[0]} instead" in err
    load_compressed(rescued[0])  # a complete, loadable model
    assert (tmp_path / ".run.tunecomp-run").is_dir()  # and the checkpoint is kept


# --- 3.: decoder models get a padding token -----------------------------------------


@pytest.mark.parametrize("kind, pad", [("gpt2", False), ("gpt2", True), ("llama", False),
                                       ("llama", True)])
def test_decoder_classifiers_run(kind, pad, rows_csv, tmp_path, capsys):
    from tunecomp_kernels.compress import load_compressed

    model_dir = make_decoder_dir(tmp_path / kind, kind, pad=pad)
    out = tmp_path / "run"
    assert main(compress_argv(model_dir, rows_csv, out, steps=2)) == 0
    assert "predictions identical" in capsys.readouterr().out
    reloaded = load_compressed(out)
    assert reloaded.config.pad_token_id == (2 if pad else 1)  # <pad>, else <eos>


def test_decoder_without_pad_or_eos_is_one_line(rows_csv, tmp_path, capsys):
    model_dir = make_decoder_dir(tmp_path / "gpt2", "gpt2", pad=False, eos=False)
    capsys.readouterr()  # the saving's progress bar
    assert main(compress_argv(model_dir, rows_csv, tmp_path / "run", steps=2)) == 2
    _one_error_line(capsys, "no padding token and no end-of-sequence token")


def test_a_ratio_below_what_the_layers_cost_at_min_rank_is_one_line(bert_dir, rows_csv,
                                                                     tmp_path, capsys):
    # known only once the model's layers are: after loading, before any training step
    out = tmp_path / "run"
    argv = compress_argv(bert_dir, rows_csv, out, steps=2) + ["--ratio", "0.001"]
    assert main(argv) == 2
    _one_error_line(capsys, "--ratio=0.001 is infeasible: the 12 targeted layers cost 896 "
                            "parameters at min_rank=1, more than the budget 16 of 16384; "
                            "use --ratio >= 0.0547")
    assert not out.exists()


# --- 4.: labels are normalised, dropped rows are counted --------------------------------


def test_numeric_labels_are_one_class_and_drops_are_reported(bert_dir, tmp_path, capsys):
    from tunecomp_kernels.tasks.data import load_dataset

    words = {"1": "bad awful hate", "5": "good great love"}
    labels = [5, "5", 5.0, "5.0", 1, "1", 1.0, " 1 "]
    rows = [{"review": f"{words[str(int(float(str(v))))]} {i % 7}", "stars": v}
            for i in range(120) for v in [labels[i % len(labels)]]]
    rows += [{"review": "", "stars": 5}, {"stars": 1}, {"review": "good", "stars": None},
             {"review": "good", "stars": "  "}, {"review": "   ", "stars": 1}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_dataset(path, "review", "stars")
    assert sorted(set(data.labels)) == ["1", "5"] and len(data) == 120
    assert data.dropped == {"with an empty text": 2, "with no text": 1,
                            "with no or an empty label": 2}
    argv = compress_argv(bert_dir, path, tmp_path / "run", steps=2)
    for option, value in (("--train-size", "70"), ("--val-size", "20"), ("--test-size", "24")):
        argv[argv.index(option) + 1] = value
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dropped 5 of 125 rows (2 with an empty text, 2 with no or an empty label, 1 " \
           "with no text)" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["split"]["labels"] == ["1", "5"]


# --- 5.: Ctrl-C checkpoints; --resume gives the same model ------------------------------


@pytest.mark.parametrize("interrupt_in", ["tunecomp", "dense"])
def test_interrupt_then_resume_gives_the_same_model(interrupt_in, bert_dir, rows_csv,
                                                    tmp_path, monkeypatch, capsys):
    """Ctrl-C in the TuneComp phase, or in the --compare-dense phase before it."""
    from tunecomp_kernels.compress import training

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    extra = ("--checkpoint-every", "2", "--eval-every", "3")
    if interrupt_in == "dense":
        extra += ("--compare-dense",)
    assert main(compress_argv(bert_dir, rows_csv, whole, *extra, steps=6)) == 0
    expected = json.loads((whole / "summary.json").read_text())
    capsys.readouterr()

    real, calls = training._Loop.optimizer_step, {"n": 0}

    def ctrl_c_at_step_5(self, batch, step):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, batch, step)

    monkeypatch.setattr(training._Loop, "optimizer_step", ctrl_c_at_step_5)
    assert main(compress_argv(bert_dir, rows_csv, parts, *extra, steps=6)) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"interrupted at step 4 of 6 ({interrupt_in})" in err
    assert f"the {interrupt_in} phase's checkpoint of step 4" in err
    assert f"--output {parts} --resume" in err
    assert not parts.exists()
    monkeypatch.setattr(training._Loop, "optimizer_step", real)

    # Without --resume the checkpoints are not silently dropped.
    assert main(compress_argv(bert_dir, rows_csv, parts, *extra, steps=6)) == 2
    _one_error_line(capsys, "--resume")
    # With other settings the run does not resume.
    assert main(compress_argv(bert_dir, rows_csv, parts, *extra, "--resume", steps=8)) == 2
    _one_error_line(capsys, "steps")
    assert main(compress_argv(bert_dir, rows_csv, parts, *extra, "--resume", steps=6)) == 0
    got = json.loads((parts / "summary.json").read_text())
    a, b = _weights(whole), _weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got["test_predictions"] == expected["test_predictions"]
    assert got["val_curve"] == expected["val_curve"]
    assert got["dense"].get("val") == expected["dense"].get("val")
    assert not (tmp_path / ".parts.tunecomp-run").exists()


def test_resume_without_checkpoints_is_one_line(bert_dir, rows_csv, tmp_path, capsys,
                                                no_training):
    assert main(compress_argv(bert_dir, rows_csv, tmp_path / "run", "--resume")) == 2
    _one_error_line(capsys, "--resume: no checkpoints")


# --- 6.: what the command says -----------------------------------------------------------


def test_run_says_what_it_is_doing(bert_dir, rows_csv, tmp_path, capsys):
    assert main(compress_argv(bert_dir, rows_csv, tmp_path / "run", steps=2)) == 0
    out = capsys.readouterr().out
    for stage in ("reading, splitting and tokenising the data", "measuring the dense one",
                  "evaluating the compressed model", "timing both models", "saving to"):
        assert f"{stage}" in out
    assert "step 2/2: loss" in out and ", 1 thread\n" in out  # conftest: one thread


def test_real_ctrl_c_exits_130_with_one_line(bert_dir, rows_csv, tmp_path):
    """A real SIGINT to the command's process: no traceback, status 130, a checkpoint."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    argv = compress_argv(bert_dir, rows_csv, out, "--eval-every", "1", "--checkpoint-every",
                         "3", "--threads", "1", steps=100_000)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A shell starts background jobs (`cmd &`) with SIGINT ignored, and Python then keeps it
    # ignored: give the command the default disposition, as an interactive terminal would.
    proc = subprocess.Popen([sys.executable, "-m", "tunecomp_kernels.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:
            if line.startswith("step 4/"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    err = err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"--output {out} --resume" in err
    assert list((tmp_path / ".run.tunecomp-run" / "tunecomp").glob("ckpt-*.pt"))
