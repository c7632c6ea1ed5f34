"""Tiny local Hugging Face model directories and data files for the ``tunecomp compress``
tests (built from configs and word lists; nothing is downloaded). No tests here."""

from __future__ import annotations

import csv
import random

import torch

WORDS = {
    "pos": ["good", "great", "love", "nice", "happy", "fine"],
    "neg": ["bad", "awful", "hate", "sad", "poor", "worst"],
    "neu": ["the", "a", "car", "flight", "today", "is"],
}
ALL_WORDS = sorted({w for words in WORDS.values() for w in words})


def write_rows(path, n: int = 150, seed: int = 0, header=("review", "stars")):
    """A CSV of ``n`` short texts whose label follows from its words."""
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i in range(n):
            label = ["neg", "neu", "pos"][i % 3]
            words = rng.choices(WORDS[label], k=3) + rng.choices(WORDS["neu"], k=2)
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return path


def make_bert_dir(root):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *ALL_WORDS]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    BertModel(config).save_pretrained(root)
    return root


def make_decoder_dir(root, kind: str, pad: bool, eos: bool = True):
    """A GPT-2 or Llama directory whose config has no pad_token_id; its word-level
    tokenizer has a pad token (``pad``), an end-of-sequence token (``eos``), or neither."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        GPT2Model,
        LlamaConfig,
        LlamaModel,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<eos>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + ALL_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"eos_token": "<eos>"} if eos else {}
    if pad:
        extra["pad_token"] = "<pad>"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **extra).save_pretrained(
        root)
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2,
                            n_positions=64, bos_token_id=1, eos_token_id=1)
        model = GPT2Model(config)
    else:
        config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=1)
        model = LlamaModel(config)
    assert model.config.pad_token_id is None
    model.save_pretrained(root)
    return root


def compress_argv(model, data, out, *extra, steps: int = 4):
    """``tunecomp compress`` on the tiny model and data: a run of a few seconds."""
    return ["compress", "--model", str(model), "--data", str(data), "--text-column",
            "review", "--label-column", "stars", "--steps", str(steps),
            "--train-size", "90", "--val-size", "24", "--test-size", "30",
            "--batch-size", "16", "--eval-every", "2", "--output", str(out), "--no-progress",
            *extra]
