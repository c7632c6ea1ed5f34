"""bench/reproduce_stats.py: the paired per-seed differences, their Student-t CIs and the
Goals lines of the reproduction."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import reproduce_stats as rs  # noqa: E402

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


@pytest.mark.parametrize("dof,expected", sorted(T_975.items()))
def test_t_quantile_matches_the_printed_table(dof, expected):
    assert rs.t_quantile_975(dof) == pytest.approx(expected, abs=1e-3)


def test_t_quantile_against_scipy_and_monotone():
    stats = pytest.importorskip("scipy.stats")
    values = [rs.t_quantile_975(d) for d in range(1, 301)]
    for dof, value in enumerate(values, 1):
        assert value == pytest.approx(stats.t.ppf(0.975, dof), rel=1e-6, abs=2e-6), dof
    assert all(a > b for a, b in zip(values, values[1:]))  # no jump at the table's end


@pytest.mark.parametrize("dof", [0, -1])
def test_t_quantile_rejects_nonpositive_dof(dof):
    with pytest.raises(ValueError, match="dof >= 1"):
        rs.t_quantile_975(dof)


def test_paired_ci_known_values():
    ci = rs.paired_ci([1.0, 2.0, 3.0])
    half = 4.3026527 * 1.0 / math.sqrt(3)  # t(0.975, 2) · sd / √n, sd = 1
    assert ci.n == 3 and ci.mean == pytest.approx(2.0)
    assert ci.half_width == pytest.approx(half, rel=1e-7)
    assert (ci.lower, ci.upper) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    two = rs.paired_ci([-1.0, 3.0])  # sd = 2√2, t(0.975, 1) = 12.706
    assert two.mean == pytest.approx(1.0)
    assert two.half_width == pytest.approx(12.7062047 * 2 * math.sqrt(2) / math.sqrt(2))


def test_paired_ci_against_scipy_on_random_samples():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for n in range(2, 13):
        diffs = [rng.gauss(0.7, 1.3) for _ in range(n)]
        ci = rs.paired_ci(diffs)
        lo, hi = stats.t.interval(0.95, n - 1, loc=stats.tmean(diffs), scale=stats.sem(diffs))
        assert (ci.lower, ci.upper) == (pytest.approx(lo, rel=1e-6), pytest.approx(hi, rel=1e-6))


def test_paired_ci_one_seed_has_no_interval_and_bad_input_raises():
    one = rs.paired_ci([2.5])
    assert one.mean == 2.5 and one.half_width is None and one.lower is None
    assert "no CI" in one.text()
    with pytest.raises(ValueError, match="at least one"):
        rs.paired_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        rs.paired_ci([1.0, float("nan")])


def _run(method, ratio, seed, test, val):
    spec = {"method": method, "seed": seed}
    if ratio is not None:
        spec["ratio"] = ratio
    return {"spec": spec, "test_accuracy": test, "val_accuracy": val}


def _runs():
    runs = []
    for seed, off in ((0, 0.00), (1, 0.01), (2, -0.01)):
        runs += [_run("dense", None, seed, 0.80 + off, 0.81 + off),
                 _run("seq_a_phase1", None, seed, 0.0, 0.0)]
        for ratio, drop in ((0.5, 0.0), (0.25, 0.05)):
            runs += [_run("tunecomp", ratio, seed, 0.79 - drop + off, 0.80 - drop),
                     _run("seq_a", ratio, seed, 0.77 - drop + off + 0.01 * seed, 0.78 - drop),
                     _run("seq_b", ratio, seed, 0.75 - drop, 0.76 - drop)]
    return runs


def test_paired_differences_pairs_seed_by_seed():
    rows = rs.paired_differences(_runs())
    keys = [(r["budget"], r["minuend"], r["subtrahend"]) for r in rows]
    assert keys == [(0.5, "tunecomp", "seq_a"), (0.5, "tunecomp", "seq_b"),
                    (0.5, "dense", "tunecomp"), (0.25, "tunecomp", "seq_a"),
                    (0.25, "tunecomp", "seq_b")]
    a50 = rows[0]
    assert a50["seeds"] == [0, 1, 2]
    assert a50["test"]["diffs"] == pytest.approx([2.0, 1.0, 0.0])  # points, per seed
    assert a50["val"]["diffs"] == pytest.approx([2.0, 2.0, 2.0])
    assert a50["val"]["half_width"] == pytest.approx(0.0)
    b50 = rows[1]["test"]  # seq_b has no seed offset: the differences carry it
    assert b50["diffs"] == pytest.approx([4.0, 5.0, 3.0])
    assert rows[2]["test"]["diffs"] == pytest.approx([1.0, 1.0, 1.0])
    only = rs.paired_differences(_runs(), seeds=[1])
    assert all(r["seeds"] == [1] and r["test"]["half_width"] is None for r in only)


def test_paired_differences_uses_only_common_seeds():
    runs = [r for r in _runs() if not (r["spec"]["method"] == "seq_b" and r["spec"]["seed"] == 2)]
    rows = {(r["budget"], r["subtrahend"]): r for r in rs.paired_differences(runs)}
    assert rows[(0.5, "seq_b")]["seeds"] == [0, 1]
    assert rows[(0.5, "seq_a")]["seeds"] == [0, 1, 2]
    assert rs.paired_differences([]) == []


def _row(minuend, diffs, budget=0.5):
    ci = rs.paired_ci(diffs)
    return {"budget": budget, "minuend": minuend,
            "subtrahend": "tunecomp" if minuend == "dense" else "seq_a",
            "seeds": list(range(len(diffs))), "test": ci.to_dict(), "val": ci.to_dict()}


@pytest.mark.parametrize("diffs,met", [
    ([2.0, 2.5, 1.5], True),      # mean 2, CI [0.76, 3.24]
    ([1.0, 1.0, 1.0], True),      # mean exactly +1, CI collapsed at 1
    ([0.9, 0.95, 0.85], False),   # CI above 0 but the mean is short of +1
    ([4.0, -1.0, 2.0], False),    # mean 1.67 but the CI reaches below 0
    ([5.0], False),               # one seed: no CI, no claim
    ([-2.0, -1.0, -3.0], False),
])
def test_goal_gain_needs_mean_and_ci_lower_bound(diffs, met):
    line = rs.goal_line(_row("tunecomp", diffs))
    assert line.endswith(": met" if met else ": NOT met"), line
    assert "mean ≥ +1.00 and CI lower bound > 0" in line


@pytest.mark.parametrize("diffs,met", [
    ([0.5, 0.6, 0.4], True),      # mean 0.5
    ([1.5, 1.5, 1.5], True),      # mean exactly 1.5
    ([0.5, 2.5, -0.5], True),     # mean 0.83 (its CI, printed beside it, reaches 4.6)
    ([1.6, 1.7, 1.8], False),
    ([0.0], False),               # one seed: no CI, no claim
])
def test_goal_dense_gap_is_on_the_mean(diffs, met):
    line = rs.goal_line(_row("dense", diffs))
    assert line.endswith(": met" if met else ": NOT met"), line
    assert line.startswith("50%: dense fine-tune − TuneComp (joint)")


def test_goals_and_markdown_cover_every_row():
    rows = rs.paired_differences(_runs())
    lines = rs.goals(rows)
    assert len(lines) == len(rows) == 5
    assert sum(x.endswith(": met") for x in lines) == 3  # (b) at both budgets, dense gap
    table = rs.paired_markdown(rows)
    assert len(table) == 2 + len(rows)
    # TuneComp − (a) at 50 %: per-seed +2, +1, 0 → mean +1, half-width 4.303/√3 = 2.48
    assert "| +1.00 [-1.48, +3.48] |" in table[2] and table[2].endswith("| +2.00, +1.00, +0.00 |")
    assert rs.paired_markdown([]) == []
