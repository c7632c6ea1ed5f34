"""Data loading, the seeded stratified split and batching of ``tunecomp_kernels.tasks``."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tunecomp_kernels.tasks import text_classification as tc


def _write_csv(path, rows, header=("text", "label", "confidence")):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def data(tmp_path):
    rows = []
    for i in range(300):
        label = ["neg", "neu", "pos"][0 if i % 10 < 5 else 1 if i % 10 < 8 else 2]
        confidence = "" if i % 17 == 0 else f"{0.3 + 0.7 * ((i * 37) % 100) / 100:.3f}"
        rows.append((f"text number {i}", label, confidence))
    path = _write_csv(tmp_path / "d.csv", rows)
    return tc.load_dataset(path, "text", "label", "confidence")


def test_load_csv_and_jsonl(tmp_path):
    csv_path = _write_csv(tmp_path / "a.csv", [("hello", "x", "1"), ("", "y", "1"),
                                              ("bye", "y", "")])
    d = tc.load_dataset(csv_path, "text", "label", "confidence")
    assert d.texts == ["hello", "bye"] and d.labels == ["x", "y"]
    assert d.confidences == [1.0, None]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [{"t": "a", "l": 1}, {"t": "b", "l": 0}]))
    d = tc.load_dataset(jsonl, "t", "l")
    assert d.texts == ["a", "b"] and d.labels == ["1", "0"]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(tc.DataError, match="not found"):
        tc.load_dataset(tmp_path / "missing.csv")
    path = _write_csv(tmp_path / "a.csv", [("hello", "x", "1")])
    with pytest.raises(tc.DataError, match="no label column 'sentiment'.*'text', 'label'"):
        tc.load_dataset(path, "text", "sentiment")
    bad = tmp_path / "a.txt"
    bad.write_text("x")
    with pytest.raises(tc.DataError, match="unsupported file type"):
        tc.load_dataset(bad)
    one_class = _write_csv(tmp_path / "b.csv", [(f"t{i}", "x", "1") for i in range(20)])
    d = tc.load_dataset(one_class, "text", "label")
    with pytest.raises(tc.DataError, match="at least 2 classes"):
        tc.stratified_split(d, 10, 5, 5)
    with pytest.raises(tc.DataError, match="only 20 usable rows"):
        tc.resolve_sizes(20, 15, 5, 5)


def test_split_is_deterministic_stratified_filtered_and_disjoint(data):
    a = tc.stratified_split(data, 100, 30, 60, seed=3, min_confidence=0.5)
    b = tc.stratified_split(data, 100, 30, 60, seed=3, min_confidence=0.5)
    c = tc.stratified_split(data, 100, 30, 60, seed=4, min_confidence=0.5)
    for name in ("train", "val", "test"):
        assert getattr(a, name).indices == getattr(b, name).indices
    assert a.train.indices != c.train.indices
    assert (len(a.train), len(a.val), len(a.test)) == (100, 30, 60)
    ids = [set(s.indices) for s in (a.train, a.val, a.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    # Only confident rows (known confidence >= 0.5) are used.
    for i in ids[0] | ids[1] | ids[2]:
        assert data.confidences[i] is not None and data.confidences[i] >= 0.5
    # Stratified: each split's class shares match the filtered data's within one row.
    kept = [i for i, conf in enumerate(data.confidences) if conf is not None and conf >= 0.5]
    share = {k: v / len(kept) for k, v in Counter(data.labels[i] for i in kept).items()}
    for split in (a.train, a.val, a.test):
        counts = Counter(a.label_names[y] for y in split.labels)
        for label, frac in share.items():
            assert abs(counts[label] - frac * len(split)) <= 1.0
    assert a.label_names == ["neg", "neu", "pos"]


def test_test_set_does_not_depend_on_train_size(data):
    small = tc.stratified_split(data, 50, 30, 60, seed=1)
    large = tc.stratified_split(data, 150, 30, 60, seed=1)
    assert small.test.indices == large.test.indices
    assert small.val.indices == large.val.indices
    assert set(small.train.indices) < set(large.train.indices)


def test_resolve_sizes_defaults_shrink_to_small_data():
    assert tc.resolve_sizes(100_000, None, None, None) == (4000, 1000, 2000)
    assert tc.resolve_sizes(100, None, None, None) == (80, 10, 10)
    assert tc.resolve_sizes(100, 30, None, None) == (30, 10, 10)


def test_batches_pad_dynamically_and_cover_the_epoch():
    enc = tc.Encoded([[5] * n for n in (3, 9, 4, 7, 2, 8, 6, 5)], [0, 1, 0, 1, 0, 1, 0, 1])
    batches = tc.epoch_batches(enc, batch_size=3, pad_id=0, seed=0)
    assert sum(b["labels"].numel() for b in batches) == len(enc)
    for b in batches:
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == lengths.max()  # padded to the batch's longest
        assert torch.all((b["input_ids"] == 0) == (b["attention_mask"] == 0))
    again = tc.epoch_batches(enc, batch_size=3, pad_id=0, seed=0)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))
    stream = tc.train_batches(enc, 4, 0, seed=1)
    assert sum(next(stream)["labels"].numel() for _ in range(6)) == 24  # runs past an epoch


def test_linear_schedule():
    f = tc.linear_schedule(100, warmup_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == 0.0
