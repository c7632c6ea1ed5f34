"""Distill forward kernel: the blend, the feature difference D and its partial sums at once.

Notation as in :mod:`.forward`. Given t = x·Vᵀ (fp32, from the decode shrink or the GEMM
kernel), one program owns a ``[BLOCK_M, BLOCK_N]`` tile of the output and keeps the two
branches in two fp32 accumulators: the teacher ``acc_t = x·W0ᵀ + b0`` (a K-loop over x and
W0) and the student ``acc_s = (t ⊙ mask)·Uᵀ + bias`` (an r-loop over t and U, on fp32
operands with ``WIDE_PRECISION`` like the blend's). Its epilogue stores
``y = a·acc_t + s·acc_s`` (x's dtype), ``D = acc_s − acc_t`` (fp32) and the tile's
``Σ D²`` and ``Σ acc_t²`` into row ``pid_m·cdiv(O, BLOCK_N) + pid_n`` of a zero-filled
``[tiles, 2]`` buffer, which the launcher sums with ``torch.sum``: no atomics, so the sums
are the same from run to run.

Why t comes from memory: the two accumulators already hold ``2·BLOCK_M·BLOCK_N`` fp32
values per program, and keeping ``[BLOCK_M, r]`` of t in registers as well (as the blend's
fused kernel does) would recompute t once per output tile; reading it back costs
``4·N·r`` bytes per output tile column, small next to x for r < in.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import autotune as at
from .common import col_sum, dot_operand, load_tile


@triton.jit
def _tile_sum(a):
    """Sum of a 2-D tile (a scalar)."""
    return tl.reduce(col_sum(a), 0, _plus)


@triton.jit
def _plus(a, b):
    return a + b


#: Tuned on the expand kernel's tiles (the same loops, one accumulator more), keyed apart.
DISTILL_KEY = ["KEY_M", "KEY_N", "KEY_K", "KEY_R", "PRECISION"]


@at.autotune(at.EXPAND, at.EXPAND_INTERP, key=DISTILL_KEY, reset_to_zero=["part_ptr"])
@triton.jit
def distill_forward_kernel(
    t_ptr, u_ptr, mask_ptr, x_ptr, w0_ptr, bias_ptr, b0_ptr, y_ptr, d_ptr, part_ptr,
    M, N, R, K, KEY_M, KEY_N, KEY_K, KEY_R,
    stride_tm, stride_tr, stride_un, stride_ur, stride_xm, stride_xk,
    stride_wn, stride_wk, stride_ym, stride_yn, stride_dm, stride_dn,
    a_ptr, s_ptr,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WIDE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y [M, N] (x's dtype), D [M, N] (fp32) and partial sums [tiles, 2] (fp32, zeroed);
    grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``. t [M, R] fp32, U [N, R], x [M, K],
    W0 [N, K]; a and s are loaded from the 0-d tensors at ``a_ptr`` / ``s_ptr``. The
    launcher sizes the partial-sum buffer for the smallest tiles of the config list."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc_t = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        k_ok = offs_k < K
        xt = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, m_ok, k_ok)
        wt = load_tile(w0_ptr, offs_k, offs_n, stride_wk, stride_wn, k_ok, n_ok)  # W0ᵀ
        acc_t = tl.dot(dot_operand(xt, x_ptr, UPCAST), dot_operand(wt, x_ptr, UPCAST), acc_t,
                       input_precision=PRECISION)
    acc_s = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r0 in range(0, R, BLOCK_K):
        offs_r = r0 + offs_kb
        r_ok = offs_r < R
        ms = tl.load(mask_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        tt = load_tile(t_ptr, offs_m, offs_r, stride_tm, stride_tr, m_ok, r_ok).to(tl.float32)
        ut = load_tile(u_ptr, offs_r, offs_n, stride_ur, stride_un, r_ok, n_ok)  # Uᵀ
        acc_s = tl.dot(tt * ms[None, :], ut.to(tl.float32), acc_s,
                       input_precision=WIDE_PRECISION)
    if HAS_BIAS:
        acc_s += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_TEACHER_BIAS:
        acc_t += tl.load(b0_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    # Padding rows and columns hold the biases: zero them before they reach the sums.
    acc_t = tl.where(ok, acc_t, 0.0)
    diff = tl.where(ok, acc_s - acc_t, 0.0)
    y = tl.load(a_ptr).to(tl.float32) * acc_t + tl.load(s_ptr).to(tl.float32) * acc_s
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(d_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn, diff, mask=ok)
    tile = pid_m * tl.num_programs(1) + pid_n
    tl.store(part_ptr + 2 * tile, _tile_sum(diff * diff))
    tl.store(part_ptr + 2 * tile + 1, _tile_sum(acc_t * acc_t))
