"""What ``tunecomp compress`` reports after a run: the headline line against
summary.json's values, the units and latency spread in summary.json, the majority-class
rate, the dense reference (or "not measured"), the PNG plots owned by the saved model,
and the latency measurement itself. A tiny BERT and a small CSV, seconds each."""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter

import pytest
import torch
from tiny_task import WORDS, compress_argv

from tunecomp_kernels.cli import main
from tunecomp_kernels.tasks import classifier as clf

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _unbalanced_csv(path):
    """Classes neg:neu:pos = 3:2:1, so the majority-class rate is not 1/3 by accident."""
    import csv
    import random

    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["review", "stars"])
        for label, count in (("neg", 120), ("neu", 80), ("pos", 40)):
            for _ in range(count):
                writer.writerow([" ".join(rng.choices(WORDS[label], k=4)), label])
    return path


@pytest.fixture(scope="module")
def run(bert_dir, tmp_path_factory):
    """One default run (no --compare-dense): (output dir, stdout, summary, data path)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("report")
    data = _unbalanced_csv(root / "rows.csv")
    out = root / "run"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(compress_argv(bert_dir, data, out, steps=4)) == 0
    summary = json.loads((out / "summary.json").read_text())
    return out, buffer.getvalue(), summary, data


def _headline(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("headline: ")]
    assert len(lines) == 1, stdout
    return lines[0]


def test_headline_numbers_are_summary_values(run):
    from tunecomp_kernels.tasks import data as td

    _, stdout, summary, data = run
    line = _headline(stdout)
    assert line == summary["headline"]["text"]
    dense, comp = summary["dense"], summary["compressed"]
    assert f"({comp['size_bytes'] / 2**20:.2f} vs {dense['size_bytes'] / 2**20:.2f} MiB)" in line
    smaller = 100 * (1 - comp["size_bytes"] / dense["size_bytes"])
    assert f"{abs(smaller):.0f} % {'smaller' if smaller >= 0 else 'larger'} on disk" in line
    speedup = dense["latency_ms"] / comp["latency_ms"]
    word = f"{speedup:.2f}× faster" if speedup >= 1 else f"{1 / speedup:.2f}× slower"
    assert f"on disk ({comp['size_bytes'] / 2**20:.2f} vs" in line and f", {word} (" in line
    assert summary["headline"]["speedup"] == pytest.approx(speedup)
    paired = summary["latency"]["speedup"]
    assert f"speed-up IQR {paired['q1']:.2f}–{paired['q3']:.2f}, " in line
    assert f"min–max {paired['min']:.2f}–{paired['max']:.2f})" in line
    assert f"({comp['latency_ms']:.1f} vs {dense['latency_ms']:.1f} ms median;" in line
    assert f"test {comp['test']:.4f}" in line
    assert "accuracy against dense not measured (run with --compare-dense)" in line
    # The majority-class rate, recomputed from the split itself.
    split = td.stratified_split(td.load_dataset(data, "review", "stars"), 90, 24, 30, seed=0)
    counts = Counter(split.train.labels)
    top = max(sorted(counts), key=lambda k: counts[k])
    rate = sum(y == top for y in split.test.labels) / len(split.test.labels)
    assert summary["majority_class"]["test"] == pytest.approx(rate)
    assert summary["majority_class"]["label"] == split.label_names[top]
    assert abs(rate - 1 / 3) > 0.05  # the data is unbalanced: a real check
    assert f"majority-class rate {rate:.4f} ({split.label_names[top]!r})" in line
    assert summary["headline"]["majority_test"] == pytest.approx(rate)
    assert summary["headline"]["accuracy_points"] is None


def test_summary_json_has_units_and_keeps_the_old_keys(run):
    _, stdout, summary, _ = run
    for row in (summary["dense"], summary["compressed"]):
        assert row["size_bytes"] == row["size"] > 0
        assert row["size_mib"] == pytest.approx(row["size"] / 2**20)
        assert row["latency_ms"] == row["latency"] > 0
        assert row["latency_ms_iqr"] == pytest.approx(row["latency_ms_q3"] - row["latency_ms_q1"])
        assert (row["latency_ms_min"] <= row["latency_ms_q1"] <= row["latency_ms"]
                <= row["latency_ms_q3"] <= row["latency_ms_max"])
        assert isinstance(row["params"], int) and isinstance(row["model_params"], int)
        numeric = {k for k, v in row.items() if isinstance(v, (int, float))}
        assert numeric <= set(summary["units"]), numeric - set(summary["units"])
    latency = summary["latency"]
    assert latency["repeats"] >= 10 and latency["batches"] >= 1
    assert len(latency["batch_shapes"]) == latency["batches"]
    assert f"{summary['compressed']['latency_ms']:.1f} ms (IQR " in stdout


def test_without_compare_dense_accuracy_is_not_measured(run):
    _, stdout, summary, _ = run
    assert summary["dense_reference"] == "not measured (run with --compare-dense)"
    assert "val" not in summary["dense"] and "test" not in summary["dense"]
    dense_line = next(line for line in stdout.splitlines() if line.startswith("dense (original)"))
    assert dense_line.count("not measured") == 2
    assert any(line.startswith("majority class ('") for line in stdout.splitlines())


def test_with_compare_dense_the_headline_gives_points(bert_dir, rows_csv, tmp_path, capsys,
                                                      monkeypatch):
    from tunecomp_kernels.tasks import job

    rates = []  # the peak learning rate of each phase's plan

    def recording_plan(settings, **kwargs):
        plan = real_plan(settings, **kwargs)
        rates.append(plan.make_optimizer(torch.nn.Linear(2, 2)).param_groups[0]["lr"])
        return plan

    real_plan = job.training_plan
    monkeypatch.setattr(job, "training_plan", recording_plan)
    out = tmp_path / "run"
    argv = compress_argv(bert_dir, rows_csv, out, "--compare-dense", "--lr", "5e-4",
                         "--dense-lr", "3e-4", steps=2)
    assert main(argv) == 0
    assert rates == [3e-4, 5e-4]  # the dense comparison trains at its own rate
    summary = json.loads((out / "summary.json").read_text())
    points = 100 * (summary["compressed"]["test"] - summary["dense"]["test"])
    assert summary["headline"]["accuracy_points"] == pytest.approx(points)
    line = _headline(capsys.readouterr().out)
    assert f"{points:+.1f} points against dense".replace("+-", "-") in line
    assert summary["dense_reference"].startswith("measured: a dense fine-tune")


def test_plots_are_pngs_owned_by_the_model(run):
    out, stdout, summary, _ = run
    owned = set(json.loads((out / "tunecomp.json").read_text())["files"])
    assert summary["plots"] == ["ranks.png", "val_curve.png"]
    for name in summary["plots"]:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
        assert name in owned
    assert {"tokenizer_config.json", "summary.json"} <= owned  # the tokenizer is saved too
    assert f"plots: {out / 'ranks.png'}, {out / 'val_curve.png'}" in stdout


def test_overwrite_replaces_the_plots_and_nothing_else(bert_dir, rows_csv, tmp_path,
                                                      monkeypatch, capsys):
    import tunecomp_kernels.tasks.plots as plots

    out = tmp_path / "run"
    assert main(compress_argv(bert_dir, rows_csv, out, steps=2)) == 0
    assert (out / "val_curve.png").is_file()
    (tmp_path / "val_curve.png").write_bytes(b"the user's")  # beside, not in, the model
    capsys.readouterr()
    monkeypatch.setattr(plots, "_figure_class", lambda: None)  # as without matplotlib
    assert main(compress_argv(bert_dir, rows_csv, out, "--overwrite", steps=2)) == 0
    printed = capsys.readouterr().out
    assert printed.count("plots: skipped (matplotlib is not installed") == 1
    assert not (out / "val_curve.png").exists() and not (out / "ranks.png").exists()
    assert json.loads((out / "summary.json").read_text())["plots"] == []
    assert (tmp_path / "val_curve.png").read_bytes() == b"the user's"


def test_spread_quartiles():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0]
    got = clf.spread(values)
    q1, median, q3 = statistics.quantiles(sorted(values), n=4, method="inclusive")
    assert (got["q1"], got["median"], got["q3"]) == (q1, median, q3) == (2.5, 4.0, 6.0)
    assert got["iqr"] == 3.5 and (got["min"], got["max"]) == (1.0, 9.0)
    assert clf.spread([2.0]) == {"median": 2.0, "q1": 2.0, "q3": 2.0, "iqr": 0.0,
                                 "min": 2.0, "max": 2.0}
    with pytest.raises(ValueError, match="at least one"):
        clf.spread([])


class _Sleeper(torch.nn.Module):
    """A "model" whose forward takes ``seconds`` and logs (its name, the batch)."""

    def __init__(self, name: str, seconds: float, log: list) -> None:
        super().__init__()
        self.name, self.seconds, self.log = name, seconds, log

    def forward(self, input_ids, attention_mask):
        self.log.append((self.name, int(input_ids[0, 0])))
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        return input_ids


def test_latency_spread_interleaves_batches_and_gives_the_ratio():
    log: list = []
    slow, fast = _Sleeper("slow", 0.004, log), _Sleeper("fast", 0.001, log).eval()
    batches = [{"input_ids": torch.full((2, 3), k), "attention_mask": torch.ones(2, 3)}
               for k in range(3)]
    got = clf.measure_latency_spread(slow, fast, batches, repeats=6, warmup=1)
    # Per repeat, each batch through both models back to back; who goes first alternates.
    pairs = [log[i:i + 2] for i in range(0, len(log), 2)]
    assert len(pairs) == 7 * 3
    assert [pair[0][1] for pair in pairs] == [pair[1][1] for pair in pairs] == [0, 1, 2] * 7
    firsts = [pair[0][0] for pair in pairs]
    assert firsts.count("slow") in (10, 11) and firsts[:2] == ["slow", "fast"]
    assert slow.training and not fast.training  # modes restored
    assert got["first"]["min"] >= 4.0 and got["second"]["min"] >= 1.0
    assert 2.0 < got["ratio"]["median"] < 30  # 4 on an idle machine; this one is shared
    assert got["ratio"]["q1"] <= got["ratio"]["median"] <= got["ratio"]["q3"]
    with pytest.raises(ValueError, match="batches"):
        clf.measure_latency_spread(slow, fast, [], repeats=3)


def test_latency_pair_is_the_spread_median_on_one_batch():
    log: list = []
    slow, fast = _Sleeper("slow", 0.003, log), _Sleeper("fast", 0.001, log)
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)}
    first, second = clf.measure_latency_pair(slow, fast, batch, repeats=4, warmup=1)
    assert len(log) == 2 * 5  # every repeat and the warm-up run both models once
    assert first >= 3.0 and second >= 1.0  # lower bounds only: the machine is shared
