"""save_compressed / load_compressed: exact round trips, atomic writes, clear errors."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from tiny_models import (
    block_net,
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

import tunecomp_kernels.compress.export as export_mod
from tunecomp_kernels import MaskedLowRankLinear
from tunecomp_kernels.compress import (
    TuneCompConfig,
    compress_to_budget,
    compression_report,
    finalize,
    load_compressed,
    prepare,
    read_metadata,
    save_compressed,
    train,
)


def compressed(make_model, batches, ratio=0.4, forward=None, loss_fn=None, steps=3):
    model = make_model()
    cfg = TuneCompConfig(target_ratio=ratio, blend_steps=2, total_steps=steps)
    kwargs = {} if forward is None else {"forward": forward}
    controller = prepare(model, cfg, **kwargs)
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batches,
          controller=controller, loss_fn=loss_fn)
    finalize(model)
    return model.eval()


HF = {
    "bert": (tiny_bert, lambda: text_batches(3)),
    "gpt2": (tiny_gpt2, lambda: text_batches(3, classes=None)),
    "llama": (tiny_llama, lambda: text_batches(3, classes=None)),
    "vit": (tiny_vit, lambda: image_batches(3)),
}


@pytest.mark.parametrize("arch", list(HF))
def test_hf_round_trip_from_config_alone(arch, tmp_path):
    make_model, make_batches = HF[arch]
    batches = make_batches()
    model = compressed(make_model, batches)
    out = save_compressed(model, tmp_path / "saved")
    assert {"model.safetensors", "tunecomp.json"} <= set(os.listdir(out))
    loaded = load_compressed(out)
    assert type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, model(**batches[0]).logits)
    assert compression_report(loaded).to_dict() == compression_report(model).to_dict()
    assert loaded.tunecomp_config == model.tunecomp_config
    meta = read_metadata(out)
    # a model saved before plan_dense existed was made with every layer converted
    old = json.loads((out / "tunecomp.json").read_text())
    del old["tunecomp_config"]["plan_dense"]
    (out / "tunecomp.json").write_text(json.dumps(old))
    assert load_compressed(out).tunecomp_config.plan_dense is False
    assert meta["hf_model"]["class"] == type(model).__name__
    ranks = {n: e["rank"] for n, e in meta["layers"].items() if e["kind"] == "lowrank"}
    assert ranks and all(loaded.get_submodule(n).rank == r for n, r in ranks.items())
    # a saved model is genuinely smaller on disk than the parameters it replaced
    assert compression_report(loaded).params_after < compression_report(loaded).params_before


def test_gpt2_dense_layers_come_back_as_conv1d(tmp_path):
    batches = text_batches(3, classes=None)
    model = compressed(tiny_gpt2, batches, ratio=0.9)
    report = compression_report(model)
    dense = [r.name for r in report.layers if r.kind == "dense"]
    assert dense, "expected some layers to stay dense at 90%"
    assert all(type(model.get_submodule(n)).__name__ == "Conv1D" for n in dense)
    loaded = load_compressed(save_compressed(model, tmp_path / "g"))
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, model(**batches[0]).logits)
    # tied input/output embeddings stay tied and are stored once
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert read_metadata(tmp_path / "g")["tied"] == {"lm_head.weight": "transformer.wte.weight"}


def test_plain_module_round_trip_needs_model(tmp_path):
    batches = vector_batches(3)
    model = compressed(block_net, batches, forward=forward_x, loss_fn=ce_loss)
    save_compressed(model, tmp_path / "net")
    with pytest.raises(ValueError, match="pass model="):
        load_compressed(tmp_path / "net")
    loaded = load_compressed(tmp_path / "net", model=block_net(seed=123))
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert any(isinstance(m, MaskedLowRankLinear) for m in loaded.modules())


def test_mismatching_base_model_changes_nothing(tmp_path):
    model = compressed(block_net, vector_batches(3), forward=forward_x, loss_fn=ce_loss)
    save_compressed(model, tmp_path / "net")
    files_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "net").iterdir()}

    other = block_net(width=16)  # same names, other shapes
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"base model mismatch: 'blocks\.0\.\w+' has \(in, out\)"):
        load_compressed(tmp_path / "net", model=other)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    assert not any(isinstance(m, MaskedLowRankLinear) for m in other.modules())

    shallow = block_net(depth=1)  # a missing layer
    with pytest.raises(ValueError, match="base model mismatch: it has no module 'blocks.1"):
        load_compressed(tmp_path / "net", model=shallow)

    class Wider(type(block_net())):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(3, 3)

    wider = Wider()  # layers match but the state dict has an extra entry
    with pytest.raises(ValueError, match=r"base model mismatch: missing \['extra.bias'"):
        load_compressed(tmp_path / "net", model=wider)
    assert isinstance(wider.blocks[0].up, torch.nn.Linear)  # rolled back
    assert not hasattr(wider.blocks[0].up, "tunecomp_info")
    with pytest.raises(ValueError, match="already holds TuneComp layers"):
        load_compressed(tmp_path / "net", model=model)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "net").iterdir()} == files_before


def test_missing_and_corrupt_files(tmp_path):
    model = compressed(block_net, vector_batches(3), forward=forward_x, loss_fn=ce_loss)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_compressed(tmp_path / "nowhere", model=block_net())
    good = save_compressed(model, tmp_path / "good")

    broken = tmp_path / "no_weights"
    broken.mkdir()
    (broken / "tunecomp.json").write_text((good / "tunecomp.json").read_text())
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_compressed(broken, model=block_net())

    bad_json = save_compressed(model, tmp_path / "bad_json")
    (bad_json / "tunecomp.json").write_text("{not json")
    with pytest.raises(ValueError, match="tunecomp.json is corrupt"):
        load_compressed(bad_json, model=block_net())

    wrong = save_compressed(model, tmp_path / "wrong")
    (wrong / "tunecomp.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a TuneComp model description"):
        load_compressed(wrong, model=block_net())

    bad_weights = save_compressed(model, tmp_path / "bad_weights")
    (bad_weights / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    target = block_net()
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        load_compressed(bad_weights, model=target)
    assert not any(isinstance(m, MaskedLowRankLinear) for m in target.modules())


def test_save_refuses_unfinalized_models(tmp_path):
    model = block_net()
    prepare(model, TuneCompConfig(target_ratio=0.4), forward=forward_x)
    with pytest.raises(ValueError, match="call finalize"):
        save_compressed(model, tmp_path / "x")
    with pytest.raises(ValueError, match="no TuneComp layers"):
        save_compressed(block_net(), tmp_path / "y")
    assert not os.listdir(tmp_path)


def test_save_is_atomic_and_never_clobbers(tmp_path, monkeypatch):
    batches = vector_batches(3)
    first = compressed(block_net, batches, ratio=0.5, forward=forward_x, loss_fn=ce_loss)
    second = compressed(block_net, batches, ratio=0.3, forward=forward_x, loss_fn=ce_loss)
    dest = save_compressed(first, tmp_path / "model")
    good_json = (dest / "tunecomp.json").read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(second, dest)
    monkeypatch.undo()
    assert (dest / "tunecomp.json").read_text() == good_json
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary directory left
    with torch.no_grad():
        x = batches[0][0]
        assert torch.equal(load_compressed(dest, model=block_net())(x), first(x))

    save_compressed(second, dest)  # replacing a previous export is fine
    assert sorted(os.listdir(tmp_path)) == ["model"]
    with torch.no_grad():
        assert torch.equal(load_compressed(dest, model=block_net())(x), second(x))

    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_compressed(second, unrelated)
    assert os.listdir(unrelated) == ["cat.jpg"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_compressed(second, a_file)


# --- the given base model must compute like the saved one's -------------------------------


def _saved_truncated(make_model, tmp_path):
    model = compress_to_budget(make_model(), TuneCompConfig(target_ratio=0.5))
    return model.eval(), save_compressed(model, tmp_path / "saved")


def _rebuilt(make_model, **changes):
    """``make_model()``'s architecture with config fields changed (dict values are merged
    into the nested config, e.g. rope parameters)."""
    config = make_model().config.to_dict()
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    model = make_model()
    return type(model)(type(model.config).from_dict(config))


CONFIG_CHANGES = [
    ("bert", {"hidden_act": "relu"}, "hidden_act: saved gelu, given relu"),
    ("bert", {"layer_norm_eps": 1e-5}, "layer_norm_eps: saved 1e-12, given 1e-05"),
    ("bert", {"num_attention_heads": 2}, "num_attention_heads: saved 4, given 2"),
    ("bert", {"type_vocab_size": 3}, "type_vocab_size: saved 2, given 3"),
    ("gpt2", {"activation_function": "relu"}, "activation_function: saved gelu_new, given relu"),
    ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights: saved True, given False"),
    ("llama", {"rms_norm_eps": 1e-5}, "rms_norm_eps: saved 1e-06, given 1e-05"),
    ("llama", {"rope_parameters": {"rope_theta": 500000.0}},
     "rope_parameters.rope_theta: saved 10000.0, given 500000.0"),
    # k/v shapes change too: the shape error comes first, with the config field after it
    ("llama", {"num_key_value_heads": 4}, "num_key_value_heads: saved 2, given 4"),
    ("vit", {"qkv_bias": False}, "qkv_bias: saved True, given False"),
]


@pytest.mark.parametrize("arch, changes, message", CONFIG_CHANGES,
                         ids=[f"{a}-{next(iter(c))}" for a, c, _ in CONFIG_CHANGES])
def test_load_refuses_a_base_model_with_another_config(arch, changes, message, tmp_path):
    make_model = HF[arch][0]
    _, path = _saved_truncated(make_model, tmp_path)
    files_before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()}
    other = _rebuilt(make_model, **changes)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    config_before = other.config.to_dict()
    with pytest.raises(ValueError, match=r"^base model mismatch: (.*; )?" + re.escape(message)):
        load_compressed(path, model=other)
    assert not any(isinstance(m, MaskedLowRankLinear) for m in other.modules())
    assert state.keys() == other.state_dict().keys()
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    assert other.config.to_dict() == config_before
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()} == files_before


def test_load_ignores_config_fields_that_do_not_change_the_computation(tmp_path):
    model, path = _saved_truncated(tiny_bert, tmp_path)
    batch = text_batches(1)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    given = _rebuilt(tiny_bert, output_hidden_states=True, use_cache=False,
                     id2label={0: "neg", 1: "neu", 2: "pos"},
                     label2id={"neg": 0, "neu": 1, "pos": 2}, problem_type=None,
                     _name_or_path="/somewhere/else", initializer_range=0.5)
    loaded = load_compressed(path, model=given).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)


def test_config_differences_lists_every_field_with_dotted_names():
    from tunecomp_kernels.compress.base_model import config_differences

    saved = {"a": 1, "dtype": "float32", "rope": {"theta": 1.0, "type": "x"}, "only_saved": 2}
    given = {"a": 2, "dtype": "bfloat16", "rope": {"theta": 1.0, "type": "y"}}
    assert config_differences(saved, given) == [
        ("a", 1, 2), ("only_saved", 2, "<absent>"), ("rope.type", "x", "y")]


def _encoder(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = {"d_model": 16, "nhead": 2, "dim_feedforward": 32, "dropout": 0.0,
                "batch_first": True, **kwargs}
    return torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(**settings), 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"activation": "gelu"}, r"layers\.0\.activation: saved torch\.nn\.functional\.relu, "
                             r"given torch\..*gelu"),
    ({"layer_norm_eps": 1e-6}, r"layers\.0\.norm1\.eps: saved 1e-05, given 1e-06"),
    ({"nhead": 4}, r"layers\.0\.self_attn\.head_dim: saved 8, given 4"),
    ({"norm_first": True}, r"layers\.0\.norm_first: saved False, given True"),
    ({"dropout": 0.1}, r"layers\.0\.dropout\.p: saved 0\.0, given 0\.1"),
], ids=["activation", "eps", "heads", "norm_first", "dropout"])
def test_load_refuses_a_plain_model_with_other_hyperparameters(kwargs, message, tmp_path):
    """A model without a config: the saved modules' hyperparameters are compared, so a
    model with every tensor shape equal but another function is refused."""
    with pytest.warns(UserWarning, match="out_proj"):
        model = compress_to_budget(_encoder(), TuneCompConfig(target_ratio=0.5))
    path = save_compressed(model.eval(), tmp_path / "enc")
    files_before = {p: p.read_bytes() for p in path.iterdir()}
    other = _encoder(**kwargs)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="^base model mismatch: .*" + message):
        load_compressed(path, model=other)
    assert not any(isinstance(m, MaskedLowRankLinear) for m in other.modules())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    assert {p: p.read_bytes() for p in path.iterdir()} == files_before
    x = torch.randn(2, 5, 16)
    loaded = load_compressed(path, model=_encoder()).eval()  # the same architecture loads
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def _mlp(*acts: type[torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 16), acts[0](), torch.nn.Linear(16, 8), *(a() for a in acts[1:])]
    return torch.nn.Sequential(*layers)


def test_load_refuses_a_plain_model_with_other_parameterless_modules(tmp_path):
    model = compress_to_budget(_mlp(torch.nn.ReLU), TuneCompConfig(target_ratio=0.5))
    path = save_compressed(model, tmp_path / "mlp")
    with pytest.raises(ValueError, match=r"^base model mismatch: 1\.class: saved ReLU, given GELU"):
        load_compressed(path, model=_mlp(torch.nn.GELU))
    with pytest.raises(ValueError, match=r"^base model mismatch: 3: saved <absent>, given"):
        load_compressed(path, model=_mlp(torch.nn.ReLU, torch.nn.Tanh))
    x = torch.randn(3, 8)
    torch.testing.assert_close(load_compressed(path, model=_mlp(torch.nn.ReLU))(x), model(x),
                               rtol=0, atol=0)


def test_run_state_of_user_modules_is_not_compared(tmp_path):
    model = compressed(block_net, vector_batches(3), forward=forward_x, loss_fn=ce_loss)
    model.blocks[0].calls = 17  # an attribute of a user-defined class: not a hyperparameter
    save_compressed(model, tmp_path / "net")
    x = torch.randn(2, 8)
    loaded = load_compressed(tmp_path / "net", model=block_net(seed=9))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
