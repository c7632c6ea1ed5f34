"""Bad input gets a clear error that names the problem."""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs
from torch import nn

from tunecomp_kernels import MaskedLowRankLinear, masked_lowrank_linear


def call(**overrides):
    inputs = make_inputs((3,), 8, 6, 4, torch.float32, teacher=True)
    inputs.update(overrides)
    kwargs = {k: inputs.pop(k) for k in ("teacher_weight", "teacher_bias")}
    kwargs.update({k: inputs.pop(k) for k in list(inputs)
                   if k in ("teacher_scale", "student_scale", "backend")})
    kwargs.setdefault("teacher_scale", 0.5)
    return masked_lowrank_linear(inputs["x"], inputs["U"], inputs["mask"], inputs["V"],
                                 inputs["bias"], **kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"x": torch.randn(3, 9)}, r"x \[3, 9\] has 9 input features but V \[4, 8\]"),
        ({"x": torch.tensor(1.0)}, r"x must have at least one dimension"),
        ({"U": torch.randn(6, 5)}, r"rank mismatch: U \[6, 5\] has r=5, V \[4, 8\] has r=4"),
        ({"U": torch.randn(6)}, r"U must be 2-D \[out, r\], got shape \[6\]"),
        ({"V": torch.randn(4, 8, 1)}, r"V must be 2-D"),
        ({"mask": torch.ones(5)}, r"rank mismatch: .* mask \[5\] has r=5"),
        ({"mask": torch.ones(4, 1)}, r"mask must be 1-D \[r\]"),
        ({"bias": torch.randn(7)}, r"bias must be \[out\]=\[6\] .* got \[7\]"),
        ({"teacher_weight": torch.randn(8, 6)}, r"teacher_weight must be \[out, in\]=\[6, 8\]"),
        ({"teacher_bias": torch.randn(5)}, r"teacher_bias must be \[out\]=\[6\], got \[5\]"),
        ({"teacher_weight": None}, r"teacher_bias was given without teacher_weight"),
        ({"teacher_weight": None, "teacher_bias": None},
         r"teacher_scale=0.5 but no teacher_weight"),
        ({"U": torch.randn(6, 4, dtype=torch.float64)}, r"dtype mismatch: .*U=float64"),
        ({"x": torch.ones(3, 8, dtype=torch.int64)}, r"x has dtype torch.int64"),
        ({"device_mix": True}, r"device mismatch: .*U=meta"),
        ({"teacher_scale": float("nan")}, r"teacher_scale must be finite, got nan"),
        ({"student_scale": float("inf")}, r"student_scale must be finite"),
        ({"backend": "nope"}, r"unknown backend 'nope'; choose 'auto' or one of \["),
    ],
)
def test_op_errors_name_the_problem(overrides, message):
    if overrides.pop("device_mix", False):
        overrides["U"] = torch.randn(6, 4, device="meta")
    with pytest.raises(ValueError, match=message):
        call(**overrides)


def test_non_tensor_input_is_a_type_error():
    with pytest.raises(TypeError, match="U must be a torch.Tensor, got list"):
        call(U=[[1.0]])


def test_unavailable_backend_is_a_runtime_error():
    from tunecomp_kernels.ops.backends import known_backends, unavailable_reason

    missing = [n for n in known_backends() if unavailable_reason(n) is not None]
    if not missing:
        pytest.skip("every known backend can run on this machine")
    with pytest.raises(RuntimeError, match=f"backend '{missing[0]}' is not available"):
        call(backend=missing[0])


@pytest.mark.parametrize(
    "args, exc, message",
    [
        ((8, 6, 0), ValueError, "rank must be >= 1, got 0"),
        ((8, 6, 7), ValueError, r"rank=7 exceeds min\(in_features, out_features\)=6"),
        ((-8, 6, 2), ValueError, "in_features must be >= 1, got -8"),
        ((8, 0, 2), ValueError, "out_features must be >= 1, got 0"),
        ((8, 6, 2.5), TypeError, "rank must be an int, got float"),
    ],
)
def test_module_argument_errors(args, exc, message):
    with pytest.raises(exc, match=message):
        MaskedLowRankLinear(*args)


def test_from_linear_errors():
    with pytest.raises(TypeError, match="expects an nn.Linear, got Conv2d"):
        MaskedLowRankLinear.from_linear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="unknown init 'pca'"):
        MaskedLowRankLinear.from_linear(nn.Linear(4, 4), init="pca")
    with pytest.raises(ValueError, match="rank=9 exceeds"):
        MaskedLowRankLinear.from_linear(nn.Linear(4, 8), rank=9)
    with pytest.raises(ValueError, match="init='asvd' needs input_abs_mean"):
        MaskedLowRankLinear.from_linear(nn.Linear(4, 4), init="asvd")
    with pytest.raises(ValueError, match="init='svd_llm' needs gram"):
        MaskedLowRankLinear.from_linear(nn.Linear(4, 4), init="svd_llm")


def test_module_input_feature_mismatch():
    with pytest.raises(ValueError, match=r"x \[2, 5\] has 5 input features but V \[3, 6\]"):
        MaskedLowRankLinear(6, 4, 3)(torch.randn(2, 5))


def test_set_teacher_shape_errors():
    layer = MaskedLowRankLinear(6, 4, 3)
    with pytest.raises(ValueError, match=r"teacher weight must be \[4, 6\], got \[6, 4\]"):
        layer.set_teacher(torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"teacher bias must be \[4\], got \[3\]"):
        layer.set_teacher(torch.randn(4, 6), torch.randn(3))


@pytest.mark.parametrize(
    "overrides, exc, message",
    [
        ({"teacher_scale": torch.ones(2)}, ValueError,
         r"teacher_scale must be a float or a 0-d floating tensor, got a torch.float32 tensor "
         r"of shape \[2\]"),
        ({"student_scale": torch.tensor(1)}, ValueError,
         r"student_scale must be a float or a 0-d floating tensor, got a torch.int64"),
        ({"student_scale": float("nan")}, ValueError, "student_scale must be finite, got nan"),
        ({"teacher_scale": "0.5"}, TypeError, "teacher_scale must be a float, got str"),
    ],
)
def test_scale_errors_name_the_scale(overrides, exc, message):
    with pytest.raises(exc, match=message):
        call(**overrides)


def test_tensor_scales_give_the_float_result():
    # a 0-d tensor (any float dtype, here float64) is the same blend as the float
    torch.testing.assert_close(call(teacher_scale=torch.tensor(0.25, dtype=torch.float64),
                                    student_scale=torch.tensor(0.5)),
                               call(teacher_scale=0.25, student_scale=0.5))


def test_layer_scale_setters_check_and_keep_fp32():
    layer = MaskedLowRankLinear(8, 6, 4)
    with pytest.raises(ValueError, match="teacher_scale must be finite, got inf"):
        layer.teacher_scale = float("inf")
    with pytest.raises(TypeError, match="student_scale must be a float, got str"):
        layer.student_scale = "1"
    layer.teacher_scale = 0.3
    assert "teacher_scale_tensor" not in layer.state_dict()  # non-persistent buffers
    layer.half()
    assert layer.teacher_scale_tensor.dtype == torch.float32  # not rounded to 0.2998
    assert float(layer.teacher_scale_tensor) == pytest.approx(0.3, rel=1e-7)


def test_new_alpha_between_forward_and_backward_uses_the_forward_alpha():
    # the scale buffers are filled in place; the backward must still see the forward's α
    layer = MaskedLowRankLinear(8, 6, 4)
    layer.set_teacher(torch.randn(6, 8))
    layer.teacher_scale, layer.student_scale = 0.25, 0.5
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    expected = [x.grad.clone(), layer.U.grad.clone()]
    x.grad = layer.U.grad = None
    y = layer(x)
    layer.teacher_scale, layer.student_scale = 0.75, 2.0  # e.g. controller.step() too early
    y.sum().backward()
    torch.testing.assert_close([x.grad, layer.U.grad], expected)


def test_scale_buffers_survive_meta_device_loading():
    # from_pretrained-style loading: built on meta, to_empty(), weights from a state_dict
    src = MaskedLowRankLinear(8, 6, 4)
    with torch.device("meta"):
        layer = MaskedLowRankLinear(8, 6, 4)
    layer.student_scale = 0.5
    layer.to_empty(device="cpu")
    layer.load_state_dict(src.state_dict())
    assert float(layer.student_scale_tensor) == 0.5 and float(layer.teacher_scale_tensor) == 0
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), 0.5 * src(x))
