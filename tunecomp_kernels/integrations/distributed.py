"""TuneComp under ``torch.distributed``: DDP and FSDP2 helpers and consistency checks.

How TuneComp runs data-parallel:

* Call :func:`~tunecomp_kernels.compress.prepare` on every rank *before* wrapping the
  model (``DistributedDataParallel(model)`` or ``fully_shard``), on the same pretrained
  weights, so every rank holds the same students and the same frozen teachers.
* Pruning needs no communication: the controller ranks the ranks by scores computed
  from the parameters (identical on every rank after each synchronised optimiser step),
  compares them in float64 on the CPU and breaks ties deterministically, so every rank
  prunes the same ranks at the same step. Under FSDP2 the controller reads the sharded
  parameters as whole tensors (one all-gather of the masks per step, of U and V when it
  prunes). :func:`check_in_sync` verifies it; :func:`broadcast_controller` forces rank
  ``src``'s decisions on all ranks if you ever need to (e.g. after loading a checkpoint
  on one rank only).
* DDP broadcasts every module buffer from rank 0 at each forward by default, and the
  frozen teachers are buffers: during the blend that is a copy of the whole dense model
  per step. :func:`ddp_ignore_teachers` (call before ``DistributedDataParallel(...)``)
  tells DDP to leave them alone; it then also holds no reference to them, so the
  teachers' memory is released when the blend ends.

* Compaction during training (:mod:`tunecomp_kernels.compress.compaction`) stays off
  while ``torch.distributed`` is initialised: DDP sizes its gradient buckets and FSDP2 its
  shards when the model is wrapped, so parameters must keep their shapes. Pruned ranks
  stay stored there, masked to 0 (as in a run with ``compact_during_training=False``),
  and ``finalize`` removes them; ``controller.compaction_blocker`` says so. A checkpoint
  of a compacted single-process run still loads: load the controller state before
  wrapping or sharding the model.

These helpers work with any backend (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..nn.masked_lowrank_linear import MaskedLowRankLinear

TEACHER_BUFFERS = ("teacher_weight", "teacher_bias")


def teacher_buffer_names(model: nn.Module) -> list[str]:
    """Qualified names of the frozen-teacher buffers of every
    :class:`~tunecomp_kernels.MaskedLowRankLinear` in ``model`` (those currently set)."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, MaskedLowRankLinear):
            for buf in TEACHER_BUFFERS:
                if getattr(mod, buf, None) is not None:
                    names.append(f"{mod_name}.{buf}" if mod_name else buf)
    return names


def ddp_ignore_teachers(model: nn.Module) -> list[str]:
    """Make ``DistributedDataParallel`` skip the teacher buffers (no per-forward
    broadcast, no reference kept after the blend). Call after ``prepare`` and before
    wrapping; names already set to be ignored are kept. Returns the teacher names.

    Every rank must then hold the same teachers itself (``prepare`` on the same
    pretrained weights does that; :func:`check_in_sync` with ``buffers=True`` checks it).
    """
    from torch.nn.parallel import DistributedDataParallel

    names = teacher_buffer_names(model)
    already = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []) or [])
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, already + [n for n in names if n not in already])
    return names


def _full(t: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(t, "full_tensor", None)  # DTensor (FSDP2): gather the shards
    return full_tensor() if callable(full_tensor) else t


def _digest(t: torch.Tensor) -> str:
    data = _full(t.detach()).contiguous().cpu()
    h = hashlib.sha256(str((tuple(data.shape), str(data.dtype))).encode())
    # reshape first: a 0-d tensor (e.g. a blend-scale buffer) cannot be viewed as bytes
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def controller_fingerprint(controller: Any) -> dict[str, Any]:
    """What must agree across ranks: step, blend state, budget, the alive ranks and the
    ranks the layers store."""
    alive = controller.alive_masks()
    stored = controller.stored_ranks() if hasattr(controller, "stored_ranks") else {}
    h = hashlib.sha256()
    for name in sorted(alive):
        h.update(name.encode())
        h.update(alive[name].to(torch.uint8).numpy().tobytes())
        if name in stored:
            h.update(stored[name].to(torch.int64).numpy().tobytes())
    return {"step": controller.step_count, "teacher_freed": controller.teacher_freed,
            "budget_params": controller.budget_params, "start_params": controller.start_params,
            "current_params": controller.current_params, "alive_sha256": h.hexdigest()}


def model_fingerprint(model: nn.Module, *, buffers: bool = False) -> dict[str, str]:
    """SHA-256 of every parameter (whole tensors, also under FSDP2) and, with
    ``buffers``, every buffer. A collective under FSDP2: call it on every rank."""
    out = {f"param:{n}": _digest(p) for n, p in model.named_parameters()}
    if buffers:
        out.update({f"buffer:{n}": _digest(b) for n, b in model.named_buffers()})
    return out


def _gather(obj: Any, group: Any = None) -> list[Any]:
    world = dist.get_world_size(group)
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def check_in_sync(
    controller: Any = None,
    model: nn.Module | None = None,
    *,
    buffers: bool = False,
    group: Any = None,
) -> None:
    """Raise ``RuntimeError`` unless every rank has the same controller state (step, blend,
    budget, alive ranks) and — when ``model`` is given — bitwise identical parameters
    (and buffers, with ``buffers=True``). A collective: call it on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    problems = []
    if controller is not None:
        states = _gather(controller_fingerprint(controller), group)
        for r, s in enumerate(states):
            diff = sorted(k for k in s if s[k] != states[0][k])
            if diff:
                problems.append(f"rank {r} controller differs from rank 0 in {diff}")
    if model is not None:
        prints = _gather(model_fingerprint(model, buffers=buffers), group)
        for r, p in enumerate(prints):
            diff = sorted(k for k in set(p) | set(prints[0]) if p.get(k) != prints[0].get(k))
            if diff:
                problems.append(f"rank {r} differs from rank 0 in {len(diff)} tensors, e.g. "
                                f"{diff[:3]}")
    if problems:
        raise RuntimeError("TuneComp ranks are out of sync: " + "; ".join(problems))


def broadcast_controller(controller: Any, src: int = 0, group: Any = None) -> None:
    """Give every rank the controller state of rank ``src`` (alive ranks, step, budget;
    masks of pruned ranks are re-zeroed). A collective: call it on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    box = [controller.state_dict() if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    if dist.get_rank() != src:
        controller.load_state_dict(box[0])
