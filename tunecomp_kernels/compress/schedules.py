"""The three schedules of a run, as pure functions of the step ``t``.

* blend: teacher scale α_t and student scale α'_t (docs/design.md#the-method);
* L1 weight λ_t, decaying from λ_0 to 0;
* budget fraction f_t in [0, 1]: 1 at ``prune_start`` (the starting size), 0 at
  ``prune_end`` (the target size).

All of them are deterministic in ``t`` alone, so a resumed run recomputes the same values.
The step counts come from a :class:`~.config.Schedule`: the config's schedule fitted to
the run's length (``config.resolve_schedule(total_steps)``).
"""

from __future__ import annotations

import math

from .config import Schedule, TuneCompConfig


class ScheduleError(RuntimeError):
    """The TuneComp schedule was used or finished wrongly: stepped before its length was
    known, finalized before the budget was met, or rewound to a state it cannot continue
    from. The message gives the numbers and what to do."""


def blend_scales(blend: str, t: int, T: int) -> tuple[float, float]:
    """``(α_t, α'_t)``: the teacher and student scales at step ``t`` of a ``T``-step blend.

    ``sine_power``: α = 1 − sin(πt/2T), α' = sqrt(1 − α²) (the paper's form);
    ``sine_affine``: same α, α' = 1 − α; ``linear``: α = 1 − t/T, α' = 1 − α;
    ``cosine``: α = (1 + cos(πt/T))/2, α' = 1 − α. For ``t >= T`` (and for ``T = 0``)
    α = 0 and α' = 1.
    """
    if t < 0:
        raise ValueError(f"step t must be >= 0, got {t}")
    if t >= T:
        return 0.0, 1.0
    p = t / T
    if blend in ("sine_power", "sine_affine"):
        alpha = 1.0 - math.sin(math.pi * p / 2.0)
    elif blend == "linear":
        alpha = 1.0 - p
    elif blend == "cosine":
        alpha = 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        raise ValueError(f"unknown blend {blend!r}")
    alpha = min(max(alpha, 0.0), 1.0)
    student = math.sqrt(1.0 - alpha * alpha) if blend == "sine_power" else 1.0 - alpha
    return alpha, student


def _decay(kind: str, t: int, start: int, end: int) -> float:
    """1 before ``start``, 0 from ``end`` on, ``kind``-shaped in between."""
    if t >= end:
        return 0.0
    if t <= start:
        return 1.0
    p = (t - start) / (end - start)
    if kind == "linear":
        return 1.0 - p
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "cubic":
        return (1.0 - p) ** 3
    raise ValueError(f"unknown schedule {kind!r}")


def l1_weight(config: TuneCompConfig, t: int, schedule: Schedule | None = None) -> float:
    """λ_t: ``l1_lambda`` decayed by ``l1_schedule`` to 0 at ``schedule.l1_decay_steps``.

    ``schedule`` defaults to ``config.resolve_schedule()``, which raises ``ValueError`` when
    the config leaves the run length open (``total_steps=None``)."""
    if config.l1_schedule == "constant":
        return config.l1_lambda
    schedule = config.resolve_schedule() if schedule is None else schedule
    return config.l1_lambda * _decay(config.l1_schedule, t, 0, schedule.l1_decay_steps)


def budget_fraction(config: TuneCompConfig, t: int, schedule: Schedule | None = None) -> float:
    """f_t: how far the budget still is from the target (1 = starting size, 0 = target),
    between ``schedule.prune_start`` and ``schedule.prune_end`` (default schedule as in
    :func:`l1_weight`)."""
    schedule = config.resolve_schedule() if schedule is None else schedule
    return _decay(config.budget_schedule, t, schedule.prune_start, schedule.prune_end)
