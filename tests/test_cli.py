"""``tunecomp compress`` end to end on a tiny BERT and a tiny CSV, and its argument errors.

The model is built from a config and saved to a temporary directory with a WordPiece
tokenizer made from a small vocabulary file, so nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch

from tunecomp_kernels.cli import main

WORDS = {
    "pos": ["good", "great", "love", "nice", "happy", "fine"],
    "neg": ["bad", "awful", "hate", "sad", "poor", "worst"],
    "neu": ["the", "a", "car", "flight", "today", "is"],
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted({w for words in WORDS.values() for w in words})
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    BertModel(config).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.csv"
    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["review", "stars"])
        for i in range(150):
            label = ["neg", "neu", "pos"][i % 3]
            words = rng.choices(WORDS[label], k=3) + rng.choices(WORDS["neu"], k=2)
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return path


def _args(model, data, out, *extra):
    return ["compress", "--model", str(model), "--data", str(data), "--text-column",
            "review", "--label-column", "stars", "--steps", "6", "--blend-steps", "3",
            "--train-size", "90", "--val-size", "24", "--test-size", "30",
            "--batch-size", "16", "--eval-every", "3", "--output", str(out), "--no-progress",
            *extra]


def test_compress_end_to_end_and_reload(tiny_model, tiny_csv, tmp_path, capsys):
    from tunecomp_kernels.compress import load_compressed
    from tunecomp_kernels.tasks import text_classification as tc

    out = tmp_path / "run"
    assert main(_args(tiny_model, tiny_csv, out, "--ratio", "0.5")) == 0
    printed = capsys.readouterr().out
    assert "compressed (TuneComp)" in printed and "dense (original)" in printed
    assert "predictions identical" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reload_identical"] is True
    assert summary["report"]["params_after"] <= 0.5 * summary["report"]["params_before"]
    assert [c["step"] for c in summary["val_curve"]] == [3, 6]

    # The saved model loads without the training code path and predicts the same labels.
    model = load_compressed(out)
    data = tc.load_dataset(tiny_csv, "review", "stars")
    splits = tc.stratified_split(data, 90, 24, 30, seed=0)
    tokenizer = tc.load_tokenizer(tiny_model)
    enc = tc.encode(tokenizer, splits.test, 64)
    batches = [tc.collate(enc.input_ids[i:i + 16], enc.labels[i:i + 16], 0)
               for i in range(0, len(enc), 16)]
    preds = tc.predict(model, batches).argmax(-1).tolist()
    assert preds == summary["test_predictions"]

    # An existing non-empty output directory needs --overwrite.
    assert main(_args(tiny_model, tiny_csv, out)) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (("--ratio", "0"), "--ratio must be in (0, 1]"),
    (("--ratio", "1.5"), "--ratio must be in (0, 1]"),
    (("--steps", "0"), "--steps must be >= 1"),
    (("--data", "/nonexistent/data.csv"), "--data: file not found"),
    (("--model", "/nonexistent/model"), "--model: directory not found"),
    (("--text-column", "body"), "no text column 'body'"),
    (("--label-column", "sentiment"), "no label column 'sentiment'"),
])
def test_bad_arguments_exit_2_with_one_line(tiny_model, tiny_csv, tmp_path, capsys, change,
                                            message):
    argv = _args(tiny_model, tiny_csv, tmp_path / "out")
    argv += list(change)  # argparse keeps the last value given
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_version(capsys):
    from tunecomp_kernels import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip().startswith(f"tunecomp_kernels {__version__} ")


@pytest.mark.parametrize("value", ["0", "1.5", "abc"])
def test_demo_argument_errors_have_the_prefix_and_status_2(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--rank-ratio", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tunecomp demo: error: argument --rank-ratio: ")


def test_a_command_stopping_with_a_message_gets_the_prefix(monkeypatch, capsys):
    import tunecomp_kernels.cli as cli

    def stop(args):
        raise SystemExit("something is wrong")

    help_text, add_args, _run = cli._COMMANDS["info"]
    monkeypatch.setitem(cli._COMMANDS, "info", (help_text, add_args, stop))
    assert main(["info"]) == 2
    assert capsys.readouterr().err.strip() == "tunecomp info: error: something is wrong"


def test_compress_help_takes_its_defaults_from_the_settings(capsys):
    from tunecomp_kernels.compress import TuneCompConfig
    from tunecomp_kernels.tasks.settings import full, quick

    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    cfg = TuneCompConfig()
    assert f"student initialisation (default {cfg.init})" in text
    assert f"(default {cfg.init_rank_ratio:g})" in text
    assert f"optimiser steps (default {full().steps}; {quick().steps} with --quick)" in text
    from tunecomp_kernels.tasks.compress_job import QUICK_MEASURED

    assert "under a minute" not in text and QUICK_MEASURED in text


def test_predict_is_a_command_with_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--model DIR", "--data FILE", "--text-column NAME", "--output FILE",
                   "--overwrite"):
        assert option in text
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--data", "x.csv"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err
