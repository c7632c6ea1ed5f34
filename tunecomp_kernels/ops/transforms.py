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


def _select(arg: object, dim: int | None, index: int) -> object:
    return arg if dim is None else arg.select(dim, index)


def _per_sample(op, batch_size: int, in_dims: Sequence[int | None], args: tuple) -> list:
    return [op(*[_select(a, d, i) for a, d in zip(args, in_dims)]) for i in range(batch_size)]


def _register_vmap(fwd_name: str, bwd_name: str) -> None:
    fwd = getattr(torch.ops.tunecomp, fwd_name.split("::")[1]).default
    bwd = getattr(torch.ops.tunecomp, bwd_name.split("::")[1]).default

    def forward_rule(info, in_dims, *args):
        if in_dims[0] is not None and all(d is None for d in in_dims[1:]):
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


def register_transforms(fwd_name: str, bwd_name: str) -> None:
    """Register the autocast rule (forward op) and the vmap rules (both ops)."""
    _register_autocast(fwd_name)
    _register_vmap(fwd_name, bwd_name)
