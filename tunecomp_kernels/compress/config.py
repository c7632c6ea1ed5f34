"""``TuneCompConfig``: every knob of a joint fine-tune + compress run, validated up front.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` (or
``TypeError`` for a wrong type) whose message names the field and the value, and for
named choices lists the allowed ones.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..nn.init import INIT_METHODS
from ..ops.backends import check_backend_name

BLENDS = ("sine_power", "sine_affine", "linear", "cosine")
L1_SCHEDULES = ("constant", "linear", "cosine")
BUDGET_SCHEDULES = ("cubic", "linear", "cosine")
SCORES = ("auto", "magnitude", "activation")
DISTILL_MODES = ("none", "logits", "hidden")


@dataclass
class TuneCompConfig:
    """Configuration of TuneComp joint fine-tuning and compression.

    Budget
        target_ratio: fraction of the targeted layers' parameters kept at the end, in
            ``(0, 1]``. A low-rank layer costs ``rank·(in + out)`` (U and V), a dense one
            ``in·out``; biases and masks are not counted. A layer whose low-rank form is not
            smaller than its dense form counts as dense and is exported dense.
        min_rank: no layer is pruned below this many ranks.

    Module selection (regular expressions, ``re.search`` on the qualified module name)
        include: ``None`` (default) selects every ``nn.Linear`` / HF GPT-2 ``Conv1D`` that
            lives inside an ``nn.ModuleList`` (the repeated blocks of a transformer; a model
            without any ``ModuleList`` gets all its linear layers), minus task heads and
            poolers (any name component in :data:`~.targets.HEAD_NAMES`). Otherwise only
            linear layers whose name matches one of the patterns.
        exclude: linear layers whose name matches any of these patterns stay dense.

    Initialisation
        init: ``"svd"``, ``"asvd"`` or ``"svd_llm"`` (the last two need calibration data).
        init_rank_ratio: starting rank as a fraction of ``min(in, out)``, in ``(0, 1]``;
            it should start above the budget so that pruning has room.
        asvd_alpha: exponent of the ASVD activation scaling ``mean|x|^alpha``.

    Blend (teacher → student), over ``blend_steps`` = T optimiser steps
        blend: ``"sine_power"`` (paper: α = 1 − sin(πt/2T), α' = sqrt(1 − α²)),
            ``"sine_affine"`` (same α, α' = 1 − α), ``"linear"`` (α = 1 − t/T, α' = 1 − α),
            ``"cosine"`` (α = (1 + cos(πt/T))/2, α' = 1 − α). α = 0 for t ≥ T, and the
            teacher weights are freed then.
        total_steps: planned optimiser steps of the whole run (``blend_steps <= total_steps``).

    Sparsity
        l1_lambda: λ_0, weight of the L1 penalty ``λ_t Σ|mask|``.
        l1_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay of λ_t to 0 at
            ``l1_decay_steps`` (default: ``prune_end``).
        shrink_threshold: hard shrinkage τ: after every step ranks with ``|mask| <= τ`` are
            pruned for good.
        prune_start, prune_end: the global budget tightens from the starting size (at
            ``prune_start``) to the target (reached at ``prune_end``, default ``blend_steps``)
            along ``budget_schedule`` (``"cubic"``, ``"linear"`` or ``"cosine"``).
        score: rank importance for the global ranking: ``"magnitude"`` =
            ``|mask_i|·‖U[:, i]‖·‖V[i, :]‖``; ``"activation"`` weights the columns of V by the
            calibration inputs' RMS per channel (needs calibration data); ``"auto"``
            (default) is ``"activation"`` when calibration data is given, else
            ``"magnitude"``.
        score_per_param: rank by importance per parameter freed (score / (in + out)).

    Distillation (optional, against the frozen teacher while it is alive, t < T)
        distill: ``"none"``, ``"logits"`` (KL on softened logits) or ``"hidden"`` (MSE on
            hidden states).
        distill_weight, distill_temperature: weight of the term; softmax temperature.

    Execution
        backend: op backend of the :class:`~tunecomp_kernels.MaskedLowRankLinear` layers.
    """

    target_ratio: float = 0.5
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    init: str = "svd"
    init_rank_ratio: float = 1.0
    asvd_alpha: float = 0.5
    blend: str = "sine_power"
    blend_steps: int = 100
    total_steps: int = 200
    l1_lambda: float = 1e-4
    l1_schedule: str = "cosine"
    l1_decay_steps: int | None = None
    shrink_threshold: float = 1e-3
    prune_start: int = 0
    prune_end: int | None = None
    budget_schedule: str = "cubic"
    score: str = "auto"
    score_per_param: bool = True
    min_rank: int = 1
    distill: str = "none"
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    backend: str = "auto"
    _patterns: dict[str, list[re.Pattern[str]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.target_ratio = _number("target_ratio", self.target_ratio)
        if not 0.0 < self.target_ratio <= 1.0:
            raise ValueError(f"target_ratio must be in (0, 1], got {self.target_ratio}")
        self.include = None if self.include is None else _patterns("include", self.include)
        self.exclude = _patterns("exclude", self.exclude)
        self._patterns = {
            "include": [re.compile(p) for p in (self.include or ())],
            "exclude": [re.compile(p) for p in self.exclude],
        }
        _choice("init", self.init, INIT_METHODS)
        self.init_rank_ratio = _number("init_rank_ratio", self.init_rank_ratio)
        if not 0.0 < self.init_rank_ratio <= 1.0:
            raise ValueError(f"init_rank_ratio must be in (0, 1], got {self.init_rank_ratio}")
        self.asvd_alpha = _number("asvd_alpha", self.asvd_alpha)
        if self.asvd_alpha < 0:
            raise ValueError(f"asvd_alpha must be >= 0, got {self.asvd_alpha}")
        _choice("blend", self.blend, BLENDS)
        _integer("blend_steps", self.blend_steps, minimum=0)
        _integer("total_steps", self.total_steps, minimum=1)
        if self.blend_steps > self.total_steps:
            raise ValueError(
                f"blend_steps={self.blend_steps} must be <= total_steps={self.total_steps}"
            )
        self.l1_lambda = _number("l1_lambda", self.l1_lambda)
        if self.l1_lambda < 0:
            raise ValueError(f"l1_lambda must be >= 0, got {self.l1_lambda}")
        _choice("l1_schedule", self.l1_schedule, L1_SCHEDULES)
        if self.l1_decay_steps is not None:
            _integer("l1_decay_steps", self.l1_decay_steps, minimum=0)
        self.shrink_threshold = _number("shrink_threshold", self.shrink_threshold)
        if self.shrink_threshold < 0:
            raise ValueError(f"shrink_threshold must be >= 0, got {self.shrink_threshold}")
        _integer("prune_start", self.prune_start, minimum=0)
        if self.prune_end is not None:
            _integer("prune_end", self.prune_end, minimum=0)
        if self.prune_start > self.resolved_prune_end:
            raise ValueError(
                f"prune_start={self.prune_start} must be <= prune_end={self.resolved_prune_end}"
            )
        if self.resolved_prune_end > self.total_steps:
            raise ValueError(
                f"prune_end={self.resolved_prune_end} must be <= total_steps={self.total_steps}"
            )
        _choice("budget_schedule", self.budget_schedule, BUDGET_SCHEDULES)
        _choice("score", self.score, SCORES)
        if not isinstance(self.score_per_param, bool):
            raise TypeError(
                f"score_per_param must be a bool, got {type(self.score_per_param).__name__}"
            )
        _integer("min_rank", self.min_rank, minimum=1)
        _choice("distill", self.distill, DISTILL_MODES)
        self.distill_weight = _number("distill_weight", self.distill_weight)
        if self.distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        self.distill_temperature = _number("distill_temperature", self.distill_temperature)
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        check_backend_name(self.backend)

    # --- derived values ------------------------------------------------------------------

    @property
    def resolved_prune_end(self) -> int:
        """The step at which the budget is met: ``prune_end``, or ``blend_steps`` if unset."""
        return self.blend_steps if self.prune_end is None else self.prune_end

    @property
    def resolved_l1_decay_steps(self) -> int:
        """The step at which λ reaches 0: ``l1_decay_steps``, or the prune end if unset."""
        return self.resolved_prune_end if self.l1_decay_steps is None else self.l1_decay_steps

    @property
    def needs_calibration(self) -> bool:
        """Whether :func:`~.prepare.prepare` needs calibration inputs for this config."""
        return self.init in ("asvd", "svd_llm") or self.score == "activation"

    def include_patterns(self) -> list[re.Pattern[str]] | None:
        """Compiled ``include`` patterns, or ``None`` for the default selection."""
        return None if self.include is None else self._patterns["include"]

    def exclude_patterns(self) -> list[re.Pattern[str]]:
        """Compiled ``exclude`` patterns."""
        return self._patterns["exclude"]

    # --- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneCompConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they name the key)."""
        if not isinstance(data, dict):
            raise TypeError(f"TuneCompConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TuneCompConfig field(s) {unknown}; known: {sorted(known)}")
        kwargs = dict(data)
        for key in ("include", "exclude"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


# --- field checks ------------------------------------------------------------------------


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _integer(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


def _patterns(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(
            f"{name} must be a sequence of regular expressions, got {type(value).__name__}"
        )
    out = []
    for pattern in value:
        if not isinstance(pattern, str):
            raise TypeError(f"{name} patterns must be str, got {type(pattern).__name__}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{name} pattern {pattern!r} is not a valid regex: {exc}") from exc
        out.append(pattern)
    return tuple(out)
