"""The arithmetic of ``bench/reproduce.py``'s report: the per-method table, the paired
per-seed differences with their Student-t confidence intervals, and the Goals lines.

Every method in a reproduction sees the same split and the same batch stream for a given
seed, so methods are compared seed by seed: for each seed the difference of two methods'
accuracies, then the mean of those differences over seeds with a 95 % confidence interval
``mean ± t(0.975, n−1) · sd / √n`` (docs/design.md#measuring). Differences are in
accuracy points (percent).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

METHOD_TITLES = {
    "dense": "dense fine-tune",
    "seq_a": "(a) fine-tune → truncate → fine-tune",
    "seq_b": "(b) truncate → fine-tune",
    "tunecomp": "TuneComp (joint)",
}
#: t(0.975, dof) for dof = 1 .. 30 (two-sided 95 %).
T975 = (12.7062047, 4.3026527, 3.1824463, 2.7764451, 2.5705818, 2.4469119, 2.3646243,
        2.3060041, 2.2621572, 2.2281389, 2.2009852, 2.1788128, 2.1603687, 2.1447867,
        2.1314495, 2.1199053, 2.1098155, 2.1009220, 2.0930241, 2.0859634, 2.0796138,
        2.0738731, 2.0686576, 2.0638986, 2.0595386, 2.0555294, 2.0518305, 2.0484071,
        2.0452296, 2.0422725)
#: The goals: TuneComp beats each baseline by at least this many points (with the CI's
#: lower bound above 0), and is within DENSE_GAP points of dense at 50 % (mean gap).
MIN_GAIN = 1.0
DENSE_GAP = 1.5


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom: the table for
    1..30, a Cornish-Fisher expansion around the normal quantile beyond (error < 1e-5).

    Raises:
        ValueError: ``dof`` < 1.
    """
    if dof < 1:
        raise ValueError(f"t quantile needs dof >= 1, got {dof}")
    if dof <= len(T975):
        return T975[dof - 1]
    z = 1.959963984540054
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof ** 2 + g3 / dof ** 3


@dataclass(frozen=True)
class PairedCI:
    """The mean of per-seed differences and its 95 % Student-t interval (None for a
    single seed: no spread to estimate)."""

    diffs: tuple[float, ...]
    mean: float
    half_width: float | None

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def lower(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def upper(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def to_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "half_width": self.half_width,
                "lower": self.lower, "upper": self.upper, "diffs": list(self.diffs)}

    def text(self) -> str:
        """``+1.23 [+0.10, +2.36]`` (or ``+1.23 [n=1, no CI]``)."""
        if self.half_width is None:
            return f"{self.mean:+.2f} [n={self.n}, no CI]"
        return f"{self.mean:+.2f} [{self.lower:+.2f}, {self.upper:+.2f}]"


def paired_ci(diffs: Sequence[float]) -> PairedCI:
    """Mean and 95 % CI of paired differences ``diffs`` (one per seed).

    Raises:
        ValueError: no differences, or one that is not finite.
    """
    values = tuple(float(d) for d in diffs)
    if not values:
        raise ValueError("paired_ci needs at least one difference")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"paired_ci got a non-finite difference: {values}")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return PairedCI(values, mean, None)
    sd = statistics.stdev(values)
    return PairedCI(values, mean, t_quantile_975(len(values) - 1) * sd / math.sqrt(len(values)))


# --- the per-method table ------------------------------------------------------------------

def run_key(spec: dict) -> str:
    """``method|budget|seed``: what identifies a run in a plan."""
    ratio = spec.get("ratio")
    return f"{spec['method']}|{'' if ratio is None else ratio}|{spec['seed']}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def complete_seeds(runs: list[dict], plan: list[dict]) -> list[int]:
    """Seeds whose planned runs have all finished (the table uses only these, so every
    row averages over the same seeds)."""
    done = {run_key(r["spec"]) for r in runs}
    seeds = sorted({s["seed"] for s in plan})
    return [seed for seed in seeds
            if all(run_key(s) in done for s in plan if s["seed"] == seed)]


def aggregate(runs: list[dict], seeds: list[int] | None = None) -> list[dict]:
    """One table row per (method, budget): mean ± std of test and val accuracy over the
    runs of ``seeds`` (all if None), mean parameters and wall time, peak RSS; (a)'s rows
    include the time and memory of its shared dense phase."""
    phase1 = {r["spec"]["seed"]: r for r in runs if r["spec"]["method"] == "seq_a_phase1"}
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        spec = r["spec"]
        if spec["method"] == "seq_a_phase1":
            continue
        if seeds is not None and spec["seed"] not in seeds:
            continue
        r = dict(r)
        if spec["method"] == "seq_a" and spec["seed"] in phase1:
            p1 = phase1[spec["seed"]]
            r["wall_s"] += p1["wall_s"]
            r["peak_rss_mb"] = max(r["peak_rss_mb"], p1["peak_rss_mb"])
        groups.setdefault((spec["method"], spec.get("ratio")), []).append(r)
    rows = []
    order = list(METHOD_TITLES)
    for (method, ratio), rs in sorted(groups.items(),
                                      key=lambda kv: (-(kv[0][1] or 1.0),
                                                      order.index(kv[0][0]))):
        test_m, test_s = _mean_std([r["test_accuracy"] for r in rs])
        val_m, val_s = _mean_std([r["val_accuracy"] for r in rs])
        rows.append({
            "method": method, "title": METHOD_TITLES[method], "budget": ratio,
            "init": rs[0]["spec"].get("init") or rs[0]["spec"].get("joint", {}).get("init"),
            "seeds": sorted(r["spec"]["seed"] for r in rs),
            "test_mean": test_m, "test_std": test_s, "val_mean": val_m, "val_std": val_s,
            "params": statistics.fmean(r["params"] for r in rs),
            "params_before": rs[0]["params_before"],
            "model_params": statistics.fmean(r["model_params"] for r in rs),
            "wall_s": statistics.fmean(r["wall_s"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        })
    return rows


# --- paired differences --------------------------------------------------------------------

def _per_seed(runs: Sequence[dict], seeds: Sequence[int] | None) -> dict[tuple, dict]:
    """(method, budget, seed) → run, phase-1 records of (a) left out."""
    out = {}
    for r in runs:
        spec = r["spec"]
        if spec["method"] == "seq_a_phase1" or (seeds is not None and spec["seed"] not in seeds):
            continue
        out[(spec["method"], spec.get("ratio"), spec["seed"])] = r
    return out


def comparisons(budgets: Sequence[float]) -> list[tuple[float, tuple, tuple]]:
    """(budget, minuend, subtrahend) per reported difference: TuneComp − (a) and − (b) at
    every budget, dense − TuneComp at 50 %."""
    out = []
    for budget in sorted(budgets, reverse=True):
        joint = ("tunecomp", budget)
        out += [(budget, joint, ("seq_a", budget)), (budget, joint, ("seq_b", budget))]
        if math.isclose(budget, 0.5):
            out.append((budget, ("dense", None), joint))
    return out


def paired_differences(runs: Sequence[dict], seeds: Sequence[int] | None = None) -> list[dict]:
    """Per-seed differences (points) of test and val accuracy for each comparison whose
    two methods both ran on at least one common seed (restricted to ``seeds`` if given)."""
    by = _per_seed(runs, seeds)
    budgets = {k[1] for k in by if k[1] is not None}
    rows = []
    for budget, (ma, ra), (mb, rb) in comparisons(budgets):
        common = sorted({k[2] for k in by if k[:2] == (ma, ra)}
                        & {k[2] for k in by if k[:2] == (mb, rb)})
        if not common:
            continue
        row = {"budget": budget, "minuend": ma, "subtrahend": mb, "seeds": common}
        for split in ("test", "val"):
            diffs = [100 * (by[(ma, ra, s)][f"{split}_accuracy"]
                            - by[(mb, rb, s)][f"{split}_accuracy"]) for s in common]
            row[split] = paired_ci(diffs).to_dict()
        rows.append(row)
    return rows


def _ci(d: dict) -> PairedCI:
    return PairedCI(tuple(d["diffs"]), d["mean"], d["half_width"])


def goal_line(row: dict) -> str:
    """One Goals line for a row of :func:`paired_differences` (on test accuracy).

    TuneComp − baseline: met only if the mean is ≥ +MIN_GAIN points and the CI's lower
    bound is > 0. dense − TuneComp: met if the mean gap is ≤ DENSE_GAP points (the CI is
    printed beside it). A single seed gives no CI, so no goal is met on one seed.
    """
    ci = _ci(row["test"])
    label = f"{METHOD_TITLES[row['minuend']]} − {METHOD_TITLES[row['subtrahend']]}"
    where = f"{row['budget']:.0%}: {label} = {ci.text()} points (n={ci.n})"
    if row["minuend"] == "dense":
        rule = f"goal: mean ≤ {DENSE_GAP:.2f}"
        met = ci.upper is not None and ci.mean <= DENSE_GAP
    else:
        rule = f"goal: mean ≥ +{MIN_GAIN:.2f} and CI lower bound > 0"
        met = ci.lower is not None and ci.mean >= MIN_GAIN and ci.lower > 0
    return f"{where} ({rule}): {'met' if met else 'NOT met'}"


def goals(paired: Sequence[dict]) -> list[str]:
    """The Goals lines, one per row of :func:`paired_differences`."""
    return [goal_line(row) for row in paired]


def paired_markdown(paired: Sequence[dict]) -> list[str]:
    """The paired-differences table (markdown lines; empty when there is nothing)."""
    if not paired:
        return []
    lines = ["| budget | difference | test: mean [95% CI] | val: mean [95% CI] | seeds "
             "| per-seed test differences |", "|---|---|---|---|---|---|"]
    for row in paired:
        label = f"{METHOD_TITLES[row['minuend']]} − {METHOD_TITLES[row['subtrahend']]}"
        per_seed = ", ".join(f"{d:+.2f}" for d in row["test"]["diffs"])
        lines.append(f"| {row['budget']:.0%} | {label} | {_ci(row['test']).text()} | "
                     f"{_ci(row['val']).text()} | {','.join(map(str, row['seeds']))} | "
                     f"{per_seed} |")
    return lines
