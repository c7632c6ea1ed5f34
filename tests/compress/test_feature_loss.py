"""The per-layer feature loss in the layer and the controller: β_t = β_0·α_t, gradients
equal to ``L + β·ℓ`` against float64, off after the blend, and a run that uses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunecomp_kernels import MaskedLowRankLinear
from tunecomp_kernels.compress import TuneCompConfig, prepare
from tunecomp_kernels.ops.reference import reference_distill_float64


def _layer(dtype=torch.float32) -> MaskedLowRankLinear:
    torch.manual_seed(0)
    dense = nn.Linear(12, 10, dtype=dtype)
    layer = MaskedLowRankLinear.from_linear(dense, rank=5)
    layer.set_teacher(dense.weight, dense.bias)
    layer.teacher_scale, layer.student_scale = 0.6, 0.4
    return layer


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_layer_gradients_are_those_of_task_loss_plus_weighted_feature_loss(dtype, tol):
    layer = _layer(dtype)
    layer.feature_weight = 0.7
    x = torch.randn(3, 4, 12, dtype=dtype, requires_grad=True)
    y = layer(x)
    (y.sin().sum()).backward()
    params = [x, layer.U, layer.mask, layer.V, layer.bias]
    got = [p.grad.clone() for p in params]

    ref = [p.detach().to(torch.float64).requires_grad_() for p in params]
    y_ref, loss_ref = reference_distill_float64(
        ref[0], ref[1], ref[2], ref[3], ref[4], layer.teacher_weight, layer.teacher_bias,
        0.6, 0.4)
    (y_ref.sin().sum() + 0.7 * loss_ref).backward()
    torch.testing.assert_close(y.detach().double(), y_ref.detach(), rtol=tol, atol=tol)
    # ℓ is returned in fp32 (a logging value) whatever the dtype
    assert layer.feature_loss.dtype == torch.float32
    torch.testing.assert_close(layer.feature_loss.double(), loss_ref.detach(), rtol=1e-6,
                               atol=0)
    for name, g, r in zip(["x", "U", "mask", "V", "bias"], got, ref):
        torch.testing.assert_close(g.double(), r.grad, rtol=tol, atol=tol, msg=name)


def test_zero_weight_or_no_teacher_is_the_plain_op():
    layer = _layer()
    x = torch.randn(5, 12)
    assert layer.feature_weight == 0.0 and not layer.feature_loss_active
    plain = layer(x)
    assert layer.feature_loss is None
    layer.feature_weight = 0.5
    torch.testing.assert_close(layer(x), plain, rtol=1e-6, atol=1e-6)  # y is the same blend
    layer.drop_teacher()
    layer.feature_loss = None
    layer(x)
    assert layer.feature_loss is None  # no teacher, no feature loss
    with pytest.raises(ValueError, match="feature_weight must be >= 0"):
        layer.feature_weight = -1.0


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])

    def forward(self, x):  # noqa: ANN001, ANN201
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def test_controller_decays_the_weight_with_the_blend_and_reports_the_loss():
    torch.manual_seed(0)
    model = _Blocks()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, feature_weight=2.0,
                                               total_steps=8, blend_steps=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(8):
        for layer in controller.layers.values():
            assert layer.feature_weight == pytest.approx(2.0 * controller.alpha)
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        stats = controller.stats()
        assert (stats["feature_loss"] is not None) == (step < 4)
        if step < 4:
            assert stats["feature_loss"] >= 0
        controller.step()
    assert all(m.feature_weight == 0.0 for m in controller.layers.values())


def test_the_feature_loss_pulls_the_student_towards_the_teacher():
    # with no task signal at all, β > 0 alone must lower ℓ; with β ≈ 0 nothing moves (SGD:
    # the step is proportional to β)
    def run(beta: float) -> tuple[float, float]:
        torch.manual_seed(0)
        model = _Blocks()
        controller = prepare(model, TuneCompConfig(target_ratio=1.0, init_rank_ratio=0.5,
                                                   feature_weight=beta, total_steps=40,
                                                   blend_steps=40, l1_lambda=0.0))
        opt = torch.optim.SGD([p for m in controller.layers.values()
                               for p in (m.U, m.V)], lr=0.5)
        # anisotropic inputs: the SVD start is not the best fit on them, so ℓ can fall
        x = torch.randn(64, 16) * torch.logspace(0.5, -2, 16)
        first = None
        layer = next(iter(controller.layers.values()))
        for _ in range(30):
            layer.feature_weight = max(beta, 1e-12)  # measure ℓ even for β = 0
            (model(x) * 0).sum().backward()
            first = float(layer.feature_loss) if first is None else first
            opt.step()
            opt.zero_grad()
        return first, float(layer.feature_loss)

    start, end = run(1.0)
    assert end < 0.7 * start
    start0, end0 = run(0.0)
    assert end0 == pytest.approx(start0, rel=1e-6)


def test_feature_weight_config_check():
    with pytest.raises(ValueError, match="feature_weight must be >= 0"):
        TuneCompConfig(feature_weight=-0.1)
    with pytest.raises(TypeError, match="feature_weight must be a number"):
        TuneCompConfig(feature_weight="1")
