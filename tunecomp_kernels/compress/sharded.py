"""Whole-tensor access to parameters that FSDP2 ``fully_shard`` turned into DTensors, so
that every data-parallel rank reads and decides alike (used by the controller)."""

from __future__ import annotations

import torch


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a DTensor (parameters sharded by FSDP2 ``fully_shard``) the whole
    tensor on every rank (an all-gather / all-reduce), so every rank decides alike."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


def laid_out_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` split across ranks like the DTensor ``ref`` (each rank holds the same ``t``,
    so no communication); ``t`` itself when ``ref`` is a plain tensor."""
    mesh = getattr(ref, "device_mesh", None)
    if mesh is None:
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, mesh, ref.placements, src_data_rank=None)


def gather_cpu(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Detached float32 CPU copies of ``tensors``, with one transfer per device."""
    flat = [full_tensor(t.detach()).float() for t in tensors]
    devices = {t.device for t in flat}
    if len(devices) == 1:
        joined = torch.cat(flat).cpu()
        return list(joined.split([t.numel() for t in flat]))
    return [t.cpu() for t in flat]
