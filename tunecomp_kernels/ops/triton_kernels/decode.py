"""Decode path (N <= ``TRITON_DECODE_MAX_N`` rows): split-K shrink ``t = x·Vᵀ``.

With a handful of rows, ``x·Vᵀ`` is tall-skinny on the wrong side: the output ``[N, r]``
has too few tiles to occupy the GPU while the reduction over ``in`` is long, and the time
is the time to read V once. One program row tile covers all N rows (``BLOCK_M`` = N
rounded up to a power of two, at least 16 for ``tl.dot``), the grid splits r into
``BLOCK_R`` tiles and ``in`` into ``SPLIT_K`` slices, so ``cdiv(r, BLOCK_R) · SPLIT_K``
programs each stream a disjoint ``[BLOCK_R, in / SPLIT_K]`` block of V, and the partial
sums meet in the fp32 t buffer through ``tl.atomic_add``. The expand kernel then applies
mask, U, bias and the teacher in one accumulator.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import autotune as at
from .common import cdiv, dot_operand, load_tile


@at.autotune(at.DECODE_SHRINK, at.DECODE_SHRINK_INTERP, reset_to_zero=["t_ptr"])
@triton.jit
def decode_shrink_kernel(
    x_ptr, v_ptr, t_ptr,
    N, K, O, R, N_BUCKET,
    stride_xn, stride_xk, stride_vr, stride_vk, stride_tn, stride_tr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """t [N, R] (fp32, zeroed) += x [N, K] · Vᵀ; grid ``(cdiv(R, BLOCK_R), SPLIT_K)``;
    ``BLOCK_M >= N``. ``O`` only keys the autotuner."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_kb = tl.arange(0, BLOCK_K)
    m_ok = offs_m < N
    r_ok = offs_r < R
    k_per_split = cdiv(cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + offs_kb
        k_ok = offs_k < k_stop
        xt = load_tile(x_ptr, offs_m, offs_k, stride_xn, stride_xk, m_ok, k_ok)
        vt = load_tile(v_ptr, offs_k, offs_r, stride_vk, stride_vr, k_ok, r_ok)
        acc = tl.dot(dot_operand(xt, x_ptr, UPCAST), dot_operand(vt, x_ptr, UPCAST), acc,
                     input_precision=PRECISION)
    tl.atomic_add(t_ptr + offs_m[:, None] * stride_tn + offs_r[None, :] * stride_tr, acc,
                  mask=m_ok[:, None] & r_ok[None, :])
