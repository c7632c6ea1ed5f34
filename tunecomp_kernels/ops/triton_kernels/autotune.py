"""Autotuning policy shared by the Triton kernels: configs, keys, interpreter mode.

Every tuned kernel is keyed on ``(N_BUCKET, K, O, R)`` (for the generic GEMM/expand
kernels: their own dims, which map onto those) plus the dtypes of its tensor arguments
(``triton.autotune`` appends those itself) and the variant flags that change its work
(teacher on/off, fused dU, fp32 dot precision). ``N_BUCKET`` is the row count rounded
up to a power of two (capped at 16384), so that a training run whose batch size wobbles
does not re-tune on every new N.

Config lists are written for sm_90 (H100/H200: 228 KB shared memory, 3-4 stage
pipelines, 8 warps for the tiles that hold a whole rank slice); their sm_80 variants
(A100: 164 KB) cap the pipeline at 3 stages. :func:`make_pruner` keeps the list of the
device the tensors live on, then drops the configs whose register estimate for this
call (it depends on ``BLOCK_R``) predicts spills. Configs that still exceed the
device's resources fail to compile and Triton's autotuner discards them.

Under ``TRITON_INTERPRET=1`` (CPU tests) every kernel gets exactly one small config, so
nothing is benchmarked and the interpreter runs as few programs as possible. With
``TUNECOMP_TRITON_AUTOTUNE=0`` every kernel runs the first config of its table; with
``TUNECOMP_TRITON_MAX_CONFIGS=n`` it is tuned over the first n only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import torch
import triton

#: Key of the layer-shaped kernels (dtypes are appended by triton.autotune itself; the
#: fp32 dot precision, ieee or tf32, changes the best tile too).
TUNE_KEY = ["N_BUCKET", "K", "O", "R", "PRECISION"]
#: Key of the generic kernels (GEMM, expand): their own problem dims, with the row-count
#: dim bucketed by the launcher. Each maps onto (N bucket, in, out, r) of the layer.
GEMM_KEY = ["KEY_M", "KEY_N", "KEY_K", "PRECISION"]
#: The expand kernel is tuned apart with and without its dense (teacher) term.
EXPAND_KEY = ["KEY_M", "KEY_N", "KEY_K", "KEY_R", "HAS_SECOND", "PRECISION"]
#: The fused forward kernel: with and without the teacher.
FUSED_FORWARD_KEY = [*TUNE_KEY, "HAS_TEACHER"]
#: The dy kernel: with and without the fused dU.
DY_KEY = [*TUNE_KEY, "FUSE_DU"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def n_bucket(n: int) -> int:
    """Autotune bucket for a row count: the next power of two, capped at 16384."""
    return min(triton.next_power_of_2(max(int(n), 1)), 16384)


def _cfg(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    return triton.Config(dict(meta), num_warps=num_warps, num_stages=num_stages)


def autotuning_enabled() -> bool:
    """False when ``TUNECOMP_TRITON_AUTOTUNE=0``: each kernel then runs its first (default)
    config without benchmarking, for quick correctness runs such as bench/gpu_check.sh.
    Read when the kernels are defined (first import of the Triton backend)."""
    return os.environ.get("TUNECOMP_TRITON_AUTOTUNE", "1") != "0"


def max_configs() -> int | None:
    """``TUNECOMP_TRITON_MAX_CONFIGS=n``: tune over at most the first n configs of each
    table (they are ordered most promising first), to bound tuning time in short runs."""
    value = os.environ.get("TUNECOMP_TRITON_MAX_CONFIGS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def configs(gpu: Sequence[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The GPU config list; the single interpreter config under ``TRITON_INTERPRET=1``;
    only the first GPU config when autotuning is switched off; at most
    ``TUNECOMP_TRITON_MAX_CONFIGS`` of them when that is set."""
    if interpreting():
        return [interpreter]
    if not autotuning_enabled():
        return list(gpu)[:1]
    return list(gpu)[:max_configs()]


def _capability(named_args: dict) -> tuple[int, int] | None:
    for value in named_args.values():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            return torch.cuda.get_device_capability(value.device)
    return None


def _signature(c: triton.Config) -> tuple:
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def for_sm80(configs_: Sequence[triton.Config]) -> list[triton.Config]:
    """The sm_80 variants of sm_90 configs: at most 3 pipeline stages (A100 has 164 KB of
    shared memory per SM against H100/H200's 228 KB), duplicates dropped."""
    seen: set[tuple] = set()
    out = []
    for c in configs_:
        v = triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=min(c.num_stages, 3))
        if _signature(v) not in seen:
            seen.add(_signature(v))
            out.append(v)
    return out


RegisterEstimate = Callable[[triton.Config, dict], float]


def make_pruner(sm90: Sequence[triton.Config], sm80: Sequence[triton.Config],
                registers: RegisterEstimate | None = None,
                budget: tuple[float, float] = (160.0, 96.0)):
    """An ``early_config_prune`` hook: keep the configs written for the tensors' GPU
    (sm_90 list on sm_90+, sm_80 list below), then, given a per-kernel ``registers``
    estimate (fp32 accumulator values per thread, from the call's constexprs such as
    ``BLOCK_R``), drop the configs over ``budget`` = (sm_90+, sm_80) limits.

    The estimates and budgets were fitted to the ptxas reports of
    ``python -m bench.compile_check`` (Triton 3.9; bench/results/compile-*.json): on
    sm_90 configs under the budget compiled without spills, those over it spilled. They
    only save tuning time on configs that would spill; they are compile-time facts, not
    timings, and the autotuner still times whatever is kept. At least one config is
    always kept."""
    sigs90 = {_signature(c) for c in sm90}
    sigs80 = {_signature(c) for c in sm80}

    def prune(configs_: Iterable[triton.Config], named_args: dict,
              **kwargs: object) -> list[triton.Config]:
        configs_ = list(configs_)
        cap = _capability(named_args)
        older = cap is not None and cap < (9, 0)
        wanted = sigs80 if older else sigs90
        kept = [c for c in configs_ if _signature(c) in wanted] or configs_
        if registers is not None:
            meta = {**named_args, **kwargs}
            limit = budget[1] if older else budget[0]
            fitting = [c for c in kept if registers(c, meta) <= limit]
            kept = fitting or [min(kept, key=lambda c: registers(c, meta))]
        return kept

    return prune


def autotune(gpu_configs: Sequence[triton.Config], interpreter_config: triton.Config,
             key: Sequence[str] = tuple(TUNE_KEY), reset_to_zero: Sequence[str] | None = None,
             registers: RegisterEstimate | None = None,
             budget: tuple[float, float] = (160.0, 96.0)):
    """``triton.autotune`` over ``gpu_configs`` (sm_90) plus their sm_80 variants, with the
    given key, the pruning of :func:`make_pruner`, and one config under the interpreter.

    ``reset_to_zero`` names the outputs that a kernel accumulates into atomically: the
    autotuner zeroes them before each timed run and once more before the real one.
    """
    chosen = configs(gpu_configs, interpreter_config)
    prune = None
    if len(chosen) > 1:
        sm90, sm80 = chosen, for_sm80(chosen)
        sigs = {_signature(c) for c in sm90}
        chosen = sm90 + [c for c in sm80 if _signature(c) not in sigs]
        prune = {"early_config_prune": make_pruner(sm90, sm80, registers, budget)}
    return triton.autotune(
        configs=chosen,
        key=list(key),
        prune_configs_by=prune,
        reset_to_zero=list(reset_to_zero) if reset_to_zero else None,
    )


def fused_forward_registers(c: triton.Config, meta: dict) -> float:
    """Fused forward: t [BLOCK_M, BLOCK_R] and the accumulator [BLOCK_M, BLOCK_N], fp32
    values per thread."""
    k = c.kwargs
    block_r = int(meta.get("BLOCK_R", 64))
    return k["BLOCK_M"] * (block_r + k["BLOCK_N"]) / (32 * c.num_warps)


def dy_registers(c: triton.Config, meta: dict) -> float:
    """dy kernel: g [BLOCK_M, BLOCK_R] fp32 values per thread; the fused dU adds its
    [BLOCK_O, BLOCK_R] fp32 partial and the fp32 ``t·mask`` operand (kept fp32 so that it
    cannot overflow fp16; see :mod:`.forward`)."""
    k = c.kwargs
    bm, bo = k["BLOCK_M"], k["BLOCK_O"]
    block_r = int(meta.get("BLOCK_R", 64))
    regs = bm * block_r
    if meta.get("FUSE_DU", False):
        regs += bo * block_r + bm * block_r
    return regs / (32 * c.num_warps)


#: (sm_90+, sm_80) register budgets for the estimates above. DY's sm_80 budget is 72:
#: with fp32 operands, sm_80's mma.sync holds both fused-dU operands in registers and
#: ptxas spilled the fused-dU configs estimated at 80-96 (compile-sm90-sm80-20261130-*.json);
#: at r = 128 no config fits, so the pruner keeps the first lowest estimate, (8 warps, 64 x 64),
#: which did not spill. The unfused dy configs all stay under 72 or over 96.
FUSED_FORWARD_BUDGET = (160.0, 96.0)
DY_BUDGET = (120.0, 72.0)

# --- config tables ------------------------------------------------------------------
# Every GPU config below compiles for sm_90 and (as its 3-stage variant) sm_80 within
# shared memory (``python -m bench.compile_check``); the register estimates above drop
# the ones ptxas reports spilling for the call's BLOCK_R. None has been timed on a GPU.

#: Fused forward (t kept on chip): the [BLOCK_M, BLOCK_R] fp32 t lives in registers next
#: to the accumulator, so wide r wants BLOCK_M = 64 with 8 warps.
FUSED_FORWARD = [
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, OUT_TILES=1),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, OUT_TILES=1),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=256, BLOCK_K=32, OUT_TILES=1),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, OUT_TILES=1),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, OUT_TILES=1),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, OUT_TILES=1),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, OUT_TILES=2),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, OUT_TILES=4),
    _cfg(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, OUT_TILES=1),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, OUT_TILES=1),
]
FUSED_FORWARD_INTERP = _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, OUT_TILES=2)

#: Expand (t or h read from memory) + dense term: forward split/decode and dx.
EXPAND = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128),  # decode: few rows, long K steps
    _cfg(4, 4, BLOCK_M=32, BLOCK_N=32, BLOCK_K=128),
    _cfg(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128),
]
EXPAND_INTERP = _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)

#: Plain GEMM C = A·B (t in the split path, dU and dV in backward). The SPLIT_K > 1
#: configs serve dU/dV, whose reduction runs over N while the output is small.
GEMM = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, SPLIT_K=1),
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
    _cfg(8, 3, BLOCK_M=64, BLOCK_O=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_O=128),
    _cfg(8, 3, BLOCK_M=32, BLOCK_O=128),
    _cfg(4, 4, BLOCK_M=16, BLOCK_O=64),
    _cfg(4, 3, BLOCK_M=32, BLOCK_O=64),
    _cfg(4, 3, BLOCK_M=16, BLOCK_O=128),
    _cfg(4, 3, BLOCK_M=64, BLOCK_O=32),
]
DY_INTERP = _cfg(4, 1, BLOCK_M=32, BLOCK_O=32)
