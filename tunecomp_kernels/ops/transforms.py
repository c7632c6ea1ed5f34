"""Autocast and vmap rules, registered for every backend's op pair by the contract.

Autocast: under ``torch.autocast(device, dtype)`` the forward op behaves like
``nn.Linear``: its floating tensors (float64 excepted, as autocast does) are cast to the
autocast dtype, the kernels accumulate in fp32 and the output has the autocast dtype.
The casts happen above autograd, so gradients flow back through them and reach fp32
parameters in fp32. The blend scales stay as they are (fp32): cast to bf16, 0.3 would
become 0.30078. Unlike ``torch.library.register_autocast`` (one fixed dtype per device),
the rule reads the autocast dtype of the current context, so fp16 and bf16 both work.

vmap (``torch.vmap``, per-sample gradients with ``torch.func``): when only x is batched
the forward folds the batch into x's leading dims (one op call). Any other batching,
and the backward op (whose weight gradients must stay per sample, not summed over the
batch), runs the op once per batch element and stacks the results.

torch.func (grad, vjp, jacrev, vmap of those): the autograd that ``register_autograd``
generates for a custom op cannot run under functorch transforms, so while one is active
the public function calls the op pair through :func:`functorch_function`, an
``autograd.Function`` with ``setup_context`` whose vmap rule PyTorch generates from the
ops' own vmap rules, with a forward-mode rule (jvp, jacfwd) built from op calls. Second
derivatives (grad of grad, hessian) are not supported and raise NotImplementedError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NAMESPACE = "tunecomp"
#: The seven tensor arguments of the forward op that autocast casts (not the scales).
_CAST_ARGS = 7

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # kept alive for the registrations


def _autocast_device_types() -> list[str]:
    return [d for d in ("cpu", "cuda") if torch._C._is_autocast_available(d)]


def _cast(arg: object, dtype: torch.dtype) -> object:
    if (isinstance(arg, torch.Tensor) and arg.is_floating_point()
            and arg.dtype != torch.float64 and arg.dtype != dtype):
        return arg.to(dtype)
    return arg


def _register_autocast(fwd_name: str) -> None:
    op = getattr(torch.ops.tunecomp, fwd_name.split("::")[1]).default
    short = fwd_name.split("::")[1]
    for device_type in _autocast_device_types():
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _exclude=keyset):
            dtype = torch.get_autocast_dtype(_device_type)
            cast = [_cast(a, dtype) if i < _CAST_ARGS else a for i, a in enumerate(args)]
            with torch._C._ExcludeDispatchKeyGuard(_exclude):
                return op(*cast)

        _LIB.impl(short, kernel, key, with_keyset=True)


def _select(arg: object, dim: object, index: int) -> object:
    # in_dims holds None (or, for a list argument such as needs_grad, a list) where unbatched
    return arg.select(dim, index) if isinstance(dim, int) else arg


def _per_sample(op, batch_size: int, in_dims: Sequence[int | None], args: tuple) -> list:
    return [op(*[_select(a, d, i) for a, d in zip(args, in_dims)]) for i in range(batch_size)]


def _register_vmap(fwd_name: str, bwd_name: str) -> None:
    fwd = getattr(torch.ops.tunecomp, fwd_name.split("::")[1]).default
    bwd = getattr(torch.ops.tunecomp, bwd_name.split("::")[1]).default

    def forward_rule(info, in_dims, *args):
        if isinstance(in_dims[0], int) and not any(isinstance(d, int) for d in in_dims[1:]):
            x = args[0].movedim(in_dims[0], 0)
            y, t = fwd(x, *args[1:])
            return (y, t.reshape(info.batch_size, -1, t.shape[-1])), (0, 0)
        outs = _per_sample(fwd, info.batch_size, in_dims, args)
        return tuple(torch.stack(list(o)) for o in zip(*outs)), (0, 0)

    def backward_rule(info, in_dims, *args):
        outs = _per_sample(bwd, info.batch_size, in_dims, args)
        return tuple(torch.stack(list(o)) for o in zip(*outs)), (0,) * 5

    torch.library.register_vmap(fwd_name, forward_rule)
    torch.library.register_vmap(bwd_name, backward_rule)


def _make_backward_function(bwd) -> type[torch.autograd.Function]:  # noqa: ANN001
    """The backward op as an ``autograd.Function`` (its own generated autograd cannot run
    under torch.func); differentiating it again raises, as it does outside torch.func."""

    class BackwardFunction(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(needs_bits, *args):  # noqa: ANN001, ANN205
            return bwd(*args, [bool(needs_bits >> i & 1) for i in range(5)])

        @staticmethod
        def setup_context(ctx, inputs, output):  # noqa: ANN001, ANN205
            pass

        @staticmethod
        def backward(ctx, *grads):  # noqa: ANN001, ANN205
            raise NotImplementedError(_NO_SECOND_DERIVATIVE)

        @staticmethod
        def jvp(ctx, *tangents):  # noqa: ANN001, ANN205
            raise NotImplementedError(_NO_SECOND_DERIVATIVE)

    return BackwardFunction


def _jvp(fwd, saved, x_t, U_t, mask_t, V_t, bias_t, *_frozen_t):  # noqa: ANN001, ANN202
    """Forward-mode AD: the op is linear in each of x, U, mask, V and bias, so the output
    tangent is a sum of op calls with one tangent each. The teacher and the scales are
    frozen, as in the backward: their tangents are ignored."""
    x, U, mask, V, w0, a, s = saved
    terms = []
    if x_t is not None:  # the teacher term is linear in x too
        terms.append(fwd(x_t, U, mask, V, None, w0, None, a, s)[0])
    no_teacher = torch.zeros_like(a)
    for tangent_args in ((x, U_t, mask, V), (x, U, mask_t, V), (x, U, mask, V_t)):
        if all(t is not None for t in tangent_args):
            terms.append(fwd(*tangent_args, None, None, None, no_teacher, s)[0])
    if bias_t is not None:
        terms.append((bias_t * s).to(x.dtype).expand(*x.shape[:-1], -1))
    return sum(terms) if terms else None


def _make_functions(fwd, bwd) -> type[torch.autograd.Function]:  # noqa: ANN001
    """The op pair as ``autograd.Function``s usable under torch.func transforms. The ops
    are closed over (torch.compile cannot call an op stored on ctx, nor look one up by a
    traced name)."""
    BackwardFunction = _make_backward_function(bwd)  # noqa: N806  (a class)

    class FunctorchFunction(torch.autograd.Function):
        """``apply(x, U, mask, V, bias, teacher_weight, teacher_bias, teacher_scale,
        student_scale) -> (y, t)``, with the ops' own schema and gradients."""

        generate_vmap_rule = True

        @staticmethod
        def forward(*args):  # noqa: ANN002, ANN205
            return fwd(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):  # noqa: ANN001, ANN205
            x, U, mask, V, bias, teacher_weight, _tb, a, s = inputs
            ctx.mark_non_differentiable(output[1])
            ctx.save_for_backward(x, U, mask, V, output[1], teacher_weight,
                                  a.detach().clone(), s.detach().clone())  # buffers change
            ctx.has_bias = bias is not None
            ctx.saved_for_jvp = (x, U, mask, V, teacher_weight, a, s)

        @staticmethod
        def backward(ctx, grad_y, _grad_t):  # noqa: ANN001, ANN205
            x, U, mask, V, t, teacher_weight, a, s = ctx.saved_tensors
            needs = [bool(n) for n in ctx.needs_input_grad[:5]]
            needs[4] = needs[4] and ctx.has_bias
            if not any(needs):
                return (None,) * 9
            bits = sum(1 << i for i, n in enumerate(needs) if n)  # an int, not a pytree
            grads = BackwardFunction.apply(bits, grad_y.contiguous(), x, U, mask, V, t,
                                           teacher_weight, a, s)
            return (*(g if n else None for g, n in zip(grads, needs)), None, None, None, None)

        @staticmethod
        def jvp(ctx, *tangents):  # noqa: ANN001, ANN205
            return _jvp(fwd, ctx.saved_for_jvp, *tangents), None

    return FunctorchFunction


_NO_SECOND_DERIVATIVE = (
    "masked_lowrank_linear has no second derivative: gradients of its gradients (double "
    "backward, grad of grad, hessian) are not supported")
_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}


def functorch_function(backend: str) -> type[torch.autograd.Function]:
    """The ``autograd.Function`` form of backend ``backend``'s ops (for torch.func and
    forward-mode AD)."""
    return _FUNCTIONS[backend]


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) or forward-mode AD
    (``torch.autograd.forward_ad``) is active around this call: the custom op's own
    autograd supports neither."""
    if torch.compiler.is_compiling():
        # Dynamo answers peek_interpreter_stack() with a non-None value even outside any
        # transform; torch.func inside torch.compile is not supported (see the README).
        return False
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0)


def register_transforms(fwd_name: str, bwd_name: str) -> None:
    """Register the autocast rule (forward op), the vmap rules (both ops) and the
    ``autograd.Function`` form of the pair (:func:`functorch_function`)."""
    _register_autocast(fwd_name)
    _register_vmap(fwd_name, bwd_name)
    ops = torch.ops.tunecomp
    _FUNCTIONS[fwd_name.split("::")[1].removeprefix("masked_lowrank_")] = _make_functions(
        getattr(ops, fwd_name.split("::")[1]), getattr(ops, bwd_name.split("::")[1]))


def register_distill_transforms(fwd_name: str, bwd_name: str) -> None:
    """Autocast and vmap rules of a distill op pair (:mod:`.distill_contract`). Autocast is
    the blend op's rule (its first seven arguments are the same tensors). vmap runs the op
    once per batch element for every batching, x alone included: the feature loss and its
    sums belong to one call, and folding the batch into x's rows would pool them."""
    _register_autocast(fwd_name)
    fwd = getattr(torch.ops.tunecomp, fwd_name.split("::")[1]).default
    bwd = getattr(torch.ops.tunecomp, bwd_name.split("::")[1]).default

    def rule(op, n_out):  # noqa: ANN001, ANN202
        def per_sample(info, in_dims, *args):  # noqa: ANN001, ANN202
            outs = _per_sample(op, info.batch_size, in_dims, args)
            return tuple(torch.stack(list(o)) for o in zip(*outs)), (0,) * n_out
        return per_sample

    torch.library.register_vmap(fwd_name, rule(fwd, 4))
    torch.library.register_vmap(bwd_name, rule(bwd, 5))
    ops = torch.ops.tunecomp
    _DISTILL_FUNCTIONS[fwd_name.split("::")[1].removeprefix("masked_lowrank_distill_")] = (
        _make_distill_function(getattr(ops, fwd_name.split("::")[1]),
                               getattr(ops, bwd_name.split("::")[1])))


_DISTILL_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}


def distill_functorch_function(backend: str) -> type[torch.autograd.Function]:
    """The ``autograd.Function`` form of backend ``backend``'s distill ops, for torch.func
    transforms (grad, vjp, vmap of those), as :func:`functorch_function` is for the blend."""
    return _DISTILL_FUNCTIONS[backend]


def _make_distill_function(fwd, bwd) -> type[torch.autograd.Function]:  # noqa: ANN001
    """The distill op pair as an ``autograd.Function`` (see :func:`_make_functions`). It has
    no forward-mode rule: the feature term is injected into a backward pass only."""
    BackwardFunction = _make_backward_function(bwd)  # noqa: N806  (a class)

    class DistillFunction(torch.autograd.Function):
        """``apply(x, U, mask, V, bias, W0, b0, a, s, feature_weight) -> (y, t, D, sums)``."""

        generate_vmap_rule = True

        @staticmethod
        def forward(*args):  # noqa: ANN002, ANN205
            return fwd(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):  # noqa: ANN001, ANN205
            x, U, mask, V, bias, teacher_weight, _tb, a, s, fw = inputs
            ctx.mark_non_differentiable(*output[1:])
            ctx.save_for_backward(x, U, mask, V, *output[1:], teacher_weight,
                                  a.detach().clone(), s.detach().clone(), fw.detach().clone())
            ctx.has_bias = bias is not None

        @staticmethod
        def backward(ctx, grad_y, *_grads):  # noqa: ANN001, ANN002, ANN205
            needs = [bool(n) for n in ctx.needs_input_grad[:5]]
            needs[4] = needs[4] and ctx.has_bias
            if not any(needs):
                return (None,) * 10
            bits = sum(1 << i for i, n in enumerate(needs) if n)
            grads = BackwardFunction.apply(bits, grad_y.contiguous(), *ctx.saved_tensors)
            return (*(g if n else None for g, n in zip(grads, needs)), *(None,) * 5)

        @staticmethod
        def jvp(ctx, *tangents):  # noqa: ANN001, ANN205
            raise NotImplementedError(
                "masked_lowrank_linear_distill has no forward-mode derivative (jvp, jacfwd): "
                "its feature loss acts through the backward pass only")

    return DistillFunction
