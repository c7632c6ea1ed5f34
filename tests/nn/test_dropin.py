"""MaskedLowRankLinear as an nn.Linear drop-in: copy, pickle, dtype casts, gradient
checkpointing, and the one constructor from a dense weight (``from_dense``)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import TOLERANCE, rel_err
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunecomp_kernels import MaskedLowRankLinear
from tunecomp_kernels.compress.calibration import ActivationStats
from tunecomp_kernels.compress.prepare import build_lowrank
from tunecomp_kernels.compress.targets import TargetInfo
from tunecomp_kernels.nn.init import init_decomposition, lowrank_factors
from tunecomp_kernels.ops.reference import reference_float64


def blended_layer(teacher: bool, seed: int = 0) -> MaskedLowRankLinear:
    """A rank-5 layer mid-blend (a = 0.3, s = 0.7) with a pruned rank, or student only."""
    torch.manual_seed(seed)
    dense = nn.Linear(12, 10)
    layer = MaskedLowRankLinear.from_linear(dense, rank=5)
    with torch.no_grad():
        layer.mask.copy_(torch.tensor([1.0, 0.5, 0.0, 2.0, 0.8]))
        layer.bias.add_(0.1)
    if teacher:
        layer.set_teacher(dense.weight, dense.bias)
        layer.teacher_scale, layer.student_scale = 0.3, 0.7
    return layer


def expected_output(layer: MaskedLowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's function in float64, from its own tensors."""
    teacher = layer.teacher_weight is not None
    return reference_float64(
        x, layer.U, layer.mask, layer.V, layer.bias,
        teacher_weight=layer.teacher_weight, teacher_bias=layer.teacher_bias,
        teacher_scale=layer.teacher_scale if teacher else 0.0,
        student_scale=layer.student_scale)


def roundtrip_torch_save(layer: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": roundtrip_torch_save,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("teacher", [True, False], ids=["teacher", "student"])
def test_copies_compute_the_same_and_are_independent(how, teacher):
    layer = blended_layer(teacher)
    x = torch.randn(4, 12)
    y = layer(x)
    clone = COPIES[how](layer)
    assert torch.equal(clone(x), y)
    assert (clone.teacher_scale, clone.student_scale) == (layer.teacher_scale,
                                                          layer.student_scale)
    assert (clone.teacher_weight is None) == (not teacher)
    assert set(clone.state_dict()) == set(layer.state_dict())
    for name, t in layer.state_dict().items():
        assert torch.equal(clone.state_dict()[name], t), name
        assert clone.state_dict()[name].data_ptr() != t.data_ptr(), name
    with torch.no_grad():  # the copy owns its tensors: changing it leaves the original
        clone.U.zero_()
        if teacher:
            clone.teacher_weight.zero_()
    clone.teacher_scale = 0.0 if teacher else clone.teacher_scale
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cast", ["method", "to"])
@pytest.mark.parametrize("teacher", [True, False], ids=["teacher", "student"])
def test_half_precision_casts_move_parameters_buffers_and_teacher(dtype, cast, teacher):
    layer = blended_layer(teacher)
    x = torch.randn(6, 12)
    ref = expected_output(layer, x)
    low = copy.deepcopy(layer)
    if cast == "to":
        low = low.to(dtype)
    else:
        low = low.half() if dtype == torch.float16 else low.bfloat16()
    tensors = dict(low.named_parameters()) | dict(low.named_buffers())
    floats = {n: t.dtype for n, t in tensors.items() if not n.endswith("scale_tensor")}
    assert set(floats.values()) == {dtype}, floats
    assert (low.teacher_weight is None) == (not teacher)
    assert (low.teacher_scale, low.student_scale) == (layer.teacher_scale, layer.student_scale)
    out = low(x.to(dtype))
    assert out.dtype == dtype
    # the cast rounds the weights too, so compare with the same tolerance as the op tests
    assert rel_err(out, ref) <= 10 * TOLERANCE[dtype]
    assert rel_err(out, expected_output(low, x.to(dtype))) <= TOLERANCE[dtype]
    back = low.float()
    assert all(t.dtype == torch.float32 for n, t in back.state_dict().items()
               if not n.endswith("scale_tensor"))


class Stack(nn.Module):
    """Two low-rank layers with an activation, optionally under gradient checkpointing."""

    def __init__(self, teacher: bool) -> None:
        super().__init__()
        self.a = blended_layer(teacher, seed=1)
        self.b = MaskedLowRankLinear.from_linear(nn.Linear(10, 12), rank=4)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))

    def forward(self, x: torch.Tensor, reentrant: bool | None = None) -> torch.Tensor:
        if reentrant is None:
            return self.block(x)
        return checkpoint(self.block, x, use_reentrant=reentrant)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("teacher", [True, False], ids=["teacher", "student"])
def test_gradient_checkpointing_gives_the_plain_gradients(reentrant, teacher):
    torch.manual_seed(3)
    plain = Stack(teacher)
    ckpt = copy.deepcopy(plain)
    x = torch.randn(5, 12)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y_plain = plain(xs[0])
    y_ckpt = ckpt(xs[1], reentrant=reentrant)
    assert torch.equal(y_plain, y_ckpt)
    y_plain.square().sum().backward()
    y_ckpt.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name
    assert torch.equal(xs[0].grad, xs[1].grad)
    if teacher:  # the frozen teacher gets no gradient either way
        assert ckpt.a.teacher_weight.grad is None


# --- from_dense: the one constructor ------------------------------------------------------


@pytest.mark.parametrize("init", ["svd", "asvd", "svd_llm"])
def test_from_dense_is_what_from_linear_and_prepare_build(init):
    torch.manual_seed(0)
    dense = nn.Linear(16, 12)
    x = torch.randn(64, 16) * torch.linspace(0.2, 3.0, 16)
    stats = ActivationStats(count=64, abs_sum=x.double().abs().sum(0),
                            sq_sum=x.double().square().sum(0), gram=x.double().t() @ x.double())
    layer = MaskedLowRankLinear.from_dense(dense.weight, dense.bias, rank=6, init=init,
                                           stats=stats)
    via_linear = MaskedLowRankLinear.from_linear(dense, 6, init, input_abs_mean=stats.abs_mean,
                                                 gram=stats.gram)
    info = TargetInfo("x", 16, 12, True, "linear")
    via_prepare = build_lowrank(dense, info, 6, init, stats)
    for other in (via_linear, via_prepare):
        for name, t in layer.state_dict().items():
            assert torch.equal(other.state_dict()[name], t), (init, name)
    assert layer.teacher_weight is None and layer.student_scale == 1.0
    assert torch.equal(layer.mask, torch.ones(6))


@pytest.mark.parametrize("init", ["svd", "asvd", "svd_llm"])
def test_one_decomposition_gives_the_spectrum_and_the_factors_at_any_rank(init):
    """InitSVD: the factors at rank r are those lowrank_factors computes, the first r of
    the full-rank ones, and the spectrum is the init metric's singular values."""
    torch.manual_seed(0)
    weight = torch.randn(12, 16)
    x = torch.randn(64, 16, dtype=torch.float64) * torch.linspace(0.2, 3.0, 16)
    stats = {"input_abs_mean": x.abs().mean(0), "gram": x.t() @ x}
    svd = init_decomposition(weight, init, **stats)
    U6, V6 = svd.factors(6)
    want_U, want_V = lowrank_factors(weight, 6, init, **stats)
    assert torch.equal(U6, want_U) and torch.equal(V6, want_V)
    U, V = svd.factors(12)
    torch.testing.assert_close(U[:, :6], U6, rtol=0, atol=0)
    torch.testing.assert_close(V[:6], V6, rtol=1e-12, atol=1e-12)  # svd_llm: a solve per row
    torch.testing.assert_close(U @ V, weight.double(), rtol=1e-10, atol=1e-10)
    metric = {"svd": weight.double(), "asvd": None, "svd_llm": None}[init]
    if metric is not None:
        torch.testing.assert_close(svd.spectrum(), torch.linalg.svdvals(metric))
    torch.testing.assert_close(svd.spectrum(), svd.S, rtol=1e-12, atol=1e-12)


def test_from_dense_copies_given_factors_instead_of_factoring_again(monkeypatch):
    torch.manual_seed(0)
    dense = nn.Linear(16, 12)
    want = MaskedLowRankLinear.from_dense(dense.weight, dense.bias, rank=5)
    factors = tuple(f.float() for f in lowrank_factors(dense.weight, 5))
    monkeypatch.setattr(torch.linalg, "svd", None)  # must not be called
    got = MaskedLowRankLinear.from_dense(dense.weight, dense.bias, rank=5, factors=factors)
    for name, t in want.state_dict().items():
        assert torch.equal(got.state_dict()[name], t), name


def test_from_dense_full_rank_reproduces_the_dense_layer_and_keeps_dtype():
    torch.manual_seed(0)
    weight, bias = torch.randn(9, 14, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    layer = MaskedLowRankLinear.from_dense(weight, bias)
    assert layer.rank == 9 and layer.U.dtype == torch.float64
    x = torch.randn(3, 14, dtype=torch.float64)
    assert rel_err(layer(x), x @ weight.t() + bias) < 1e-12
    no_bias = MaskedLowRankLinear.from_dense(weight.float(), rank=3)
    assert no_bias.bias is None and no_bias.U.dtype == torch.float32


def test_from_dense_conv1d_weight_is_passed_transposed():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(10, 6)  # weight [in=6, out=10]
    layer = MaskedLowRankLinear.from_dense(conv.weight.t(), conv.bias)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, exc, message", [
    (lambda: MaskedLowRankLinear.from_dense([[1.0]], rank=1), TypeError,
     "weight must be a torch.Tensor, got list"),
    (lambda: MaskedLowRankLinear.from_dense(torch.ones(4), rank=1), ValueError,
     r"weight must be 2-D \[out, in\], got shape \[4\]"),
    (lambda: MaskedLowRankLinear.from_dense(torch.ones(3, 4), torch.ones(4), rank=1),
     ValueError, r"bias must have shape \[3\] for weight \[3, 4\], got \[4\]"),
    (lambda: MaskedLowRankLinear.from_dense(torch.full((3, 4), float("inf")), rank=1),
     ValueError, r"weight \[3, 4\] has 12 NaN/inf values"),
    (lambda: MaskedLowRankLinear.from_dense(torch.ones(3, 4), rank=4), ValueError,
     "rank=4 exceeds min"),
    (lambda: MaskedLowRankLinear.from_dense(torch.ones(3, 4), rank=2, init="pca"),
     ValueError, "unknown init 'pca'"),
    (lambda: MaskedLowRankLinear.from_dense(torch.ones(3, 4), rank=2, init="asvd"),
     ValueError, "init='asvd' needs input_abs_mean"),
    (lambda: MaskedLowRankLinear.from_dense(torch.ones(3, 4), rank=2, init="svd_llm"),
     ValueError, "init='svd_llm' needs gram"),
    (lambda: MaskedLowRankLinear.from_dense(
        torch.ones(3, 4), rank=2, init="svd_llm",
        stats=ActivationStats(1, torch.ones(4), torch.ones(4), torch.eye(3))),
     ValueError, r"gram must have shape \[4, 4\] .* got \[3, 3\]"),
    (lambda: MaskedLowRankLinear.from_dense(torch.ones(3, 4, dtype=torch.int64), rank=1),
     ValueError, "dtype must be float16, bfloat16, float32 or float64"),
    (lambda: MaskedLowRankLinear.from_dense(torch.ones(3, 4), rank=2,
                                            factors=(torch.ones(3, 3), torch.ones(3, 4))),
     ValueError, r"factors must have shapes \[3, 2\] and \[2, 4\], got \[3, 3\] and \[3, 4\]"),
], ids=["not_tensor", "not_2d", "bias_shape", "inf", "rank", "init", "asvd_stats",
        "svd_llm_stats", "gram_shape", "int_dtype", "factors_shape"])
def test_from_dense_errors(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_every_builder_goes_through_from_dense(monkeypatch, capsys):
    """from_linear, prepare, compress_to_budget and `tunecomp demo` share one constructor
    (and the demo selects its layers with find_targets, like prepare)."""
    import tunecomp_kernels.compress.targets as targets_mod
    from tunecomp_kernels.cli import main
    from tunecomp_kernels.compress import TuneCompConfig, compress_to_budget, prepare

    from_dense = MaskedLowRankLinear.from_dense.__func__
    calls: list[tuple[int, int]] = []

    def spy(cls, weight, bias=None, **kwargs):
        calls.append(tuple(weight.shape))
        return from_dense(cls, weight, bias, **kwargs)

    monkeypatch.setattr(MaskedLowRankLinear, "from_dense", classmethod(spy))
    MaskedLowRankLinear.from_linear(nn.Linear(6, 5), rank=2)
    assert calls == [(5, 6)]

    def block_net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 8)]))

    calls.clear()
    prepare(block_net(), TuneCompConfig(target_ratio=0.5), forward=lambda m, b: b)
    assert sorted(calls) == [(8, 16), (16, 8)]
    calls.clear()
    model = compress_to_budget(block_net(), TuneCompConfig(target_ratio=0.5))
    assert len(calls) == sum(isinstance(m, MaskedLowRankLinear) for m in model.modules()) > 0

    selections = []
    find_targets = targets_mod.find_targets
    monkeypatch.setattr(targets_mod, "find_targets",
                        lambda model, *a, **k: selections.append(1) or find_targets(model, *a,
                                                                                       **k))
    calls.clear()
    assert main(["demo", "--hidden", "32", "--layers", "1"]) == 0
    assert selections == [1] and len(calls) == 6
    assert "converted 6 linear layers" in capsys.readouterr().out


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_hf_gradient_checkpointing_mid_blend_gives_the_plain_gradients(reentrant):
    """A prepared tiny BERT mid-blend, with HF's gradient checkpointing on: same loss
    gradients, bitwise, as the plain run."""
    pytest.importorskip("transformers")
    from tiny_models import text_batches, tiny_bert

    from tunecomp_kernels.compress import TuneCompConfig, prepare

    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=4, total_steps=4))
    controller.step()  # 0 < α < 1: teacher and student both in the graph
    assert 0.0 < controller.alpha < 1.0
    ckpt_model = copy.deepcopy(model)
    ckpt_model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert ckpt_model.is_gradient_checkpointing and not model.is_gradient_checkpointing
    batch = text_batches(1)[0]
    for m in (model, ckpt_model):
        m.train()
        torch.manual_seed(0)
        m(**batch).loss.backward()
    for (name, p), q in zip(model.named_parameters(), ckpt_model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.equal(p.grad, q.grad), name
