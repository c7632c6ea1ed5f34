"""model.save_pretrained on a TuneComp model never writes a checkpoint that plain
transformers loads with random low-rank layers."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TextRows, text_batches, tiny_bert, tiny_gpt2

from tunecomp_kernels.compress import (
    TuneCompConfig,
    compress_to_budget,
    finalize,
    guard_save_pretrained,
    load_compressed,
    merge_and_unload,
    prepare,
    read_metadata,
    save_compressed,
)
from tunecomp_kernels.compress.hf_format import GUARD_ATTR

transformers = pytest.importorskip("transformers")


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def test_unguarded_save_pretrained_is_the_trap_the_guard_closes(tmp_path):
    # Why the guard exists: plain save_pretrained + plain from_pretrained "works" and
    # silently re-initialises the low-rank layers.
    model = compress_to_budget(tiny_bert(), TuneCompConfig(target_ratio=0.4)).eval()
    type(model).save_pretrained(model, tmp_path / "plain")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "plain").eval()
    got = reloaded.bert.encoder.layer[0].attention.self.query.weight
    want = model.bert.encoder.layer[0].attention.self.query.weight  # U·diag(mask)·V
    assert not torch.allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_guarded_finalized_model_writes_the_loadable_directory(make, tmp_path):
    model = guard_save_pretrained(
        compress_to_budget(make(), TuneCompConfig(target_ratio=0.4)).eval())
    model.save_pretrained(tmp_path / "m")
    meta = read_metadata(tmp_path / "m")
    assert {"config.json", "modeling_tunecomp.py"} <= set(meta["files"])
    batch = text_batches(1)[0]
    assert torch.equal(_logits(load_compressed(tmp_path / "m"), batch), _logits(model, batch))
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoConfig.from_pretrained(tmp_path / "m", trust_remote_code=False)
    model.save_pretrained(tmp_path / "m")  # again: replaces its own files
    with pytest.raises(ValueError, match="save_compressed"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_guarded_model_in_training_writes_a_resumable_but_refused_checkpoint(tmp_path):
    model = tiny_bert()
    prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=2, total_steps=4))
    guard_save_pretrained(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "tunecomp_unfinalized_checkpoint"
    assert "save_compressed" in config["tunecomp_note"]
    with pytest.raises(ValueError):  # "Unrecognized model": not a random dense BERT
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    # What a Trainer resume does: the weights load back into the prepared model.
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in state)


def test_guard_is_idempotent_and_merge_removes_it(tmp_path):
    model = compress_to_budget(tiny_bert(), TuneCompConfig(target_ratio=0.4))
    assert guard_save_pretrained(guard_save_pretrained(model)) is model
    finalize(model)
    merge_and_unload(model)
    assert not hasattr(model, GUARD_ATTR) and "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path / "dense")
    assert not (tmp_path / "dense" / "tunecomp.json").exists()
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "dense").eval()
    batch = text_batches(1)[0]
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model.eval(), batch))


def test_guard_leaves_models_without_save_pretrained_alone():
    net = torch.nn.Linear(2, 2)
    assert guard_save_pretrained(net) is net and not hasattr(net, GUARD_ATTR)


def test_prepare_truncation_and_loading_guard_save_pretrained(tmp_path):
    model = tiny_bert()
    prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=2, total_steps=4))
    assert getattr(model, GUARD_ATTR, False)
    truncated = compress_to_budget(tiny_bert(), TuneCompConfig(target_ratio=0.4))
    assert getattr(truncated, GUARD_ATTR, False)
    save_compressed(truncated.eval(), tmp_path / "saved")
    assert getattr(load_compressed(tmp_path / "saved"), GUARD_ATTR, False)


def test_guarded_model_pickles_and_copies(tmp_path):
    import copy
    import io

    model = guard_save_pretrained(
        compress_to_budget(tiny_bert(), TuneCompConfig(target_ratio=0.4)).eval())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        twin.save_pretrained(tmp_path / "twin")  # the copy's own guard, writing the copy
        assert read_metadata(tmp_path / "twin")["files"]
        assert twin.save_pretrained.args[0] is twin


def test_guard_on_a_full_rank_model_without_teacher_writes_a_refused_checkpoint(tmp_path):
    # Teacher gone but ranks not yet pruned: save_compressed refuses it (not finalized),
    # so the guard must neither raise (Trainer checkpoints) nor write a loadable dense model.
    model = tiny_bert()
    prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=2, total_steps=4))
    for layer in model.modules():
        if hasattr(layer, "drop_teacher"):
            layer.drop_teacher()
    guard_save_pretrained(model).save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "tunecomp_unfinalized_checkpoint"


def test_guarded_save_on_other_ranks_writes_nothing(tmp_path):
    model = guard_save_pretrained(
        compress_to_budget(tiny_bert(), TuneCompConfig(target_ratio=0.4)))
    assert model.save_pretrained(tmp_path / "m", is_main_process=False) is None
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers.Trainer needs accelerate")
def test_trainer_checkpoints_of_a_guarded_model_resume(tmp_path):
    from tunecomp_kernels.integrations.hf_trainer import TuneCompCallback

    cfg = TuneCompConfig(target_ratio=0.4, blend_steps=3, total_steps=4)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-3, report_to="none", save_strategy="steps", save_steps=2,
        logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        seed=0)
    runs = []
    for resume in (None, str(tmp_path / "out" / "checkpoint-2")):
        model = tiny_bert()
        controller = prepare(model, cfg)
        guard_save_pretrained(model)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=TextRows(),
                                       callbacks=[TuneCompCallback(controller)])
        trainer.train(resume_from_checkpoint=resume)
        runs.append(controller)
        ckpt = json.loads((tmp_path / "out" / "checkpoint-2" / "config.json").read_text())
        assert ckpt["model_type"] == "tunecomp_unfinalized_checkpoint"
    assert runs[1].step_count == 4
    assert all(torch.equal(runs[1].alive_masks()[k], v)
               for k, v in runs[0].alive_masks().items())
