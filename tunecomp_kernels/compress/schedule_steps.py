"""A config's schedule in optimiser steps (:class:`Schedule`), and how a fraction of the
run becomes a step count (:func:`steps_of`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """A config's schedule fitted to a run of ``total_steps`` optimiser steps (all in steps).

    Attributes:
        total_steps: the run's optimiser steps.
        blend_steps: T, the step at which α reaches 0 and the teachers are freed.
        prune_start, prune_end: the budget tightens from the starting size at
            ``prune_start`` to the target, met at ``prune_end``.
        l1_decay_steps: the step at which λ reaches 0 (decaying L1 schedules).
    """

    total_steps: int
    blend_steps: int
    prune_start: int
    prune_end: int
    l1_decay_steps: int

    @property
    def end(self) -> int:
        """The step from which the blend is over and the budget is met."""
        return max(self.blend_steps, self.prune_end)


def steps_of(fraction: float, total_steps: int) -> int:
    """``round(fraction · total_steps)``, at least 1 when ``fraction > 0`` (so a blend is
    never dropped on a short run) and at most ``total_steps``; 0 for ``fraction == 0``."""
    if fraction == 0:
        return 0
    return min(total_steps, max(1, round(fraction * total_steps)))
