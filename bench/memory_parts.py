"""Where a training step's memory goes: the bytes of the trainable parameters, their
gradients, the optimiser's state, the frozen buffers (the teachers) and the activations
autograd keeps for the backward pass.

The activations are counted with :func:`torch.autograd.graph.saved_tensors_hooks` over one
forward pass: every distinct storage saved for backward that is not a parameter or a
buffer, once (x saved by q, k and v is one tensor). Gradients and optimiser state are read
after the step. Exact tensor bytes, not RSS: the allocator's own overhead is not in them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

MIB = 2**20


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


@contextlib.contextmanager
def saved_activations(model: nn.Module) -> Iterator[dict[str, float]]:
    """Count the bytes of what autograd saves for backward inside the block (parameters
    and buffers excluded); ``result["activations_mib"]`` is set when the block ends."""
    owned = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    seen: dict[tuple[int, int], int] = {}
    result: dict[str, float] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in owned and t.device.type != "meta":
            seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["activations_mib"] = sum(seen.values()) / MIB


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def state_parts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """MiB of the trainable parameters, their gradients, the optimiser state and the
    model's buffers (the frozen teachers of a joint run), read after an optimiser step."""
    params = [p for p in model.parameters() if p.requires_grad]
    state = [v for s in optimizer.state.values() for v in s.values()]
    return {
        "trainable_params_mib": _bytes(params) / MIB,
        "gradients_mib": _bytes(p.grad for p in params) / MIB,
        "optimizer_state_mib": _bytes(state) / MIB,
        "buffers_mib": _bytes(model.buffers()) / MIB,
    }
