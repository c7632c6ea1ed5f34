"""Triton implementation of the distill op (:mod:`.distill_contract`): backend ``"triton"``.

Forward: t = x·Vᵀ from the blend's kernels (the split-K decode shrink for
``N <= TRITON_DECODE_MAX_N``, else the GEMM kernel), then one launch of
:func:`.triton_kernels.distill.distill_forward_kernel`, which keeps the teacher and the
student tile in two fp32 accumulators and writes y, D and per-tile partial sums of D² and
y_t² (a ``[tiles, 2]`` buffer summed afterwards: deterministic, no atomics).

Backward: ``G_s = s·dy + c·D`` is formed once in fp32. dx (no feature term) is the blend's
backward (:func:`.triton_backend.backward`) on dy; dU and dmask come from one wide GEMM
``P = G_sᵀ t``, dbias from a column sum of G_s, and dV from the blend's dy kernel and dV
GEMM run on G_s with ``s = 1``. So ``dy·U`` (for dx) and ``G_s·U`` (for dV) are two
products where the blend has one: the price of a student gradient that differs from dx's.

float64, r = 0, N = 0 and problems whose offsets overflow int32 run the reference
implementation inside the same op, as the blend's Triton backend does.
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op, wrap_triton

from . import reference_distill
from . import triton_backend as tb
from .contract import BackendOps
from .distill_contract import feature_coefficient, register_distill_ops
from .triton_kernels import autotune as at
from .triton_kernels.distill import distill_forward_kernel


def _partials(n: int, out_f: int, device: torch.device) -> torch.Tensor:
    """A zeroed fp32 ``[tiles, 2]`` buffer with room for the most tiles any config of the
    kernel launches (the autotuner picks the config after this buffer exists)."""
    configs = distill_forward_kernel.configs
    block_m = min(c.kwargs["BLOCK_M"] for c in configs)
    block_n = min(c.kwargs["BLOCK_N"] for c in configs)
    tiles = triton.cdiv(n, block_m) * triton.cdiv(out_f, block_n)
    return torch.zeros((tiles, 2), dtype=torch.float32, device=device)


def _served_by_reference(x2: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                         teacher_weight: torch.Tensor) -> bool:
    n, k = x2.shape
    out_f, r = U.shape
    return (x2.dtype == torch.float64 or r == 0 or n == 0
            or not tb._int32_indexable(n, k, out_f, r, x2, U, V, teacher_weight))


def forward(
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    teacher_scale: torch.Tensor,
    student_scale: torch.Tensor,
    feature_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [..., out], t [N, r], D [N, out], sums [2])``; t, D and sums in fp32."""
    out_f, r = U.shape
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    n = x2.shape[0]
    if _served_by_reference(x2, U, V, teacher_weight):
        return reference_distill.forward(x, U, mask, V, bias, teacher_weight, teacher_bias,
                                         teacher_scale, student_scale, feature_weight)
    mask = mask.contiguous()
    bias = bias.contiguous() if bias is not None else None
    b0 = teacher_bias.contiguous() if teacher_bias is not None else None
    t = (tb._shrink_decode(x2, V, out_f) if n <= tb.TRITON_DECODE_MAX_N
         else tb._gemm(x2, V.t(), x2, at.n_bucket(n), r, k))
    y = torch.empty((n, out_f), dtype=x.dtype, device=x.device)
    D = torch.empty((n, out_f), dtype=torch.float32, device=x.device)
    partials = _partials(n, out_f, x.device)
    w0 = teacher_weight

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(out_f, meta["BLOCK_N"]))

    wrap_triton(distill_forward_kernel)[grid](
        t, U, mask, x2, w0, bias if bias is not None else mask, b0 if b0 is not None else mask,
        y, D, partials,
        n, out_f, r, k, at.n_bucket(n), out_f, k, r,
        t.stride(0), t.stride(1), U.stride(0), U.stride(1), x2.stride(0), x2.stride(1),
        w0.stride(0), w0.stride(1), y.stride(0), y.stride(1), D.stride(0), D.stride(1),
        teacher_scale, student_scale,
        HAS_BIAS=bias is not None, HAS_TEACHER_BIAS=b0 is not None,
        UPCAST=tb._upcast(x.dtype), PRECISION=tb._precision(x.dtype),
        WIDE_PRECISION=tb._wide_precision(x.dtype),
    )
    return y.reshape(*x.shape[:-1], out_f), t, D, partials.sum(0)


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    t: torch.Tensor,
    D: torch.Tensor,
    sums: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_scale: torch.Tensor,
    student_scale: torch.Tensor,
    feature_weight: torch.Tensor,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dU, dmask, dV, dbias), fresh 0-element tensors where not needed."""
    if _served_by_reference(x.reshape(-1, x.shape[-1]), U, V, teacher_weight):
        return reference_distill.backward(grad_y, x, U, mask, V, t, D, sums, teacher_weight,
                                          teacher_scale, student_scale, feature_weight,
                                          needs_grad)
    need_x, *need_params = (bool(n) for n in needs_grad)
    dx = grad_y.new_empty((0,))
    if need_x:
        dx = tb.backward(grad_y, x, U, mask, V, t, teacher_weight, teacher_scale,
                         student_scale, [True, False, False, False, False])[0]
    if not any(need_params):
        return (dx, *(grad_y.new_empty((0,)) for _ in range(4)))
    return (dx, *_student_grads(grad_y, x, U, mask, V, t, D, sums, teacher_scale,
                                student_scale, feature_weight, need_params))


def _student_grads(grad_y: torch.Tensor, x: torch.Tensor, U: torch.Tensor, mask: torch.Tensor,
                   V: torch.Tensor, t: torch.Tensor, D: torch.Tensor, sums: torch.Tensor,
                   teacher_scale: torch.Tensor, student_scale: torch.Tensor,
                   feature_weight: torch.Tensor, needs: list[bool]) -> list[torch.Tensor]:
    """[dU, dmask, dV, dbias] from the fp32 ``G_s = s·dy + c·D`` (0-element where not needed).

    ``P = G_sᵀ t`` [out, r] is one wide (fp32-operand) GEMM giving both ``dU = P·diag(mask)``
    and ``dmask = Σ_out U ⊙ P``, so G_s is never rounded to a half dtype for them: rounded,
    a half G_s lost the cancellation in dmask's sum over N·out terms (1.4e-3 relative for
    r = 1 in fp16, where dy itself is exact in fp16). dV runs the blend's dy kernel on G_s
    with s = 1 (``h = (G_s U) ⊙ mask``, then ``dV = hᵀ x``)."""
    need_U, need_mask, need_V, need_bias = needs
    out_f, r = U.shape
    x2 = x.reshape(-1, x.shape[-1])
    dy = grad_y.reshape(-1, out_f)
    g_s = dy.to(D.dtype) * student_scale.to(D.dtype) + D * feature_coefficient(
        D, sums, feature_weight)
    grads = [grad_y.new_empty((0,)) for _ in range(4)]
    if need_U or need_mask:
        p = tb._gemm(g_s.t(), t, x2, out_f, r, at.n_bucket(x2.shape[0]))
        if need_U:
            grads[0] = (p * mask.to(p.dtype)).to(U.dtype)
        if need_mask:
            grads[1] = (p * U.to(p.dtype)).sum(0).to(mask.dtype)
    if need_V:
        one = torch.ones((), dtype=student_scale.dtype, device=student_scale.device)
        grads[2] = tb.backward(g_s, x, U, mask, V, t, None, teacher_scale, one,
                               [False, False, False, True, False])[3]
    if need_bias:
        grads[3] = g_s.sum(0).to(grad_y.dtype)
    return grads


# As for the blend op: triton_op on a GPU (torch.compile traces into the kernels), an
# opaque custom_op under TRITON_INTERPRET=1.
OPS: BackendOps = register_distill_ops(
    "triton", forward, backward,
    make_op=torch.library.custom_op if at.interpreting() else triton_op)
