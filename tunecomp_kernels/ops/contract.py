"""The op's contract, declared once: schema, fake (meta) implementation, autograd.

Every backend registers the same pair of ``torch.library`` ops under its own
name, ``tunecomp::masked_lowrank_<backend>`` and ``..._<backend>_backward``:

    forward(x[..., in], U[out, r], mask[r], V[r, in], bias[out]?,
            teacher_weight[out, in]?, teacher_bias[out]?, teacher_scale[], student_scale[])
        -> (y[..., out], t[N, r])
    backward(grad_y[..., out], x, U, mask, V, t, teacher_weight?, teacher_scale[],
             student_scale[], needs_grad[5])
        -> (dx, dU, dmask, dV, dbias)   # a 0-element tensor where not needed

Every tensor has x's dtype, except that the frozen teacher (W0, b0) of float32 x may be
bfloat16 or float16 (:data:`.validation.REDUCED_TEACHER_DTYPES`); the fake
implementation needs no change, its outputs follow x. The blend scales are 0-d tensors
(:func:`scale_dtype` of x, on x's device) that the kernels load, never Python floats:
``torch.compile`` then treats a new α as new data instead of a new constant, and a whole
blend runs one graph. Outputs are contiguous whatever the inputs' strides (the fake
implementation says so too).

``t = x·Vᵀ`` is returned so backward does not recompute it; it is marked
non-differentiable and never leaves :func:`tunecomp_kernels.masked_lowrank_linear`. An
op pair whose backward needs none of t returns it with no rows and says so at
registration (``saves_t=False``, for the fake): the torch backend's weight-path pair
(:mod:`tunecomp_kernels.ops.reference`).
The public function calls exactly one of these ops, so an uncompiled call
crosses one op boundary and ``torch.compile`` sees one node per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .transforms import register_transforms

NAMESPACE = "tunecomp"

FORWARD_SCHEMA = (
    "(Tensor x, Tensor U, Tensor mask, Tensor V, Tensor? bias, Tensor? teacher_weight, "
    "Tensor? teacher_bias, Tensor teacher_scale, Tensor student_scale) -> (Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor U, Tensor mask, Tensor V, Tensor t, "
    "Tensor? teacher_weight, Tensor teacher_scale, Tensor student_scale, bool[] needs_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

ForwardImpl = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BackwardImpl = Callable[..., tuple[torch.Tensor, ...]]


def intermediate_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved ``t``: fp32 for half inputs (fp32 accumulation), else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the 0-d scale tensors the ops take for inputs of ``dtype``: float64 for
    float64 inputs, else float32 (a half-precision 0.3 would be off by 1e-3)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make_fake_forward(saves_t: bool):
    def fake_forward(x, U, mask, V, bias, teacher_weight, teacher_bias, teacher_scale,
                     student_scale):
        n = x.numel() // x.shape[-1] if saves_t and x.shape[-1] != 0 else 0
        y = x.new_empty((*x.shape[:-1], U.shape[0]))
        t = x.new_empty((n, V.shape[0]), dtype=intermediate_dtype(x.dtype))
        return y, t

    return fake_forward


def _fake_backward(grad_y, x, U, mask, V, t, teacher_weight, teacher_scale, student_scale,
                   needs_grad):
    # Every backend returns fresh contiguous gradients, whatever the inputs' strides
    # (a transposed or expanded x included): empty_like would copy x's strides.
    def like(ref: torch.Tensor, needed: bool) -> torch.Tensor:
        return ref.new_empty(ref.shape) if needed else ref.new_empty((0,))

    dbias = grad_y.new_empty((U.shape[0],)) if needs_grad[4] else grad_y.new_empty((0,))
    return (like(x, needs_grad[0]), like(U, needs_grad[1]), like(mask, needs_grad[2]),
            like(V, needs_grad[3]), dbias)


@dataclass(frozen=True)
class BackendOps:
    """The registered forward/backward ops of one backend."""

    name: str
    forward: torch._ops.OpOverloadPacket
    backward: torch._ops.OpOverloadPacket


def register_backend_ops(
    name: str,
    forward_impl: ForwardImpl,
    backward_impl: BackwardImpl,
    *,
    make_op: Callable[..., object] = torch.library.custom_op,
    saves_t: bool = True,
) -> BackendOps:
    """Register a backend's forward/backward implementations as ``torch.library`` ops.

    ``make_op`` is ``torch.library.custom_op`` for opaque kernels, or
    ``torch.library.triton_op`` so that ``torch.compile`` can trace into Triton kernels.
    ``saves_t=False``: the forward returns t with no rows (its backward needs none), as
    the fake implementation of a ``custom_op`` then says.
    """
    fwd_name = f"{NAMESPACE}::masked_lowrank_{name}"
    bwd_name = f"{fwd_name}_backward"
    if make_op is torch.library.triton_op:
        # triton_op infers its schema from the type hints (it ignores ``schema=``, and
        # older torch lacks the argument): the hints must spell the contract exactly.
        from torch._library.infer_schema import infer_schema

        for impl, schema in ((forward_impl, FORWARD_SCHEMA), (backward_impl, BACKWARD_SCHEMA)):
            inferred = infer_schema(impl, mutates_args=())
            if inferred != schema:
                raise TypeError(f"{impl.__qualname__}'s type hints give schema {inferred}, "
                                f"the contract is {schema}")
        fwd = make_op(fwd_name, forward_impl, mutates_args=())
        bwd = make_op(bwd_name, backward_impl, mutates_args=())
    else:
        fwd = make_op(fwd_name, forward_impl, mutates_args=(), schema=FORWARD_SCHEMA)
        bwd = make_op(bwd_name, backward_impl, mutates_args=(), schema=BACKWARD_SCHEMA)
    # triton_op derives its own fake implementation by tracing; custom_op needs one.
    if make_op is torch.library.custom_op:
        fwd.register_fake(_make_fake_forward(saves_t))
        bwd.register_fake(_fake_backward)
    bwd_packet = getattr(torch.ops.tunecomp, bwd_name.split("::")[1])

    def setup_context(ctx, inputs, output):
        x, U, mask, V, bias, teacher_weight, _tb, teacher_scale, student_scale = inputs
        _, t = output
        ctx.mark_non_differentiable(t)
        # The frozen teacher is only needed for dx. Its scale is a tensor: whether it is 0
        # is not known here without a device sync, so a present teacher is always kept
        # (a reference to a buffer, no copy). The scales are copied: a layer's scale
        # buffers are updated in place (a new α), and the backward must use the forward's.
        ctx.save_for_backward(x, U, mask, V, t, teacher_weight, teacher_scale.detach().clone(),
                              student_scale.detach().clone())
        ctx.has_bias = bias is not None

    def backward(ctx, grad_y, _grad_t):
        x, U, mask, V, t, teacher_weight, teacher_scale, student_scale = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:5]]
        needs[4] = needs[4] and ctx.has_bias
        if not any(needs):
            return (None,) * 9
        grads = bwd_packet(grad_y.contiguous(), x, U, mask, V, t, teacher_weight,
                           teacher_scale, student_scale, needs)
        out = tuple(g if need else None for g, need in zip(grads, needs))
        return (*out, None, None, None, None)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
    register_transforms(fwd_name, bwd_name)
    return BackendOps(name, getattr(torch.ops.tunecomp, fwd_name.split("::")[1]), bwd_packet)
