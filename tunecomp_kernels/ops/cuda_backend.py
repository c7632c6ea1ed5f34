"""CUDA backend ``"cuda"``: hand-written kernels in ``csrc/cuda`` behind ``torch.library``.

The kernels (``csrc/cuda/mlr_kernels.cuh``) are compiled into ``tunecomp_kernels._C``
without libtorch; :mod:`.cuda_marshal` turns tensors into their arguments, allocates
outputs and a workspace with torch's allocator and launches on the current stream. This module
registers them as ``tunecomp::masked_lowrank_cuda`` (+ ``_backward``) with
``torch.library.custom_op``, so an eager call crosses one op boundary and
``torch.compile`` sees one opaque node.

Kernels, per dtype (float32 on CUDA cores with FMA; float16 / bfloat16 on tensor cores
through WMMA with fp32 accumulation):

* ``forward_fused`` (``1 <= r <= 128`` and enough rows to fill the GPU): ``t = x·Vᵀ`` is
  computed per 128-row tile and kept in shared memory; the same block then produces its
  output tiles with the teacher ``a·x·W0ᵀ`` and the student ``(t ⊙ s·mask)·Uᵀ`` in one
  accumulator, plus ``s·b + a·b0``.
* ``forward_split`` (otherwise): split-K GEMM for ``t``, then one expand GEMM with the
  same single-accumulator epilogue.
* ``forward_decode`` (``N <= CUDA_DECODE_MAX_N`` = 16): GEMV kernels, split-K over ``in``
  for ``t``.
* ``backward``: ``g = dy·U`` with ``h`` and the ``dmask`` reduction in its epilogue,
  ``dU`` and ``dV`` as split-K GEMMs over N, ``dx = h·V + a·dy·W0`` in one accumulator,
  ``dbias`` as a column sum. No atomics: results are reproducible bit for bit.

float64 (gradcheck) is served by the reference implementation inside the same op.
Every CUDA kernel that has not passed the GPU checks on the current GPU (see
:mod:`.cuda_tables`) warns once when it runs; ``backend="auto"`` never picks it.
"""

from __future__ import annotations

import torch

from . import cuda_marshal, reference
from .contract import register_backend_ops
from .cuda_tables import dtype_name, warn_if_unverified


def run_forward(x, U, mask, V, bias, teacher_weight, teacher_bias, teacher_scale,
                student_scale, *, path: str = "auto"):
    """The backend's forward on any inputs: ``(y [..., out], t [N, r], kernel name)``.

    ``path`` forces one forward kernel (``"fused"``, ``"split"``, ``"decode"``), for the
    GPU tests and the verification script. float64 runs the reference (kernel ``"reference"``).
    """
    if x.dtype not in cuda_marshal.CUDA_KERNEL_DTYPES:
        y, t = reference.forward(x, U, mask, V, bias, teacher_weight, teacher_bias,
                                 teacher_scale, student_scale)
        return y, t, "reference"
    x2 = x.reshape(-1, x.shape[-1])
    y2, t, path_name = cuda_marshal.masked_lowrank_forward_cuda(
        x2, U, mask, V, bias, teacher_weight, teacher_bias, teacher_scale, student_scale,
        path=path)
    return y2.reshape(*x.shape[:-1], U.shape[0]), t, f"forward_{path_name}"


def forward(
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_scale: torch.Tensor,
    student_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, t, kernel = run_forward(x, U, mask, V, bias, teacher_weight, teacher_bias,
                               teacher_scale, student_scale)
    if kernel != "reference":
        warn_if_unverified(kernel, dtype_name(x.dtype))
    return y, t


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    mask: torch.Tensor,
    V: torch.Tensor,
    t: torch.Tensor,
    teacher_weight: torch.Tensor | None,
    teacher_scale: torch.Tensor,
    student_scale: torch.Tensor,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.dtype not in cuda_marshal.CUDA_KERNEL_DTYPES:
        return reference.backward(grad_y, x, U, mask, V, t, teacher_weight, teacher_scale,
                                  student_scale, needs_grad)
    warn_if_unverified("backward", dtype_name(x.dtype))
    x2 = x.reshape(-1, x.shape[-1])
    dx, dU, dmask, dV, dbias = cuda_marshal.masked_lowrank_backward_cuda(
        grad_y.reshape(-1, U.shape[0]), x2, U, mask, V, t, teacher_weight, teacher_scale,
        student_scale, needs_grad)
    if needs_grad[0]:
        dx = dx.reshape(x.shape)
    return dx, dU, dmask, dV, dbias


OPS = register_backend_ops("cuda", forward, backward)
