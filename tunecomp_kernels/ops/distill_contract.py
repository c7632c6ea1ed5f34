"""The contract of the distill op: the blend of :mod:`.contract` plus a per-layer feature loss.

Every backend that serves it registers ``tunecomp::masked_lowrank_distill_<backend>`` and
``..._distill_<backend>_backward`` (docs/design.md#the-method):

    forward(x[..., in], U[out, r], mask[r], V[r, in], bias[out]?, teacher_weight[out, in],
            teacher_bias[out]?, teacher_scale[], student_scale[], feature_weight[])
        -> (y[..., out], t[N, r], D[N, out], sums[2])
    backward(grad_y[..., out], x, U, mask, V, t, D, sums, teacher_weight, teacher_scale[],
             student_scale[], feature_weight[], needs_grad[5])
        -> (dx, dU, dmask, dV, dbias)   # a 0-element tensor where not needed

with ``y_t = x W0ᵀ + b0`` (teacher branch), ``y_s = (x Vᵀ ⊙ mask) Uᵀ + bias`` (student
branch, unscaled), ``y = a·y_t + s·y_s`` in x's dtype, ``D = y_s − y_t`` and
``sums = [Σ D², Σ y_t²]``; t, D and sums are in :func:`.contract.intermediate_dtype` of x
(fp32 for half inputs). The teacher is required: without one there is no feature loss.

The feature loss of one call is ``ℓ = Σ D² / (Σ y_t² + eps)`` with ``eps`` from
:func:`feature_eps`. The backward injects ``feature_weight·∂ℓ/∂(U, mask, V, bias)`` into
the student's gradients, treating x and the denominator as constants (ℓ is a local target
for this layer's student on the input it sees; it reaches neither earlier layers nor the
frozen teacher): with ``G_s = s·dy + c·D`` and ``c = 2·feature_weight / (Σ y_t² + eps)``,
``dU = (G_sᵀ t)·diag(mask)``, ``dmask = Σ_out U ⊙ (G_sᵀ t)``, ``dV = diag(mask)·(G_s U)ᵀ x``,
``dbias = Σ_N G_s``, while ``dx = s·(dy U)·diag(mask)·V + a·dy W0`` has no feature term.
So the user's loss needs no change (HF Trainer, Lightning and plain loops work as they are).

t, D and sums are non-differentiable outputs, saved for the backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .contract import NAMESPACE, BackendOps, intermediate_dtype
from .transforms import register_distill_transforms

DISTILL_FORWARD_SCHEMA = (
    "(Tensor x, Tensor U, Tensor mask, Tensor V, Tensor? bias, Tensor teacher_weight, "
    "Tensor? teacher_bias, Tensor teacher_scale, Tensor student_scale, "
    "Tensor feature_weight) -> (Tensor, Tensor, Tensor, Tensor)"
)
DISTILL_BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor U, Tensor mask, Tensor V, Tensor t, Tensor D, "
    "Tensor sums, Tensor teacher_weight, Tensor teacher_scale, Tensor student_scale, "
    "Tensor feature_weight, bool[] needs_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

#: Relative size of the denominator's guard: ``eps = FEATURE_EPS · max(1, N·out)``, i.e. a
#: teacher output of mean square 1e-12 (root mean square 1e-6). It keeps ℓ finite when the
#: teacher branch is all zeros (or there are no rows) and is negligible for any trained layer.
FEATURE_EPS = 1e-12


def feature_eps(n: int, out_features: int) -> float:
    """``eps`` of the feature loss ``Σ D² / (Σ y_t² + eps)`` for ``n`` rows of ``out_features``
    outputs: ``FEATURE_EPS · max(1, n·out_features)`` (scales with the sum it guards)."""
    return FEATURE_EPS * max(1, n * out_features)


def feature_loss(D: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """``Σ D² / (Σ y_t² + eps)`` as a 0-d tensor in ``sums``' dtype, from the op's outputs."""
    return sums[0] / (sums[1] + feature_eps(D.shape[0], D.shape[1]))


def feature_coefficient(D: torch.Tensor, sums: torch.Tensor,
                        feature_weight: torch.Tensor) -> torch.Tensor:
    """``c = 2·feature_weight / (Σ y_t² + eps)``, a 0-d tensor on the device (never read on
    the host): the weight of D in ``G_s = s·dy + c·D``."""
    return 2 * feature_weight.to(sums.dtype) / (sums[1] + feature_eps(D.shape[0], D.shape[1]))


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] != 0 else 0


def _fake_forward(x, U, mask, V, bias, teacher_weight, teacher_bias, teacher_scale,
                  student_scale, feature_weight):
    n, wide = _rows(x), intermediate_dtype(x.dtype)
    y = x.new_empty((*x.shape[:-1], U.shape[0]))
    t = x.new_empty((n, V.shape[0]), dtype=wide)
    D = x.new_empty((n, U.shape[0]), dtype=wide)
    return y, t, D, x.new_empty((2,), dtype=wide)


def _fake_backward(grad_y, x, U, mask, V, t, D, sums, teacher_weight, teacher_scale,
                   student_scale, feature_weight, needs_grad):
    # Fresh contiguous gradients whatever the inputs' strides, as in the blend op.
    def like(ref: torch.Tensor, needed: bool) -> torch.Tensor:
        return ref.new_empty(ref.shape) if needed else ref.new_empty((0,))

    dbias = grad_y.new_empty((U.shape[0],)) if needs_grad[4] else grad_y.new_empty((0,))
    return (like(x, needs_grad[0]), like(U, needs_grad[1]), like(mask, needs_grad[2]),
            like(V, needs_grad[3]), dbias)


def _check_hints(impls: tuple[Callable, Callable]) -> None:
    """triton_op infers its schema from the type hints: they must spell the contract."""
    from torch._library.infer_schema import infer_schema

    for impl, schema in zip(impls, (DISTILL_FORWARD_SCHEMA, DISTILL_BACKWARD_SCHEMA)):
        inferred = infer_schema(impl, mutates_args=())
        if inferred != schema:
            raise TypeError(f"{impl.__qualname__}'s type hints give schema {inferred}, "
                            f"the contract is {schema}")


def register_distill_ops(
    name: str,
    forward_impl: Callable[..., tuple[torch.Tensor, ...]],
    backward_impl: Callable[..., tuple[torch.Tensor, ...]],
    *,
    make_op: Callable[..., object] = torch.library.custom_op,
) -> BackendOps:
    """Register a backend's distill forward/backward as ``torch.library`` ops, with their
    fake implementations (``custom_op``), autograd, autocast and vmap rules.

    ``make_op`` is ``torch.library.custom_op`` (opaque) or ``torch.library.triton_op``.
    Raises TypeError when a triton_op implementation's type hints miss the contract."""
    fwd_name = f"{NAMESPACE}::masked_lowrank_distill_{name}"
    bwd_name = f"{fwd_name}_backward"
    if make_op is torch.library.triton_op:
        _check_hints((forward_impl, backward_impl))
        fwd = make_op(fwd_name, forward_impl, mutates_args=())
        bwd = make_op(bwd_name, backward_impl, mutates_args=())
    else:
        fwd = make_op(fwd_name, forward_impl, mutates_args=(), schema=DISTILL_FORWARD_SCHEMA)
        bwd = make_op(bwd_name, backward_impl, mutates_args=(), schema=DISTILL_BACKWARD_SCHEMA)
    if make_op is torch.library.custom_op:
        fwd.register_fake(_fake_forward)
        bwd.register_fake(_fake_backward)
    bwd_packet = getattr(torch.ops.tunecomp, bwd_name.split("::")[1])
    torch.library.register_autograd(fwd_name, _make_backward(bwd_packet),
                                    setup_context=_setup_context)
    register_distill_transforms(fwd_name, bwd_name)
    return BackendOps(name, getattr(torch.ops.tunecomp, fwd_name.split("::")[1]), bwd_packet)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, U, mask, V, bias, teacher_weight, _tb, a, s, fw = inputs
    _, t, D, sums = output
    ctx.mark_non_differentiable(t, D, sums)
    # The scales are copied: a layer's scale buffers change in place (a new α or feature
    # weight), and the backward must use the forward's values. W0 is a reference, no copy.
    ctx.save_for_backward(x, U, mask, V, t, D, sums, teacher_weight, a.detach().clone(),
                          s.detach().clone(), fw.detach().clone())
    ctx.has_bias = bias is not None


def _make_backward(bwd_packet: torch._ops.OpOverloadPacket) -> Callable:
    def backward(ctx, grad_y, _grad_t, _grad_D, _grad_sums):  # noqa: ANN001, ANN202
        x, U, mask, V, t, D, sums, teacher_weight, a, s, fw = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:5]]
        needs[4] = needs[4] and ctx.has_bias
        if not any(needs):
            return (None,) * 10
        grads = bwd_packet(grad_y.contiguous(), x, U, mask, V, t, D, sums, teacher_weight,
                           a, s, fw, needs)
        out = tuple(g if need else None for g, need in zip(grads, needs))
        return (*out, None, None, None, None, None)

    return backward
