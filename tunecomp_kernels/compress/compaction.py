"""Compaction during training: pruned ranks leave the computation, not only at finalize.

The controller prunes a rank by writing 0 into its mask. Such a rank adds nothing to the
output, yet it is still multiplied, backpropagated and updated by the optimiser. At a
*compaction event* the pruned ranks are removed for real: every layer that holds dead
ranks gets smaller ``U [out, k]``, ``mask [k]`` and ``V [k, in]``, and so do their
gradients and the optimiser state kept for them.

* **In place.** Each ``nn.Parameter`` object is kept and receives a smaller ``.data``, so
  an optimiser built by someone else (HF ``Trainer``, Lightning) keeps working. In every
  attached optimiser, each per-parameter state tensor shaped like the parameter (AdamW
  ``exp_avg`` / ``exp_avg_sq``, SGD ``momentum_buffer``, ...) is shrunk the same way.
  Scalar state such as ``step`` is kept. So are factored statistics that have size 1 along
  the rank dimension (Adafactor's row or column variance); they stay as they are.
* **Batched.** Events are rare. One happens at a step where some layer's dead ranks
  exceed :data:`COMPACT_SHARE` of the ranks it stores, and at every step from the one at
  which the budget is met on, if dead ranks are stored. Each event compacts every layer
  that holds dead ranks.
* **When.** Compaction needs the training's optimiser(s):
  :meth:`~.controller.TuneCompController.attach_optimizer`. ``train``, ``run_tunecomp``
  and the HF / Lightning callbacks attach it. Without one, nothing is compacted, because
  an unknown optimiser's state would no longer fit its parameters. Compaction is also off
  with ``TuneCompConfig(compact_during_training=False)``, and while ``torch.distributed``
  is initialised: DDP sizes its gradient buckets and FSDP2 its shards when the model is
  wrapped. There the dead ranks stay stored, masked to 0, until ``finalize``.
  :attr:`RankStorage.blocker` says which applies.
* **Index map.** :class:`RankStorage` records which of a layer's original ranks it
  stores. The controller's alive flags, its state dict and its checkpoints stay in the
  original index space. Loading a controller state resizes the layers to the ranks that
  the state stores.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..nn.masked_lowrank_linear import MaskedLowRankLinear

#: A layer is compacted once its dead ranks exceed this share of the ranks it stores.
COMPACT_SHARE = 0.25
#: (parameter name, rank dimension) of the low-rank factors.
RANK_PARAMS = (("U", 1), ("mask", 0), ("V", 0))
#: Set on a layer by its load hook when a state dict was loaded into it. The ranks of those
#: weights are then known only from the controller state saved with them.
LOADED_ATTR = "_tunecomp_weights_loaded"
_HOOKED_ATTR = "_tunecomp_resize_hook"


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` that holds the state: ``optimizer`` itself, or the
    one a wrapper holds in ``.optimizer`` / ``._optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``).

    Raises:
        TypeError: no optimizer is found.
        ValueError: it is ``LBFGS``, whose state covers all parameters as one flat vector.
    """
    seen = 0
    while seen < 8:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            break
        optimizer, seen = inner, seen + 1
    if not (isinstance(getattr(optimizer, "state", None), dict)
            and isinstance(getattr(optimizer, "param_groups", None), list)):
        raise TypeError(f"attach_optimizer needs a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("LBFGS keeps one flat state vector for all parameters, which "
                         "compaction cannot shrink: use TuneCompConfig("
                         "compact_during_training=False) with LBFGS")
    return optimizer


def remap(t: torch.Tensor, dim: int, src: torch.Tensor) -> torch.Tensor:
    """``t`` with its ``dim`` rebuilt from ``src`` (int64 ``[k]``): entry j is
    ``t``'s entry ``src[j]``, or zeros where ``src[j] < 0``. Same dtype and device."""
    src = src.to(t.device)
    if bool((src >= 0).all()):
        return t.index_select(dim, src)
    shape = list(t.shape)
    shape[dim] = src.numel()
    out = t.new_zeros(shape)
    have = (src >= 0).nonzero().flatten()
    out.index_copy_(dim, have, t.index_select(dim, src[have]))
    return out


def _state_action(t: torch.Tensor, old: torch.Size, new: torch.Size, dim: int) -> str:
    """``"remap"``, ``"keep"`` or ``"bad"`` for optimiser state ``t`` of a parameter
    whose shape goes from ``old`` to ``new`` along ``dim``."""
    if t.dim() == 0 or t.shape == new:
        return "keep"  # scalars (step); state already loaded at the new size
    if t.shape == old:
        return "remap"
    if t.dim() == len(old) and all(s in (o, 1) for j, (s, o) in enumerate(zip(t.shape, old))
                                   if j != dim):
        if t.shape[dim] == old[dim]:
            return "remap"
        if t.shape[dim] == 1:
            return "keep"  # a statistic reduced over the rank dimension
    return "bad"


def unsupported_state(optimizers: Sequence[torch.optim.Optimizer],
                      changes: Iterable[tuple[nn.Parameter, int, torch.Size]]) -> str | None:
    """Why the optimisers' state of these parameters cannot follow a resize, or ``None``.
    ``changes`` holds ``(parameter, rank dim, new shape)``."""
    for p, dim, new in changes:
        for opt in optimizers:
            for key, value in opt.state.get(p, {}).items():
                bad = (isinstance(value, torch.Tensor)
                       and _state_action(value, p.shape, new, dim) == "bad")
                if bad or (isinstance(value, (list, tuple))
                           and any(isinstance(v, torch.Tensor) for v in value)):
                    shape = list(value.shape) if isinstance(value, torch.Tensor) else "a list"
                    return (f"{type(opt).__name__} state {key!r} ({shape}) of a parameter "
                            f"{list(p.shape)} does not follow the parameter's shape")
    return None


def set_data(p: nn.Parameter, data: torch.Tensor) -> None:
    """``p.data = data`` for a ``data`` of another shape, without a stale gradient
    accumulator: autograd caches ``p``'s AccumulateGrad node with ``p``'s shape, and an
    earlier graph still referenced (e.g. the previous step's ``loss`` variable) would hand
    it out to the next graph, whose backward then fails on the shape. Assigning ``.data``
    drops that cache only when the dtype or device changes, so ``p`` passes through an
    empty tensor of another dtype first."""
    other = torch.float32 if data.dtype != torch.float32 else torch.float64
    p.data = torch.empty(0, dtype=other, device=data.device)
    p.data = data


@torch.no_grad()
def resize_layer(layer: MaskedLowRankLinear, src: torch.Tensor,
                 optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
    """Rebuild ``layer``'s ranks from ``src`` (see :func:`remap`; -1 = a new rank of
    zeros) in place: U, mask, V, their gradients and the optimisers' state for them."""
    for name, dim in RANK_PARAMS:
        p = getattr(layer, name)
        old = p.shape
        grad, p.grad = p.grad, None
        set_data(p, remap(p.data, dim, src))
        if grad is not None:
            p.grad = remap(grad, dim, src)
        for opt in optimizers:
            state = opt.state.get(p)
            for key, value in (state or {}).items():
                if isinstance(value, torch.Tensor) and _state_action(
                        value, old, p.shape, dim) == "remap":
                    state[key] = remap(value, dim, src)


def _resize_on_load(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                    *_args: Any) -> None:
    """Load pre-hook of a converted layer: weights saved after compaction have fewer ranks
    than a freshly prepared layer, so the layer takes the saved rank count first (the
    controller state saved with them says which ranks they are)."""
    mask, u, v = (state_dict.get(prefix + n) for n in ("mask", "U", "V"))
    if not all(isinstance(t, torch.Tensor) for t in (mask, u, v)):
        return
    object.__setattr__(module, LOADED_ATTR, True)
    k = mask.shape[0] if mask.dim() == 1 else -1
    fits = (1 <= k <= min(module.in_features, module.out_features)
            and tuple(u.shape) == (module.out_features, k)
            and tuple(v.shape) == (k, module.in_features))
    if not fits or k == module.rank or hasattr(module.mask, "device_mesh"):
        return  # the load itself reports a mismatch; sharded layers are not resized
    with torch.no_grad():
        for name, dim in RANK_PARAMS:
            p = getattr(module, name)
            shape = list(p.shape)
            shape[dim] = k
            p.grad = None
            set_data(p, p.data.new_zeros(shape))


def install_load_hook(layer: MaskedLowRankLinear) -> None:
    """Register :func:`_resize_on_load` on ``layer`` once (a module-level function, so the
    model still pickles and deep-copies)."""
    if getattr(layer, _HOOKED_ATTR, False):
        return
    register = getattr(layer, "register_load_state_dict_pre_hook", None)
    if register is None:  # older torch: the private spelling takes the module first too
        layer._register_load_state_dict_pre_hook(_resize_on_load, with_module=True)
    else:
        register(_resize_on_load)
    object.__setattr__(layer, _HOOKED_ATTR, True)


def _sharded(layers: Sequence[MaskedLowRankLinear]) -> bool:
    return any(hasattr(getattr(m, n), "device_mesh") for m in layers for n, _ in RANK_PARAMS)


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


class RankStorage:
    """Which of its original ranks each layer stores, and the optimisers whose state
    follows the parameters (see the module docstring).

    Args:
        layers: the controller's layers, in its order (their current size is the original
            rank).
        enabled: ``TuneCompConfig.compact_during_training``.

    Attributes:
        stored: per layer, int64 CPU ``[k]``: the original indices of the ranks it holds,
            ascending.
        events: how many compaction events ran.
    """

    def __init__(self, layers: Sequence[MaskedLowRankLinear], enabled: bool) -> None:
        self.layers = list(layers)
        self.enabled = enabled
        self.stored = [torch.arange(m.rank) for m in self.layers]
        self.events = 0
        self._optimizers: list[weakref.ref[torch.optim.Optimizer]] = []
        self._unsupported: str | None = None
        for m in self.layers:
            install_load_hook(m)
            object.__setattr__(m, LOADED_ATTR, False)

    def attach(self, optimizer: Any) -> torch.optim.Optimizer:
        """Add ``optimizer`` (or the optimiser it wraps) to those kept in step; returns it."""
        opt = unwrap_optimizer(optimizer)
        if all(ref() is not opt for ref in self._optimizers):
            self._optimizers = [r for r in self._optimizers if r() is not None]
            self._optimizers.append(weakref.ref(opt))
        return opt

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The attached optimisers still alive."""
        return [opt for ref in self._optimizers if (opt := ref()) is not None]

    @property
    def blocker(self) -> str | None:
        """Why compaction events do not run now, or ``None`` when they do."""
        if not self.enabled:
            return "TuneCompConfig(compact_during_training=False)"
        if self._unsupported is not None:
            return self._unsupported
        if not self.optimizers:
            return "no optimiser is attached (controller.attach_optimizer(optimizer))"
        if _sharded(self.layers):
            return "the parameters are sharded (FSDP2 fully_shard)"
        if _distributed():
            return ("torch.distributed is initialised: DDP sizes its gradient buckets and "
                    "FSDP its shards when the model is wrapped")
        return None

    def local(self, i: int, flags: torch.Tensor) -> torch.Tensor:
        """``flags`` (over layer ``i``'s original ranks) at the ranks it stores."""
        return flags[self.stored[i]]

    def expand(self, i: int, values: torch.Tensor, size: int) -> torch.Tensor:
        """``values`` (one per stored rank of layer ``i``) spread over its ``size``
        original ranks, zeros at the ranks it no longer stores."""
        out = values.new_zeros(size)
        out[self.stored[i]] = values
        return out

    def check(self, names: Sequence[str]) -> None:
        """Raise ``RuntimeError`` when a layer holds another number of ranks than the
        controller expects (compacted weights loaded without their controller state)."""
        for name, m, stored in zip(names, self.layers, self.stored):
            if m.rank != stored.numel():
                raise RuntimeError(
                    f"layer {name!r} holds {m.rank} ranks, but the controller expects "
                    f"{stored.numel()}: weights saved after a compaction were loaded without "
                    "the controller state saved with them. Load that state "
                    "(controller.load_state_dict) too; load_checkpoint and train(resume=...) "
                    "do both"
                )
            if vars(m).get(LOADED_ATTR):
                object.__setattr__(m, LOADED_ATTR, False)

    def compact(self, alive: Sequence[torch.Tensor], budget_met: bool) -> list[int]:
        """Run a compaction event if one is due; returns the compacted layers' indices.

        Args:
            alive: per layer, CPU bool over its original ranks.
            budget_met: the final budget is met (then any stored dead rank goes).
        """
        if self.blocker is not None:
            return []
        local = [self.local(i, a) for i, a in enumerate(alive)]
        dead = [int((~flags).sum()) for flags in local]
        due = budget_met or any(d > COMPACT_SHARE * f.numel() for d, f in zip(dead, local))
        keep = {i: local[i].nonzero().flatten() for i, d in enumerate(dead)
                if due and d and d < local[i].numel()}
        if not keep:
            return []
        changes = []
        for i, idx in keep.items():
            for name, dim in RANK_PARAMS:
                p = getattr(self.layers[i], name)
                changes.append((p, dim, _resized(p.shape, dim, idx.numel())))
        problem = unsupported_state(self.optimizers, changes)
        if problem is not None:
            self._unsupported = ("the optimiser keeps state that compaction cannot shrink: "
                                 + problem)
            warnings.warn(f"compaction during training is off for this run: "
                          f"{self._unsupported}; pruned ranks stay stored (masked) until "
                          "finalize", stacklevel=4)
            return []
        for i, idx in keep.items():
            resize_layer(self.layers[i], idx, self.optimizers)
            self.stored[i] = self.stored[i][idx]
        self.events += 1
        return list(keep)

    def restore(self, names: Sequence[str], saved: dict[str, torch.Tensor]) -> list[int]:
        """Make every layer hold the ranks ``saved`` (name -> original indices, from a
        controller state) says; returns the indices of the layers that changed.

        A layer whose weights were just loaded from a state dict (the load hook set
        :data:`LOADED_ATTR`) already holds those ranks' values and only takes the index
        map; otherwise its ranks are moved (ranks it does not hold come back as zeros,
        for the weights loaded next to fill).

        Raises:
            ValueError: a layer's size fits neither the saved ranks nor the ranks it holds,
                or a sharded layer would change size. Nothing is changed then.
        """
        plans: dict[int, torch.Tensor | None] = {}
        for i, (name, m) in enumerate(zip(names, self.layers)):
            target = saved[name].to("cpu", torch.long)
            current = self.stored[i]
            if vars(m).get(LOADED_ATTR) and m.rank == target.numel():
                if not torch.equal(target, current):
                    plans[i] = None  # adopt the map: the values are already in place
                continue
            if m.rank != current.numel():
                raise ValueError(
                    f"layer {name!r} holds {m.rank} ranks; the controller state keeps "
                    f"{target.numel()} and the controller knew {current.numel()}")
            if torch.equal(target, current):
                continue
            if _sharded([m]):
                raise ValueError(f"layer {name!r} is sharded (FSDP2): load the controller "
                                 "state before sharding the model")
            position = torch.full((int(max(current.max(), target.max())) + 1,), -1)
            position[current] = torch.arange(current.numel())
            plans[i] = position[target]
        for i, src in plans.items():
            if src is not None:
                resize_layer(self.layers[i], src, self.optimizers)
            self.stored[i] = saved[names[i]].to("cpu", torch.long).clone()
        for m in self.layers:
            object.__setattr__(m, LOADED_ATTR, False)
        return list(plans)

    def state(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per layer name, a copy of the original indices of its stored ranks."""
        return {n: s.clone() for n, s in zip(names, self.stored)}


def _resized(shape: torch.Size, dim: int, size: int) -> torch.Size:
    out = list(shape)
    out[dim] = size
    return torch.Size(out)
