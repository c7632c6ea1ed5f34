"""Autotuning policy shared by the Triton kernels: configs, keys, interpreter mode.

Every tuned kernel is keyed on ``(N_BUCKET, K, O, R)`` plus the dtypes of its tensor
arguments (``triton.autotune`` appends those itself), where ``N_BUCKET`` is the row
count rounded up to a power of two (capped at 16384) so that a training run whose batch
size wobbles does not re-tune on every new N.

Config lists are written for sm_90 (H100/H200: 228 KB shared memory, 4-stage pipelines,
8 warps for the wide tiles) and sm_80 (A100: 164 KB, at most 3 stages for the widest
tiles); :func:`prune_for_device` drops configs that do not suit the device the tensors
live on before anything is benchmarked. Configs that still exceed the device's resources
fail to compile and are discarded by Triton's autotuner (it times them as infinite).

Under ``TRITON_INTERPRET=1`` (CPU tests) every kernel gets exactly one small config, so
nothing is benchmarked and the interpreter runs as few programs as possible.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
import triton

#: Key of the layer-shaped kernels (dtypes are appended by triton.autotune itself).
TUNE_KEY = ["N_BUCKET", "K", "O", "R"]
#: Key of the generic kernels (GEMM, expand): their own problem dims, with the row-count
#: dim bucketed by the launcher. Each maps onto (N bucket, in, out, r) of the layer.
GEMM_KEY = ["KEY_M", "KEY_N", "KEY_K"]
EXPAND_KEY = ["KEY_M", "KEY_N", "KEY_K", "KEY_R"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def n_bucket(n: int) -> int:
    """Autotune bucket for a row count: the next power of two, capped at 16384."""
    return min(triton.next_power_of_2(max(int(n), 1)), 16384)


def _cfg(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    return triton.Config(dict(meta), num_warps=num_warps, num_stages=num_stages)


def configs(gpu: Sequence[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The GPU config list, or the single interpreter config under ``TRITON_INTERPRET=1``."""
    return [interpreter] if interpreting() else list(gpu)


def _capability(named_args: dict) -> tuple[int, int] | None:
    for value in named_args.values():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            return torch.cuda.get_device_capability(value.device)
    return None


def prune_for_device(configs_: Iterable[triton.Config], named_args: dict,
                     **_kwargs: object) -> list[triton.Config]:
    """``early_config_prune`` hook. On sm_90+ keep every config; below that drop the ones
    with 8 warps and 4+ pipeline stages, which are sized for Hopper's 228 KB of shared
    memory and either fail or spill on sm_80's 164 KB."""
    configs_ = list(configs_)
    cap = _capability(named_args)
    if cap is None or cap >= (9, 0):
        return configs_
    kept = [c for c in configs_ if not (c.num_stages >= 4 and c.num_warps >= 8)]
    return kept or configs_[:1]


PRUNE = {"early_config_prune": prune_for_device}


def autotune(gpu_configs: Sequence[triton.Config], interpreter_config: triton.Config,
             key: Sequence[str] = tuple(TUNE_KEY), reset_to_zero: Sequence[str] | None = None):
    """``triton.autotune`` with the given key, device pruning and interpreter mode.

    ``reset_to_zero`` names the outputs that a kernel accumulates into atomically: the
    autotuner zeroes them before each timed run and once more before the real one.
    """
    chosen = configs(gpu_configs, interpreter_config)
    return triton.autotune(
        configs=chosen,
        key=list(key),
        prune_configs_by=None if len(chosen) == 1 else PRUNE,
        reset_to_zero=list(reset_to_zero) if reset_to_zero else None,
    )


# --- config tables ------------------------------------------------------------------

#: Fused forward (t kept on chip): BLOCK_R is fixed by r, so the tile over out is
#: narrower for wide r to keep t [BLOCK_M, BLOCK_R] plus the accumulator in registers.
FUSED_FORWARD = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, OUT_TILES=1),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, OUT_TILES=2),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, OUT_TILES=4),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, OUT_TILES=1),
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, OUT_TILES=4),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, OUT_TILES=8),
]
FUSED_FORWARD_INTERP = _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, OUT_TILES=2)

#: Expand (t read from memory) + teacher, also the second kernel of the split path.
EXPAND = [
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128),   # decode: tiny N, wide K steps
    _cfg(4, 4, BLOCK_M=32, BLOCK_N=32, BLOCK_K=128),
]
EXPAND_INTERP = _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)

#: Plain GEMM C = A·B (t in the split path, dU and dV in backward). The SPLIT_K > 1
#: configs serve dU/dV, whose reduction runs over N while the output is small.
GEMM = [
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SPLIT_K=1),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=4),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=16),
]
GEMM_INTERP = _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2)

#: Decode shrink t = x·Vᵀ for N <= 64: one row tile, split over in (K) and r.
DECODE_SHRINK = [
    _cfg(4, 4, BLOCK_R=64, BLOCK_K=128, SPLIT_K=8),
    _cfg(4, 4, BLOCK_R=64, BLOCK_K=128, SPLIT_K=16),
    _cfg(4, 3, BLOCK_R=32, BLOCK_K=256, SPLIT_K=8),
    _cfg(4, 4, BLOCK_R=128, BLOCK_K=64, SPLIT_K=16),
    _cfg(8, 4, BLOCK_R=128, BLOCK_K=128, SPLIT_K=4),
]
DECODE_SHRINK_INTERP = _cfg(4, 1, BLOCK_R=16, BLOCK_K=32, SPLIT_K=2)

#: Backward dy kernel (g, dmask, h, dbias and optionally dU from one read of dy).
DY = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_O=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_O=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_O=128),
    _cfg(8, 4, BLOCK_M=64, BLOCK_O=128),
    _cfg(4, 3, BLOCK_M=32, BLOCK_O=128),
    _cfg(4, 4, BLOCK_M=16, BLOCK_O=128),
]
DY_INTERP = _cfg(4, 1, BLOCK_M=32, BLOCK_O=32)

#: Backward dx = h·V + a·dy·W0.
DX = EXPAND
DX_INTERP = EXPAND_INTERP
