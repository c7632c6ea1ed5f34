"""``JobSettings``: one validated place for the job's defaults; the CLI's flags and
messages derive from it."""

from __future__ import annotations

import dataclasses

import pytest

from tunecomp_kernels.compress import TuneCompConfig
from tunecomp_kernels.tasks.compress_job import _translate, flag_of
from tunecomp_kernels.tasks.data import normalize_label
from tunecomp_kernels.tasks.settings import CONFIG_FIELDS, JobSettings, SettingsError, full, quick


def test_the_recipe_is_tunecompconfigs_defaults():
    settings, config = full(), TuneCompConfig()
    for job_name, config_name in CONFIG_FIELDS.items():
        if job_name != "steps":  # the job fixes the run length; the config fits it
            assert getattr(settings, job_name) == getattr(config, config_name), job_name
    built = settings.tunecomp_config()
    assert built.total_steps == settings.steps
    assert built.resolve_schedule().blend_steps == round(0.5 * settings.steps)


def test_presets():
    f, q = full(), quick()
    changed = {k.name for k in dataclasses.fields(JobSettings)
               if getattr(f, k.name) != getattr(q, k.name)}
    assert changed == {"steps", "split_sizes", "eval_every", "checkpoint_every"}
    assert (f.steps, f.split_sizes, f.eval_every) == (150, (4000, 1000, 2000), 30)
    assert (q.steps, q.split_sizes, q.eval_every) == (40, (800, 200, 400), 20)
    assert quick(steps=7).steps == 7


def test_every_field_has_help_and_a_flag_that_maps_back():
    flags = {}
    for f in dataclasses.fields(JobSettings):
        assert f.metadata["help"] and f.metadata["group"]
        flag = flag_of(f.name)
        if flag is not None:
            assert flag.startswith("--") and flag not in flags
            flags[flag] = f.name
    assert flags["--no-progress"] == "progress" and "split_sizes" not in flags.values()


@pytest.mark.parametrize("change, field, needle", [
    ({"ratio": 0.0}, "ratio", "ratio must be in (0, 1]"),
    ({"ratio": 1.5}, "ratio", "ratio must be in (0, 1]"),
    ({"steps": 0}, "steps", "steps must be >= 1"),
    ({"steps": 2.5}, "steps", "steps must be an integer"),
    ({"blend_steps": 200}, "blend_steps", "blend_steps=200 must be <= steps=150"),
    ({"init": "qr"}, "init", "unknown init 'qr'"),
    ({"backend": "opencl"}, "backend", "unknown backend 'opencl'"),
    ({"init_rank_ratio": 0.0}, "init_rank_ratio", "init_rank_ratio must be in (0, 1]"),
    ({"l1": -1.0}, "l1", "l1 must be >= 0"),
    ({"lr": 0.0}, "lr", "lr must be > 0"),
    ({"lr": float("inf")}, "lr", "lr must be a finite number"),
    ({"dense_lr": 0.0}, "dense_lr", "dense_lr must be > 0"),
    ({"dense_lr": float("nan")}, "dense_lr", "dense_lr must be a finite number"),
    ({"max_length": 1}, "max_length", "max_length must be >= 2"),
    ({"train_size": 0}, "train_size", "train_size must be >= 1"),
    ({"warmup_ratio": 1.5}, "warmup_ratio", "warmup_ratio must be in [0, 1]"),
    ({"checkpoint_every": -1}, "checkpoint_every", "checkpoint_every must be >= 0"),
    ({"min_confidence": float("nan")}, "min_confidence", "must be a finite number"),
    ({"model": "/nonexistent"}, "model", "model: directory not found"),
    ({"data": "/nonexistent.csv"}, "data", "data: file not found"),
    ({"feature_weight": -1.0}, "feature_weight", "feature_weight must be >= 0"),
    ({"allocation": "best"}, "allocation", "unknown allocation 'best'"),
    ({"score": "fisher"}, "score", "unknown score 'fisher'"),
])
def test_bad_settings_name_their_field(change, field, needle):
    with pytest.raises(SettingsError) as info:
        full(**change)
    assert info.value.field == field and needle in str(info.value)


def test_messages_are_translated_to_flags_in_one_place():
    assert _translate("blend_steps=200 must be <= steps=150", "blend_steps") == \
        "--blend-steps=200 must be <= --steps=150"
    assert _translate("min_confidence needs confidence_column", "min_confidence") == \
        "--min-confidence needs --confidence-column"
    assert _translate("use a larger train_size") == "use a larger --train-size"
    # plain words that are also field names stay words
    assert _translate("the data file has no model rows") == "the data file has no model rows"


@pytest.mark.parametrize("raw, name", [
    (5, "5"), ("5", "5"), (5.0, "5"), ("5.0", "5"), (" 5 ", "5"), ("05", "5"), (2.5, "2.5"),
    ("2.50", "2.5"), ("positive", "positive"), (" positive ", "positive"), (True, "true"),
    ("", None), ("   ", None), (None, None), ("nan", "nan"),
])
def test_labels_are_normalised(raw, name):
    assert normalize_label(raw) == name


def test_method_options_reach_the_config():
    config = full(score="sensitivity", allocation="uniform", feature_weight=0.5).tunecomp_config()
    assert (config.score, config.allocation, config.feature_weight) == (
        "sensitivity", "uniform", 0.5)
    assert full().tunecomp_config().plan_dense and not full(plan_dense=False).tunecomp_config(
    ).plan_dense
