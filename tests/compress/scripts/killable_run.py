"""A small, deterministic, checkpointed TuneComp run that a test can SIGKILL and resume.

    python tests/compress/scripts/killable_run.py CKPT_DIR OUT_FILE [--resume] [--delay SECONDS]

It compresses the plain ``BlockNet`` of ``tests/tiny_models.py`` for ``STEPS``
steps with AdamW, an LR schedule, ASVD init, pruning and a noisy forward that draws from
torch's, Python's and NumPy's random generators (so a resume that lost any RNG state would
differ), writing a checkpoint every ``EVERY`` steps. ``--delay`` sleeps after each step so
that a test can kill the process mid-run. At the end it writes the masks, the alive flags,
the finalized model's state, the loss/stat history and the compression report to
OUT_FILE (``torch.save``).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for the tiny models

from tiny_models import block_net, ce_loss, vector_batches  # noqa: E402

import tunecomp_kernels  # noqa: E402
from tunecomp_kernels.compress import (  # noqa: E402
    TuneCompConfig,
    compression_report,
    prepare,
    train,
)

STEPS = 12
EVERY = 3
CONFIG = TuneCompConfig(target_ratio=0.4, blend_steps=6, total_steps=STEPS, init="asvd",
                        l1_lambda=1e-2, shrink_threshold=0.02, prune_end=9)


def noisy_forward(model, batch):
    """The model on x plus noise from all three generators."""
    x = batch[0]
    scale = 0.01 * (1.0 + random.random()) + 0.01 * float(np.random.rand())
    return model(x + scale * torch.randn_like(x))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir")
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    tunecomp_kernels.deterministic(seed=0)
    model = block_net()
    batches = vector_batches(5)  # fewer batches than steps: the run cycles over them
    controller = prepare(model, CONFIG, calibration=batches[:2], forward=noisy_forward)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.1 * s))

    def pause(_step, _info):
        time.sleep(args.delay)

    history = train(model, optimizer, batches, controller=controller, loss_fn=ce_loss,
                    scheduler=scheduler, callback=pause, checkpoint_dir=args.checkpoint_dir,
                    checkpoint_every=EVERY, resume=args.resume)
    masks = {name: layer.mask.detach().clone() for name, layer in controller.layers.items()}
    alive = controller.alive_masks()
    controller.finalize()
    torch.save({"masks": masks, "alive": alive, "state": model.state_dict(),
                "losses": history.losses, "stats": history.stats, "steps": history.steps,
                "report": compression_report(model).to_dict()}, args.out)


if __name__ == "__main__":
    main()
