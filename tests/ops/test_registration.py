"""torch.library registration: opcheck, torch.compile without graph breaks, one op per call."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, backend_params, make_inputs, op_recorder

from tunecomp_kernels import MaskedLowRankLinear, masked_lowrank_linear
from tunecomp_kernels.ops.backends import backend_serves, load_backend

LAYOUTS = ["contiguous", "strided", "transposed", "expanded", "params-transposed",
           "empty-params-transposed"]


def _laid_out(inputs: dict, layout: str) -> dict:
    """The same values in another memory layout (x [2, 3, in]; params [out, r], [r, in])."""
    out = dict(inputs)
    x = inputs["x"]
    if layout == "strided":  # last dim with stride 2
        out["x"] = torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]
    elif layout == "transposed":  # x.transpose(0, 1) of a [3, 2, in] tensor
        out["x"] = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "expanded":  # a stride-0 leading dim
        out["x"] = x[:1].expand(x.shape)
    elif layout.endswith("params-transposed"):  # (N = 0 has its own zero-gradient path)
        if layout.startswith("empty"):
            out["x"] = x[:0]
        for name in ("U", "V", "teacher_weight"):
            if out[name] is not None:
                out[name] = out[name].t().contiguous().t()
    return out


def _scales(teacher: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(0.5 if teacher else 0.0, device=device),
            torch.tensor(1.5, device=device))


@pytest.mark.filterwarnings("ignore::UserWarning")  # the CUDA backend's unverified-kernel note
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("backend", backend_params())
def test_opcheck_every_op(backend, teacher, layout, device):
    """Schema, fake implementation (shapes *and strides*), autograd registration and AOT
    dispatch of each backend's forward and backward op, on contiguous, strided,
    transposed and expanded inputs. The fake dx used to copy x's strides while every
    backend returns a contiguous dx (Inductor: "expected ... stride 48==8")."""
    if not backend_serves(backend, device):
        pytest.skip(f"backend {backend} does not serve {device}")
    ops = load_backend(backend)
    inputs = _laid_out(make_inputs((2, 3), 9, 7, 4, torch.float32, device, teacher=teacher),
                       layout)
    a, s = _scales(teacher, device)
    leaves = {n: inputs[n].detach().requires_grad_() for n in ("x", "U", "mask", "V", "bias")}
    args = (leaves["x"], leaves["U"], leaves["mask"], leaves["V"], leaves["bias"],
            inputs["teacher_weight"], inputs["teacher_bias"], a, s)
    torch.library.opcheck(ops.forward.default, args)
    with torch.no_grad():
        y, t = ops.forward(*args)
    dy = torch.randn_like(y)
    plain = [v.detach() for v in (leaves["x"], leaves["U"], leaves["mask"], leaves["V"])]
    torch.library.opcheck(ops.backward.default,
                          (dy, *plain, t, inputs["teacher_weight"], a, s, [True] * 5))
    torch.library.opcheck(ops.backward.default,
                          (dy, *plain, t, None, a, s, [True, False, True, False, False]))


@pytest.mark.parametrize("backend", backend_params())
def test_compiled_gradient_of_transposed_input_matches_eager(backend):
    """torch.compile (Inductor) of ``layer(xb.transpose(0, 1)).sum()`` with backward: the
    fake dx must have the real (contiguous) strides."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MaskedLowRankLinear(8, 5, 4, backend=backend)
    layer.set_teacher(torch.randn(5, 8), torch.randn(5))
    layer.teacher_scale, layer.student_scale = 0.3, 0.8
    xb = torch.randn(6, 3, 8, requires_grad=True)
    params = [xb, *layer.parameters()]

    def f(xb):
        return layer(xb.transpose(0, 1)).sum()

    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(xb), params)
    ref = torch.autograd.grad(f(xb), params)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend", backend_params())
def test_one_op_boundary_per_call(backend):
    layer = MaskedLowRankLinear(9, 7, 4, backend=backend)
    layer.set_teacher(torch.randn(7, 9), torch.randn(7))
    layer.teacher_scale = 0.5
    x = torch.randn(3, 9)
    with torch.no_grad(), op_recorder() as rec:
        layer(x)
    assert rec.ops == [f"tunecomp.masked_lowrank_{backend}.default"], rec.ops


@pytest.mark.parametrize("backend", backend_params())
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        MaskedLowRankLinear(12, 10, 5, backend=backend), torch.nn.GELU(),
        MaskedLowRankLinear(10, 6, 3, backend=backend),
    )
    model[0].set_teacher(torch.randn(10, 12))
    model[0].teacher_scale, model[0].student_scale = 0.3, 0.9
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 4, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = compiled(x)
    y_ref = model(x_ref)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_ref.square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_compile_has_no_graph_break():
    torch._dynamo.reset()
    layer = MaskedLowRankLinear(8, 8, 4)
    explanation = torch._dynamo.explain(layer)(torch.randn(3, 8))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_functional_call_compiles():
    torch._dynamo.reset()
    inputs = make_inputs((5,), 8, 6, 3, torch.float32, teacher=True)

    def f(x, U, mask, V, b, w0, b0):
        return masked_lowrank_linear(x, U, mask, V, b, teacher_weight=w0, teacher_bias=b0,
                                     teacher_scale=0.25, student_scale=0.75)

    args = [inputs[k] for k in ("x", "U", "mask", "V", "bias", "teacher_weight", "teacher_bias")]
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*args), f(*args))
