"""TuneCompConfig(teacher_dtype=...): the frozen teachers stored in bf16/fp16.

``None`` keeps today's behaviour (the model's dtype). ``"bfloat16"``/``"float16"`` make
``prepare`` store every teacher (weight and bias) in that dtype: the teacher bytes halve,
the blend still accumulates in fp32, and a float32 model trains as before.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCE, rel_err
from tiny_models import buffer_bytes, text_batches, tiny_bert, tiny_llama

from tunecomp_kernels import MaskedLowRankLinear
from tunecomp_kernels.compress import TuneCompConfig, prepare, train
from tunecomp_kernels.compress.config import TEACHER_DTYPES


def _teachers(model) -> list[MaskedLowRankLinear]:
    return [m for m in model.modules()
            if isinstance(m, MaskedLowRankLinear) and m.teacher_weight is not None]


def _teacher_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for m in _teachers(model)
               for t in (m.teacher_weight, m.teacher_bias) if t is not None)


def test_default_is_the_model_dtype_and_the_field_round_trips():
    assert TuneCompConfig().teacher_dtype is None
    for value in (None, *TEACHER_DTYPES):
        cfg = TuneCompConfig(teacher_dtype=value)
        assert cfg.to_dict()["teacher_dtype"] == value
        assert TuneCompConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("value", ["bf16", "float32", "int8", torch.bfloat16, 16])
def test_bad_teacher_dtype_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"unknown teacher_dtype .*choose None .*'bfloat16'"):
        TuneCompConfig(teacher_dtype=value)


@pytest.mark.parametrize("distill", ["logits", "hidden"])
def test_distillation_with_a_reduced_teacher(distill):
    """The teacher-only forward upcasts the stored teacher: at step 0 (student = teacher
    blend at α = 1) the distillation term is zero, and it trains afterwards."""
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(
        target_ratio=0.5, blend_steps=3, total_steps=4, distill=distill, l1_lambda=0.0,
        teacher_dtype="bfloat16"))
    batches = [dict(b, output_hidden_states=True) for b in text_batches(4)]
    out = model(**batches[0])
    assert controller.regularization(out, batches[0]).item() == pytest.approx(0.0, abs=1e-6)
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batches,
          controller=controller, steps=2)
    out = model(**batches[0])
    reg = controller.regularization(out, batches[0])
    assert reg.item() > 0 and torch.isfinite(reg)


@pytest.mark.parametrize("teacher_dtype", TEACHER_DTYPES)
def test_prepare_stores_the_teachers_in_it_and_their_bytes_halve(teacher_dtype):
    batch = text_batches(1, classes=None)[0]
    full, cheap = tiny_llama(), tiny_llama()
    config = dict(target_ratio=0.5, total_steps=20)
    prepare(full, TuneCompConfig(**config))
    prepare(cheap, TuneCompConfig(**config, teacher_dtype=teacher_dtype))
    dtype = getattr(torch, teacher_dtype)
    assert _teachers(cheap) and len(_teachers(cheap)) == len(_teachers(full))
    for m in _teachers(cheap):
        assert m.teacher_weight.dtype == dtype and m.U.dtype == torch.float32
        assert m.teacher_bias is None or m.teacher_bias.dtype == dtype
    assert 2 * _teacher_bytes(cheap) == _teacher_bytes(full) > 0
    # the rest of the buffers are unchanged: the model's buffer bytes drop by exactly that
    assert buffer_bytes(full) - buffer_bytes(cheap) == _teacher_bytes(cheap)
    # at α = 1 the layers are their teachers: the outputs differ by the teacher rounding
    with torch.no_grad():
        y_full = full(**batch).logits
        y_cheap = cheap(**batch).logits
    assert y_cheap.dtype == torch.float32
    assert rel_err(y_cheap, y_full) <= 10 * TOLERANCE[dtype]


def test_a_joint_run_with_bf16_teachers_trains_and_frees_them():
    model = tiny_llama()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, total_steps=6,
                                               teacher_dtype="bfloat16"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    controller.attach_optimizer(opt)
    for batch in text_batches(6, classes=None):
        loss = model(**batch).loss + controller.regularization()
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        controller.step()
    assert controller.teacher_freed and not _teachers(model)


def test_a_half_model_with_a_reduced_teacher_dtype_is_refused_unchanged():
    model = tiny_llama().to(torch.float16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"teacher_dtype='bfloat16'\) needs a float32 model"):
        prepare(model, TuneCompConfig(teacher_dtype="bfloat16"))
    assert not any(isinstance(m, MaskedLowRankLinear) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the model's own dtype is not a reduction: accepted
    prepare(tiny_llama().to(torch.bfloat16), TuneCompConfig(teacher_dtype="bfloat16"))


@pytest.mark.parametrize("layer_dtype,teacher_dtype", [
    (torch.float32, torch.float64), (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float16), (torch.float64, torch.float32)])
def test_set_teacher_refuses_a_dtype_the_op_cannot_blend(layer_dtype, teacher_dtype):
    layer = MaskedLowRankLinear(8, 6, 3, dtype=layer_dtype)
    with pytest.raises(ValueError, match=r"teacher dtype .* cannot be blended"):
        layer.set_teacher(torch.randn(6, 8), dtype=teacher_dtype)
    assert layer.teacher_weight is None


def test_layer_with_bf16_teacher_to_linear_matches_forward():
    torch.manual_seed(0)
    layer = MaskedLowRankLinear(16, 12, 5)
    layer.set_teacher(torch.randn(12, 16), torch.randn(12), dtype=torch.bfloat16)
    assert layer.teacher_weight.dtype == layer.teacher_bias.dtype == torch.bfloat16
    layer.teacher_scale, layer.student_scale = 0.4, 0.6
    x = torch.randn(3, 16)
    linear = layer.to_linear()
    assert linear.weight.dtype == torch.float32
    torch.testing.assert_close(linear(x), layer(x), rtol=1e-5, atol=1e-5)
