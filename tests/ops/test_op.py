"""The op against the float64 reference: forward and every gradient, every runnable backend."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, TOLERANCE, assert_close, backend_params, make_inputs

from tunecomp_kernels import available_backends, masked_lowrank_linear
from tunecomp_kernels.ops.reference import reference_float64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_NAMES = ("x", "U", "mask", "V", "bias")

# (leading dims, in, out, rank)
SHAPES = [
    pytest.param((3, 5), 37, 29, 11, id="odd-lead3x5"),
    pytest.param((1,), 37, 29, 11, id="N1"),
    pytest.param((8,), 16, 24, 1, id="r1"),
    pytest.param((6,), 13, 21, 13, id="r_full"),
    pytest.param((2, 3, 4), 20, 9, 9, id="lead3d_r_full_out"),
]


def run_and_compare(backend, inputs, dtype, teacher_scale, student_scale, seed=1):
    leaves = {}
    for name in GRAD_NAMES:
        if inputs[name] is not None:
            leaves[name] = inputs[name].detach().clone().requires_grad_()
    refs = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    frozen = {k: inputs[k] for k in ("teacher_weight", "teacher_bias")}

    y = masked_lowrank_linear(
        leaves["x"], leaves["U"], leaves["mask"], leaves["V"], leaves.get("bias"),
        **frozen, teacher_scale=teacher_scale, student_scale=student_scale, backend=backend,
    )
    y_ref = reference_float64(
        refs["x"], refs["U"], refs["mask"], refs["V"], refs.get("bias"),
        **frozen, teacher_scale=teacher_scale, student_scale=student_scale,
    )
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "forward")

    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype).to(y.device)
    y.backward(dy)
    y_ref.backward(dy.to(torch.float64))
    for name in leaves:
        assert leaves[name].grad is not None, f"no gradient for {name}"
        assert leaves[name].grad.dtype == dtype
        assert_close(leaves[name].grad, refs[name].grad, dtype, f"d{name}")
    for name, t in frozen.items():
        assert t is None or t.grad is None, f"frozen {name} received a gradient"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,in_f,out_f,rank", SHAPES)
@pytest.mark.parametrize("teacher", [False, True], ids=["student", "teacher"])
def test_forward_and_gradients(device, backend, dtype, lead, in_f, out_f, rank, teacher):
    inputs = make_inputs(lead, in_f, out_f, rank, dtype, device, teacher=teacher)
    run_and_compare(backend, inputs, dtype, teacher_scale=0.6 if teacher else 0.0,
                    student_scale=0.8)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_no_bias_teacher_without_bias_and_zero_mask(backend, dtype):
    inputs = make_inputs((4, 3), 19, 23, 7, dtype, bias=False, teacher=True, teacher_bias=False,
                         zero_mask_frac=0.4)
    run_and_compare(backend, inputs, dtype, teacher_scale=-1.3, student_scale=2.5)


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_x(backend):
    base = torch.randn(11, 2 * 17, dtype=torch.float32)
    inputs = make_inputs((11,), 17, 10, 5, torch.float32, teacher=True)
    inputs["x"] = base[:, ::2]  # stride 2 in the feature dim
    assert not inputs["x"].is_contiguous()
    run_and_compare(backend, inputs, torch.float32, teacher_scale=0.4, student_scale=0.9)
    inputs["x"] = torch.randn(17, 11).t()  # transposed
    run_and_compare(backend, inputs, torch.float32, teacher_scale=0.4, student_scale=0.9)


@pytest.mark.parametrize("backend", backend_params())
def test_empty_batch(backend):
    inputs = make_inputs((0,), 8, 6, 3, torch.float32)
    y = masked_lowrank_linear(inputs["x"], inputs["U"], inputs["mask"], inputs["V"],
                              inputs["bias"], backend=backend)
    assert y.shape == (0, 6)


# rows against in/out: the torch backend folds the student into the teacher's weight in
# the forward when rows > in and for dx when rows > out (ops/reference.py, _folds)
FOLD_SHAPES = [
    pytest.param(40, 12, 30, id="fold-forward-and-dx"),
    pytest.param(20, 12, 30, id="fold-forward-only"),
    pytest.param(20, 30, 12, id="fold-dx-only"),
    pytest.param(8, 12, 30, id="no-fold"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rows,in_f,out_f", FOLD_SHAPES)
def test_teacher_folded_into_one_weight_matches_float64(dtype, rows, in_f, out_f):
    inputs = make_inputs((rows,), in_f, out_f, 5, dtype, teacher=True, zero_mask_frac=0.3)
    run_and_compare("torch", inputs, dtype, teacher_scale=0.6, student_scale=0.8)


@pytest.mark.parametrize("rows,in_f,out_f", FOLD_SHAPES)
def test_teacher_fold_gives_dx_alone(rows, in_f, out_f):
    # only x needs a gradient: the folded dx skips the student's [N, r] product
    inputs = make_inputs((rows,), in_f, out_f, 5, torch.float64, teacher=True)
    x = inputs["x"].clone().requires_grad_()
    x_ref = inputs["x"].clone().requires_grad_()
    frozen = {k: inputs[k] for k in ("mask", "V", "bias", "teacher_weight", "teacher_bias")}
    y = masked_lowrank_linear(x, inputs["U"], **frozen, teacher_scale=0.3, student_scale=0.7,
                              backend="torch")
    y_ref = reference_float64(x_ref, inputs["U"], **frozen, teacher_scale=0.3,
                              student_scale=0.7)
    y.sum().backward()
    y_ref.sum().backward()
    assert_close(x.grad, x_ref.grad, torch.float64, "dx")


def test_only_needed_gradients_are_computed():
    inputs = make_inputs((5,), 8, 6, 3, torch.float64)
    U = inputs["U"].requires_grad_()
    y = masked_lowrank_linear(inputs["x"], U, inputs["mask"], inputs["V"], inputs["bias"])
    y.sum().backward()
    assert U.grad is not None
    assert inputs["x"].grad is None and inputs["V"].grad is None


def test_teacher_scale_zero_ignores_teacher():
    inputs = make_inputs((5,), 8, 6, 3, torch.float64, teacher=True)
    nan_teacher = torch.full_like(inputs["teacher_weight"], float("nan"))
    y = masked_lowrank_linear(inputs["x"], inputs["U"], inputs["mask"], inputs["V"],
                              inputs["bias"], teacher_weight=nan_teacher, teacher_scale=0.0)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("lead,in_f,out_f,rank", [((2, 3), 7, 5, 4),
                                                   pytest.param((16,), 5, 7, 3, id="folded")])
def test_gradcheck_float64(lead, in_f, out_f, rank):
    inputs = make_inputs(lead, in_f, out_f, rank, torch.float64, teacher=True)
    args = [inputs[n].detach().clone().requires_grad_() for n in GRAD_NAMES]

    def f(*a):
        return masked_lowrank_linear(*a, teacher_weight=inputs["teacher_weight"],
                                     teacher_bias=inputs["teacher_bias"], teacher_scale=0.7,
                                     student_scale=1.3, backend="torch")

    assert torch.autograd.gradcheck(f, args)


def test_available_backends_contains_torch_first_class():
    names = available_backends()
    assert "torch" in names
    assert len(names) == len(set(names))


def test_tolerance_table_covers_every_dtype():
    assert set(DTYPES) <= set(TOLERANCE)
