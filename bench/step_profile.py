"""Where a dense MiniLM training step spends its time, and the speed-up that compressing
only its linear layers can give at most (Amdahl's law).

    python bench/step_profile.py [--steps 3] [--budget 0.5] [--out PATH]

The step (batch 16×128, AdamW, 1 thread, as in ``bench/e2e.py``) runs under
``torch.profiler``; each aten op's self CPU time is put into a group (matrix products of
the linear layers, attention's batched products, dropout's random numbers, the optimiser,
the rest). If a compressed model did the linear layers' matrix products at ``budget`` of
their cost and everything else unchanged, its step would take ``1 − s·(1 − budget)`` of
the dense one, where ``s`` is their share: the bound printed is the inverse.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

#: aten op -> group; ops not listed are "other". ``mm``/``addmm`` come from the linear
#: layers (the task head's are a few rows), ``bmm`` from attention scores and context.
GROUPS = {"aten::mm": "linear matmuls", "aten::addmm": "linear matmuls",
          "aten::bmm": "attention matmuls", "aten::bernoulli_": "dropout RNG"}


def profile_dense_step(steps: int, model_name: str = "minilm", batch: int = 16,
                       seq: int = 128) -> dict[str, float]:
    """Seconds of self CPU time per group over ``steps`` dense training steps."""
    import torch
    from e2e import build_model, make_batch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(1)
    model, vocab, kind = build_model(model_name)
    inputs = make_batch(vocab, kind, batch, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        with record_function("optimizer"):
            opt.step()

    step()  # warm-up: AdamW state, allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    times: dict[str, float] = {}
    optimizer_total = 0.0
    for event in prof.key_averages():
        if event.key == "optimizer":
            optimizer_total = event.cpu_time_total / 1e6
            continue
        group = GROUPS.get(event.key, "other")
        times[group] = times.get(group, 0.0) + event.self_cpu_time_total / 1e6
    # the optimiser's own aten ops were counted as "other": move their total across
    times["other"] = max(0.0, times.get("other", 0.0) - optimizer_total)
    times["optimizer"] = optimizer_total
    return times


def main(argv: list[str] | None = None) -> int:
    from _util import environment, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default="minilm", help="a bench/e2e.py model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--out", default=str(ROOT / "bench/results/step_profile_minilm.json"))
    args = ap.parse_args(argv)
    times = profile_dense_step(args.steps, args.model, args.batch, args.seq)
    total = sum(times.values())
    share = times["linear matmuls"] / total
    bound = 1.0 / (1.0 - share * (1.0 - args.budget))
    result = {"benchmark": "step_profile", "environment": environment(1),
              "config": vars(args), "seconds": times, "linear_share": share,
              "amdahl_bound": bound}
    for group, sec in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"{group:18s} {sec / args.steps:7.3f} s/step  {sec / total:6.1%}")
    print(f"linear matmuls: {share:.1%} of the dense step; with them at {args.budget:g} of "
          f"their cost the step is at most {bound:.2f}x faster")
    write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
