"""Low-rank layer vs dense ``nn.Linear``: measured time ratio against the ideal FLOP ratio.

A rank-r layer ``x Vᵀ Uᵀ + b`` costs ``2·N·r·(in + out)`` FLOPs, a dense one
``2·N·in·out``, so the ideal time ratio (low-rank / dense) is ``r·(in + out) / (in·out)``.
Goal (issue 6): at ``r ∈ {d/8, d/4, d/2}`` (d = min(in, out)) the measured ratio is within
1.1× of the ideal one, i.e. ``measured / ideal <= 1.1``.

Contenders, timed side by side (interleaved, rotating order, median of paired ratios):

* ``dense``     — ``nn.Linear(in, out)``;
* ``lowrank``   — :class:`~tunecomp_kernels.MaskedLowRankLinear` of rank r, as an exported
  layer has it (mask of ones, no teacher), through the op (backend ``auto``);
* ``two_linear``— the same product as two plain ``F.linear`` calls (unfused PyTorch).

Modes: ``forward`` (inference, ``torch.inference_mode``) and ``train`` (forward + backward
with gradients for the parameters and the input, as for a layer inside a network).

Usage::

    python bench/layer_ratio.py                     # writes bench/results/layer_ratio.json
    python bench/layer_ratio.py --shapes 1024x1024 --tokens 2048 --repeats 9
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS, environment, interleaved, set_threads, write_json  # noqa: E402

from tunecomp_kernels import MaskedLowRankLinear  # noqa: E402

GOAL = 1.1


def parse_shape(text: str) -> tuple[int, int]:
    """``"INxOUT"`` -> (in, out)."""
    a, b = text.lower().split("x")
    return int(a), int(b)


def make_case(in_f: int, out_f: int, rank: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(in_f, out_f).to(device)
    low = MaskedLowRankLinear(in_f, out_f, rank).to(device)
    with torch.no_grad():
        low.U.copy_(torch.randn(out_f, rank, generator=g) * rank**-0.5)
        low.V.copy_(torch.randn(rank, in_f, generator=g) * in_f**-0.5)
    low.mask.requires_grad_(False)  # exported layers: mask folded into U, frozen
    U = nn.Parameter(low.U.detach().clone())
    V = nn.Parameter(low.V.detach().clone())
    b = nn.Parameter(low.bias.detach().clone())
    return dense, low, (U, V, b)


def run_case(in_f: int, out_f: int, rank: int, tokens: int, mode: str, repeats: int,
             device: str) -> dict:
    dense, low, (U, V, b) = make_case(in_f, out_f, rank, device)
    x = torch.randn(tokens, in_f, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else None

    if mode == "forward":
        def wrap(fn):
            def call():
                with torch.inference_mode():
                    fn(x)
            return call
        contenders = {
            "dense": wrap(dense),
            "lowrank": wrap(low),
            "two_linear": wrap(lambda inp: F.linear(F.linear(inp, V), U, b)),
        }
    else:
        xg = x.clone().requires_grad_()
        params = [*dense.parameters(), *low.parameters(), U, V, b]

        def wrap(fn):
            def call():
                for p in params:
                    p.grad = None
                xg.grad = None
                fn(xg).sum().backward()
            return call
        contenders = {
            "dense": wrap(dense),
            "lowrank": wrap(low),
            "two_linear": wrap(lambda inp: F.linear(F.linear(inp, V), U, b)),
        }
    res = interleaved(contenders, baseline="dense", repeats=repeats, warmup=2, sync=sync)
    ideal = rank * (in_f + out_f) / (in_f * out_f)
    row = {
        "in": in_f, "out": out_f, "rank": rank, "d": min(in_f, out_f),
        "rank_fraction": rank / min(in_f, out_f), "tokens": tokens, "mode": mode,
        "ideal_ratio": ideal,
        "dense_ms": res["dense"]["median_s"] * 1e3,
    }
    for name in ("lowrank", "two_linear"):
        ratio = res[name]["paired_ratio"]
        row[f"{name}_ms"] = res[name]["median_s"] * 1e3
        row[f"{name}_ratio"] = ratio
        row[f"{name}_vs_ideal"] = ratio / ideal
    row["goal_met"] = row["lowrank_vs_ideal"] <= GOAL
    row["raw"] = {k: v["times_s"] for k, v in res.items()}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1024x1024,384x1536,1536x384",
                    help="comma-separated INxOUT shapes (default: %(default)s)")
    ap.add_argument("--fractions", default="8,4,2",
                    help="rank = d / F for each F (default: %(default)s, i.e. d/8, d/4, d/2)")
    ap.add_argument("--tokens", type=int, default=4096, help="rows N of x (default 32x128)")
    ap.add_argument("--modes", default="forward,train")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "layer_ratio.json")
    args = ap.parse_args(argv)

    set_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        in_f, out_f = parse_shape(shape)
        d = min(in_f, out_f)
        for frac in (int(f) for f in args.fractions.split(",")):
            rank = d // frac
            for mode in args.modes.split(","):
                row = run_case(in_f, out_f, rank, args.tokens, mode, args.repeats, args.device)
                rows.append(row)
                print(f"{in_f}x{out_f} r={rank:4d} (d/{frac}) {mode:7s}  dense "
                      f"{row['dense_ms']:8.2f} ms  lowrank {row['lowrank_ms']:8.2f} ms  "
                      f"ratio {row['lowrank_ratio']:.3f}  ideal {row['ideal_ratio']:.3f}  "
                      f"x{row['lowrank_vs_ideal']:.2f} of ideal "
                      f"({'ok' if row['goal_met'] else 'MISSED'})  two_linear "
                      f"x{row['two_linear_vs_ideal']:.2f}", flush=True)
    payload = {"benchmark": "layer_ratio", "goal": f"lowrank/dense <= {GOAL} x ideal",
               "environment": environment(args.threads), "device": args.device,
               "rows": rows}
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
