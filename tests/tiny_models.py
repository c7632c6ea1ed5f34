"""Tiny models and batches shared by the model-level tests (no tests here).

Every model is built from a config object (nothing is downloaded) with dropout off, so
runs are deterministic given the seed.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def tiny_bert(seed: int = 0, layers: int = 2, hidden: int = 32) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    seeded(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    seeded(seed)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ))


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    seeded(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
    ))


def tiny_vit(seed: int = 0) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    seeded(seed)
    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


def text_batches(n: int, seed: int = 1, batch: int = 4, length: int = 8,
                 classes: int | None = 3) -> list[dict]:
    """Classification batches (``classes``) or causal-LM batches (``classes=None``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        labels = ids if classes is None else torch.randint(0, classes, (batch,), generator=g)
        out.append({"input_ids": ids, "labels": labels})
    return out


class TextRows(torch.utils.data.Dataset):
    """``n`` rows of one :func:`text_batches` batch, as a map-style dataset for the HF
    ``Trainer``."""

    def __init__(self, n: int = 12) -> None:
        batch = text_batches(1, batch=n)[0]
        self.ids, self.labels = batch["input_ids"], batch["labels"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def trainer_args(tmp_path, max_steps: int = 3, **kw):
    """Quiet, single-process CPU ``TrainingArguments`` for a few steps, no checkpoints
    unless asked; ``kw`` overrides any field."""
    import transformers

    base = {"output_dir": str(tmp_path / "out"), "max_steps": max_steps,
            "per_device_train_batch_size": 4, "learning_rate": 1e-3, "report_to": "none",
            "save_strategy": "no", "logging_strategy": "no", "use_cpu": True,
            "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0}
    base.update(kw)
    return transformers.TrainingArguments(**base)


def image_batches(n: int, seed: int = 1, batch: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch, 3, 16, 16, generator=g),
             "labels": torch.randint(0, 3, (batch,), generator=g)} for _ in range(n)]


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class BlockNet(nn.Module):
    """A plain (non-HF) model: stem → ModuleList of MLP blocks → head."""

    def __init__(self, width: int = 24, depth: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def block_net(seed: int = 0, **kwargs) -> BlockNet:
    seeded(seed)
    return BlockNet(**kwargs)


def vector_batches(n: int, seed: int = 1, batch: int = 8) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=g), torch.randint(0, 3, (batch,), generator=g))
            for _ in range(n)]


def forward_x(model: nn.Module, batch):
    """``forward`` for (x, y) batches: the model sees only x."""
    return model(batch[0])


def ce_loss(outputs, batch):
    return nn.functional.cross_entropy(outputs, batch[1])


def buffer_bytes(model: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def lightning_block_module(config, make_optimizer=None):
    """A ``LightningModule`` training :func:`block_net` (seed 0) under TuneComp with
    ``config`` (``module.tunecomp`` is the controller); ``make_optimizer(params)`` builds
    its optimiser (default AdamW, lr 1e-2)."""
    import lightning.pytorch as L

    from tunecomp_kernels.compress import prepare

    class BlockModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = block_net(seed=0)
            self.tunecomp = prepare(self.net, config)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            if make_optimizer is None:
                return torch.optim.AdamW(self.parameters(), lr=1e-2)
            return make_optimizer(self.parameters())

    return BlockModule()
