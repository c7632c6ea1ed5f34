"""Validation of a :class:`~.controller.TuneCompController` state dict before it is loaded,
so that a bad or foreign checkpoint changes nothing."""

from __future__ import annotations

from typing import Any

import torch

from .config import TuneCompConfig

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
    unknown = sorted(set(state["activation_rms"]) - set(ranks))
    if unknown:
        raise ValueError(f"the checkpoint has statistics for unknown layers {unknown[:3]}")
    _check_config(state["config"], config)
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


def _check_config(saved: dict[str, Any], config: TuneCompConfig) -> None:
    mine = config.to_dict()
    # a field newer than the checkpoint counts as saved with its default value
    defaults = TuneCompConfig.__dataclass_fields__
    diff = sorted(k for k in mine if saved.get(k, defaults[k].default) != mine[k])
    if diff:
        raise ValueError(
            "the checkpoint was made with a different TuneCompConfig; differing fields: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {mine[k]!r})" for k in diff)
        )
