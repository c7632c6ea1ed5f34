"""MaskedLowRankLinear under torch.func: grad, vmap, functional_call (per-sample gradients),
jacrev, jvp / jacfwd; second derivatives raise an error that names the cause.

A custom op's generated autograd cannot run under functorch transforms ("must override
the setup_context staticmethod"), so under torch.func the public function goes through an
``autograd.Function`` (tunecomp_kernels.ops.transforms), and the ops have vmap rules.
"""

from __future__ import annotations

import pytest
import torch
from helpers import backend_params
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

from tunecomp_kernels import MaskedLowRankLinear


def make_layer(backend: str, teacher: bool = True) -> MaskedLowRankLinear:
    torch.manual_seed(0)
    layer = MaskedLowRankLinear(8, 6, 3, backend=backend)
    with torch.no_grad():
        layer.mask.uniform_(0.5, 1.5)
    if teacher:
        layer.set_teacher(torch.randn(6, 8) / 3, torch.randn(6))
        layer.teacher_scale, layer.student_scale = 0.3, 0.8
    return layer


@pytest.mark.parametrize("teacher", [False, True], ids=["student", "blend"])
@pytest.mark.parametrize("backend", backend_params())
def test_per_sample_gradients(backend, teacher):
    layer = make_layer(backend, teacher)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    buffers = dict(layer.named_buffers())
    X, Y = torch.randn(5, 2, 8), torch.randn(5, 2, 6)

    def loss(p, x, y):
        return ((functional_call(layer, (p, buffers), (x,)) - y) ** 2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, Y)
    for i in range(5):
        layer.zero_grad()
        loss(dict(layer.named_parameters()), X[i], Y[i]).backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, msg=f"{name}[{i}]")


@pytest.mark.parametrize("backend", backend_params())
def test_vmap_forward_and_batched_parameters(backend):
    layer = make_layer(backend)
    X = torch.randn(4, 3, 8)
    torch.testing.assert_close(vmap(layer)(X), layer(X))  # only x batched: one op call
    buffers = dict(layer.named_buffers())
    stacked = {k: torch.stack([v.detach() * (1 + 0.1 * i) for i in range(4)])
               for k, v in layer.named_parameters()}
    got = vmap(lambda p, x: functional_call(layer, (p, buffers), (x,)))(stacked, X)
    for i in range(4):
        params_i = {k: v[i] for k, v in stacked.items()}
        torch.testing.assert_close(got[i], functional_call(layer, (params_i, buffers), (X[i],)))


@pytest.mark.parametrize("backend", backend_params())
def test_jacobians_forward_and_reverse_agree(backend):
    layer = make_layer(backend)
    x = torch.randn(8)
    jr = jacrev(layer)(x)
    torch.testing.assert_close(jr, layer.weight.detach() * 0.8 + 0.3 * layer.teacher_weight)
    torch.testing.assert_close(jacfwd(layer)(x), jr)
    tangent = torch.randn(8)
    _, out_t = jvp(layer, (x,), (tangent,))
    torch.testing.assert_close(out_t, jr @ tangent)
    buffers = dict(layer.named_buffers())
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def f(p):
        return functional_call(layer, (p, buffers), (x[None],))

    fwd, rev = jacfwd(f)(params), jacrev(f)(params)
    for name in params:
        torch.testing.assert_close(fwd[name], rev[name], msg=name)


def test_second_derivatives_name_the_cause():
    layer = make_layer("torch")
    with pytest.raises(NotImplementedError, match="masked_lowrank_linear has no second"):
        torch.func.hessian(lambda x: layer(x).sum())(torch.randn(8))
    with pytest.raises(NotImplementedError, match="masked_lowrank_linear has no second"):
        grad(lambda x: grad(lambda z: layer(z).square().sum())(x).sum())(torch.randn(8))


def test_forward_mode_ad_outside_torch_func():
    layer = make_layer("torch")
    x, tangent = torch.randn(3, 8), torch.randn(3, 8)
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        out = layer(fwad.make_dual(x, tangent))
        got = fwad.unpack_dual(out).tangent
    torch.testing.assert_close(got, tangent @ jacrev(layer)(x[0]).t())

