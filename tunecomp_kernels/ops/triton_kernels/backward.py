"""Backward dy kernel: g = dy·U, dmask, h, dbias (and dU when fused) from one read of dy.

Notation as in :mod:`.forward`; ``s`` = student_scale, ``ms = s·mask``.

One program owns ``BLOCK_M`` rows and a ``BLOCK_R`` slice of the ranks (one slice when
r <= 256, the fused case). It loads its ``t`` tile once, then streams dy and U over the
output dim in ``BLOCK_O`` steps. Each dy tile is used, while it sits in registers, for

* ``g += dy·U``                       (complete for these rows: the loop covers all of O),
* ``dU[o-tile] += dyᵀ·(t ⊙ ms)``       (``FUSE_DU``: this program's share of the N-sum),
* ``dbias[o-tile] += s·Σ_rows dy``     (first rank slice only).

After the loop g is complete, so the epilogue folds in ``dmask += s·Σ_rows t ⊙ g`` and
stores ``h = g ⊙ ms`` (fp32: in fp16, dy·U of small dy and U went subnormal, and large
ones overflowed) for the dx and dV kernels. The fused dU product reads fp32 t ⊙ ms with
``WIDE_PRECISION`` like the forward's second product (see :mod:`.forward`). Sums over the rows of
several programs meet through ``tl.atomic_add`` in zero-filled fp32 buffers; with a
single row tile (decode) dU is stored directly.

Why dU is fused only for few row tiles: the fused dU costs ``(N / BLOCK_M)·O·r`` fp32
atomic adds (each row tile adds a full ``[O, r]`` partial), while the separate GEMM
costs one more read of dy (``N·O`` elements) and no atomics; the two break even around
``BLOCK_M = 2r``, so the fusion only pays with one or two row tiles. The launcher fuses
dU for N <= ``FUSE_DU_MAX_N`` and r <= ``FUSE_DU_MAX_R`` (see
:mod:`tunecomp_kernels.ops.triton_backend`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import autotune as at
from .common import col_sum, dot_operand, load_tile


@at.autotune(at.DY, at.DY_INTERP, key=at.DY_KEY,
             reset_to_zero=["du_ptr", "dmask_ptr", "dbias_ptr"],
             registers=at.dy_registers, budget=at.DY_BUDGET)
@triton.jit
def dy_kernel(
    dy_ptr, u_ptr, t_ptr, mask_ptr, h_ptr, du_ptr, dmask_ptr, dbias_ptr, ref_ptr,
    N, K, O, R, N_BUCKET,
    stride_dyn, stride_dyo, stride_uo, stride_ur, stride_tn, stride_tr,
    stride_hn, stride_hr, stride_duo, stride_dur,
    s_ptr,
    FUSE_DU: tl.constexpr, NEED_MASK: tl.constexpr, NEED_H: tl.constexpr,
    NEED_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_M), cdiv(R, BLOCK_R))``. dy [N, O], U [O, R], t [N, R] fp32;
    writes h [N, R] (fp32); accumulates dU [O, R], dmask [R], dbias [O] (fp32, zeroed).
    s is loaded from the 0-d tensor at ``s_ptr``."""
    student_scale = tl.load(s_ptr).to(tl.float32)
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_ob = tl.arange(0, BLOCK_O)
    m_ok = offs_m < N
    r_ok = offs_r < R
    ms = tl.load(mask_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32) * student_scale
    if FUSE_DU:  # fp32 t·ms: rounded to fp16 it could overflow
        t = load_tile(t_ptr, offs_m, offs_r, stride_tn, stride_tr, m_ok, r_ok).to(tl.float32)
        ts = t * ms[None, :]
    else:
        ts = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    single_row_tile = tl.num_programs(0) == 1
    g = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for o0 in range(0, O, BLOCK_O):
        offs_o = o0 + offs_ob
        o_ok = offs_o < O
        dyt = load_tile(dy_ptr, offs_m, offs_o, stride_dyn, stride_dyo, m_ok, o_ok)
        dyd = dot_operand(dyt, ref_ptr, UPCAST)
        ut = load_tile(u_ptr, offs_o, offs_r, stride_uo, stride_ur, o_ok, r_ok)
        g = tl.dot(dyd, dot_operand(ut, ref_ptr, UPCAST), g, input_precision=PRECISION)
        if FUSE_DU:
            du = tl.dot(tl.trans(dyt.to(tl.float32)), ts,
                        input_precision=WIDE_PRECISION)  # [BLOCK_O, BLOCK_R]
            du_ptrs = du_ptr + offs_o[:, None] * stride_duo + offs_r[None, :] * stride_dur
            du_ok = o_ok[:, None] & r_ok[None, :]
            if single_row_tile:
                tl.store(du_ptrs, du, mask=du_ok)
            else:
                tl.atomic_add(du_ptrs, du, mask=du_ok)
        if NEED_BIAS:
            col = col_sum(dyt.to(tl.float32)) * student_scale
            o_lim = tl.where(pid_r == 0, O, 0)  # dbias: first rank slice only
            tl.atomic_add(dbias_ptr + offs_o, col, mask=offs_o < o_lim)
    if NEED_MASK:  # t is re-read here (L2-resident) rather than held in registers
        t = load_tile(t_ptr, offs_m, offs_r, stride_tn, stride_tr, m_ok, r_ok).to(tl.float32)
        tl.atomic_add(dmask_ptr + offs_r, col_sum(t * g) * student_scale, mask=r_ok)
    if NEED_H:
        tl.store(h_ptr + offs_m[:, None] * stride_hn + offs_r[None, :] * stride_hr,
                 (g * ms[None, :]).to(h_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & r_ok[None, :])
