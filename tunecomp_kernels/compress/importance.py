"""A task-aware rank importance: the smoothed sensitivity of AdaLoRA.

The controller's default score, ``|mask_i|·‖U[:, i]‖·‖V[i, :]‖``, looks at the weights
alone, so a compress-then-fine-tune pipeline could compute it too. The smoothed
sensitivity looks at how the task loss reacts to each entry *during* the joint run
(Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
eqs. 8-11); see docs/design.md#the-method for where pruning scores enter the method.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .compaction import RANK_PARAMS, remap

#: Keys of one parameter's state: the EMAs (Ī, Ū) and, within a step, the product w·G at
#: the last recorded gradient and the sum of |w·g| over that step's backward passes.
_KEYS = ("avg", "unc", "prod", "acc")
_KIND = "sensitivity"


class _Slot:
    """State of one parameter (U, mask or V) of one layer; every tensor fp32, shaped like
    the parameter, on its device, or ``None`` (zeros for the EMAs, nothing pending)."""

    __slots__ = _KEYS

    def __init__(self) -> None:
        for key in _KEYS:
            setattr(self, key, None)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: t for k in _KEYS if (t := getattr(self, k)) is not None}


def rank_positions(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The ``keep`` argument of :meth:`SensitivityScore.compact` for a layer whose stored
    original ranks (``controller.stored_ranks()[name]``, int64 ``[k]``) go from ``before``
    to ``after``: int64 CPU ``[len(after)]``, the position in ``before`` of each rank of
    ``after``, -1 for a rank ``before`` does not hold.

    Raises:
        ValueError: ``before`` or ``after`` is not a 1-D integer tensor of indices >= 0.
    """
    for name, t in (("before", before), ("after", after)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point():
            raise ValueError(f"{name} must be a 1-D integer tensor of rank indices")
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"{name} holds a negative rank index")
    before, after = before.to("cpu", torch.long), after.to("cpu", torch.long)
    size = max([int(t.max()) + 1 for t in (before, after) if t.numel()], default=0)
    position = torch.full((size,), -1, dtype=torch.long)
    position[before] = torch.arange(before.numel())
    return position[after]


def _on_grad(owner: weakref.ref, i: int, name: str, param: torch.Tensor) -> None:
    """Post-accumulate-grad hook (module level and holding the scorer weakly, so a
    forgotten scorer neither stays alive nor breaks anything)."""
    scorer = owner()
    if scorer is not None:
        scorer._record(i, name, param)


class SensitivityScore:
    """AdaLoRA's smoothed sensitivity of every rank of ``MaskedLowRankLinear`` layers.

    For every entry w of each layer's ``U [out, r]``, ``mask [r]`` and ``V [r, in]``
    (Zhang et al. 2023, eqs. 8-11)::

        I_t = |w · ∂L/∂w|
        Ī_t = β1·Ī_{t-1} + (1 - β1)·I_t
        Ū_t = β2·Ū_{t-1} + (1 - β2)·|I_t - Ī_t|       (Ī_0 = Ū_0 = 0)
        s(w) = Ī_t · Ū_t

    and the score of rank i is ``S_i = s(mask_i) + mean_j s(U[j, i]) + mean_j s(V[i, j])``.

    **Protocol.** ``I_t`` of optimiser step t is the sum, over the gradient arrivals
    recorded in that step, of ``|w · Δ|``, Δ being what the arrival added to ``.grad``
    (w does not change within a step). One arrival is recorded

    * after every backward pass while hooks are attached (:meth:`attach`; a
      ``register_post_accumulate_grad_hook`` on U, mask and V), or
    * at every call of :meth:`accumulate` (reads ``.grad`` as it is now).

    :meth:`step_end` then folds ``I_t`` into the EMAs, once per optimiser step. Grads must
    not be zeroed between the arrivals of one step. Two uses:

    * explicit (own loop): call :meth:`update` (= :meth:`accumulate` + :meth:`step_end`)
      after the step's backward pass(es) and BEFORE ``optimizer.step()`` / ``zero_grad()``;
      with gradient accumulation that uses the summed gradient, ``|w · Σ_k g_k|``. Call
      :meth:`accumulate` after each micro-batch's backward for ``Σ_k |w · g_k|`` instead.
    * hooks (HF ``Trainer`` zeroes grads before ``on_step_end``): :meth:`attach` once,
      :meth:`step_end` once per optimiser step (after it, too, is fine: only the
      recorded products are used). Micro-batches give ``Σ_k |w · g_k|``.

    With one backward per step both give the same bits, and :meth:`update` with hooks
    attached adds nothing to what they recorded. A parameter with no recorded gradient in a
    step has ``I_t = 0``. Gradients must be unscaled (AMP ``GradScaler``: explicit mode after
    ``scaler.unscale_(optimizer)``; hook mode sees scaled gradients). Under DDP (with its
    default ``gradient_as_bucket_view=False``) hooks see each process's local gradient,
    :meth:`update` the averaged one; :meth:`scores` averages over the processes either
    way. Sharded (FSDP2 DTensor) parameters are not supported.

    **Memory.** Ī and Ū are per entry (the definition needs them), fp32 on each parameter's
    device: 2× the student's parameter count (U, mask, V) × 4 bytes, allocated at the first
    recorded gradient. Within a step, the pending product adds 1× more, and a second
    arrival in the same step (micro-batches) another 1×; both are freed by :meth:`step_end`.

    **Compaction.** When a layer's ranks are rebuilt (``compaction.resize_layer``), call
    :meth:`compact` with the positions of the ranks it keeps (:func:`rank_positions`
    gives them from ``stored_ranks`` before and after). A layer whose size no longer fits
    its state makes recording and :meth:`scores` raise.

    Args:
        layers: the layers to score, in the controller's order (index ``i`` below).
        beta1, beta2: EMA factors in ``[0, 1)`` (AdaLoRA's defaults 0.85).
        group: process group for :meth:`scores` under ``torch.distributed`` (default: the
            world).

    Attributes:
        steps: EMA updates so far (calls of :meth:`step_end` that folded a record in).

    Raises:
        TypeError: ``layers`` holds something else than ``MaskedLowRankLinear``, or a beta
            is not a number.
        ValueError: ``layers`` is empty or holds a layer twice, or a beta is out of range.
    """

    def __init__(self, layers: Sequence[MaskedLowRankLinear], beta1: float = 0.85,
                 beta2: float = 0.85, *, group: Any = None) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("SensitivityScore needs at least one layer")
        for i, m in enumerate(layers):
            if not isinstance(m, MaskedLowRankLinear):
                raise TypeError(f"layers[{i}] must be a MaskedLowRankLinear, got "
                                f"{type(m).__name__}")
        if len({id(m) for m in layers}) != len(layers):
            raise ValueError("layers holds the same layer more than once")
        self.beta1 = _check_beta("beta1", beta1)
        self.beta2 = _check_beta("beta2", beta2)
        self.layers = layers
        self.group = group
        self.steps = 0
        self._slots = [{name: _Slot() for name, _ in RANK_PARAMS} for _ in layers]
        self._handles: list[Any] = []

    # --- recording -----------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether the gradient hooks are registered."""
        return bool(self._handles)

    @property
    def pending(self) -> bool:
        """Whether gradients were recorded since the last :meth:`step_end`."""
        return any(s.prod is not None for slots in self._slots for s in slots.values())

    def attach(self) -> None:
        """Register a post-accumulate-grad hook on every layer's U, mask and V that records
        each backward pass's gradient (a no-op when already attached). The hooks follow the
        parameters through compaction (their ``.data`` changes, the objects stay)."""
        if self._handles:
            return
        owner = weakref.ref(self)
        for i, m in enumerate(self.layers):
            for name, _ in RANK_PARAMS:
                hook = functools.partial(_on_grad, owner, i, name)
                self._handles.append(getattr(m, name).register_post_accumulate_grad_hook(hook))

    def detach(self) -> None:
        """Remove the hooks (recorded gradients stay pending until :meth:`step_end`)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def accumulate(self) -> None:
        """Record the gradients now in ``.grad`` of every layer's U, mask and V (only what
        they gained since the last record in this step counts; parameters without a
        gradient are skipped).

        Raises:
            RuntimeError: a layer's size no longer fits its state (see :meth:`compact`).
            NotImplementedError: a parameter or gradient is sharded (FSDP2 DTensor).
        """
        for i, m in enumerate(self.layers):
            for name, _ in RANK_PARAMS:
                self._record(i, name, getattr(m, name))

    @torch.no_grad()
    def _record(self, i: int, name: str, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        if hasattr(param, "device_mesh") or hasattr(grad, "device_mesh"):
            raise NotImplementedError(
                f"layer {i} {name}: SensitivityScore does not support sharded (FSDP2 "
                "DTensor) parameters")
        slot = self._slots[i][name]
        self._fit(i, name, slot, param)
        prod = param.detach().float() * grad.detach().float()
        if slot.prod is not None:
            delta = prod.sub(slot.prod).abs_()
            slot.acc = slot.prod.abs().add_(delta) if slot.acc is None else slot.acc.add_(delta)
        slot.prod = prod

    def _fit(self, i: int, name: str, slot: _Slot, param: torch.Tensor) -> None:
        """Check that ``slot`` fits ``param``'s shape; follow it to ``param``'s device."""
        for key, t in slot.tensors().items():
            if t.shape != param.shape:
                raise RuntimeError(
                    f"layer {i} {name} has shape {list(param.shape)} but its sensitivity "
                    f"state has {list(t.shape)}: the layer's ranks changed; call "
                    "SensitivityScore.compact(i, keep) whenever they do")
            if t.device != param.device:
                setattr(slot, key, t.to(param.device))

    @torch.no_grad()
    def step_end(self) -> None:
        """Fold this step's recorded ``I_t`` into Ī and Ū (see the class docstring) and
        clear it. Call once per optimiser step.

        Raises:
            RuntimeError: nothing was recorded since the last call (no backward pass with
                hooks attached, no :meth:`accumulate` with gradients present).
        """
        if not self.pending:
            raise RuntimeError(
                "no gradient was recorded since the last step_end(): call update() after "
                "backward and before optimizer.zero_grad(), or attach() before training")
        for slots in self._slots:
            for slot in slots.values():
                self._fold(slot)
        self.steps += 1

    def _fold(self, slot: _Slot) -> None:
        b1, b2 = self.beta1, self.beta2
        if slot.prod is None:
            if slot.avg is not None:  # I_t = 0: no gradient reached it this step
                slot.avg.mul_(b1)
                slot.unc.mul_(b2).add_(slot.avg, alpha=1.0 - b2)
            return
        ipt = slot.acc if slot.acc is not None else slot.prod.abs_()
        if slot.avg is None:
            slot.avg, slot.unc = torch.zeros_like(ipt), torch.zeros_like(ipt)
        slot.avg.mul_(b1).add_(ipt, alpha=1.0 - b1)
        slot.unc.mul_(b2).add_(ipt.sub_(slot.avg).abs_(), alpha=1.0 - b2)
        slot.prod = slot.acc = None

    def update(self) -> None:
        """:meth:`accumulate` then :meth:`step_end`: call once per optimiser step, after
        the backward pass(es), before ``optimizer.step()`` and ``zero_grad()``.

        Raises:
            RuntimeError / NotImplementedError: as :meth:`accumulate` and :meth:`step_end`.
        """
        self.accumulate()
        self.step_end()

    # --- scores --------------------------------------------------------------------------

    @torch.no_grad()
    def scores(self) -> list[torch.Tensor]:
        """Per layer, float64 CPU ``[r]`` (r = the ranks it stores now): ``S_i``; zeros
        before the first :meth:`step_end`. Under an initialised ``torch.distributed`` this
        is a collective (call it on every process): the scores are averaged over the
        processes, then rank 0's result is broadcast, so all hold the same bits.

        Raises:
            RuntimeError: a layer's size no longer fits its state (see :meth:`compact`).
        """
        out = []
        for i, m in enumerate(self.layers):
            total = torch.zeros(m.rank, dtype=torch.float64, device=m.mask.device)
            for name, dim in RANK_PARAMS:
                slot = self._slots[i][name]
                param = getattr(m, name)
                self._fit(i, name, slot, param)
                if slot.avg is None:
                    continue
                s = slot.avg * slot.unc
                total += s.double() if s.dim() == 1 else s.mean(dim=1 - dim, dtype=torch.float64)
            out.append(total)
        return _agree(out, self.group)

    # --- compaction ----------------------------------------------------------------------

    @torch.no_grad()
    def compact(self, i: int, keep: torch.Tensor) -> None:
        """Follow layer ``i``'s ranks being rebuilt: the state of its rank ``keep[j]``
        becomes that of rank j (-1: a new rank, zero state), as ``compaction.remap`` does
        for the parameters. ``keep`` (integer ``[k]``) holds positions among the ranks the
        state holds now (see :func:`rank_positions`).

        Raises:
            IndexError: ``i`` is not a layer index.
            ValueError: ``keep`` is not a 1-D integer tensor, or holds a position < -1 or
                beyond the ranks the state holds.
        """
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.layers):
            raise IndexError(f"layer index {i!r} out of range [0, {len(self.layers)})")
        if not isinstance(keep, torch.Tensor) or keep.dim() != 1 or keep.is_floating_point():
            raise ValueError("keep must be a 1-D integer tensor of rank positions")
        keep = keep.to("cpu", torch.long)
        for name, dim in RANK_PARAMS:
            slot = self._slots[i][name]
            for key, t in slot.tensors().items():
                held = t.shape[dim]
                if keep.numel() and (int(keep.min()) < -1 or int(keep.max()) >= held):
                    raise ValueError(f"keep holds a position outside [-1, {held}) for layer "
                                     f"{i}, whose state holds {held} ranks")
                setattr(slot, key, remap(t, dim, keep))

    # --- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit for bit: betas, steps and, per layer and
        parameter, the state tensors (fp32 CPU copies; pending records included)."""
        return {
            "kind": _KIND,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "steps": self.steps,
            "layers": [{name: {k: t.detach().to("cpu", copy=True)
                               for k, t in slot.tensors().items()}
                        for name, slot in slots.items()} for slots in self._slots],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors go to each parameter's device). Load it
        after the layers hold the ranks the state was saved with (e.g. after the
        controller's state). Nothing changes when it raises.

        Raises:
            ValueError: not a sensitivity state, other betas or layer count, a tensor that
                does not fit its parameter's shape, or Ī without Ū.
        """
        if not isinstance(state, dict) or state.get("kind") != _KIND:
            raise ValueError("not a SensitivityScore state (missing kind='sensitivity')")
        if (state.get("beta1"), state.get("beta2")) != (self.beta1, self.beta2):
            raise ValueError(f"the state was made with beta1={state.get('beta1')}, "
                             f"beta2={state.get('beta2')}; this scorer uses "
                             f"{self.beta1}, {self.beta2}")
        saved = state.get("layers")
        if not isinstance(saved, list) or len(saved) != len(self.layers):
            raise ValueError(f"the state holds {len(saved) if isinstance(saved, list) else 0}"
                             f" layers, this scorer {len(self.layers)}")
        loaded = [self._load_layer(i, entry) for i, entry in enumerate(saved)]
        self._slots = loaded
        self.steps = int(state.get("steps", 0))

    def _load_layer(self, i: int, entry: Any) -> dict[str, _Slot]:
        if not isinstance(entry, dict) or set(entry) != {n for n, _ in RANK_PARAMS}:
            raise ValueError(f"layer {i} of the state must map U, mask and V to their state")
        slots = {}
        for name, _ in RANK_PARAMS:
            param, tensors, slot = getattr(self.layers[i], name), entry[name], _Slot()
            if not isinstance(tensors, dict) or not set(tensors) <= set(_KEYS):
                raise ValueError(f"layer {i} {name}: state keys must be among {list(_KEYS)}")
            if ("avg" in tensors) != ("unc" in tensors):
                raise ValueError(f"layer {i} {name}: the state holds one EMA without the other")
            for key, t in tensors.items():
                if not isinstance(t, torch.Tensor) or t.shape != param.shape:
                    shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"layer {i} {name} {key!r}: expected a tensor of shape "
                                     f"{list(param.shape)}, got {shape}")
                setattr(slot, key, t.detach().to(param.device, torch.float32, copy=True))
            slots[name] = slot
        return slots


def _check_beta(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def _agree(scores: list[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """``scores`` as float64 CPU tensors; under torch.distributed, averaged over the
    processes and then rank 0's bits everywhere (an all-reduce need not give every process
    the same rounding)."""
    dist = torch.distributed
    sizes = [s.numel() for s in scores]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [s.to("cpu", torch.float64) for s in scores]
    backend = str(dist.get_backend(group))
    device = (torch.device("cpu") if "gloo" in backend or "nccl" not in backend
              else torch.device("cuda", torch.cuda.current_device()))
    flat = torch.cat([s.to(device, torch.float64) for s in scores])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(flat, src=src, group=group)
    return [s.clone() for s in flat.cpu().split(sizes)]
