"""Smoke tests of ``bench/e2e.py``'s compiled training methods on the tiny BERT (2 layers,
hidden 64) at batch 2 × 8 tokens, compiled with ``aot_eager`` (Dynamo capture + AOT
autograd, no code generation) to stay cheap; the MiniLM measurement uses Inductor.

Not collected by a plain ``pytest`` (testpaths = tests); run::

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_e2e_smoke.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest.importorskip("transformers")

import e2e  # noqa: E402
from e2e_compile import (  # noqa: E402
    CountingBackend,
    base_method,
    compile_model,
    compile_overhead,
    warm_up,
)

COMPILED = "train_dense_compiled,train_joint_compiled,train_after_compact_compiled"


def test_compiled_methods_mirror_their_eager_method_and_take_ratios():
    specs = e2e.method_specs(_args(["--methods", "train_dense," + COMPILED,
                                    "--init-rank-ratios", "1.0,0.5"]))
    labels = [s["label"] for s in specs]
    assert labels == ["train_dense", "train_dense_compiled", "train_joint_compiled@1",
                      "train_joint_compiled@0.5", "train_after_compact_compiled@1",
                      "train_after_compact_compiled@0.5"]
    assert {s["compile_backend"] for s in specs} == {"inductor"}
    assert base_method("train_joint_compiled") == "train_joint"
    assert base_method("train_joint") == "train_joint"
    with pytest.raises(SystemExit, match="unknown method 'train_joint_bf16_compiled'"):
        e2e.method_specs(_args(["--methods", "train_joint_bf16_compiled"]))


def _args(argv: list[str]):
    """The parsed command line of e2e.py (its parser is built inside main)."""
    captured = {}

    def fake_specs(args):
        captured["args"] = args
        raise SystemExit(0)

    real, e2e.method_specs = e2e.method_specs, fake_specs
    try:
        with pytest.raises(SystemExit):
            e2e.main(argv + ["--model", "tiny"])
    finally:
        e2e.method_specs = real
    return captured["args"]


def test_warm_up_counts_captures_and_rejects_no_steps():
    torch._dynamo.reset()
    lin = torch.nn.Linear(4, 3)
    compiled, counter = compile_model(lin, "aot_eager")
    x = torch.randn(2, 4)

    def step():
        compiled(x).sum().backward()

    info = warm_up(step, counter, steps=2)
    assert info["graphs_after_first_step"] == 1 and info["graphs_after_warmup"] == 1
    assert len(info["warmup_step_s"]) == 2 and min(info["warmup_step_s"]) > 0
    compiled(torch.randn(5, 7, 4)).sum()  # a new input rank: a second capture
    assert counter.graphs == 2
    with pytest.raises(ValueError, match="at least 1 step"):
        warm_up(step, counter, steps=0)
    with pytest.raises(Exception, match="no_such_backend"):
        CountingBackend("no_such_backend")
    torch._dynamo.reset()


def test_compile_overhead_is_the_warmup_beyond_ordinary_steps():
    assert compile_overhead([10.0, 3.0, 1.0, 1.0], 1.0) == pytest.approx(11.0)
    assert compile_overhead([10.0, 3.0, 1.0], 1.0, steps=1) == pytest.approx(9.0)
    assert compile_overhead([4.0], 1.0) == pytest.approx(3.0)  # fewer steps than asked


def test_interleaved_compiled_training_steps(tmp_path):
    out = tmp_path / "e2e.json"
    rc = e2e.main(["--model", "tiny", "--interleaved", "--batch", "2", "--seq", "8",
                   "--train-repeats", "1", "--compile-backend", "aot_eager",
                   "--methods", "train_dense," + COMPILED, "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    train = data["result"]["train"]
    assert list(train) == ["train_dense", "train_dense_compiled", "train_joint_compiled@1",
                           "train_after_compact_compiled@1"]
    assert "compile_s" not in train["train_dense"]
    for label in list(train)[1:]:
        r = train[label]
        assert r["compile_s"] == pytest.approx(
            sum(r["warmup_step_s"]) - 2 * r["median_step_s"]), label
        assert r["compile_s"] > 0 and r["compile_backend"] == "aot_eager", label
        assert r["graphs_after_first_step"] >= 1, label
        assert r["recompiled_while_timed"] == r["graphs_total"] - r["graphs_after_warmup"]
        assert math.isfinite(r["speed_vs_dense"]) and r["speed_vs_dense"] > 0, label
    assert 0 < train["train_joint_compiled@1"]["alpha"] < 1  # the blend is active
    assert (train["train_after_compact_compiled@1"]["trainable_params"]
            < train["train_dense_compiled"]["trainable_params"])
    # the blend's α moved every step without a new graph
    assert train["train_joint_compiled@1"]["recompiled_while_timed"] == 0
    assert data["config"]["compile_backend"] == "aot_eager"


def test_per_process_compiled_training_step(tmp_path):
    out = tmp_path / "e2e.json"
    rc = e2e.main(["--model", "tiny", "--rounds", "1", "--batch", "2", "--seq", "8",
                   "--steps", "2", "--compile-backend", "aot_eager",
                   "--methods", "train_joint_compiled", "--out", str(out)])
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert "error" not in run, run.get("error")
    overhead = sum(run["step_s"][:2]) - 2 * run["median_step_s"]
    assert run["compile_s"] == pytest.approx(overhead) and run["graphs_total"] >= 1
    assert run["tokens_per_s"] > 0


def test_step_profile_splits_the_step_and_bounds_the_speed_up(tmp_path):
    import step_profile

    out = tmp_path / "profile.json"
    assert step_profile.main(["--model", "tiny", "--batch", "2", "--seq", "8", "--steps", "1",
                              "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    seconds = result["seconds"]
    assert {"linear matmuls", "optimizer", "other"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values())
    share = result["linear_share"]
    assert 0 < share < 1
    # Amdahl: linear matmuls at half their cost, the rest unchanged
    assert result["amdahl_bound"] == pytest.approx(1 / (1 - share / 2))


def test_memory_parts_count_saved_activations_once_and_the_state():
    """x saved by two layers is one activation; a parameter saved for backward is not
    one; gradients and AdamW state are what the step allocated."""
    from memory_parts import MIB, saved_activations, state_parts

    model = torch.nn.ModuleDict({"a": torch.nn.Linear(64, 32), "b": torch.nn.Linear(64, 32)})
    x = torch.randn(128, 64, requires_grad=True)
    with saved_activations(model) as saved:
        loss = (model["a"](x) * model["b"](x)).sum()  # the product saves both outputs
    assert saved["activations_mib"] == pytest.approx((128 * 64 + 2 * 128 * 32) * 4 / MIB)
    opt = torch.optim.AdamW(model.parameters())
    loss.backward()
    opt.step()
    parts = state_parts(model, opt)
    params = 2 * (64 * 32 + 32) * 4 / MIB
    assert parts["trainable_params_mib"] == parts["gradients_mib"] == pytest.approx(params)
    assert parts["optimizer_state_mib"] >= 2 * params and parts["buffers_mib"] == 0
