"""torch.library registration: opcheck, torch.compile without graph breaks, one op per call."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_params, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from tunecomp_kernels import MaskedLowRankLinear, masked_lowrank_linear
from tunecomp_kernels.ops.backends import load_backend


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("teacher", [False, True])
def test_opcheck(backend, teacher):
    ops = load_backend(backend)
    inputs = make_inputs((2, 3), 9, 7, 4, torch.float32, teacher=teacher)
    for name in ("x", "U", "mask", "V", "bias"):
        inputs[name].requires_grad_()
    args = (inputs["x"], inputs["U"], inputs["mask"], inputs["V"], inputs["bias"],
            inputs["teacher_weight"], inputs["teacher_bias"], 0.5 if teacher else 0.0, 1.5)
    torch.library.opcheck(ops.forward.default, args)


@pytest.mark.parametrize("backend", backend_params())
def test_one_op_boundary_per_call(backend):
    layer = MaskedLowRankLinear(9, 7, 4, backend=backend)
    layer.set_teacher(torch.randn(7, 9), torch.randn(7))
    layer.teacher_scale = 0.5
    x = torch.randn(3, 9)
    with torch.no_grad(), RecordOps() as rec:
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
