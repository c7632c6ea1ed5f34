"""``TuneCompConfig``: every knob of a joint fine-tune + compress run, validated up front.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` (or
``TypeError`` for a wrong type) whose message names the field and the value, and for
named choices lists the allowed ones.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..nn.init import INIT_METHODS
from ..ops.backends import check_backend_name
from .allocation import ALLOCATIONS
from .config_checks import TEACHER_DTYPES as TEACHER_DTYPES  # noqa: F401 (public)
from .config_checks import (
    boolean,
    check_init,
    check_teacher_dtype,
    choice,
    fraction,
    integer,
    number,
    patterns,
)
from .schedule_steps import Schedule, steps_of

BLENDS = ("sine_power", "sine_affine", "linear", "cosine")
L1_SCHEDULES = ("constant", "linear", "cosine")
BUDGET_SCHEDULES = ("cubic", "linear", "cosine")
SCORES = ("auto", "magnitude", "activation", "sensitivity")
DISTILL_MODES = ("none", "logits", "hidden")
#: Student initialisations: ``"auto"`` is ``"svd_llm"`` when calibration data is given,
#: else ``"svd"`` (:meth:`TuneCompConfig.resolved`).
INITS = ("auto", *INIT_METHODS)

#: The joint recipe chosen on the validation split (``bench/results/reproduction_pilots.md``):
#: the defaults of :class:`TuneCompConfig`, and what ``tunecomp compress`` and the
#: reproduction use. The student starts from a plain SVD at 0.75 of full rank, with or
#: without calibration data (SVD-LLM, ``init="auto"``, was better at 25 % but worse at
#: 50 % and on average over the two budgets); the blend runs over the first
#: ``blend_fraction`` of the run and the budget, shared between layers during training, is
#: met when it ends; the pruning score is ``"magnitude"`` even when calibration data is
#: passed. Train at the learning rate it was validated with (:data:`JOINT_LR`).
RECIPE: Mapping[str, Any] = MappingProxyType({
    "init": "svd",
    "init_rank_ratio": 0.75,
    "blend": "sine_affine",
    "blend_fraction": 0.5,
    "l1_lambda": 1e-4,
    "l1_schedule": "cosine",
    "shrink_threshold": 1e-3,
    "budget_schedule": "cubic",
    "plan_dense": True,
    "score": "magnitude",
    "distill": "none",
})

#: The peak AdamW learning rate for the recipe (MiniLM-L6, batch 32, 200 steps), chosen on
#: val over two tasks and both budgets (``bench/results/reproduction_pilots.md``, round 3):
#: the best mean accuracy among the rates whose double still trained everywhere. 8e-4 had
#: the best mean, but at 1.6e-3 the joint run broke down on MMLU subjects at 50 %. The
#: joint run wants about twice a dense fine-tune's rate: it learns slowly below its best
#: rate (16 points lost at 25 % on MMLU subjects at a quarter of it).
JOINT_LR = 4e-4

# A run length long enough that every fraction > 0 of it exceeds any explicit step count:
# the schedule's values at step 0 (all that is needed before the run length is known)
# depend only on which of its end points are 0, so a run this long gives them.
_NOMINAL_STEPS = 1 << 40


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

    The defaults are the recipe chosen on validation data (:data:`RECIPE`). Train at
    about :data:`JOINT_LR` (4e-4 for MiniLM at batch 32), roughly twice a dense
    fine-tune's rate: the factorised student learns slowly at a dense rate (16 points
    lost on val at a quarter of a task's best rate).

    Initialisation
        init: ``"svd"``, ``"asvd"`` or ``"svd_llm"`` (the last two need calibration
            data), or ``"auto"``: ``"svd_llm"`` when calibration data is given, else
            ``"svd"``.
        init_rank_ratio: starting rank as a fraction of ``min(in, out)``, in ``(0, 1]``
            (default 0.75); it should start above the budget so that pruning has room.
        asvd_alpha: exponent of the ASVD activation scaling ``mean|x|^alpha``.

    Run length. By default the schedule is expressed in fractions of the run and fitted to
    the trainer's planned optimiser steps when training starts
    (:meth:`~.controller.TuneCompController.fit_schedule`, called by the HF / Lightning
    callbacks and ``train``), so changing the number of steps keeps a sound schedule.
        total_steps: ``None`` (default): the run's length, known when training starts.
            An int fixes it; the trainer must then plan exactly this many steps.
        blend_steps: T in optimiser steps; ``None`` (default): ``blend_fraction`` of the
            run. An int is used as it is (``blend_steps <= total_steps``).
        blend_fraction: T as a fraction of the run, in ``[0, 1]`` (default 0.5), used when
            ``blend_steps`` is ``None``; ``round(fraction · steps)``, at least 1 step
            when the fraction is > 0.

    Blend (teacher → student), over T optimiser steps
        blend: ``"sine_power"`` (paper: α = 1 − sin(πt/2T), α' = sqrt(1 − α²)),
            ``"sine_affine"`` (default; same α, α' = 1 − α), ``"linear"`` (α = 1 − t/T,
            α' = 1 − α), ``"cosine"`` (α = (1 + cos(πt/T))/2, α' = 1 − α). α = 0 for
            t ≥ T, and the teacher weights are freed then.

    Sparsity
        l1_lambda: λ_0, weight of the L1 penalty ``λ_t Σ|mask|``.
        l1_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay of λ_t to 0 at
            ``l1_decay_steps`` (default: ``prune_end``).
        shrink_threshold: hard shrinkage τ: after every step ranks with ``|mask| <= τ`` are
            pruned for good.
        prune_start, prune_end: the global budget tightens from the starting size (at
            ``prune_start``) to the target (met at ``prune_end``; default: where the blend
            ends) along ``budget_schedule`` (``"cubic"``, ``"linear"`` or ``"cosine"``).
        prune_end_fraction: ``prune_end`` as a fraction of the run, in ``[0, 1]``
            (exclusive with ``prune_end``).
        prune_start_fraction: ``prune_start`` as a fraction of the run (exclusive with a
            ``prune_start`` > 0): pruning waits until the task head has warmed up.
        allocation: how the budget is shared between layers (:mod:`~.allocation`):
            ``"adaptive"`` (default: global ranking on the current scores during
            training), or planned before training from the init's spectrum —
            ``"global"``, ``"uniform"``, ``"floor"``, ``"sigma2"``. A planned allocation
            leaves a layer dense (an ``nn.Linear``, fine-tuned) when its final rank would
            not make it smaller, and prunes every other layer within itself.
        plan_dense: with ``"adaptive"``, a layer that the ``"global"`` plan would not make
            smaller stays an ``nn.Linear`` (fine-tuned dense, no teacher); the others share
            the rest of the budget (default True). ``False`` converts every layer.
        allocation_floor: for ``"floor"``, the fraction of its uniform rank every layer
            keeps, in ``[0, 1]``.
        prune_fraction: with a planned allocation, each layer starts at
            ``ceil(final_rank / (1 − prune_fraction))`` (capped at full rank), so that this
            fraction of its starting ranks is pruned; ``None`` (default): start at
            ``init_rank_ratio``. In ``[0, 1)``.
        score: rank importance for the global ranking: ``"magnitude"`` (default) =
            ``|mask_i|·‖U[:, i]‖·‖V[i, :]‖``, also when calibration data is given;
            ``"activation"`` weights the columns of V by the calibration inputs' RMS per
            channel (needs calibration data); ``"sensitivity"``: AdaLoRA's smoothed
            sensitivity of the task loss (:mod:`~.scoring`; task-aware; DDP yes, FSDP2
            sharded layers not yet: NotImplementedError); ``"auto"`` is
            ``"activation"`` when calibration data is given, else ``"magnitude"``.
        score_per_param: rank by importance per parameter freed (score / (in + out)).

    Feature loss (per layer, while the teacher is alive, t < T)
        feature_weight: β_0. Each layer's student branch is pulled towards its teacher
            branch on the same forward, ``ℓ = Σ(y_s − y_t)² / Σ y_t²``, with weight
            ``β_t = β_0·α_t`` (decaying with the blend); the gradient goes into the layer's
            own U, mask, V and bias inside the op's backward
            (:func:`~tunecomp_kernels.ops.masked_lowrank_linear_distill`), so no loss term
            has to be added and no second teacher pass runs. 0 (default): off. It acts
            once per backward pass: with gradient accumulation over k micro-batches (a task
            loss averaged over them), divide it by k to keep the same balance.

    Distillation (optional, against the frozen teacher while it is alive, t < T)
        distill: ``"none"``, ``"logits"`` (KL on softened logits) or ``"hidden"`` (MSE on
            hidden states).
        distill_weight, distill_temperature: weight of the term; softmax temperature.

    Execution
        backend: op backend of the :class:`~tunecomp_kernels.MaskedLowRankLinear` layers.
        teacher_dtype: the dtype ``prepare`` stores the frozen teachers in: ``None``
            (default) the model's own; ``"bfloat16"`` or ``"float16"`` (float32 models
            only) halves their memory, the blend still accumulating in fp32. Not with
            ``distill`` (yet).
        compact_during_training: remove pruned ranks from the layers (and from the
            attached optimiser's state) during training, at a few steps of the run and
            when the budget is met, instead of masking them until ``finalize``
            (:mod:`~.compaction`; default True). Results equal the masked run to
            rounding. A run may resume with the other value.
    """

    target_ratio: float = 0.5
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    init: str = RECIPE["init"]
    init_rank_ratio: float = RECIPE["init_rank_ratio"]
    asvd_alpha: float = 0.5
    blend: str = RECIPE["blend"]
    blend_steps: int | None = None
    total_steps: int | None = None
    blend_fraction: float = RECIPE["blend_fraction"]
    l1_lambda: float = RECIPE["l1_lambda"]
    l1_schedule: str = RECIPE["l1_schedule"]
    l1_decay_steps: int | None = None
    shrink_threshold: float = RECIPE["shrink_threshold"]
    prune_start: int = 0
    prune_end: int | None = None
    prune_end_fraction: float | None = None
    prune_start_fraction: float | None = None
    allocation: str = "adaptive"
    plan_dense: bool = RECIPE["plan_dense"]
    allocation_floor: float = 0.5
    prune_fraction: float | None = None
    budget_schedule: str = RECIPE["budget_schedule"]
    score: str = RECIPE["score"]
    score_per_param: bool = True
    min_rank: int = 1
    feature_weight: float = 0.0
    distill: str = RECIPE["distill"]
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    backend: str = "auto"
    compact_during_training: bool = True
    teacher_dtype: str | None = None
    _patterns: dict[str, list[re.Pattern[str]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.target_ratio = number("target_ratio", self.target_ratio)
        if not 0.0 < self.target_ratio <= 1.0:
            raise ValueError(f"target_ratio must be in (0, 1], got {self.target_ratio}")
        self.include = None if self.include is None else patterns("include", self.include)
        self.exclude = patterns("exclude", self.exclude)
        self._patterns = {
            "include": [re.compile(p) for p in (self.include or ())],
            "exclude": [re.compile(p) for p in self.exclude],
        }
        check_init(self.init)
        self.init_rank_ratio = number("init_rank_ratio", self.init_rank_ratio)
        if not 0.0 < self.init_rank_ratio <= 1.0:
            raise ValueError(f"init_rank_ratio must be in (0, 1], got {self.init_rank_ratio}")
        self.asvd_alpha = number("asvd_alpha", self.asvd_alpha)
        if self.asvd_alpha < 0:
            raise ValueError(f"asvd_alpha must be >= 0, got {self.asvd_alpha}")
        choice("blend", self.blend, BLENDS)
        self.l1_lambda = number("l1_lambda", self.l1_lambda)
        if self.l1_lambda < 0:
            raise ValueError(f"l1_lambda must be >= 0, got {self.l1_lambda}")
        choice("l1_schedule", self.l1_schedule, L1_SCHEDULES)
        if self.l1_decay_steps is not None:
            integer("l1_decay_steps", self.l1_decay_steps, minimum=0)
        self.shrink_threshold = number("shrink_threshold", self.shrink_threshold)
        if self.shrink_threshold < 0:
            raise ValueError(f"shrink_threshold must be >= 0, got {self.shrink_threshold}")
        self._check_steps()
        choice("budget_schedule", self.budget_schedule, BUDGET_SCHEDULES)
        self._check_allocation()
        choice("score", self.score, SCORES)
        boolean("score_per_param", self.score_per_param)
        integer("min_rank", self.min_rank, minimum=1)
        self.feature_weight = number("feature_weight", self.feature_weight)
        if self.feature_weight < 0:
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight}")
        choice("distill", self.distill, DISTILL_MODES)
        self.distill_weight = number("distill_weight", self.distill_weight)
        if self.distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        self.distill_temperature = number("distill_temperature", self.distill_temperature)
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        check_backend_name(self.backend)
        boolean("compact_during_training", self.compact_during_training)
        check_teacher_dtype(self.teacher_dtype)

    def _check_steps(self) -> None:
        for name in ("total_steps", "blend_steps", "prune_end", "l1_decay_steps"):
            value = getattr(self, name)
            if value is not None:
                integer(name, value, minimum=1 if name == "total_steps" else 0)
        integer("prune_start", self.prune_start, minimum=0)
        self.blend_fraction = fraction("blend_fraction", self.blend_fraction)
        if self.prune_start_fraction is not None:
            self.prune_start_fraction = fraction("prune_start_fraction",
                                                  self.prune_start_fraction)
            if self.prune_start:
                raise ValueError(
                    f"give prune_start={self.prune_start} (steps) or prune_start_fraction="
                    f"{self.prune_start_fraction} (of the run), not both")
        if self.prune_end_fraction is not None:
            self.prune_end_fraction = fraction("prune_end_fraction", self.prune_end_fraction)
            if self.prune_end is not None:
                raise ValueError(
                    f"give prune_end={self.prune_end} (steps) or prune_end_fraction="
                    f"{self.prune_end_fraction} (of the run), not both"
                )
        self._check_startfraction()
        # everything that explicit step counts alone decide is checked now
        self.resolve_schedule(_NOMINAL_STEPS if self.total_steps is None else None)

    def _check_startfraction(self) -> None:
        """A pruning start given as a fraction must not follow an end given as one."""
        if self.prune_start_fraction is None or self.prune_end is not None:
            return
        if self.prune_end_fraction is not None:
            end, name = self.prune_end_fraction, "prune_end_fraction"
        elif self.blend_steps is None:
            end, name = self.blend_fraction, "blend_fraction (the default prune end)"
        else:
            return
        if self.prune_start_fraction > end:
            raise ValueError(f"prune_start_fraction={self.prune_start_fraction} must be <= "
                             f"{name}={end}")

    def _check_allocation(self) -> None:
        choice("allocation", self.allocation, ALLOCATIONS)
        boolean("plan_dense", self.plan_dense)
        self.allocation_floor = fraction("allocation_floor", self.allocation_floor)
        if self.prune_fraction is not None:
            self.prune_fraction = number("prune_fraction", self.prune_fraction)
            if not 0.0 <= self.prune_fraction < 1.0:
                raise ValueError(f"prune_fraction must be in [0, 1), got {self.prune_fraction}")
            if self.allocation == "adaptive":
                raise ValueError(
                    "prune_fraction needs a planned allocation (allocation='uniform', "
                    "'global', 'floor' or 'sigma2'); with allocation='adaptive' the "
                    "starting rank is init_rank_ratio")

    @property
    def planned_allocation(self) -> bool:
        """Whether final ranks are planned before training (``allocation != "adaptive"``)."""
        return self.allocation != "adaptive"

    # --- derived values ------------------------------------------------------------------

    @property
    def keeps_teacher(self) -> bool:
        """Whether the run blends from a teacher (T > 0), i.e. ``prepare`` keeps one."""
        if self.blend_steps is not None:
            return self.blend_steps > 0
        return self.blend_fraction > 0

    def resolve_schedule(self, total_steps: int | None = None) -> Schedule:
        """The schedule in optimiser steps for a run of ``total_steps`` steps (default:
        ``self.total_steps``). Explicit step fields are used as they are; fractions are
        taken of ``total_steps`` (:func:`steps_of`).

        Raises:
            ValueError: the run length is unknown (``total_steps`` is ``None`` here and in
                the config); the config fixes ``total_steps`` to another value; or the
                explicit step counts do not fit into the run (the message names them).
        """
        total = self.total_steps if total_steps is None else total_steps
        if total is None:
            raise ValueError(
                "the run length is not known: TuneCompConfig(total_steps=None) expresses the "
                "schedule in fractions of the run; fit it with controller.fit_schedule(steps) "
                "(the HF / Lightning callbacks and train() do this) or set total_steps"
            )
        if self.total_steps is not None and total != self.total_steps:
            raise ValueError(
                f"TuneCompConfig(total_steps={self.total_steps}) does not fit a run of {total} "
                f"optimiser steps: set total_steps={total}, or leave total_steps=None (the "
                "default) so that the schedule is fitted to the run"
            )
        where = " (the run's optimiser steps)" if self.total_steps is None else ""
        blend = (steps_of(self.blend_fraction, total) if self.blend_steps is None
                 else self.blend_steps)
        if blend > total:
            raise ValueError(f"blend_steps={blend} must be <= total_steps={total}{where}")
        if self.prune_end is not None:
            prune_end = self.prune_end
        elif self.prune_end_fraction is not None:
            prune_end = steps_of(self.prune_end_fraction, total)
        else:
            prune_end = blend
        prune_start = (self.prune_start if self.prune_start_fraction is None
                       else steps_of(self.prune_start_fraction, total))
        # a start given as a fraction is only known in steps once the run length is
        nominal = total == _NOMINAL_STEPS and self.prune_start_fraction is not None
        if prune_start > prune_end and not nominal:
            raise ValueError(f"prune_start={prune_start} must be <= prune_end={prune_end}")
        if prune_end > total:
            raise ValueError(f"prune_end={prune_end} must be <= total_steps={total}{where}")
        l1_end = prune_end if self.l1_decay_steps is None else self.l1_decay_steps
        return Schedule(total, blend, prune_start, prune_end, l1_end)

    @property
    def resolved_prune_end(self) -> int:
        """The step at which the budget is met (needs a known run length, see
        :meth:`resolve_schedule`)."""
        return self.resolve_schedule().prune_end

    @property
    def resolved_l1_decay_steps(self) -> int:
        """The step at which λ reaches 0 (needs a known run length)."""
        return self.resolve_schedule().l1_decay_steps

    def resolved(self, calibrated: bool) -> TuneCompConfig:
        """This config with ``init="auto"`` made concrete: ``"svd_llm"`` when calibration
        data is given (``calibrated``), else ``"svd"``; the config itself otherwise."""
        if self.init != "auto":
            return self
        return dataclasses.replace(self, init="svd_llm" if calibrated else "svd")

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
