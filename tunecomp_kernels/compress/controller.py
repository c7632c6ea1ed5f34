"""``TuneCompController``: drives the joint schedule of a prepared model.

Training loop contract (see :func:`~.training.train` for a ready-made loop)::

    controller = prepare(model, config)            # build the optimiser *after* this
    controller.fit_schedule(len(batches))          # the run's optimiser steps
    for batch in batches:
        outputs = model(**batch)
        loss = task_loss(outputs) + controller.regularization(outputs, batch)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        controller.step()
    finalize(model)

``controller.step()`` advances t and then, in this order:

1. sets α_t / α'_t on every layer; once α reaches 0 (t >= T) it drops the teachers
   (``MaskedLowRankLinear.drop_teacher``), freeing their memory;
2. hard-shrinks: ranks with ``|mask| <= shrink_threshold`` die;
3. enforces the budget (:mod:`.budget`). With a planned allocation (:mod:`.allocation`)
   each layer goes from its starting rank to its planned final rank along
   ``budget_schedule``, dropping its own least important ranks. Otherwise the raw budget
   ``B + (R_0 − B)·f_t`` follows ``budget_schedule`` from the starting size R_0 (at
   ``prune_start``) to the final budget ``B = floor(target_ratio · Σ in·out)`` (at
   ``prune_end``); the globally least important ranks are pruned until the raw size is
   within it or the exported size is already within ``B`` (the layers ``prepare`` kept
   dense count with their dense size in both);
4. compacts (:mod:`.compaction`): at a few steps of the run, and whenever dead ranks
   are stored once the budget is met, the dead ranks leave U, mask and V in place, and
   so does the state the attached optimisers keep for them
   (:meth:`TuneCompController.attach_optimizer`; ``train`` and the trainer callbacks
   attach theirs);
5. writes 0 into the mask of every dead rank still stored. A dead rank never comes back:
   the alive flags live in the controller (and its ``state_dict``), so whatever the
   optimiser (momentum, Adam, weight decay) does to a pruned mask entry is undone after
   each step.

The config's schedule is in fractions of the run unless it gives step counts;
:meth:`TuneCompController.fit_schedule` fixes the run length (the trainer integrations
call it from the trainer's planned steps).

Pruning uses no randomness, with float64 scores and a stable sort on the CPU. The
parameter-only scores need no communication: every data-parallel rank holds the same
parameters and therefore prunes the same ranks. The gradient-based
``score="sensitivity"`` averages its scores over the processes and broadcasts rank 0's
(:mod:`.scoring`), so every process prunes the same ranks too.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .budget import effective_cost, hard_shrink, prune_to_budget, prune_within_layer
from .compaction import RankStorage
from .config import _NOMINAL_STEPS, Schedule, TuneCompConfig
from .controller_state import STATE_VERSION, controller_state, load_controller_state
from .controller_teacher import TeacherOutputs
from .distill import LossTerms
from .model_io import call_model
from .schedules import ScheduleError, blend_scales, budget_fraction, l1_weight
from .scoring import RankScorer
from .sharded import gather_cpu as _gather_cpu
from .sharded import laid_out_like as _laid_out_like
from .targets import INFO_ATTR, TargetInfo

__all__ = ["STATE_VERSION", "TuneCompController", "controller_of"]

# model -> weak reference to its controller, so that ``finalize(model)`` can check the
# schedule without the model holding (or pickling) a reference to the controller.
_CONTROLLERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[TuneCompController]] = (
    weakref.WeakKeyDictionary()
)


def controller_of(model: nn.Module) -> TuneCompController | None:
    """The live controller that ``prepare`` made for ``model``, or ``None``."""
    ref = _CONTROLLERS.get(model)
    return None if ref is None else ref()


class TuneCompController(LossTerms, TeacherOutputs):
    """Schedules, pruning and teacher management for the layers :func:`prepare` made.

    Attributes:
        config: the :class:`TuneCompConfig`.
        model: the prepared model (used for teacher forwards).
        layers: the converted layers by qualified name.
        step_count: optimiser steps taken so far (t).
        schedule: the :class:`~.config.Schedule` in steps, or ``None`` until the run length
            is known (:meth:`fit_schedule`).
        distill_terms: how many distillation losses were computed (integrations check it).
        alpha, student_alpha: the current teacher / student scales α_t, α'_t.
        l1_lambda: the current L1 weight λ_t.
        original_params: Σ in·out over the targeted layers.
        budget_params: the final budget ``floor(target_ratio · original_params)``.
        start_params: the raw low-rank size at step 0 (``Σ rank_0·(in + out)``).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, MaskedLowRankLinear],
        config: TuneCompConfig,
        *,
        activation_rms: dict[str, torch.Tensor] | None = None,
        forward: Callable[[nn.Module, Any], Any] = call_model,
        final_ranks: dict[str, int] | None = None,
        dense_layers: dict[str, TargetInfo] | None = None,
    ) -> None:
        if not layers:
            raise ValueError("TuneCompController needs at least one layer")
        if not isinstance(config, TuneCompConfig):
            raise TypeError(f"config must be a TuneCompConfig, got {type(config).__name__}")
        for name, m in layers.items():
            if not (isinstance(m, MaskedLowRankLinear)
                    and isinstance(getattr(m, INFO_ATTR, None), TargetInfo)):
                raise TypeError(
                    f"layer {name!r} ({type(m).__name__}) is not a layer made by prepare(); "
                    "get the controller from prepare(model, config)"
                )
        self.config = config
        self.model = model
        self.layers = dict(layers)
        self.forward = forward
        self._names = list(self.layers)
        self._mods = [self.layers[n] for n in self._names]
        self._infos: list[TargetInfo] = [getattr(m, INFO_ATTR) for m in self._mods]
        self.activation_rms = {k: v.detach() for k, v in (activation_rms or {}).items()}
        self.scorer = RankScorer(self._mods, self._names, self.score_kind, self.activation_rms)
        self._alive = [torch.ones(m.rank, dtype=torch.bool) for m in self._mods]
        self._storage = RankStorage(self._mods, config.compact_during_training)
        self._alive_dev = [a.to(m.mask.device) for a, m in zip(self._alive, self._mods)]
        self._ranks = [m.rank for m in self._mods]
        self._start_ranks = list(self._ranks)
        self._final = None if final_ranks is None else [final_ranks[n] for n in self._names]
        self.dense_layers = dict(dense_layers or {})
        self.dense_params = sum(i.dense_params for i in self.dense_layers.values())
        self.original_params = (sum(i.dense_params for i in self._infos)
                                + self.dense_params)
        self.budget_params = math.floor(config.target_ratio * self.original_params)
        self.start_params = self.raw_params
        self.step_count = 0
        self.schedule: Schedule | None = (
            None if config.total_steps is None else config.resolve_schedule())
        self.teacher_freed = all(m.teacher_weight is None for m in self._mods)
        self.finalized = False
        self.distill_terms = 0
        self.alpha, self.student_alpha = 1.0, 0.0
        self.l1_lambda = config.l1_lambda
        self._apply(prune=True)
        _CONTROLLERS[model] = weakref.ref(self)

    # --- sizes -----------------------------------------------------------------------

    @property
    def raw_params(self) -> int:
        """``Σ k·(in + out)`` over alive ranks k (U and V of the low-rank forms), plus the
        layers kept dense (planned before training)."""
        return (sum(k * i.rank_cost for k, i in zip(self._ranks, self._infos))
                + self.dense_params)

    @property
    def current_params(self) -> int:
        """The targeted layers' size if exported now: ``Σ min(k·(in + out), in·out)``, plus
        the layers kept dense (planned before training)."""
        return (sum(effective_cost(k, i) for k, i in zip(self._ranks, self._infos))
                + self.dense_params)

    @property
    def ratio(self) -> float:
        """``current_params / original_params``."""
        return self.current_params / self.original_params

    def raw_budget_at(self, t: int) -> int:
        """The raw-size budget after step ``t``: ``B + floor((R_0 − B)·f_t)``."""
        slack = max(self.start_params - self.budget_params, 0)
        f_t = budget_fraction(self.config, t, self._schedule_at(t))
        return self.budget_params + math.floor(slack * f_t)

    def active_ranks(self) -> dict[str, int]:
        """Alive ranks per layer."""
        return dict(zip(self._names, self._ranks))

    def alive_masks(self) -> dict[str, torch.Tensor]:
        """Per layer, a CPU bool ``[r]`` of the ranks still alive (copies), indexed by the
        layer's original ranks."""
        return {n: a.clone() for n, a in zip(self._names, self._alive)}

    def stored_ranks(self) -> dict[str, torch.Tensor]:
        """Per layer, int64 ``[k]``: the original indices of the ranks the layer stores
        now, ascending (all of them until a compaction; see :mod:`.compaction`)."""
        return self._storage.state(self._names)

    # --- compaction during training ----------------------------------------------------

    def attach_optimizer(self, optimizer: Any) -> None:
        """Keep ``optimizer``'s state in step when pruned ranks are compacted away during
        training (:mod:`.compaction`); until one is attached nothing is compacted. Attach
        every optimiser that holds the layers' parameters. Wrappers (accelerate,
        Lightning) are unwrapped; attaching again is a no-op; only a weak reference is kept.

        Raises:
            TypeError: not an optimiser. ValueError: ``LBFGS`` (flat state).
        """
        self._storage.attach(optimizer)

    @property
    def compaction_blocker(self) -> str | None:
        """Why pruned ranks are not compacted away during training now (config off, no
        optimiser attached, torch.distributed, unsupported optimiser state), or ``None``."""
        return self._storage.blocker

    @property
    def compaction_events(self) -> int:
        """How many compaction events ran (in this process)."""
        return self._storage.events

    @property
    def score_kind(self) -> str:
        """The importance score in use (:mod:`.scoring`): ``config.score``, with
        ``"auto"`` resolved to ``"activation"`` when calibration statistics exist, else
        ``"magnitude"``."""
        if self.config.score != "auto":
            return self.config.score
        complete = all(n in self.activation_rms for n in self._names)
        return "activation" if complete else "magnitude"

    # --- the schedule ------------------------------------------------------------------

    def fit_schedule(self, total_steps: int) -> Schedule:
        """Fit the schedule to a run of ``total_steps`` optimiser steps and return it.

        Fractions in the config (``blend_fraction``, ``prune_end_fraction``) are taken of
        ``total_steps``; explicit step counts must fit into it, and an explicit
        ``config.total_steps`` must equal it. Calling it again with the same value does
        nothing; another value is accepted only before the first step.

        Raises:
            TypeError / ValueError: ``total_steps`` is not an int >= 1, or the config's
                explicit step counts do not fit (the message names them).
            ScheduleError: the controller already stepped on a schedule of another length.
        """
        if isinstance(total_steps, bool) or not isinstance(total_steps, int):
            raise TypeError(f"total_steps must be an int, got {type(total_steps).__name__}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        new = self.config.resolve_schedule(total_steps)
        if self.schedule is not None and new != self.schedule and self.step_count > 0:
            raise ScheduleError(
                f"the schedule was fitted to {self.schedule.total_steps} optimiser steps and "
                f"{self.step_count} of them were taken; it cannot be refitted to {total_steps}"
            )
        self.schedule = new
        return new

    @property
    def schedule_complete(self) -> bool:
        """Whether the blend is over and the budget met (t >= the schedule's end)."""
        return self.schedule is not None and self.step_count >= self.schedule.end

    def _schedule_at(self, t: int) -> Schedule:
        if self.schedule is not None:
            return self.schedule
        if t == 0:
            # step-0 values do not depend on the run length (see config._NOMINAL_STEPS)
            return self.config.resolve_schedule(_NOMINAL_STEPS)
        raise ScheduleError(
            "the schedule's length is not known: TuneCompConfig(total_steps=None) gives it "
            "in fractions of the run. Call controller.fit_schedule(total_steps) before the "
            "first step (TuneCompCallback, TuneCompLightningCallback and train() do this "
            "from the trainer's planned steps), or set TuneCompConfig(total_steps=...)"
        )

    # --- the step ----------------------------------------------------------------------

    def step(self) -> None:
        """Call once after every optimiser step: advance t, update α/λ, prune, free the
        teacher when α reaches 0, and re-zero pruned masks.

        Raises:
            ScheduleError: the run length is not known yet (see :meth:`fit_schedule`).
            RuntimeError: the model was finalized.
        """
        if self.finalized:
            raise RuntimeError("the model was finalized; the controller cannot step any more")
        self._schedule_at(self.step_count + 1)
        self._storage.check(self._names)
        self.step_count += 1
        self.scorer.step_end()
        self._apply(prune=True)

    def _apply(self, prune: bool) -> None:
        cfg, t = self.config, self.step_count
        sched = self._schedule_at(t)
        self.alpha, self.student_alpha = blend_scales(cfg.blend, t, sched.blend_steps)
        if self.alpha == 0.0 and not self.teacher_freed:
            self.free_teacher()
        beta = cfg.feature_weight * self.alpha
        for m in self._mods:
            teacher = m.teacher_weight is not None
            m.teacher_scale = self.alpha if teacher else 0.0
            m.student_scale = self.student_alpha
            m.feature_weight = beta if teacher else 0.0
        self.l1_lambda = l1_weight(cfg, t, sched)
        if prune:
            self._shrink_and_prune(t)
            met = t >= sched.prune_end or self.current_params <= self.budget_params
            # compaction rebinds a layer's stored indices (never edits them): references do
            before = list(self._storage.stored)
            for i in self._storage.compact(self._alive, met):
                self._set_alive(i, self._alive[i])
                self.scorer.compacted(i, before[i], self._storage.stored[i])
        self._zero_dead()

    def _shrink_and_prune(self, t: int) -> None:
        cfg = self.config
        masks = _gather_cpu([m.mask for m in self._mods])
        for i, mask in enumerate(masks):
            mask = self._storage.expand(i, mask, self._alive[i].numel())
            new = hard_shrink(self._alive[i], mask, cfg.shrink_threshold,
                              min(cfg.min_rank, self._alive[i].numel()))
            if not torch.equal(new, self._alive[i]):
                self._set_alive(i, new)
        if self._final is not None:
            self._prune_layers(t)
            return
        raw_budget = self.raw_budget_at(t)
        if self.raw_params > raw_budget and self.current_params > self.budget_params:
            # the converted layers share what the layers kept dense leave of each budget
            new_alive, pruned = prune_to_budget(
                self._alive, self.scores(), self._infos,
                raw_budget=raw_budget - self.dense_params,
                final_budget=self.budget_params - self.dense_params,
                min_rank=cfg.min_rank, per_param=cfg.score_per_param,
            )
            if pruned:
                for i, a in enumerate(new_alive):
                    if not torch.equal(a, self._alive[i]):
                        self._set_alive(i, a)

    def final_ranks(self) -> dict[str, int] | None:
        """Per converted layer, the final rank a planned allocation gives it (``None`` for
        ``allocation="adaptive"``, where the global budget decides during training)."""
        return None if self._final is None else dict(zip(self._names, self._final))

    def _prune_layers(self, t: int) -> None:
        """Planned allocation: each layer goes from its starting rank to its final rank
        along the budget schedule, dropping its own least important ranks."""
        f_t = budget_fraction(self.config, t, self._schedule_at(t))
        scores = None
        for i, (k0, k1) in enumerate(zip(self._start_ranks, self._final)):
            keep = k1 + math.floor((k0 - k1) * f_t)
            if self._ranks[i] > keep:
                scores = self.scores() if scores is None else scores
                self._set_alive(i, prune_within_layer(self._alive[i], scores[i], keep))

    def _set_alive(self, i: int, alive: torch.Tensor) -> None:
        self._alive[i] = alive
        self._alive_dev[i] = self._storage.local(i, alive).to(self._mods[i].mask.device)
        self._ranks[i] = int(alive.sum())

    @torch.no_grad()
    def _zero_dead(self) -> None:
        for m, a, k in zip(self._mods, self._alive_dev, self._ranks):
            if k < m.rank:
                m.mask.masked_fill_(_laid_out_like(~a, m.mask), 0.0)

    def scores(self) -> list[torch.Tensor]:
        """Per layer, the importance of each original rank (float64, CPU ``[r]``) by
        :attr:`score_kind` (:mod:`.scoring`); 0 for ranks compacted away."""
        return [self._storage.expand(i, score, self._alive[i].numel())
                for i, score in enumerate(self.scorer.local_scores())]

    # --- teacher -----------------------------------------------------------------------

    def free_teacher(self) -> None:
        """Drop every layer's teacher weights now (done automatically once α reaches 0)."""
        for m in self._mods:
            m.drop_teacher()
        self.teacher_freed = True

    # --- reporting ---------------------------------------------------------------------

    def stats(self) -> dict[str, float | int | bool]:
        """The schedule's state, for logs and progress bars."""
        return {
            "step": self.step_count,
            "alpha": self.alpha,
            "student_alpha": self.student_alpha,
            "l1_lambda": self.l1_lambda,
            "params": self.current_params,
            "raw_params": self.raw_params,
            "ratio": self.ratio,
            "raw_budget": self.raw_budget_at(self.step_count),
            "budget_params": self.budget_params,
            "original_params": self.original_params,
            "teacher_freed": self.teacher_freed,
            "feature_loss": self.feature_loss(),
        }

    def feature_loss(self) -> float | None:
        """The mean over layers of the feature loss ℓ of their last forward (None when
        no layer computed one: ``feature_weight`` 0, or the teacher freed)."""
        losses = [m.feature_loss for m in self._mods
                  if m.feature_loss_active and m.feature_loss is not None]
        return float(torch.stack(losses).mean()) if losses else None

    def finalize(self, *, allow_partial: bool = False) -> nn.Module:
        """:func:`~.finalize.finalize` the model (same errors, same ``allow_partial``);
        the controller cannot step afterwards."""
        from .finalize import finalize

        finalize(self.model, allow_partial=allow_partial)
        self.finalized = True
        return self.model

    # --- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, alive flags and stored ranks (by original
        index), budget, config, run length, statistics."""
        return controller_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a controller made by ``prepare`` on the same
        model and config. Load it *before* the model's state dict: it resizes the layers to
        the ranks the state stores (compacted during training), and when the checkpoint was
        taken after the blend it drops the teachers, whose buffers that state dict lacks.
        (Weights loaded first also work: the layers take the saved rank count on load, and
        this then restores which ranks they are.)

        Raises:
            ValueError: not a controller state, or one made for other layers or config, or
                the layers' sizes fit neither the state nor the controller.
            ScheduleError: the state is from before the end of the blend but this model's
                teachers were already freed, so the run cannot continue from it.
        """
        load_controller_state(self, state)
