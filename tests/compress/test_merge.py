"""merge_and_unload: a TuneComp model multiplied back out to its dense architecture."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers import assert_close
from tiny_models import (
    block_net,
    image_batches,
    text_batches,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_vit,
)
from torch import nn

from tunecomp_kernels.compress import (
    TuneCompConfig,
    compress_to_budget,
    merge_and_unload,
    prepare,
)
from tunecomp_kernels.compress.merge import MergeCounts, merge_layer, parameter_count
from tunecomp_kernels.nn import MaskedLowRankLinear

pytest.importorskip("transformers")

FAMILIES = {
    "bert": (tiny_bert, lambda: text_batches(1)[0]),
    "gpt2": (tiny_gpt2, lambda: text_batches(1, classes=None)[0]),
    "llama": (tiny_llama, lambda: text_batches(1, classes=None)[0]),
    "vit": (tiny_vit, lambda: image_batches(1)[0]),
}


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    with torch.no_grad():
        return model(**inputs).logits


def _signature(model: nn.Module) -> dict:
    """Every module's type and every tensor's name and shape."""
    return {"types": [(n, type(m).__name__) for n, m in model.named_modules()],
            "tensors": {k: tuple(v.shape) for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_restores_the_architecture_and_the_compressed_outputs(family, caplog):
    make, batch_of = FAMILIES[family]
    original, batch = make(), batch_of()
    model = compress_to_budget(copy.deepcopy(original), TuneCompConfig(target_ratio=0.4))
    reference = _logits(copy.deepcopy(model).double(), batch)  # float64 compressed model
    merged64 = merge_and_unload(copy.deepcopy(model).double())
    compressed_count = parameter_count(model)
    with caplog.at_level(logging.INFO, logger="tunecomp_kernels.compress.merge"):
        merged = merge_and_unload(model)
    assert merged is model
    assert _signature(merged) == _signature(original)
    assert not any(isinstance(m, MaskedLowRankLinear) or hasattr(m, "tunecomp_info")
                   for m in merged.modules())
    assert not hasattr(merged, "tunecomp_config")
    assert_close(_logits(merged, batch), reference, torch.float32, f"{family} merged")
    assert_close(_logits(merged64, batch), reference, torch.float64, f"{family} in float64")
    counts = merged.tunecomp_merge_counts
    assert counts == MergeCounts(compressed_count, parameter_count(original))
    assert counts.compressed < counts.dense
    assert f"{counts.dense} parameters dense" in caplog.text
    assert f"compressed model has {counts.compressed}" in caplog.text


def test_gpt2_layers_come_back_as_conv1d():
    from transformers.pytorch_utils import Conv1D

    model = compress_to_budget(tiny_gpt2(), TuneCompConfig(target_ratio=0.4))
    merge_and_unload(model)
    attn = model.transformer.h[0].attn
    assert type(attn.c_attn) is Conv1D and tuple(attn.c_attn.weight.shape) == (32, 96)


def test_merge_of_a_model_in_training_keeps_the_teacher_blend():
    # At step 0 of a TuneComp run the layers still blend in their teacher: the merged
    # dense weight must be the blend, not the student alone.
    model = block_net()
    prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=4, total_steps=8))
    layer = next(m for m in model.modules() if isinstance(m, MaskedLowRankLinear))
    layer.teacher_scale, layer.student_scale = 0.25, 0.75
    x = torch.randn(5, 8, dtype=torch.float64)
    reference = copy.deepcopy(model).double()(x)
    merge_and_unload(model)
    assert_close(model(x.float()), reference, torch.float32, "blended merge")


def test_merged_bias_free_and_frozen_layers_keep_their_kind():
    layer = MaskedLowRankLinear.from_dense(torch.randn(6, 5), None, rank=2)
    from tunecomp_kernels.compress.targets import INFO_ATTR, TargetInfo

    setattr(layer, INFO_ATTR, TargetInfo("x", 5, 6, False, "linear"))
    layer.requires_grad_(False)
    dense = merge_layer(layer)
    assert type(dense) is nn.Linear and dense.bias is None
    assert not dense.weight.requires_grad
    torch.testing.assert_close(dense.weight, layer.weight)


def test_merge_refuses_models_without_tunecomp_layers():
    with pytest.raises(ValueError, match="no TuneComp layers"):
        merge_and_unload(block_net())
    with pytest.raises(TypeError, match="nn.Module"):
        merge_and_unload("model")
    with pytest.raises(ValueError, match="not a converted TuneComp layer"):
        merge_layer(nn.Linear(3, 3))
