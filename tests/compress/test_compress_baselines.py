"""Sequential baselines: one-shot truncation to the budget, (a) and (b) pipelines."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import (
    block_net,
    ce_loss,
    forward_x,
    text_batches,
    tiny_bert,
    tiny_gpt2,
    vector_batches,
)

from tunecomp_kernels import MaskedLowRankLinear
from tunecomp_kernels.compress import (
    TuneCompConfig,
    allocate_ranks,
    compress_then_finetune,
    compress_to_budget,
    compression_report,
    finetune_then_compress,
    load_compressed,
    run_tunecomp,
    save_compressed,
)
from tunecomp_kernels.compress.targets import TargetInfo


def adam(params):
    return torch.optim.Adam(params, lr=1e-3)


@pytest.mark.parametrize("init", ["svd", "asvd", "svd_llm"])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_truncation_meets_budget(init, ratio):
    model = tiny_bert()
    batches = text_batches(2)
    compress_to_budget(model, TuneCompConfig(target_ratio=ratio, init=init),
                       calibration=batches if init != "svd" else None)
    report = compression_report(model)
    assert report.params_after <= math.floor(ratio * report.params_before)
    assert report.params_before - report.params_after >= 0
    lowrank = [m for m in model.modules() if isinstance(m, MaskedLowRankLinear)]
    assert all(m.teacher_weight is None and not m.mask.requires_grad for m in lowrank)
    assert torch.isfinite(model(**batches[0]).logits).all()


def test_truncation_is_plain_svd_at_the_allocated_rank():
    model = block_net()
    original = model.blocks[0].up.weight.detach().clone()
    compress_to_budget(model, TuneCompConfig(target_ratio=0.5), forward=forward_x)
    layer = model.blocks[0].up
    P, S, Qh = torch.linalg.svd(original.double(), full_matrices=False)
    k = layer.rank
    best = (P[:, :k] * S[:k]) @ Qh[:k]
    torch.testing.assert_close(layer.weight.double(), best, rtol=1e-5, atol=1e-5)


def test_allocate_ranks_keeps_large_singular_values():
    infos = {"a": TargetInfo("a", 10, 10, True, "linear"),
             "b": TargetInfo("b", 10, 10, True, "linear")}
    sigma = {"a": torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0.5], dtype=torch.float64),
             "b": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05],
                               dtype=torch.float64)}
    ranks = allocate_ranks(sigma, infos, TuneCompConfig(target_ratio=0.4))
    assert sum(k * 20 for k in ranks.values()) <= 80
    assert ranks["a"] == 3 and ranks["b"] == 1  # min_rank keeps one in b


def test_dense_layers_keep_their_original_weight():
    model = tiny_gpt2()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if type(m).__name__ == "Conv1D"}
    compress_to_budget(model, TuneCompConfig(target_ratio=0.95))
    report = compression_report(model)
    dense = [r.name for r in report.layers if r.kind == "dense"]
    assert dense
    for name in dense:
        assert torch.equal(model.get_submodule(name).weight, before[name])


def test_finetune_then_compress(tmp_path):
    model = tiny_bert()
    batches = text_batches(4)
    cfg = TuneCompConfig(target_ratio=0.4, init="svd_llm", total_steps=4, blend_steps=2)
    result = finetune_then_compress(model, cfg, adam, batches, calibration=batches[:2])
    assert result.history.steps == 4
    assert result.report.within_budget
    save_compressed(model, tmp_path / "a")
    loaded = load_compressed(tmp_path / "a")
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, model(**batches[0]).logits)


def test_compress_then_finetune_and_joint_share_steps_and_budget():
    batches = vector_batches(6)
    cfg = TuneCompConfig(target_ratio=0.3, init="asvd", total_steps=6, blend_steps=3)
    calib = [b[0] for b in batches[:2]]
    seq = compress_then_finetune(block_net(), cfg, adam, batches, calibration=calib,
                                 loss_fn=ce_loss, forward=forward_x)
    joint = run_tunecomp(block_net(), cfg, adam, batches, calibration=calib, loss_fn=ce_loss,
                         forward=forward_x)
    dense_first = finetune_then_compress(block_net(), cfg, adam, batches, calibration=calib,
                                         loss_fn=ce_loss, forward=forward_x)
    for result in (seq, joint, dense_first):
        assert result.history.steps == 6
        assert result.report.params_before == joint.report.params_before
        assert result.report.params_after <= math.floor(0.3 * result.report.params_before)
        assert result.wall_time > 0


def test_baseline_errors():
    with pytest.raises(ValueError, match="init='asvd' needs calibration data"):
        compress_to_budget(block_net(), TuneCompConfig(init="asvd"))
    with pytest.raises(ValueError, match="dense_fraction must be in"):
        finetune_then_compress(block_net(), TuneCompConfig(), adam, vector_batches(1),
                               dense_fraction=2.0)
