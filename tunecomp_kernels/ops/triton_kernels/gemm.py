"""Generic strided GEMM with split-K: ``C = alpha · (A·B) ⊙ colscale``.

Used for the pieces that are plain GEMMs: ``t = x·Vᵀ`` in the split (r > 256) forward,
``dU = s·dyᵀ·(t ⊙ mask)`` when it is not fused into the dy kernel, and ``dV = hᵀ·x``.
Any operand may be a transposed view: only strides are passed. C is always an fp32
buffer the launcher zero-fills, because ``SPLIT_K`` is part of the tuned config: with
``SPLIT_K > 1`` the programs of one output tile each reduce a slice of K and combine
with ``tl.atomic_add`` (useful for dU/dV, whose reduction runs over the N rows while the
output is only parameter-sized). The launcher casts C to the parameter dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import autotune as at
from .common import cdiv, dot_operand, load_tile


@at.autotune(at.GEMM, at.GEMM_INTERP, key=at.GEMM_KEY, reset_to_zero=["c_ptr"])
@triton.jit
def gemm_kernel(
    a_ptr, b_ptr, c_ptr, scale_ptr, ref_ptr,
    M, N, K, KEY_M, KEY_N, KEY_K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    alpha_ptr,
    HAS_SCALE: tl.constexpr, HAS_ALPHA: tl.constexpr, WIDE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """C [M, N] (fp32, zeroed) = alpha · A [M, K] · B [K, N] ⊙ scale [N]; grid
    ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K)``. alpha (``HAS_ALPHA``) is loaded
    from the 0-d tensor at ``alpha_ptr``. ``WIDE``: an operand is an fp32 intermediate
    (t or h), so both are fed to ``tl.dot`` as fp32 with ``PRECISION`` (the launcher
    passes TF32 for half inputs, see :mod:`.forward`); else they take ``ref_ptr``'s dtype."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # This split's slice of K, a whole number of BLOCK_K steps.
    k_per_split = cdiv(cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + offs_kb
        k_ok = offs_k < k_stop
        a = load_tile(a_ptr, offs_m, offs_k, stride_am, stride_ak, m_ok, k_ok)
        b = load_tile(b_ptr, offs_k, offs_n, stride_bk, stride_bn, k_ok, n_ok)
        if WIDE:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(dot_operand(a, ref_ptr, UPCAST), dot_operand(b, ref_ptr, UPCAST),
                         acc, input_precision=PRECISION)
    if HAS_ALPHA:
        acc = acc * tl.load(alpha_ptr).to(tl.float32)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc, mask=c_ok)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_ok)
