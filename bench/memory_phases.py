"""RSS around each phase of a training step (forward, backward, optimiser, controller),
for one ``bench/e2e.py`` training method: where in the step the peak falls.

    MALLOC_MMAP_THRESHOLD_=1048576 python bench/memory_phases.py --model llama \\
        --method train_joint_bf16 --batch 8 --seq 256

Prints one line per step: the RSS after each phase and the peak since the step began (MiB).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
from _util import (  # noqa: E402
    current_rss_mib,
    peak_rss_since_reset_mib,
    reset_peak_rss,
    set_threads,
    trim_heap,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama", choices=("minilm", "llama", "tiny"))
    p.add_argument("--method", default="train_dense", choices=e2e.TRAIN_METHODS)
    p.add_argument("--init-rank-ratio", type=float, default=0.75)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    set_threads(args.threads)
    model, vocab, kind = e2e.build_model(args.model)
    controller = e2e.setup_training(model, args.method, args.init_rank_ratio, {})
    batch = e2e.make_batch(vocab, kind, args.batch, args.seq)
    opt, _ = e2e.start_optimizer(model, controller)
    model.train()
    for step in range(args.steps):
        gc.collect()
        trim_heap()
        reset_peak_rss()
        marks = [("start", current_rss_mib(), None)]
        opt.zero_grad(set_to_none=True)
        out = model(**batch)
        loss = out.loss if controller is None else out.loss + controller.regularization(
            out, batch)
        marks.append(("forward", current_rss_mib(), peak_rss_since_reset_mib()))
        loss.backward()
        del out, loss
        marks.append(("backward", current_rss_mib(), peak_rss_since_reset_mib()))
        opt.step()
        if controller is not None:
            controller.step()
        marks.append(("step", current_rss_mib(), peak_rss_since_reset_mib()))
        print(f"{args.method} step {step}: " + " | ".join(
            f"{name} {rss:.0f}" + ("" if peak is None else f" (peak {peak:.0f})")
            for name, rss, peak in marks), flush=True)


if __name__ == "__main__":
    main()
