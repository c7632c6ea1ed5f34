"""``TuneCompController``: drives the joint schedule of a prepared model.

Training loop contract (see :func:`~.training.train` for a ready-made loop)::

    controller = prepare(model, config)            # build the optimiser *after* this
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
3. enforces the global budget (:mod:`.budget`): the raw budget
   ``B + (R_0 − B)·f_t`` follows ``budget_schedule`` from the starting size R_0 (at
   ``prune_start``) to the final budget ``B = floor(target_ratio · Σ in·out)`` (at
   ``prune_end``); the globally least important ranks are pruned until the raw size is
   within it or the exported size is already within ``B``;
4. writes 0 into the mask of every dead rank. A dead rank never comes back: the alive
   flags live in the controller (and its ``state_dict``), so whatever the optimiser
   (momentum, Adam, weight decay) does to a pruned mask entry is undone after each step.

Pruning uses parameters only, no randomness and no data, with float64 scores and a
stable sort on the CPU: every data-parallel rank holds the same parameters and therefore
prunes the same ranks, without communication.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .budget import effective_cost, hard_shrink, prune_to_budget
from .calibration import eval_mode
from .config import TuneCompConfig
from .distill import distillation_loss
from .model_io import call_model
from .schedules import blend_scales, budget_fraction, l1_weight
from .targets import INFO_ATTR, TargetInfo

STATE_VERSION = 1


class TuneCompController:
    """Schedules, pruning and teacher management for the layers :func:`prepare` made.

    Attributes:
        config: the :class:`TuneCompConfig`.
        model: the prepared model (used for teacher forwards).
        layers: the converted layers by qualified name.
        step_count: optimiser steps taken so far (t).
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
        if config.score == "activation":
            missing = [n for n in self._names if n not in self.activation_rms]
            if missing:
                raise ValueError(
                    f"score='activation' needs calibration statistics; missing for {missing[0]!r}"
                )
        self._alive = [torch.ones(m.rank, dtype=torch.bool) for m in self._mods]
        self._alive_dev = [a.to(m.mask.device) for a, m in zip(self._alive, self._mods)]
        self._ranks = [m.rank for m in self._mods]
        self.original_params = sum(i.dense_params for i in self._infos)
        self.budget_params = math.floor(config.target_ratio * self.original_params)
        self.start_params = self.raw_params
        self.step_count = 0
        self.teacher_freed = all(m.teacher_weight is None for m in self._mods)
        self.finalized = False
        self.alpha, self.student_alpha = 1.0, 0.0
        self.l1_lambda = config.l1_lambda
        self._apply(prune=True)

    # --- sizes -----------------------------------------------------------------------

    @property
    def raw_params(self) -> int:
        """``Σ k·(in + out)`` over alive ranks k (U and V of the low-rank forms)."""
        return sum(k * i.rank_cost for k, i in zip(self._ranks, self._infos))

    @property
    def current_params(self) -> int:
        """The targeted layers' size if exported now: ``Σ min(k·(in + out), in·out)``."""
        return sum(effective_cost(k, i) for k, i in zip(self._ranks, self._infos))

    @property
    def ratio(self) -> float:
        """``current_params / original_params``."""
        return self.current_params / self.original_params

    def raw_budget_at(self, t: int) -> int:
        """The raw-size budget after step ``t``: ``B + floor((R_0 − B)·f_t)``."""
        slack = max(self.start_params - self.budget_params, 0)
        return self.budget_params + math.floor(slack * budget_fraction(self.config, t))

    def active_ranks(self) -> dict[str, int]:
        """Alive ranks per layer."""
        return dict(zip(self._names, self._ranks))

    def alive_masks(self) -> dict[str, torch.Tensor]:
        """Per layer, a CPU bool ``[r]`` of the ranks still alive (copies)."""
        return {n: a.clone() for n, a in zip(self._names, self._alive)}

    @property
    def score_kind(self) -> str:
        """The importance score in use: ``config.score``, with ``"auto"`` resolved to
        ``"activation"`` when calibration statistics exist, else ``"magnitude"``."""
        if self.config.score != "auto":
            return self.config.score
        complete = all(n in self.activation_rms for n in self._names)
        return "activation" if complete else "magnitude"

    # --- the step ----------------------------------------------------------------------

    def step(self) -> None:
        """Call once after every optimiser step: advance t, update α/λ, prune, free the
        teacher when α reaches 0, and re-zero pruned masks."""
        if self.finalized:
            raise RuntimeError("the model was finalized; the controller cannot step any more")
        self.step_count += 1
        self._apply(prune=True)

    def _apply(self, prune: bool) -> None:
        cfg, t = self.config, self.step_count
        self.alpha, self.student_alpha = blend_scales(cfg.blend, t, cfg.blend_steps)
        if self.alpha == 0.0 and not self.teacher_freed:
            self.free_teacher()
        for m in self._mods:
            m.teacher_scale = self.alpha if m.teacher_weight is not None else 0.0
            m.student_scale = self.student_alpha
        self.l1_lambda = l1_weight(cfg, t)
        if prune:
            self._shrink_and_prune(t)
        self._zero_dead()

    def _shrink_and_prune(self, t: int) -> None:
        cfg = self.config
        masks = _gather_cpu([m.mask for m in self._mods])
        for i, mask in enumerate(masks):
            new = hard_shrink(self._alive[i], mask, cfg.shrink_threshold,
                              min(cfg.min_rank, self._alive[i].numel()))
            if not torch.equal(new, self._alive[i]):
                self._set_alive(i, new)
        raw_budget = self.raw_budget_at(t)
        if self.raw_params > raw_budget and self.current_params > self.budget_params:
            new_alive, pruned = prune_to_budget(
                self._alive, self.scores(), self._infos,
                raw_budget=raw_budget, final_budget=self.budget_params,
                min_rank=cfg.min_rank, per_param=cfg.score_per_param,
            )
            if pruned:
                for i, a in enumerate(new_alive):
                    if not torch.equal(a, self._alive[i]):
                        self._set_alive(i, a)

    def _set_alive(self, i: int, alive: torch.Tensor) -> None:
        self._alive[i] = alive
        self._alive_dev[i] = alive.to(self._mods[i].mask.device)
        self._ranks[i] = int(alive.sum())

    @torch.no_grad()
    def _zero_dead(self) -> None:
        for m, a, k in zip(self._mods, self._alive_dev, self._ranks):
            if k < m.rank:
                m.mask.masked_fill_(_laid_out_like(~a, m.mask), 0.0)

    @torch.no_grad()
    def scores(self) -> list[torch.Tensor]:
        """Per layer, the importance of each rank (float64, CPU): ``|mask_i|·‖U[:, i]‖·
        ‖V[i, :]‖``, with V's columns weighted by the input RMS for ``score="activation"``."""
        out = []
        for name, m in zip(self._names, self._mods):
            u = _full(m.U.detach()).float().norm(dim=0)
            v_mat = _full(m.V.detach()).float()
            if self.score_kind == "activation":
                rms = self.activation_rms[name].to(device=v_mat.device, dtype=v_mat.dtype)
                v_mat = v_mat * rms
            v = v_mat.norm(dim=1)
            out.append((_full(m.mask.detach()).float().abs() * u * v).to("cpu", torch.float64))
        return out

    # --- teacher -----------------------------------------------------------------------

    def free_teacher(self) -> None:
        """Drop every layer's teacher weights now (done automatically once α reaches 0)."""
        for m in self._mods:
            m.drop_teacher()
        self.teacher_freed = True

    @contextlib.contextmanager
    def teacher_mode(self) -> Iterator[None]:
        """Within the block the converted layers compute their frozen teacher only
        (α = 1, α' = 0) and the model is in eval mode; everything else in the model (e.g.
        embeddings, heads, norms) is shared with the student, i.e. the fine-tuned ones.
        Use it under ``torch.no_grad()`` to get teacher outputs for distillation."""
        if self.teacher_freed:
            raise RuntimeError(
                f"the teacher was freed at step {self.config.blend_steps} (blend_steps); "
                "teacher outputs are only available while the blend runs"
            )
        try:
            for m in self._mods:
                m.teacher_scale, m.student_scale = 1.0, 0.0
            with eval_mode(self.model):
                yield
        finally:
            for m in self._mods:
                m.teacher_scale, m.student_scale = self.alpha, self.student_alpha

    def teacher_forward(self, inputs: Any) -> Any:
        """The teacher's outputs on ``inputs`` (no gradient), via :meth:`teacher_mode`."""
        with torch.no_grad(), self.teacher_mode():
            return self.forward(self.model, inputs)

    # --- losses ------------------------------------------------------------------------

    @property
    def distill_active(self) -> bool:
        """Whether :meth:`regularization` includes a distillation term at this step."""
        cfg = self.config
        return cfg.distill != "none" and cfg.distill_weight > 0 and not self.teacher_freed

    def l1_penalty(self) -> torch.Tensor:
        """``λ_t · Σ_layers Σ_i |mask_i|`` (a 0-d tensor; no graph when λ_t = 0)."""
        device = self._mods[0].mask.device
        if self.l1_lambda == 0.0:
            return torch.zeros((), device=device)
        total = sum(_full(m.mask.abs().sum()).to(device) for m in self._mods)
        return self.l1_lambda * total

    def distillation_loss(self, student_outputs: Any, teacher_outputs: Any) -> torch.Tensor:
        """``distill_weight ×`` the configured distillation loss (logits KL or hidden MSE)."""
        cfg = self.config
        if cfg.distill == "none":
            raise ValueError("distill='none' in the config: there is no distillation loss")
        return cfg.distill_weight * distillation_loss(
            cfg.distill, student_outputs, teacher_outputs, cfg.distill_temperature
        )

    def regularization(self, outputs: Any = None, inputs: Any = None) -> torch.Tensor:
        """The term to add to the task loss: the L1 penalty, plus — when distillation is
        configured and the teacher is still alive — the distillation loss against the
        teacher's outputs on ``inputs`` (which then must be given with the student's
        ``outputs``)."""
        loss = self.l1_penalty()
        if self.distill_active:
            if outputs is None or inputs is None:
                raise ValueError(
                    f"distill={self.config.distill!r}: pass the student's outputs and the "
                    "model inputs: controller.regularization(outputs, inputs)"
                )
            teacher = self.teacher_forward(inputs)
            loss = loss + self.distillation_loss(outputs, teacher)
        return loss

    @torch.no_grad()
    def add_l1_gradients(self) -> None:
        """Add ``λ_t·sign(mask)`` to every mask's ``.grad``: the gradient of
        :meth:`l1_penalty`, for trainers where the loss cannot be changed (the HF
        callback calls this right before the optimiser step)."""
        if self.l1_lambda == 0.0:
            return
        for m in self._mods:
            g = self.l1_lambda * torch.sign(m.mask)
            if m.mask.grad is None:
                m.mask.grad = g
            else:
                m.mask.grad.add_(g)

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
        }

    def finalize(self) -> nn.Module:
        """:func:`~.finalize.finalize` the model; the controller cannot step afterwards."""
        from .finalize import finalize

        finalize(self.model)
        self.finalized = True
        return self.model

    # --- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, alive flags, budget, config, statistics."""
        return {
            "version": STATE_VERSION,
            "step": self.step_count,
            "alive": {n: a.clone() for n, a in zip(self._names, self._alive)},
            "start_params": self.start_params,
            "budget_params": self.budget_params,
            "original_params": self.original_params,
            "teacher_freed": self.teacher_freed,
            "config": self.config.to_dict(),
            "activation_rms": {k: v.cpu().clone() for k, v in self.activation_rms.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a controller made by ``prepare`` on the same
        model and config. Load it *before* the model's state dict when the checkpoint was
        taken after the blend (it drops the teachers, whose buffers that state dict lacks).
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a TuneCompController state (version {STATE_VERSION} expected)"
            )
        missing = sorted(set(_STATE_KEYS) - set(state))
        if missing:
            raise ValueError(f"TuneCompController state is incomplete: missing {missing}")
        for key, kind in _STATE_KEYS.items():
            if not isinstance(state[key], kind):
                raise ValueError(f"TuneCompController state: {key!r} must be a "
                                 f"{kind.__name__}, got {type(state[key]).__name__}")
        bad = [k for k, v in {**state["alive"], **state["activation_rms"]}.items()
               if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"TuneCompController state: entry {bad[0]!r} is not a tensor")
        unknown = sorted(set(state["activation_rms"]) - set(self.layers))
        if unknown:
            raise ValueError(f"the checkpoint has statistics for unknown layers {unknown[:3]}")
        mine = self.config.to_dict()
        diff = sorted(k for k in mine if state["config"].get(k) != mine[k])
        if diff:
            raise ValueError(
                "the checkpoint was made with a different TuneCompConfig; differing fields: "
                + ", ".join(f"{k}={state['config'].get(k)!r} (now {mine[k]!r})" for k in diff)
            )
        alive = state["alive"]
        if sorted(alive) != sorted(self._names):
            missing = sorted(set(self._names) - set(alive))
            extra = sorted(set(alive) - set(self._names))
            raise ValueError(
                f"the checkpoint's layers differ from this model's: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        for i, name in enumerate(self._names):
            a = alive[name]
            if a.shape != self._alive[i].shape:
                raise ValueError(
                    f"layer {name!r}: checkpoint alive flags {list(a.shape)} != model rank "
                    f"[{self._alive[i].shape[0]}]"
                )
        for i, name in enumerate(self._names):
            self._set_alive(i, alive[name].to("cpu", torch.bool).clone())
        self.start_params = int(state["start_params"])
        self.budget_params = int(state["budget_params"])
        self.step_count = int(state["step"])
        self.activation_rms = {
            k: v.to(self.layers[k].V.device) for k, v in state["activation_rms"].items()
        }
        if state["teacher_freed"] and not self.teacher_freed:
            self.free_teacher()
        self._apply(prune=False)


_STATE_KEYS = {"step": int, "alive": dict, "start_params": int, "budget_params": int,
               "teacher_freed": bool, "config": dict, "activation_rms": dict}


def _full(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a DTensor (parameters sharded by FSDP2 ``fully_shard``) the whole
    tensor on every rank (an all-gather / all-reduce), so every rank decides alike."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _laid_out_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` split across ranks like the DTensor ``ref`` (each rank holds the same ``t``,
    so no communication); ``t`` itself when ``ref`` is a plain tensor."""
    mesh = getattr(ref, "device_mesh", None)
    if mesh is None:
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, mesh, ref.placements, src_data_rank=None)


def _gather_cpu(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Detached float32 CPU copies of ``tensors``, with one transfer per device."""
    flat = [_full(t.detach()).float() for t in tensors]
    devices = {t.device for t in flat}
    if len(devices) == 1:
        joined = torch.cat(flat).cpu()
        return list(joined.split([t.numel() for t in flat]))
    return [t.cpu() for t in flat]
