"""A :class:`~.controller.TuneCompController`'s state dict: building it, validating it
before anything is loaded (so that a bad or foreign checkpoint changes nothing) and
restoring it.

Alive flags and stored ranks are indexed by each layer's original ranks, so a state is
the same whether or not the run compacted (:mod:`.compaction`). A state without
``"stored"`` (written before compaction existed) stores every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .config import TuneCompConfig
from .schedules import ScheduleError

if TYPE_CHECKING:
    from .controller import TuneCompController

STATE_VERSION = 1

_STATE_KEYS = {"step": int, "alive": dict, "start_params": int, "budget_params": int,
               "teacher_freed": bool, "config": dict, "activation_rms": dict}


def check_state(state: Any, config: TuneCompConfig, ranks: dict[str, int]) -> None:
    """Raise ``ValueError`` unless ``state`` is a controller state for layers of these
    starting ``ranks`` (by name) made with an equal ``config``; the message names the
    offending key, layer or config field."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"not a TuneCompController state (version {STATE_VERSION} expected)")
    missing = sorted(set(_STATE_KEYS) - set(state))
    if missing:
        raise ValueError(f"TuneCompController state is incomplete: missing {missing}")
    for key, kind in _STATE_KEYS.items():
        if not isinstance(state[key], kind):
            raise ValueError(f"TuneCompController state: {key!r} must be a "
                             f"{kind.__name__}, got {type(state[key]).__name__}")
    steps = state.get("schedule_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
        raise ValueError(f"TuneCompController state: 'schedule_steps' must be an int or None, "
                         f"got {type(steps).__name__}")
    bad = [k for k, v in {**state["alive"], **state["activation_rms"]}.items()
           if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"TuneCompController state: entry {bad[0]!r} is not a tensor")
    _check_config(state["config"], config)  # first: a different config explains the rest
    unknown = sorted(set(state["activation_rms"]) - set(ranks))
    if unknown:
        raise ValueError(f"the checkpoint has statistics for unknown layers {unknown[:3]}")
    alive = state["alive"]
    if sorted(alive) != sorted(ranks):
        missing = sorted(set(ranks) - set(alive))
        extra = sorted(set(alive) - set(ranks))
        raise ValueError(
            f"the checkpoint's layers differ from this model's: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    for name, rank in ranks.items():
        if tuple(alive[name].shape) != (rank,):
            raise ValueError(
                f"layer {name!r}: checkpoint alive flags {list(alive[name].shape)} != model "
                f"rank [{rank}]"
            )
    if state.get("stored") is not None:
        _check_stored(state["stored"], alive, ranks)


def _check_stored(stored: Any, alive: dict[str, torch.Tensor], ranks: dict[str, int]) -> None:
    """The stored ranks: per layer, ascending original indices that include every alive
    rank."""
    if not isinstance(stored, dict) or sorted(stored) != sorted(ranks):
        raise ValueError("TuneCompController state: 'stored' must map every layer name to "
                         "its stored rank indices")
    for name, rank in ranks.items():
        idx = stored[name]
        ok = (isinstance(idx, torch.Tensor) and idx.dim() == 1 and idx.numel() >= 1
              and not idx.is_floating_point() and idx.dtype != torch.bool)
        if ok:
            idx = idx.to("cpu", torch.long)
            ok = bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < rank
        if not ok:
            raise ValueError(f"layer {name!r}: the stored ranks must be ascending integer "
                             f"indices in [0, {rank}), got {stored[name]!r}")
        kept = torch.zeros(rank, dtype=torch.bool)
        kept[idx] = True
        if bool((alive[name].to("cpu", torch.bool) & ~kept).any()):
            raise ValueError(f"layer {name!r}: an alive rank is not among the stored ranks")


# How the run executes, not what it computes: a run may resume with another value.
_EXECUTION_FIELDS = frozenset({"compact_during_training"})


#: Fields newer than some checkpoints and saved models whose old behaviour is not today's
#: default: a config saved without the field ran with this value.
BEFORE_FIELD = {"plan_dense": False}


def _check_config(saved: dict[str, Any], config: TuneCompConfig) -> None:
    mine = config.to_dict()
    # a field newer than the checkpoint counts as saved with the value it then behaved as
    defaults = TuneCompConfig.__dataclass_fields__
    saved = {k: saved.get(k, BEFORE_FIELD.get(k, defaults[k].default)) for k in mine}
    diff = sorted(k for k in mine if k not in _EXECUTION_FIELDS and saved[k] != mine[k])
    if diff:
        raise ValueError(
            "the checkpoint was made with a different TuneCompConfig; differing fields: "
            + ", ".join(f"{k}={saved[k]!r} (now {mine[k]!r})" for k in diff)
        )


def controller_state(c: TuneCompController) -> dict[str, Any]:
    """:meth:`~.controller.TuneCompController.state_dict` of ``c``."""
    return {
        "version": STATE_VERSION,
        "step": c.step_count,
        "alive": c.alive_masks(),
        "stored": c.stored_ranks(),
        "start_params": c.start_params,
        "budget_params": c.budget_params,
        "original_params": c.original_params,
        "teacher_freed": c.teacher_freed,
        "config": c.config.to_dict(),
        "schedule_steps": None if c.schedule is None else c.schedule.total_steps,
        "activation_rms": {k: v.cpu().clone() for k, v in c.activation_rms.items()},
        "scorer": c.scorer.state_dict(),
    }


def load_controller_state(c: TuneCompController, state: Any) -> None:
    """:meth:`~.controller.TuneCompController.load_state_dict` (same errors): validate,
    resize the layers to the stored ranks, then restore the rest."""
    ranks = {n: a.numel() for n, a in c.alive_masks().items()}
    check_state(state, c.config, ranks)
    saved = state.get("schedule_steps")
    schedule = c.schedule if saved is None else c.config.resolve_schedule(saved)
    if c.teacher_freed and not state["teacher_freed"]:
        blend = "the end of the blend" if schedule is None else (
            f"the end of the blend (step {schedule.blend_steps})")
        raise ScheduleError(
            f"the checkpoint is from step {state['step']}, before {blend}, but this "
            f"model's teachers were freed at {blend}: the run cannot be continued or "
            "finished from it. Reload a checkpoint taken after the blend (evaluate and "
            "save only after it), or prepare a fresh model from the pretrained weights "
            "and load the checkpoint into that"
        )
    stored = state.get("stored") or {n: torch.arange(r) for n, r in ranks.items()}
    names = list(ranks)
    c._storage.restore(names, stored)
    for i, name in enumerate(names):
        c._set_alive(i, state["alive"][name].to("cpu", torch.bool).clone())
    c.schedule = schedule
    c.start_params = int(state["start_params"])
    c.budget_params = int(state["budget_params"])
    c.step_count = int(state["step"])
    c.activation_rms = {
        k: v.to(c.layers[k].V.device) for k, v in state["activation_rms"].items()
    }
    c.scorer.load_state_dict(state.get("scorer"))
    if state["teacher_freed"] and not c.teacher_freed:
        c.free_teacher()
    c._apply(prune=False)
