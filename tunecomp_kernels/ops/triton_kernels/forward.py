"""Forward kernels: the fully fused one (t kept on chip) and the expand kernel.

Notation: x ``[N, K]`` (K = in), V ``[R, K]``, U ``[O, R]`` (O = out), mask ``[R]``,
W0 ``[O, K]``; ``a`` = teacher_scale, ``s`` = student_scale.

Numerics: t = x·Vᵀ, and h in the backward, are fp32 and stay fp32: the products that
read them (``(t ⊙ s·mask)·Uᵀ`` here, ``h·V``, ``dyᵀ·t``, ``hᵀ·x``) take fp32 operands with
``WIDE_PRECISION`` (TF32 for half inputs). Rounding t to fp16 first overflowed for
|t| > 65504 and lost precision below 6e-5 (subnormals), although y itself was in range.
TF32 keeps fp32's exponent range with fp16's 10 mantissa bits, so the result is as
precise as the fp16 dot was for in-range t, while these r-long products run at half the
fp16 tensor-core rate; the long products over in (x·Vᵀ, the teacher) stay in fp16/bf16.
fp32 inputs use the same precision as their other dots (IEEE unless TF32 is allowed).

``fused_forward_kernel`` (r <= ``FUSED_MAX_R``): one program owns ``BLOCK_M`` rows and
``OUT_TILES`` consecutive output tiles of ``BLOCK_N`` columns. Its first K-loop loads each
x tile once and feeds it to two ``tl.dot``s: ``t += x·Vᵀ`` (the whole ``[BLOCK_M, r]``
intermediate, held in registers) and, with a teacher, ``acc += x·W0ᵀ`` for the first
output tile. The epilogue scales the accumulator by ``a`` and adds
``(t ⊙ s·mask)·Uᵀ`` with one more ``tl.dot`` into the *same* accumulator, then the
biases, and stores y once. Further output tiles of the program reuse t from registers
(only the teacher needs another pass over x). ``OUT_TILES`` trades parallelism against
recomputing t: every program recomputes its rows' t, so t costs ``2·N·K·R`` FLOPs times
``ceil(O / (BLOCK_N·OUT_TILES))``.

``expand_kernel`` computes ``C = (A1 ⊙ s1·mask)·B1 + alpha2·A2·B2 + beta1·bias1 +
beta2·bias2`` with one accumulator. It is the second kernel of the split (r > 256) and
decode paths (A1 = t from memory, B1 = Uᵀ, A2 = x, B2 = W0ᵀ), and the backward's dx
(A1 = h, B1 = V, A2 = dy, B2 = W0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import autotune as at
from .common import dot_operand, load_tile


@triton.jit
def _finish_tile(acc, ts, offs_m, offs_o, m_ok, o_ok, offs_r, r_ok,
                 u_ptr, stride_uo, stride_ur, bias_ptr, b0_ptr,
                 y_ptr, stride_yn, stride_yo, teacher_scale, student_scale,
                 HAS_BIAS: tl.constexpr, HAS_TEACHER: tl.constexpr,
                 HAS_TEACHER_BIAS: tl.constexpr, WIDE_PRECISION: tl.constexpr):
    """acc [BM, BN] holds x·W0ᵀ (or zeros), ts the fp32 t ⊙ s·mask:
    y = a·acc + ts·Uᵀ + s·bias + a·b0, stored."""
    if HAS_TEACHER:
        acc = acc * teacher_scale
    ut = load_tile(u_ptr, offs_r, offs_o, stride_ur, stride_uo, r_ok, o_ok)  # Uᵀ [BR, BN]
    acc = tl.dot(ts, ut.to(tl.float32), acc, input_precision=WIDE_PRECISION)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)
        acc += student_scale * b[None, :]
    if HAS_TEACHER_BIAS:
        b0 = tl.load(b0_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)
        acc += teacher_scale * b0[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_yn + offs_o[None, :] * stride_yo,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])


@at.autotune(at.FUSED_FORWARD, at.FUSED_FORWARD_INTERP, key=at.FUSED_FORWARD_KEY,
             registers=at.fused_forward_registers, budget=at.FUSED_FORWARD_BUDGET)
@triton.jit
def fused_forward_kernel(
    x_ptr, v_ptr, u_ptr, mask_ptr, bias_ptr, w0_ptr, b0_ptr, y_ptr, t_ptr,
    N, K, O, R, N_BUCKET,
    stride_xn, stride_xk, stride_vr, stride_vk, stride_uo, stride_ur,
    stride_wo, stride_wk, stride_yn, stride_yo, stride_tn, stride_tr,
    a_ptr, s_ptr,
    HAS_BIAS: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WIDE_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    OUT_TILES: tl.constexpr,
):
    """y [N, O] and t [N, R] (fp32) in one pass; grid
    ``(cdiv(N, BLOCK_M), cdiv(cdiv(O, BLOCK_N), OUT_TILES))``; ``BLOCK_R >= R``.
    The scales a, s are loaded from the 0-d tensors at ``a_ptr``, ``s_ptr``."""
    teacher_scale = tl.load(a_ptr).to(tl.float32)
    student_scale = tl.load(s_ptr).to(tl.float32)
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_kb = tl.arange(0, BLOCK_K)
    m_ok = offs_m < N
    r_ok = offs_r < R
    first_o = pid_g * (OUT_TILES * BLOCK_N)
    offs_o = first_o + tl.arange(0, BLOCK_N)
    o_ok = offs_o < O

    # Pass 1 over K: x is loaded once per step and feeds both t and the teacher tile.
    t = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        k_ok = offs_k < K
        xt = dot_operand(load_tile(x_ptr, offs_m, offs_k, stride_xn, stride_xk, m_ok, k_ok),
                         x_ptr, UPCAST)
        vt = load_tile(v_ptr, offs_k, offs_r, stride_vk, stride_vr, k_ok, r_ok)  # Vᵀ [BK, BR]
        t = tl.dot(xt, dot_operand(vt, x_ptr, UPCAST), t, input_precision=PRECISION)
        if HAS_TEACHER:
            wt = load_tile(w0_ptr, offs_k, offs_o, stride_wk, stride_wo, k_ok, o_ok)
            acc = tl.dot(xt, dot_operand(wt, x_ptr, UPCAST), acc, input_precision=PRECISION)

    # t is saved for backward by the first column group only.
    n_lim = tl.where(pid_g == 0, N, 0)
    tl.store(t_ptr + offs_m[:, None] * stride_tn + offs_r[None, :] * stride_tr, t,
             mask=(offs_m < n_lim)[:, None] & r_ok[None, :])
    ms = tl.load(mask_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32) * student_scale
    ts = t * ms[None, :]  # fp32: rounded to fp16 it could overflow (see the module doc)
    _finish_tile(acc, ts, offs_m, offs_o, m_ok, o_ok, offs_r, r_ok, u_ptr, stride_uo,
                 stride_ur, bias_ptr, b0_ptr, y_ptr, stride_yn, stride_yo,
                 teacher_scale, student_scale, HAS_BIAS, HAS_TEACHER, HAS_TEACHER_BIAS,
                 WIDE_PRECISION)

    # Further output tiles reuse t from registers; only the teacher re-reads x.
    for j in range(1, OUT_TILES):
        start_o = first_o + j * BLOCK_N
        if start_o < O:
            offs_oj = start_o + tl.arange(0, BLOCK_N)
            o_okj = offs_oj < O
            accj = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            if HAS_TEACHER:
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + offs_kb
                    k_ok = offs_k < K
                    xt = load_tile(x_ptr, offs_m, offs_k, stride_xn, stride_xk, m_ok, k_ok)
                    wt = load_tile(w0_ptr, offs_k, offs_oj, stride_wk, stride_wo, k_ok, o_okj)
                    accj = tl.dot(dot_operand(xt, x_ptr, UPCAST),
                                  dot_operand(wt, x_ptr, UPCAST), accj,
                                  input_precision=PRECISION)
            _finish_tile(accj, ts, offs_m, offs_oj, m_ok, o_okj, offs_r, r_ok, u_ptr,
                         stride_uo, stride_ur, bias_ptr, b0_ptr, y_ptr, stride_yn, stride_yo,
                         teacher_scale, student_scale, HAS_BIAS, HAS_TEACHER,
                         HAS_TEACHER_BIAS, WIDE_PRECISION)


@at.autotune(at.EXPAND, at.EXPAND_INTERP, key=at.EXPAND_KEY)
@triton.jit
def expand_kernel(
    a1_ptr, b1_ptr, mask_ptr, a2_ptr, b2_ptr, bias1_ptr, bias2_ptr, c_ptr, ref_ptr,
    M, N, R1, K2, KEY_M, KEY_N, KEY_K, KEY_R,
    stride_a1m, stride_a1r, stride_b1r, stride_b1n,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_cm, stride_cn,
    s_ptr, a_ptr,
    HAS_MASK: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_BIAS1: tl.constexpr,
    HAS_BIAS2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C [M, N] = (A1 [M, R1] ⊙ s·mask)·B1 [R1, N] + a·A2 [M, K2]·B2 [K2, N]
    + s·bias1 + a·bias2, one fp32 accumulator; grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``.
    s and a are loaded from ``s_ptr`` / ``a_ptr`` (read only where used). A1 is fp32 (t or
    h) and its product runs on fp32 operands (``WIDE_PRECISION``); A2·B2 takes
    ``ref_ptr``'s dtype."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if HAS_SECOND:  # the dense (teacher) term first, so it can be scaled in place
        for k0 in range(0, K2, BLOCK_K):
            offs_k = k0 + offs_kb
            k_ok = offs_k < K2
            a2 = load_tile(a2_ptr, offs_m, offs_k, stride_a2m, stride_a2k, m_ok, k_ok)
            b2 = load_tile(b2_ptr, offs_k, offs_n, stride_b2k, stride_b2n, k_ok, n_ok)
            acc = tl.dot(dot_operand(a2, ref_ptr, UPCAST), dot_operand(b2, ref_ptr, UPCAST),
                         acc, input_precision=PRECISION)
        acc = acc * tl.load(a_ptr).to(tl.float32)
    scale1 = tl.load(s_ptr).to(tl.float32)
    for r0 in range(0, R1, BLOCK_K):
        offs_r = r0 + offs_kb
        r_ok = offs_r < R1
        a1 = load_tile(a1_ptr, offs_m, offs_r, stride_a1m, stride_a1r, m_ok, r_ok)
        if HAS_MASK:
            ms = tl.load(mask_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32) * scale1
            a1 = a1.to(tl.float32) * ms[None, :]
        b1 = load_tile(b1_ptr, offs_r, offs_n, stride_b1r, stride_b1n, r_ok, n_ok)
        acc = tl.dot(a1.to(tl.float32), b1.to(tl.float32), acc, input_precision=WIDE_PRECISION)
    if HAS_BIAS1:
        acc += scale1 * tl.load(bias1_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS2:
        b2v = tl.load(bias2_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.load(a_ptr).to(tl.float32) * b2v[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
