"""``tunecomp predict``: the rows it writes (checked against the reloaded model's own
forward pass) and what it refuses, before loading the model, in one line with status 2.
One tiny ``tunecomp compress`` run is shared by the module; each test takes seconds."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from tiny_task import compress_argv

from tunecomp_kernels.cli import main

TEXTS = ["good great love", "", "bad awful hate", "the car is fine", "   ", "worst flight"]


@pytest.fixture(scope="module")
def saved(bert_dir, rows_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    assert main(compress_argv(bert_dir, rows_csv, root / "model", steps=4)) == 0
    return root / "model"


@pytest.fixture
def texts_jsonl(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n"
                            for i, t in enumerate(TEXTS)))
    return path


def _argv(model, data, *extra):
    return ["predict", "--model", str(model), "--data", str(data), "--text-column", "body",
            *extra]


def _expected(model_dir, bert_dir, texts):
    """(label, probability) per text from the reloaded model and the original tokenizer."""
    from tunecomp_kernels.compress import load_compressed
    from tunecomp_kernels.tasks import classifier as clf
    from tunecomp_kernels.tasks import data as td

    model = load_compressed(model_dir)
    ids = clf.load_tokenizer(bert_dir)(texts, truncation=True, max_length=64)["input_ids"]
    batch = td.collate(ids, [0] * len(ids), 0)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).logits.double(), -1)
    best, index = probs.max(-1)
    return [(model.config.id2label[int(k)], float(p)) for k, p in zip(index, best)]


def _one_error_line(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunecomp predict: error: ") and needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_predict_writes_one_row_per_text(suffix, saved, bert_dir, texts_jsonl, tmp_path,
                                         capsys):
    out = tmp_path / f"pred{suffix}"
    assert main(_argv(saved, texts_jsonl, "--output", str(out), "--batch-size", "2")) == 0
    captured = capsys.readouterr()
    assert "skipped 2 rows with no 'body' text" in captured.err
    assert f"4 predictions written to {out}" in captured.out
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        with open(out, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    kept = [(i + 1, t) for i, t in enumerate(TEXTS) if t.strip()]
    assert [(int(r["row"]), r["text"]) for r in rows] == kept
    expected = _expected(saved, bert_dir, [t for _, t in kept])
    for row, (label, prob) in zip(rows, expected):
        assert row["label"] == label
        assert float(row["probability"]) == pytest.approx(prob, abs=2e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([texts_jsonl.name, out.name])


def test_predict_without_output_prints_csv(saved, texts_jsonl, capsys):
    assert main(_argv(saved, texts_jsonl)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "row,text,label,probability" and len(lines) == 5


def test_existing_output_needs_overwrite(saved, texts_jsonl, tmp_path, monkeypatch, capsys):
    import tunecomp_kernels.tasks.predict as predict

    out = tmp_path / "pred.csv"
    out.write_text("the user's")
    real = predict._load

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the output was refused")

    monkeypatch.setattr(predict, "_load", refuse)
    assert main(_argv(saved, texts_jsonl, "--output", str(out))) == 2
    _one_error_line(capsys, "exists; pass --overwrite")
    assert out.read_text() == "the user's"
    monkeypatch.setattr(predict, "_load", real)
    assert main(_argv(saved, texts_jsonl, "--output", str(out), "--overwrite")) == 0
    assert out.read_text().startswith("row,text,label,probability\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.csv", "texts.jsonl"]


@pytest.mark.parametrize("case, needle", [
    ("data_itself", "is the data file"),
    ("in_model_dir", "lies in the model directory"),
    ("directory", "is a directory"),
    ("no_parent", "does not exist"),
    ("suffix", "unsupported file type '.txt'"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_bad_output_is_refused(case, needle, overwrite, saved, texts_jsonl, tmp_path,
                               capsys):
    (tmp_path / "adir").mkdir()
    output = {"data_itself": texts_jsonl, "in_model_dir": saved / "pred.csv",
              "directory": tmp_path / "adir.csv", "no_parent": tmp_path / "nope" / "p.csv",
              "suffix": tmp_path / "p.txt"}[case]
    if case == "directory":
        output.mkdir()
    before = {p: p.read_bytes() for p in [texts_jsonl, *saved.iterdir()]}
    argv = _argv(saved, texts_jsonl, "--output", str(output))
    assert main(argv + (["--overwrite"] if overwrite else [])) == 2
    _one_error_line(capsys, needle)
    assert {p: p.read_bytes() for p in [texts_jsonl, *saved.iterdir()]} == before
    assert not (tmp_path / "p.txt").exists() and not (tmp_path / "nope").exists()


@pytest.mark.parametrize("case, needle", [
    ("missing_model", "--model: directory not found"),
    ("dense_model", "missing tunecomp.json"),
    ("no_tokenizer", "holds no tokenizer"),
    ("missing_data", "--data: file not found"),
    ("bad_column", "no text column 'body'"),
    ("empty_texts", "has no row with a 'body' text"),
    ("batch_size", "--batch-size must be >= 1"),
])
def test_bad_input_is_one_line(case, needle, saved, bert_dir, texts_jsonl, tmp_path, capsys):
    model, data, extra = saved, texts_jsonl, []
    if case == "missing_model":
        model = tmp_path / "nope"
    elif case == "dense_model":
        model = bert_dir
    elif case == "no_tokenizer":
        model = tmp_path / "copy"
        shutil.copytree(saved, model)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                     "special_tokens_map.json"):
            (model / name).unlink(missing_ok=True)
    elif case == "missing_data":
        data = tmp_path / "missing.csv"
    elif case == "bad_column":
        data = tmp_path / "other.csv"
        data.write_text("text\nhello\n")
    elif case == "empty_texts":
        data = tmp_path / "empty.csv"
        data.write_text("body\n\n  \n")
    else:
        extra = ["--batch-size", "0"]
    assert main(_argv(model, data, "--output", str(tmp_path / "p.csv"), *extra)) == 2
    _one_error_line(capsys, needle)
    assert not (tmp_path / "p.csv").exists()
