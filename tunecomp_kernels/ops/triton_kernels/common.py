"""Small ``@triton.jit`` helpers shared by the kernel families.

The kernels call only Triton *builtins* (``tl.load``, ``tl.dot``, ``tl.full``,
``tl.reduce``...), never functions that ``triton.language`` itself defines with
``@triton.jit`` (``tl.zeros``, ``tl.sum``, ``tl.cdiv`` in Triton 3.9): those are compiled
for the GPU when ``triton.language`` is imported before ``TRITON_INTERPRET=1`` is set
(torch.compile's machinery imports it early), and the interpreter then refuses to call
them. The kernels use ``tl.full(shape, 0.0, tl.float32)`` for zeros, and :func:`col_sum`
and :func:`cdiv` below.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot_operand(a, ref_ptr, UPCAST: tl.constexpr):
    """Cast a tile to the dtype fed to ``tl.dot``: ``ref_ptr``'s element type (the input
    dtype, so fp16/bf16 run on tensor cores with fp32 accumulation), or fp32 when
    ``UPCAST`` is set. UPCAST is used only under ``TRITON_INTERPRET=1`` for bf16, whose
    ``tl.dot`` the interpreter computes on raw bit patterns; bf16 -> fp32 is exact, so
    the upcast dot equals a correct bf16 dot with fp32 accumulation."""
    if UPCAST:  # noqa: SIM108  (a constexpr if, not a runtime select)
        out = a.to(tl.float32)
    else:
        out = a.to(ref_ptr.dtype.element_ty)
    return out


@triton.jit
def load_tile(ptr, offs_a, offs_b, stride_a, stride_b, ok_a, ok_b):
    """Load the ``[len(offs_a), len(offs_b)]`` tile ``ptr[a, b]`` with zero padding."""
    return tl.load(ptr + offs_a[:, None] * stride_a + offs_b[None, :] * stride_b,
                   mask=ok_a[:, None] & ok_b[None, :], other=0.0)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def col_sum(a):
    """Sum over axis 0 of a 2-D tile: ``[M, N] -> [N]``."""
    return tl.reduce(a, 0, _add)


@triton.jit
def cdiv(a, b):
    """Ceiling division of non-negative integers."""
    return (a + b - 1) // b
