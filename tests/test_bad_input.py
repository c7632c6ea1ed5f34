"""Bad input at every public entry point gets an exception that names the problem.

Complements ``test_errors.py`` (op shapes/dtypes/devices, module sizes, ``from_linear``),
``test_compress_config.py`` (every config field), ``test_compress_models.py`` (no matching
module, missing or empty calibration) and ``test_compress_export.py`` (missing or corrupt
files, mismatching plain models): the cases here are the ones those do not cover. Corrupt
and truncated checkpoints are in ``test_checkpoint_resume.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_inputs
from tiny_models import (
    block_net,
    forward_x,
    tiny_bert,
    vector_batches,
)
from torch import nn

from tunecomp_kernels import MaskedLowRankLinear, masked_lowrank_linear
from tunecomp_kernels.compress import (
    TuneCompConfig,
    TuneCompController,
    finalize,
    load_compressed,
    prepare,
    save_compressed,
    train,
)

# --- the op ----------------------------------------------------------------------------


def op_call(**overrides):
    inputs = make_inputs((3,), 8, 6, 4, torch.float32)
    inputs.pop("teacher_weight"), inputs.pop("teacher_bias")
    kwargs = {k: overrides.pop(k) for k in ("teacher_scale", "student_scale", "backend")
              if k in overrides}
    inputs.update(overrides)
    return masked_lowrank_linear(inputs["x"], inputs["U"], inputs["mask"], inputs["V"],
                                 inputs["bias"], **kwargs)


@pytest.mark.parametrize(("overrides", "exc", "message"), [
    ({"x": None}, TypeError, "x must be a torch.Tensor, got NoneType"),
    ({"V": None}, TypeError, "V must be a torch.Tensor, got NoneType"),
    ({"mask": torch.ones(4, dtype=torch.int32)}, ValueError,
     "dtype mismatch: .*mask=int32"),
    ({"student_scale": "1"}, TypeError, "student_scale must be a float, got str"),
    ({"backend": 3}, TypeError, r"backend must be a str, got int \(3\)"),
], ids=["x_none", "V_none", "int_mask", "scale_str", "backend_int"])
def test_op(overrides, exc, message):
    with pytest.raises(exc, match=message):
        op_call(**overrides)


# --- the module ------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "exc", "message"), [
    (lambda: MaskedLowRankLinear(8, 6, 2, dtype=torch.int64), ValueError,
     "dtype must be float16, bfloat16, float32 or float64, got torch.int64"),
    (lambda: MaskedLowRankLinear(8, 6, 2, backend="fast"), ValueError,
     r"unknown backend 'fast'; choose 'auto' or one of \["),
    (lambda: MaskedLowRankLinear(8, 6, True), TypeError, "rank must be an int, got bool"),
    (lambda: MaskedLowRankLinear(8, 6, 2)(torch.randn(2, 8, dtype=torch.float16)),
     ValueError, "dtype mismatch: .*x=float16, U=float32"),
    (lambda: MaskedLowRankLinear(8, 6, 2)([[1.0] * 8]), TypeError,
     "x must be a torch.Tensor, got list"),
    (lambda: MaskedLowRankLinear.from_linear(nan_linear()), ValueError,
     r"linear.weight \[3, 4\] has 1 NaN/inf values"),
    (lambda: MaskedLowRankLinear.from_linear(nn.Linear(4, 3), 2, init="asvd",
                                             input_abs_mean=torch.ones(5)), ValueError,
     r"input_abs_mean must have shape \[4\] .* got \[5\]"),
    (lambda: MaskedLowRankLinear.from_linear(nn.Linear(4, 3), 2, init="svd_llm",
                                             gram=torch.eye(3)), ValueError,
     r"gram must have shape \[4, 4\] .* got \[3, 3\]"),
], ids=["int_dtype", "unknown_backend", "bool_rank", "input_dtype", "input_list",
        "nan_weight", "asvd_stat_shape", "gram_shape"])
def test_module(make, exc, message):
    with pytest.raises(exc, match=message):
        make()


def nan_linear() -> nn.Linear:
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight[1, 2] = float("nan")
    return linear


# --- config ----------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "exc", "message"), [
    (lambda: TuneCompConfig(backend="fast"), ValueError, "unknown backend 'fast'"),
    (lambda: TuneCompConfig(backend=None), TypeError, "backend must be a str, got NoneType"),
    (lambda: TuneCompConfig.from_dict("target_ratio=0.5"), TypeError,
     "from_dict expects a dict, got str"),
], ids=["unknown_backend", "backend_none", "from_dict_str"])
def test_config(make, exc, message):
    with pytest.raises(exc, match=message):
        make()


# --- prepare ---------------------------------------------------------------------------


def poisoned(where: str) -> nn.Module:
    model = block_net()
    with torch.no_grad():
        if where == "weight":
            model.blocks[1].down.weight[0, 0] = float("nan")
        else:
            model.blocks[0].up.bias[3] = float("-inf")
    return model


@pytest.mark.parametrize(("call", "exc", "message"), [
    (lambda: prepare(poisoned("weight"), TuneCompConfig(), forward=forward_x), ValueError,
     r"layer 'blocks.1.down': weight \[24, 48\] has 1 NaN/inf value"),
    (lambda: prepare(poisoned("bias"), TuneCompConfig(), forward=forward_x), ValueError,
     r"layer 'blocks.0.up': bias \[48\] has 1 NaN/inf value"),
    (lambda: prepare(block_net(), TuneCompConfig(init="asvd"), calibration={"x": 1}),
     TypeError, "got a single dict; wrap one batch in a list"),
    (lambda: prepare(block_net(), TuneCompConfig(init="asvd"),
                     calibration=[torch.randn(2, 5)]),
     ValueError, r"calibration batch 0 \(Tensor\) does not fit the model: RuntimeError"),
    (lambda: prepare(block_net(), TuneCompConfig(init="asvd"),
                     calibration=[torch.randn(2, 8), torch.full((2, 8), float("nan"))]),
     ValueError, "the calibration inputs of layer 'blocks.0.up' contain NaN/inf"),
    (lambda: prepare("bert-base-uncased", TuneCompConfig()), TypeError,
     "model must be an nn.Module, got str"),
    (lambda: prepare(nn.Sequential(nn.Linear(16, 1)), TuneCompConfig()), ValueError,
     "no module of Sequential matches the selection"),  # a 16->1 layer cannot shrink
], ids=["nan_weight", "inf_bias", "single_batch", "mismatched_calibration",
        "nan_calibration", "model_str", "nothing_compressible"])
def test_prepare(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_prepare_leaves_a_poisoned_model_untouched():
    model = poisoned("weight")
    with pytest.raises(ValueError, match="NaN/inf"):
        prepare(model, TuneCompConfig(), forward=forward_x)
    assert not any(isinstance(m, MaskedLowRankLinear) for m in model.modules())


# --- controller ------------------------------------------------------------------------


@pytest.fixture
def prepared():
    model = block_net()
    return model, prepare(model, TuneCompConfig(target_ratio=0.5, init_rank_ratio=1.0),
                          forward=forward_x)


def test_controller_rejects_layers_not_made_by_prepare(prepared):
    model, controller = prepared
    with pytest.raises(TypeError, match=r"layer 'x' \(Linear\) is not a layer made by prepare"):
        TuneCompController(model, {"x": nn.Linear(4, 4)}, controller.config)
    with pytest.raises(TypeError, match="config must be a TuneCompConfig, got dict"):
        TuneCompController(model, controller.layers, {"target_ratio": 0.5})
    with pytest.raises(ValueError, match="needs at least one layer"):
        TuneCompController(model, {}, controller.config)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("alive"), r"state is incomplete: missing \['alive'\]"),
    (lambda s: s.update(step="3"), "'step' must be a int, got str"),
    (lambda s: s["alive"].update({"blocks.0.up": [True] * 24}),
     "entry 'blocks.0.up' is not a tensor"),
    (lambda s: s["alive"].update({"blocks.0.up": torch.ones(7, dtype=torch.bool)}),
     r"layer 'blocks.0.up': checkpoint alive flags \[7\] != model rank \[24\]"),
    (lambda s: s["activation_rms"].update({"ghost": torch.ones(3)}),
     r"statistics for unknown layers \['ghost'\]"),
], ids=["missing_key", "wrong_type", "not_a_tensor", "wrong_rank", "unknown_layer"])
def test_controller_state(prepared, edit, message):
    _, controller = prepared
    state = controller.state_dict()
    edit(state)
    before = controller.alive_masks()
    with pytest.raises(ValueError, match=message):
        controller.load_state_dict(state)
    assert all(torch.equal(v, controller.alive_masks()[k]) for k, v in before.items())


# --- finalize, save --------------------------------------------------------------------


def test_finalize_and_save_want_a_module(tmp_path):
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        finalize("model")
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        save_compressed({"weight": torch.ones(2)}, tmp_path / "out")
    assert not list(tmp_path.iterdir())


# --- train -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "exc", "message"), [
    ({"optimizer": None}, TypeError, "optimizer must be a torch.optim.Optimizer, got NoneType"),
    ({"steps": -1}, ValueError, "steps must be >= 0, got -1"),
    ({"checkpoint_every": 5}, ValueError, "pass checkpoint_dir and checkpoint_every together"),
    ({"checkpoint_dir": "DIR", "checkpoint_every": 0}, ValueError,
     "checkpoint_every must be >= 1, got 0"),
    ({"resume": True}, ValueError, "resume=True needs checkpoint_dir"),
    ({"checkpoint_dir": "FILE", "checkpoint_every": 2}, NotADirectoryError,
     "exists and is not a directory"),
    ({"batches": {"x": torch.ones(2, 8)}}, TypeError,
     "got a single dict; wrap one batch in a list"),
    ({"batches": 7}, TypeError, "batches must be an iterable of batches, got int"),
], ids=["optimizer_none", "negative_steps", "every_without_dir", "every_zero",
        "resume_without_dir", "dir_is_a_file", "single_batch", "batches_int"])
def test_train(tmp_path, prepared, kwargs, exc, message):
    model, controller = prepared
    (tmp_path / "FILE").write_text("x")
    kwargs = {k: (str(tmp_path / v) if v in ("DIR", "FILE") else v) for k, v in kwargs.items()}
    args = {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
            "batches": vector_batches(2), **kwargs}
    with pytest.raises(exc, match=message):
        train(model, args.pop("optimizer"), args.pop("batches"), controller=controller,
              forward=forward_x, loss_fn=lambda out, b: out.sum(), **args)
    assert controller.step_count == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


# --- load_compressed: broken descriptions, mismatching base models ----------------------


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory):
    torch.set_num_threads(1)
    model = tiny_bert()
    prepare(model, TuneCompConfig(target_ratio=0.4, blend_steps=0, total_steps=1))
    finalize(model)
    return save_compressed(model, tmp_path_factory.mktemp("bert") / "model")


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "tunecomp.json").read_text())
    edit(meta)
    (dst / "tunecomp.json").write_text(json.dumps(meta))
    return dst


def first_layer(meta: dict) -> dict:
    return meta["layers"][next(iter(meta["layers"]))]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: first_layer(m).pop("in_features"), "has a missing or invalid 'in_features'"),
    (lambda m: first_layer(m).update(kind="lowrank", rank=999), r"has rank 999, expected an "
                                                                r"int in \[1, 32\]"),
    (lambda m: first_layer(m).update(kind="sparse"), "has unknown kind 'sparse'"),
    (lambda m: m.update(dtype="float17"), "unknown dtype 'float17'"),
    (lambda m: m["hf_model"].pop("config"), "'hf_model' must hold 'module', 'class' and"),
    (lambda m: m.update(layers={"encoder.layer.0": "lowrank"}), "is described by a str"),
], ids=["missing_field", "rank_too_large", "unknown_kind", "unknown_dtype", "hf_no_config",
        "entry_not_object"])
def test_broken_description(saved_bert, tmp_path, edit, message):
    path = edited_copy(saved_bert, tmp_path / "copy", edit)
    before = tree_digest(path)
    with pytest.raises(ValueError, match=message):
        load_compressed(path)
    assert tree_digest(path) == before


@pytest.mark.parametrize(("make_base", "message"), [
    (lambda: tiny_bert(hidden=48), r"base model mismatch: '.*' has \(in, out\)=\(48, 48\), "
                                   r"the saved model \(32, 32\)"),
    (lambda: tiny_bert(layers=1), "base model mismatch: it has no module 'bert.encoder.layer.1"),
], ids=["wider", "shallower"])
def test_mismatching_base_config_changes_nothing(saved_bert, make_base, message):
    before = tree_digest(saved_bert)
    base = make_base()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_compressed(saved_bert, model=base)
    assert tree_digest(saved_bert) == before  # loading never writes
    after = base.state_dict()
    assert sorted(after) == sorted(state)
    assert all(torch.equal(v, after[k]) for k, v in state.items())


def test_saved_config_that_disagrees_with_the_weights(saved_bert, tmp_path):
    """A description whose HF config was edited (wider model) no longer fits the weights."""
    path = edited_copy(saved_bert, tmp_path / "edited",
                       lambda m: m["hf_model"]["config"].update(vocab_size=80))
    before = tree_digest(path)
    with pytest.raises(ValueError, match=r"base model mismatch: shape mismatch at "
                                         r"'bert.embeddings.word_embeddings.weight'"):
        load_compressed(path)
    assert tree_digest(path) == before


def test_missing_model_points_at_the_backup_of_an_interrupted_save(saved_bert, tmp_path):
    shutil.copytree(saved_bert, tmp_path / ".model.old-1234abcd")  # what a crash leaves
    with pytest.raises(FileNotFoundError, match=r"interrupted save left the previous model at "
                                                r".*\.model\.old-1234abcd"):
        load_compressed(tmp_path / "model")


# --- the CLI (tunecomp compress) ---------------------------------------------------------


def cli_compress_exists() -> bool:
    try:
        from tunecomp_kernels import cli

        cli.build_parser()
    except Exception:
        return False
    return "compress" in cli._COMMANDS


needs_cli = pytest.mark.skipif(not cli_compress_exists(), reason="no `tunecomp compress` yet")


def run_cli(argv: list[str]) -> int:
    from tunecomp_kernels.cli import main

    try:
        return main(argv)
    except SystemExit as exc:  # argparse errors exit, checks after parsing return 2
        return exc.code


@needs_cli
@pytest.mark.parametrize(("argv", "message"), [
    (["--ratio", "0"], r"--ratio must be in \(0, 1\], got 0.0"),
    (["--ratio", "nan"], r"--ratio must be in \(0, 1\], got nan"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--init", "pca"], "invalid choice: 'pca'"),
    (["--blend", "step"], "invalid choice: 'step'"),
    (["--model", "MISSING"], "--model: directory not found"),
    (["--data", "MISSING"], "--data: file not found"),
    (["--model", "MODEL", "--data", "DATA", "--backend", "fast"], "unknown backend 'fast'"),
], ids=["ratio_zero", "ratio_nan", "steps_zero", "unknown_init", "unknown_blend",
        "missing_model", "missing_data", "unknown_backend"])
def test_cli_compress(tmp_path, capsys, argv, message):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (tmp_path / "data.csv").write_text("text,label\nhi,0\n")
    subst = {"MISSING": str(tmp_path / "missing"), "MODEL": str(model_dir),
             "DATA": str(tmp_path / "data.csv")}
    argv = [subst.get(a, a) for a in argv]
    code = run_cli(["compress", "--output", str(tmp_path / "out"), "--no-progress", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip(), "no message on stderr"
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
