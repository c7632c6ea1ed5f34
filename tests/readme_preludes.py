"""Stand-ins for what a README block leaves to the reader (``load_pretrained()``, a data
loader, ``MyModule``): tiny models built from configs, so every block runs in CI as it is
written. A block opts in with ``<!-- readme-test: prelude=NAME [torchrun=N] -->`` on the
line above it."""

from __future__ import annotations

_TINY_BERT = '''
import torch
from transformers import BertConfig, BertForSequenceClassification

def load_pretrained():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=3))

def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (4, 8), generator=g),
             "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(n)]
'''

PRELUDES = {
    "ddp": _TINY_BERT + '''
import os
loader = _batches(4, seed=int(os.environ.get("RANK", "0")))
epochs = 2
''',
    "fsdp": '''
import os
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
from tunecomp_kernels.compress import TuneCompConfig, prepare

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
config = TuneCompConfig(target_ratio=0.5)
''',
    "lightning": '''
import lightning as L
import torch
from torch import nn
from tunecomp_kernels.compress import TuneCompConfig, prepare

class MyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 3))
        self.tunecomp = prepare(self.net, TuneCompConfig(target_ratio=0.5,
                                                         include=("0", "2")))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

g = torch.Generator().manual_seed(1)
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(torch.randn(64, 16, generator=g),
                                   torch.randint(0, 3, (64,), generator=g)), batch_size=8)
''',
}

#: Appended after a block with this prelude: checks that the block did its job.
CHECKS = {
    "fsdp": '''
from torch.distributed.tensor import DTensor
assert isinstance(model.model.layers[0].self_attn.q_proj.U, DTensor)
dist.destroy_process_group()
''',
    "lightning": '''
assert module.tunecomp.step_count == 300 and module.tunecomp.schedule_complete
''',
}
