"""print_compression_summary: trainable and total parameters, the targeted layers now and
at the end, the teachers' memory and the schedule's position."""

from __future__ import annotations

import pytest
import torch
from tiny_models import block_net, tiny_bert

from tunecomp_kernels.compress import (
    TuneCompConfig,
    compression_report,
    compression_summary,
    finalize,
    prepare,
    print_compression_summary,
)
from tunecomp_kernels.compress.report import count_parameters


def test_summary_of_a_prepared_model_states_every_count(capsys):
    model = tiny_bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    controller = prepare(model, TuneCompConfig(target_ratio=0.5))
    print_compression_summary(model)
    text = capsys.readouterr().out
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = compression_report(model)
    assert f"trainable params: {trainable:,} || all params: {count_parameters(model):,}" in text
    assert f"targeted layers: {len(report.layers)} ({report.params_before:,} weights" in text
    assert f"at most {int(0.5 * report.params_before):,} (50.0% target)" in text
    teacher = sum(m.teacher_weight.numel() * 4 + m.teacher_bias.numel() * 4
                  for m in model.modules() if getattr(m, "teacher_weight", None) is not None)
    assert f"frozen teachers: {teacher / 2**20:.1f} MiB" in text
    assert "its length is fitted when training starts" in text
    controller.fit_schedule(10)
    assert "step 0 of 10; blend ends at step 5, budget met at step 5" in compression_summary(
        model)


def test_summary_after_finalize_has_no_teacher_or_schedule():
    model = block_net()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=2, total_steps=4))
    for _ in range(4):
        controller.step()
    finalize(model)
    text = compression_summary(model)
    assert "frozen teachers" not in text
    assert f"({compression_report(model).ratio:.1%})" in text


def test_summary_refuses_a_model_without_tunecomp_layers():
    with pytest.raises(ValueError, match="no TuneComp layers"):
        compression_summary(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        compression_summary("model")
