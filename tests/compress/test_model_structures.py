"""Model structures that converting a layer could break: parents that read ``.weight``
directly, tied weights, one module under several names, layers frozen by the user. Each
is handled exactly or left dense / refused with a clear message, never silently.
Also: every model family we can build from a config computes its dense output at step 0."""

from __future__ import annotations

import importlib.util
import math
import warnings

import pytest
import torch
from tiny_models import VOCAB, block_net, forward_x, text_batches, tiny_bert, tiny_gpt2
from torch import nn

from tunecomp_kernels import MaskedLowRankLinear
from tunecomp_kernels.compress import (
    TuneCompConfig,
    compress_to_budget,
    compression_report,
    find_targets,
    prepare,
    train,
)
from tunecomp_kernels.compress.report import count_parameters

transformers = pytest.importorskip("transformers")


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


def _randn(*shape: int, seed: int = 4) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _hf(config_cls: str, model_cls: str, **kwargs):
    def make() -> nn.Module:
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**kwargs)
        return getattr(transformers, model_cls)(config)
    return make


def _torch_encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2)


def _torch_decoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerDecoder(
        nn.TransformerDecoderLayer(16, 2, 32, dropout=0.1, batch_first=True), 2)


def _torch_transformer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Transformer(16, 2, 1, 1, 32, dropout=0.1, batch_first=True)


BLOCKS = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64)
SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
               decoder_ffn_dim=64)
TEXT = lambda: {"input_ids": _ids()}  # noqa: E731

# name: (model builder, batch builder); dropout stays at each family's default (the train
# mode comparison reseeds the RNG, so dropout masks are the same in both runs).
ZOO = {
    "bert": (_hf("BertConfig", "BertModel", max_position_embeddings=32, **BLOCKS), TEXT),
    "roberta": (_hf("RobertaConfig", "RobertaModel", max_position_embeddings=40,
                    pad_token_id=0, **BLOCKS), TEXT),
    "distilbert": (_hf("DistilBertConfig", "DistilBertModel", vocab_size=VOCAB, dim=32,
                       n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32), TEXT),
    "albert": (_hf("AlbertConfig", "AlbertModel", embedding_size=16,
                   max_position_embeddings=32, **BLOCKS), TEXT),
    "gpt2": (_hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2,
                 n_head=4, n_positions=32), TEXT),
    "gpt_neox": (_hf("GPTNeoXConfig", "GPTNeoXModel", max_position_embeddings=32, **BLOCKS),
                 TEXT),
    "opt": (_hf("OPTConfig", "OPTModel", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, ffn_dim=64, max_position_embeddings=32,
                word_embed_proj_dim=32), TEXT),
    "llama": (_hf("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2,
                  max_position_embeddings=32, **BLOCKS), TEXT),
    "mistral": (_hf("MistralConfig", "MistralModel", num_key_value_heads=2,
                    max_position_embeddings=32, **BLOCKS), TEXT),
    "qwen2": (_hf("Qwen2Config", "Qwen2Model", num_key_value_heads=2,
                  max_position_embeddings=32, **BLOCKS), TEXT),
    "t5": (_hf("T5Config", "T5Model", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
               num_layers=2, num_heads=4, decoder_start_token_id=0),
           lambda: {"input_ids": _ids(), "decoder_input_ids": _ids(5)}),
    "bart": (_hf("BartConfig", "BartModel", max_position_embeddings=32, **SEQ2SEQ), TEXT),
    "whisper": (_hf("WhisperConfig", "WhisperModel", num_mel_bins=8, max_source_positions=16,
                    max_target_positions=16, decoder_start_token_id=1, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, **SEQ2SEQ),
                lambda: {"input_features": _randn(2, 8, 32), "decoder_input_ids": _ids()}),
    "vit": (_hf("ViTConfig", "ViTModel", image_size=16, patch_size=8, **{
        k: v for k, v in BLOCKS.items() if k != "vocab_size"}),
        lambda: {"pixel_values": _randn(2, 3, 16, 16)}),
    "clip_vision": (_hf("CLIPVisionConfig", "CLIPVisionModel", hidden_size=32,
                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=16, patch_size=8),
                    lambda: {"pixel_values": _randn(2, 3, 16, 16)}),
    "torch_encoder": (_torch_encoder, lambda: (_randn(2, 5, 16),)),
    "torch_encoder_padded": (_torch_encoder, lambda: {
        "src": _randn(2, 5, 16),
        "src_key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2])}),
    "torch_decoder": (_torch_decoder, lambda: (_randn(2, 5, 16), _randn(2, 6, 16, seed=5))),
    "torch_transformer": (_torch_transformer,
                          lambda: (_randn(2, 6, 16), _randn(2, 5, 16, seed=5))),
}


def _call(model: nn.Module, batch) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(*batch)
    out = out if isinstance(out, torch.Tensor) else out[0]
    pad = batch.get("src_key_padding_mask") if isinstance(batch, dict) else None
    if pad is not None:  # padded positions are undefined (0 on torch's nested-tensor path)
        out = out.masked_fill(pad[..., None], 0.0)
    return out


def _seeded_call(model: nn.Module, batch) -> torch.Tensor:
    torch.manual_seed(7)  # the same dropout masks in the dense and the prepared run
    with torch.no_grad():
        return _call(model, batch)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("family", list(ZOO))
def test_step_zero_output_equals_the_dense_model(family, mode):
    """α = 1, α' = 0 right after prepare: the model must compute its dense output exactly,
    whatever reads the layers (nn.MultiheadAttention and the TransformerEncoderLayer fast
    path read .weight directly)."""
    make_model, make_batch = ZOO[family]
    model = make_model().train(mode == "train")
    batch = make_batch()
    dense = _seeded_call(model, batch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        controller = prepare(model, TuneCompConfig(init_rank_ratio=0.5))
    left_dense = [str(w.message) for w in record if "TuneComp leaves" in str(w.message)]
    # only nn.MultiheadAttention's out_proj is left dense (it is read, not called)
    assert all("out_proj" in m for m in left_dense)
    assert bool(left_dense) == family.startswith("torch_")
    assert controller.layers and controller.alpha == 1.0
    assert model.training == (mode == "train")
    tol = 1e-6 * max(1.0, dense.abs().max().item())
    torch.testing.assert_close(_seeded_call(model, batch), dense, rtol=0, atol=tol)


# --- parents that read .weight / .bias directly ----------------------------------------------


def test_attention_out_proj_is_left_dense_with_one_warning_and_refused_when_included():
    model = _torch_encoder()
    with pytest.warns(UserWarning) as record:
        controller = prepare(model, TuneCompConfig(init_rank_ratio=0.5))
    messages = [str(w.message) for w in record if "TuneComp leaves" in str(w.message)]
    assert len(messages) == 1
    assert "layers.0.self_attn.out_proj, layers.1.self_attn.out_proj" in messages[0]
    assert "reads .weight/.bias directly" in messages[0]
    assert sorted(controller.layers) == [f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
    assert not isinstance(model.layers[0].self_attn.out_proj, MaskedLowRankLinear)
    with pytest.raises(ValueError, match=r"'layers\.0\.self_attn\.out_proj' is read directly by "
                                         r"its parent MultiheadAttention"):
        prepare(_torch_encoder(), TuneCompConfig(include=[r"out_proj"]))
    model = _torch_encoder()  # explicitly excluding them silences the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare(model, TuneCompConfig(exclude=[r"out_proj"]))


def test_encoder_fast_path_stays_exact_through_training_and_finalize():
    """Mid-blend and after finalize the eval output (no fast path for converted linears)
    equals the train-mode output, which always calls the layers."""
    model = _torch_encoder()
    x = _randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        controller = prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=2,
                                                   total_steps=4, init_rank_ratio=0.75))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        controller.step()
        with torch.no_grad():
            train_out = model.train()(x)
            eval_out = model.eval()(x)
        model.train()
        torch.testing.assert_close(eval_out, train_out, rtol=1e-5, atol=1e-5,
                                   msg=f"step {step + 1}")


# --- tied weights -------------------------------------------------------------------------


def test_tied_lm_head_is_refused_when_included():
    model = tiny_gpt2()
    before = count_parameters(model)
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with "
                                         r"'transformer\.wte\.weight' \(tied weights\)"):
        prepare(model, TuneCompConfig(include=("lm_head",)))
    assert isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert count_parameters(model) == before
    with pytest.raises(ValueError, match="tied weights"):
        compress_to_budget(tiny_gpt2(), TuneCompConfig(include=("lm_head", r"\.mlp\.")))


class TiedBlocks(nn.Module):
    """Blocks whose second projection shares its weight with the first (transposed tying
    is not possible, so the two have the same square shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"a": nn.Linear(12, 12), "b": nn.Linear(12, 12)})
                                    for _ in range(2))
        self.blocks[1]["b"].weight = self.blocks[1]["a"].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block["b"](torch.relu(block["a"](x)))
        return x


def test_tied_layers_are_skipped_with_one_warning_in_the_default_selection():
    model = TiedBlocks()
    dense_count = count_parameters(model)
    assert dense_count == 3 * 12 * 12 + 4 * 12
    with pytest.warns(UserWarning, match=r"leaves 2 layer\(s\) dense: blocks\.1\.a, blocks\.1\.b "
                                         r"\(their weight is shared"):
        controller = prepare(model, TuneCompConfig(target_ratio=0.5, init_rank_ratio=1.0))
    assert sorted(controller.layers) == ["blocks.0.a", "blocks.0.b"]
    assert model.blocks[1]["b"].weight is model.blocks[1]["a"].weight  # tie intact
    report = compression_report(model)
    assert report.model_params_before == dense_count
    assert report.params_before == 2 * 144


def test_report_counts_every_tensor_once_and_never_shows_a_false_saving():
    model = tiny_gpt2()
    dense = count_parameters(model)
    assert dense == sum(p.numel() for p in model.parameters())  # tied wte / lm_head once
    prepare(model, TuneCompConfig(target_ratio=0.5))
    report = compression_report(model)
    assert report.model_params_before == dense
    lin = nn.Linear(4, 4)
    view = nn.Parameter(lin.weight.data[:2])  # a second parameter on the same storage
    holder = nn.Module()
    holder.lin, holder.view = lin, view
    assert count_parameters(holder) == 16 + 4 + 8
    holder.same = nn.Parameter(lin.weight.data)  # same storage, same view: counted once
    assert count_parameters(holder) == 16 + 4 + 8


# --- one module under several names --------------------------------------------------------


class SharedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"p": nn.Linear(8, 8)}) for _ in range(2))
        self.blocks[0]["q"] = shared
        self.blocks[1]["q"] = shared  # the same Linear in two parents

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block["q"](torch.relu(block["p"](x)))
        return x


def test_a_module_under_two_parents_is_skipped_or_refused():
    model = SharedLinear()
    with pytest.warns(UserWarning, match=r"leaves 1 layer\(s\) dense: blocks\.0\.q \(the same "
                                         r"module is reachable under several names"):
        controller = prepare(model, TuneCompConfig(target_ratio=0.5, init_rank_ratio=1.0))
    assert sorted(controller.layers) == ["blocks.0.p", "blocks.1.p"]
    assert model.blocks[0]["q"] is model.blocks[1]["q"]
    with pytest.raises(ValueError, match=r"'blocks\.0\.q' is one module reachable as "
                                         r"'blocks\.0\.q', 'blocks\.1\.q'"):
        prepare(SharedLinear(), TuneCompConfig(include=[r"\.q$"]))
    with pytest.raises(ValueError, match="reachable as"):  # included by its second name
        prepare(SharedLinear(), TuneCompConfig(include=[r"^blocks\.1\.q$"]))
    controller = prepare(SharedLinear(), TuneCompConfig(exclude=[r"^blocks\.1\.q$"]))
    assert sorted(controller.layers) == ["blocks.0.p", "blocks.1.p"]  # excluded by any name


def test_a_repeated_block_is_converted_once_under_all_its_names():
    """The same block object twice in a ModuleList (weight sharing across depth): its
    layers have one parent, so converting them once converts every use."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    model = nn.Sequential(nn.ModuleList([block, block]))
    model.forward = lambda x: block(block(x))
    x = _randn(3, 8)
    with torch.no_grad():
        dense = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        controller = prepare(model, TuneCompConfig(target_ratio=0.5))
    assert sorted(controller.layers) == ["0.0.0", "0.0.2"]
    assert isinstance(model[0][1][0], MaskedLowRankLinear) and model[0][1] is model[0][0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, rtol=0, atol=1e-6)


# --- layers frozen by the user --------------------------------------------------------------


def _frozen_block_net() -> nn.Module:
    model = block_net()
    model.blocks[0].up.requires_grad_(False)
    return model


def test_frozen_layers_stay_exactly_as_they_were_through_every_path():
    model = _frozen_block_net()
    frozen = model.blocks[0].up
    state = {k: v.clone() for k, v in frozen.state_dict().items()}
    with pytest.warns(UserWarning, match=r"leaves 1 layer\(s\) dense: blocks\.0\.up \(frozen"):
        controller = prepare(model, TuneCompConfig(
            target_ratio=0.5, blend_steps=2, total_steps=4, l1_lambda=0.1,
            l1_schedule="constant", init_rank_ratio=1.0), forward=forward_x)
    assert "blocks.0.up" not in controller.layers and model.blocks[0].up is frozen
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batches = [(x, y) for x, y in zip(torch.randn(4, 8, 8), torch.randint(0, 3, (4, 8)))]
    train(model, opt, batches, controller=controller, forward=forward_x,
          loss_fn=lambda out, b: nn.functional.cross_entropy(out, b[1]), steps=4)
    controller.add_l1_gradients()
    controller.regularization().backward()
    assert model.blocks[0].up is frozen
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert all(torch.equal(v, state[k]) for k, v in frozen.state_dict().items())
    assert "blocks.0.up" not in {r.name for r in compression_report(model).layers}


def test_frozen_layers_are_refused_when_included_and_partly_frozen_keep_their_flags():
    with pytest.raises(ValueError, match=r"'blocks\.0\.up' is frozen \(weight\.requires_grad="
                                         r"False\)"):
        prepare(_frozen_block_net(), TuneCompConfig(include=[r"\.up$"]))
    frozen = block_net().requires_grad_(False)
    with pytest.warns(UserWarning, match="frozen"), pytest.raises(
            ValueError, match=r"nothing to compress \(the 4 layer\(s\) it selects are frozen"):
        prepare(frozen, TuneCompConfig())
    model = block_net()
    model.blocks[1].down.bias.requires_grad_(False)  # only the bias frozen: converted
    controller = prepare(model, TuneCompConfig(target_ratio=0.5), forward=forward_x)
    layer = controller.layers["blocks.1.down"]
    assert not layer.bias.requires_grad and layer.U.requires_grad


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers.Trainer needs accelerate")
def test_hf_trainer_callback_leaves_frozen_layers_alone(tmp_path, monkeypatch):
    from tunecomp_kernels.integrations.hf_trainer import TuneCompCallback

    monkeypatch.chdir(tmp_path)
    model = tiny_bert()
    frozen = model.bert.encoder.layer[0].attention.self.query
    frozen.requires_grad_(False)
    state = {k: v.clone() for k, v in frozen.state_dict().items()}
    with pytest.warns(UserWarning, match="frozen"):
        controller = prepare(model, TuneCompConfig(target_ratio=0.4, blend_steps=2,
                                                   total_steps=3, l1_lambda=0.1))
    rows = text_batches(1, batch=12)[0]
    data = [{"input_ids": i, "labels": y} for i, y in zip(rows["input_ids"], rows["labels"])]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
        learning_rate=1e-3, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=data,
                         callbacks=[TuneCompCallback(controller)]).train()
    assert controller.step_count == 3
    assert model.bert.encoder.layer[0].attention.self.query is frozen
    assert all(torch.equal(v, state[k]) for k, v in frozen.state_dict().items())
    assert all(p.grad is None for p in frozen.parameters())


def test_find_targets_default_is_unchanged_on_plain_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(find_targets(tiny_bert())) == 12
        assert len(find_targets(tiny_gpt2())) == 8
    assert math.isfinite(count_parameters(tiny_bert()))


def test_views_of_one_storage_are_tied_only_where_they_overlap():
    """Weights loaded as views of one flat buffer (disjoint slices) are not tied."""
    model = block_net()
    params = [p for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(find_targets(model)) == 4
    overlapping = block_net()
    up = overlapping.blocks[0].up.weight
    overlapping.blocks[1].down.weight.data = up.data.view(-1)[:24 * 48].view(24, 48)
    with pytest.warns(UserWarning, match=r"blocks\.0\.up, blocks\.1\.down \(their weight is "
                                         r"shared"):
        assert list(find_targets(overlapping)) == ["blocks.0.down", "blocks.1.up"]
