"""MaskedLowRankLinear as a drop-in for nn.Linear."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from torch import nn

from tunecomp_kernels import MaskedLowRankLinear
from tunecomp_kernels.ops.reference import reference_float64


def test_shapes_parameters_and_forward_match_reference():
    layer = MaskedLowRankLinear(37, 29, 11)
    assert layer.U.shape == (29, 11) and layer.V.shape == (11, 37)
    assert layer.mask.shape == (11,) and layer.bias.shape == (29,)
    assert {n for n, _ in layer.named_parameters()} == {"U", "mask", "V", "bias"}
    x = torch.randn(3, 5, 37)
    ref = reference_float64(x, layer.U, layer.mask, layer.V, layer.bias)
    assert rel_err(layer(x), ref) < 1e-5


def test_default_init_matches_nn_linear_output_scale():
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    dense = nn.Linear(256, 256)(x).std().item()
    low = MaskedLowRankLinear(256, 256, 64)(x).std().item()
    assert 0.8 < low / dense < 1.25


def test_no_bias_and_factory_kwargs():
    layer = MaskedLowRankLinear(8, 6, 3, bias=False, dtype=torch.float64)
    assert layer.bias is None and layer.U.dtype == torch.float64
    assert layer(torch.randn(2, 8, dtype=torch.float64)).shape == (2, 6)


@pytest.mark.parametrize("shape", [(37, 29), (16, 48), (20, 20)])
def test_from_linear_exact_at_full_rank(shape):
    in_f, out_f = shape
    linear = nn.Linear(in_f, out_f)
    layer = MaskedLowRankLinear.from_linear(linear)
    assert layer.rank == min(in_f, out_f)
    x = torch.randn(7, in_f)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight, linear.weight, rtol=1e-5, atol=1e-5)


def test_from_linear_error_decreases_with_rank():
    torch.manual_seed(0)
    linear = nn.Linear(40, 32)
    x = torch.randn(64, 40)
    errors = [rel_err(MaskedLowRankLinear.from_linear(linear, rank=r)(x), linear(x))
              for r in (2, 8, 16, 24, 32)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5


def test_asvd_and_svd_llm_beat_plain_svd_on_their_objective():
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    # Calibration inputs with a few loud channels, where data-aware init should help.
    scale = torch.ones(32)
    scale[:4] = 20.0
    x = torch.randn(512, 32) * scale
    gram = x.double().t() @ x.double()
    err = {
        "svd": MaskedLowRankLinear.from_linear(linear, rank=6),
        "asvd": MaskedLowRankLinear.from_linear(linear, rank=6, init="asvd",
                                                input_abs_mean=x.abs().mean(0)),
        "svd_llm": MaskedLowRankLinear.from_linear(linear, rank=6, init="svd_llm", gram=gram),
    }
    err = {k: rel_err(m(x), linear(x)) for k, m in err.items()}
    assert err["svd_llm"] < err["svd"]
    assert err["asvd"] < err["svd"]


def test_compact_keeps_output_and_drops_zero_ranks():
    torch.manual_seed(0)
    layer = MaskedLowRankLinear(20, 12, 8)
    with torch.no_grad():
        layer.mask.copy_(torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 2.0, -1.0, 0.0]))
    x = torch.randn(5, 20)
    before = layer(x)
    assert layer.compact() is layer
    assert layer.rank == 4 and layer.active_rank == 4
    torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
    assert "rank=4" in repr(layer)


def test_compact_to_zero_rank_leaves_bias():
    layer = MaskedLowRankLinear(6, 4, 2)
    with torch.no_grad():
        layer.mask.zero_()
    layer.compact()
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), layer.bias.expand(3, 4))


@pytest.mark.parametrize("teacher", [False, True])
def test_to_linear_is_equivalent(teacher):
    layer = MaskedLowRankLinear(15, 9, 5)
    if teacher:
        layer.set_teacher(torch.randn(9, 15), torch.randn(9))
        layer.teacher_scale, layer.student_scale = 0.4, 0.7
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear)
    x = torch.randn(4, 15)
    torch.testing.assert_close(linear(x), layer(x), rtol=1e-5, atol=1e-5)


def test_weight_is_read_only_and_materialised():
    layer = MaskedLowRankLinear(6, 5, 3)
    torch.testing.assert_close(layer.weight, (layer.U * layer.mask) @ layer.V)
    assert layer.weight.shape == (5, 6)
    with pytest.raises(AttributeError, match="read-only"):
        layer.weight = nn.Parameter(torch.zeros(5, 6))


def test_teacher_blend_and_drop():
    layer = MaskedLowRankLinear(10, 8, 4)
    w0, b0 = torch.randn(8, 10), torch.randn(8)
    layer.set_teacher(w0, b0)
    layer.teacher_scale, layer.student_scale = 0.25, 0.5
    x = torch.randn(3, 10)
    expected = 0.5 * (((x @ layer.V.t()) * layer.mask) @ layer.U.t() + layer.bias) \
        + 0.25 * (x @ w0.t() + b0)
    torch.testing.assert_close(layer(x), expected)
    assert not any(b.requires_grad for b in layer.buffers())
    assert "teacher_scale=0.25" in repr(layer)
    layer.drop_teacher()
    assert layer.teacher_weight is None and layer.teacher_scale == 0.0
    assert "teacher_weight" not in layer.state_dict()


def test_state_dict_round_trip():
    a = MaskedLowRankLinear(7, 5, 3)
    b = MaskedLowRankLinear(7, 5, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 7)
    torch.testing.assert_close(a(x), b(x))


def test_extra_repr_is_informative():
    layer = MaskedLowRankLinear(6, 4, 3, bias=False, backend="torch")
    text = repr(layer)
    for part in ("in_features=6", "out_features=4", "rank=3", "bias=False", "backend='torch'"):
        assert part in text


def test_trains_like_a_linear_layer():
    torch.manual_seed(0)
    target = nn.Linear(8, 4)
    layer = MaskedLowRankLinear(8, 4, 4)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    x = torch.randn(256, 8)
    with torch.no_grad():
        y = target(x)
    first = None
    for _ in range(300):
        loss = (layer(x) - y).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * first
