"""prepare → train → finalize on BERT, GPT-2, Llama, ViT and a plain module; selection,
teacher handling, distillation and input errors."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import (
    block_net,
    buffer_bytes,
    ce_loss,
    forward_x,
    image_batches,
    text_batches,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_vit,
    vector_batches,
)
from torch import nn

from tunecomp_kernels import MaskedLowRankLinear
from tunecomp_kernels.compress import (
    TuneCompConfig,
    compression_report,
    finalize,
    find_targets,
    prepare,
    run_tunecomp,
    train,
)
from tunecomp_kernels.compress.schedules import ScheduleError

ARCHS = {
    "bert": (tiny_bert, lambda: text_batches(4)),
    "gpt2": (tiny_gpt2, lambda: text_batches(4, classes=None)),
    "llama": (tiny_llama, lambda: text_batches(4, classes=None)),
    "vit": (tiny_vit, lambda: image_batches(4)),
}
EXPECTED_TARGETS = {"bert": 12, "gpt2": 8, "llama": 14, "vit": 12}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("init", ["svd", "asvd", "svd_llm"])
def test_prepare_train_finalize(arch, init):
    make_model, make_batches = ARCHS[arch]
    model, batches = make_model(), make_batches()
    cfg = TuneCompConfig(target_ratio=0.4, init=init, blend_steps=3, total_steps=4, score="auto")
    controller = prepare(model, cfg, calibration=batches[:2] if init != "svd" else None)
    assert len(controller.layers) == EXPECTED_TARGETS[arch]
    assert controller.score_kind == ("magnitude" if init == "svd" else "activation")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = train(model, opt, batches, controller=controller)
    assert history.steps == 4 and all(math.isfinite(x) for x in history.losses)
    assert controller.teacher_freed
    finalize(model)
    report = compression_report(model)
    assert report.params_after <= math.floor(0.4 * report.params_before)
    assert not any(isinstance(m, MaskedLowRankLinear) and m.teacher_weight is not None
                   for m in model.modules())
    model.eval()
    with torch.no_grad():
        out = model(**batches[0])
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(out.loss)


def test_default_selection_skips_embeddings_and_heads():
    names = list(find_targets(tiny_bert()))
    assert all(".encoder.layer." in n for n in names)
    assert not any("pooler" in n or "classifier" in n for n in names)
    gpt2 = list(find_targets(tiny_gpt2()))
    assert "lm_head" not in gpt2 and all(n.startswith("transformer.h.") for n in gpt2)
    # a plain model: inside the ModuleList only (stem and head stay dense)
    assert list(find_targets(block_net())) == [
        "blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]


def test_selection_without_module_list_and_patterns():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 1))
    assert list(find_targets(mlp)) == ["0", "2"]  # "3" has out_features=1: cannot shrink
    cfg = TuneCompConfig(include=[r"\.up$"], target_ratio=0.5)
    controller = prepare(block_net(), cfg, forward=forward_x)
    assert sorted(controller.layers) == ["blocks.0.up", "blocks.1.up"]
    cfg = TuneCompConfig(exclude=[r"^blocks\.1\."], target_ratio=0.5)
    controller = prepare(block_net(), cfg, forward=forward_x)
    assert sorted(controller.layers) == ["blocks.0.down", "blocks.0.up"]


def test_prepare_keeps_the_function_at_step_zero():
    """α_0 = 1, α'_0 = 0: right after prepare the model computes the original outputs."""
    model = tiny_llama()
    batch = text_batches(1, classes=None)[0]
    with torch.no_grad():
        before = model(**batch).logits
    controller = prepare(model, TuneCompConfig(init="svd", blend="sine_power"))
    assert controller.alpha == 1.0 and controller.student_alpha == 0.0
    with torch.no_grad():
        after = model(**batch).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_teacher_memory_is_freed_after_blend():
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=3, total_steps=5))
    teacher_bytes = sum((m.teacher_weight.numel() + m.teacher_bias.numel()) * 4
                        for m in controller.layers.values())
    assert teacher_bytes == sum((i.dense_params + i.out_features) * 4
                                for i in controller._infos)
    before = buffer_bytes(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, opt, text_batches(3), controller=controller, steps=2)
    assert not controller.teacher_freed and buffer_bytes(model) == before
    train(model, opt, text_batches(3), controller=controller, steps=1)  # t = 3 = T
    assert controller.teacher_freed and controller.alpha == 0.0
    assert before - buffer_bytes(model) == teacher_bytes
    assert all(m.teacher_weight is None and m.teacher_bias is None
               for m in controller.layers.values())
    with pytest.raises(RuntimeError, match="teacher was freed"), controller.teacher_mode():
        pass


def test_teacher_mode_gives_the_dense_model():
    model = tiny_bert()
    batch = text_batches(1)[0]
    with torch.no_grad():
        reference = model(**batch).logits
    controller = prepare(model, TuneCompConfig(target_ratio=0.3, blend_steps=4, total_steps=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for name, p in model.named_parameters():  # train the students only
        p.requires_grad_(any(name.startswith(n + ".") for n in controller.layers))
    train(model, opt, text_batches(2), controller=controller, steps=2)
    assert controller.alpha > 0
    model.train()
    teacher = controller.teacher_forward(batch).logits
    torch.testing.assert_close(teacher, reference, rtol=1e-5, atol=1e-5)
    assert model.training  # flags restored
    assert all(m.student_scale == controller.student_alpha for m in controller.layers.values())


@pytest.mark.parametrize("mode", ["logits", "hidden"])
def test_distillation_term(mode):
    model = tiny_bert()
    cfg = TuneCompConfig(target_ratio=0.4, blend_steps=3, total_steps=4, distill=mode,
                         distill_weight=2.0, l1_lambda=0.0)
    controller = prepare(model, cfg)
    batches = [dict(b, output_hidden_states=True) for b in text_batches(4)]
    out = model(**batches[0])
    with pytest.raises(ValueError, match="pass the student's outputs"):
        controller.regularization()
    assert controller.regularization(out, batches[0]).item() == pytest.approx(0.0, abs=1e-6)
    history = train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batches,
                    controller=controller, steps=2)
    assert history.steps == 2
    out = model(**batches[0])
    reg = controller.regularization(out, batches[0])
    assert reg.item() > 0 and reg.requires_grad
    reg.backward()
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batches,
          controller=controller, steps=2)
    assert not controller.distill_active  # teacher gone after T
    assert controller.regularization().item() == 0.0


def test_l1_penalty_and_its_gradient():
    model = block_net()
    controller = prepare(model, TuneCompConfig(l1_lambda=0.1, l1_schedule="constant"),
                         forward=forward_x)
    with torch.no_grad():
        for m in controller.layers.values():
            m.mask.uniform_(-1, 1)
    expected = 0.1 * sum(m.mask.abs().sum() for m in controller.layers.values())
    pen = controller.l1_penalty()
    assert pen.item() == pytest.approx(expected.item())
    pen.backward()
    via_loss = [m.mask.grad.clone() for m in controller.layers.values()]
    for m in controller.layers.values():
        m.mask.grad = None
    controller.add_l1_gradients()
    for g, m in zip(via_loss, controller.layers.values()):
        torch.testing.assert_close(m.mask.grad, g)


def test_plain_module_run_tunecomp():
    model = block_net()
    cfg = TuneCompConfig(target_ratio=0.5, blend_steps=3, total_steps=5, init="asvd")
    batches = vector_batches(5)
    result = run_tunecomp(model, cfg, lambda p: torch.optim.Adam(p, lr=1e-3), batches,
                          calibration=[b[0] for b in batches[:2]], loss_fn=ce_loss,
                          forward=forward_x)
    assert result.history.steps == 5 and result.report.within_budget
    assert model(torch.randn(2, 8)).shape == (2, 3)


def test_conv1d_layers_become_lowrank_with_transposed_weight():
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 32)
    expected = conv(x)
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=0, total_steps=1,
                                               prune_end=1, init_rank_ratio=1.0))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, MaskedLowRankLinear)
    assert (layer.in_features, layer.out_features) == (32, 96)
    assert controller.teacher_freed  # blend_steps=0: no teacher at all
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)  # full rank at t=0


def test_errors_are_clear():
    with pytest.raises(ValueError, match="no module of Sequential matches"):
        prepare(nn.Sequential(nn.ReLU()), TuneCompConfig())
    with pytest.raises(ValueError, match="no module of BlockNet matches"):
        prepare(block_net(), TuneCompConfig(include=["nothing_here"]))
    with pytest.raises(ValueError, match=r"init='asvd' needs calibration data"):
        prepare(block_net(), TuneCompConfig(init="asvd"))
    with pytest.raises(ValueError, match=r"init='svd_llm' needs calibration data"):
        prepare(tiny_bert(), TuneCompConfig(init="svd_llm"))
    with pytest.raises(ValueError, match="score='activation' needs calibration data"):
        prepare(tiny_bert(), TuneCompConfig(score="activation"))
    with pytest.raises(ValueError, match="calibration is empty"):
        prepare(tiny_bert(), TuneCompConfig(init="asvd"), calibration=[])
    with pytest.raises(TypeError, match="calibration must be an iterable"):
        prepare(tiny_bert(), TuneCompConfig(init="asvd"), calibration=5)
    with pytest.raises(TypeError, match="config must be a TuneCompConfig"):
        prepare(tiny_bert(), {"target_ratio": 0.5})
    model = block_net()
    prepare(model, TuneCompConfig(), forward=forward_x)
    with pytest.raises(ValueError, match="prepared twice"):
        prepare(model, TuneCompConfig())
    with pytest.raises(ValueError, match="call prepare"):
        finalize(block_net())
    with pytest.raises(ValueError, match="call prepare"):
        compression_report(block_net())


def test_calibration_layers_off_the_forward_path_are_reported():
    model = block_net()
    cfg = TuneCompConfig(init="asvd")
    with pytest.raises(ValueError, match="saw no calibration input"):
        prepare(model, cfg, calibration=[torch.randn(2, 8)], forward=lambda m, x: m.stem(x))


def test_step_after_finalize_is_an_error():
    model = block_net()
    controller = prepare(model, TuneCompConfig(blend_steps=1, total_steps=1), forward=forward_x)
    controller.step()
    controller.finalize()
    with pytest.raises(RuntimeError, match="finalized"):
        controller.step()


def test_finalize_before_blend_end_is_refused_unless_partial():
    model = block_net()
    controller = prepare(model, TuneCompConfig(blend_steps=4, total_steps=4), forward=forward_x)
    with pytest.raises(ScheduleError, match="never stepped"):
        finalize(model)
    with pytest.warns(UserWarning, match="allow_partial=True") as caught:
        finalize(model, allow_partial=True)
    assert len(caught) == 1 and controller.finalized
