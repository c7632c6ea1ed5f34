"""The ``tunecomp`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                           Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str):
    """Register ``add_args(parser)`` and ``run(args)`` for subcommand ``name``."""

    def wrap(add_args):
        def with_run(run):
            _COMMANDS[name] = (help_text, add_args, run)
            return run

        return with_run

    return wrap


# --- tunecomp info ---------------------------------------------------------------------

def _info_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _native_module_status(build: dict) -> str:
    """Whether the native module was built at install time, in one line."""
    import importlib.util

    if build.get("native"):
        return ("built (CUDA kernels compiled in)" if build.get("cuda")
                else "built without CUDA kernels")
    if importlib.util.find_spec("tunecomp_kernels._C") is None:
        return ("not built: installed without a C++ toolchain (or TUNECOMP_NO_NATIVE=1); "
                "everything but the CUDA backend works")
    return f"built but it does not load: {build.get('error')}"


@command("info", "show the native build, the backends and why any is unavailable")(_info_args)
def _info(args: argparse.Namespace) -> int:
    from . import __version__, available_backends, build_info
    from .ops.backends import known_backends, unavailable_reason

    info = {
        "version": __version__,
        "torch": torch.__version__,
        "available_backends": available_backends(),
        "unavailable": {n: unavailable_reason(n) for n in known_backends()
                        if unavailable_reason(n) is not None},
        "build": build_info(),
    }
    info["native_module"] = _native_module_status(info["build"])
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"tunecomp_kernels {info['version']} (torch {info['torch']})")
        print(f"native module: {info['native_module']}")
        print(f"backends available: {', '.join(info['available_backends'])}")
        for name, reason in info["unavailable"].items():
            print(f"  {name}: unavailable - {reason}")
        print("native build: " + ", ".join(f"{k}={v}" for k, v in info["build"].items()))
    return 0


# --- tunecomp demo ---------------------------------------------------------------------

def _fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank-ratio", type=_fraction, default=0.5,
                        help="rank of each converted layer as a fraction of min(in, out), "
                             "in (0, 1] (default 0.5)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the model")
    parser.add_argument("--layers", type=int, default=4, help="number of transformer blocks")
    parser.add_argument("--seed", type=int, default=0)


def _tiny_bert(hidden: int, layers: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    heads = max(1, hidden // 64)
    config = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=128)
    return BertModel(config).eval()


@command("demo", "convert a small BERT's block linears to MaskedLowRankLinear and compare")(
    _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from .compress.targets import dense_weight, find_targets, layer_dims, set_submodule
    from .nn import MaskedLowRankLinear

    if not 0.0 < args.rank_ratio <= 1.0:
        raise SystemExit(f"--rank-ratio must be in (0, 1], got {args.rank_ratio}")
    torch.manual_seed(args.seed)
    model = _tiny_bert(args.hidden, args.layers)
    ids = torch.randint(0, 1000, (4, 64))
    with torch.no_grad():
        dense_out = model(ids).last_hidden_state

    targets = list(find_targets(model).items())  # the same default rule as prepare()
    before = sum(dense_weight(m).numel() for _, m in targets)
    after = 0
    for name, dense in targets:
        rank = max(1, round(args.rank_ratio * min(layer_dims(dense))))
        low = MaskedLowRankLinear.from_dense(dense_weight(dense), getattr(dense, "bias", None),
                                             rank=rank)
        after += low.U.numel() + low.V.numel()
        set_submodule(model, name, low)

    with torch.no_grad():
        low_out = model(ids).last_hidden_state
    rel = ((low_out - dense_out).norm() / dense_out.norm()).item()
    print(f"model: BERT from config, hidden={args.hidden}, layers={args.layers}")
    print(f"converted {len(targets)} linear layers to rank {args.rank_ratio:.0%} of full")
    print(f"linear weight parameters: {before:,} -> {after:,} ({after / before:.1%})")
    print(f"relative output difference (random weights, SVD truncation): {rel:.4f}")
    print(f"first converted layer: {targets[0][0]} -> {model.get_submodule(targets[0][0])}")
    return 0


# --- tunecomp compress ------------------------------------------------------------------

def _compress_args(parser: argparse.ArgumentParser) -> None:
    from .tasks.compress_job import add_arguments

    add_arguments(parser)


@command("compress", "fine-tune a text classifier and compress it in the same run (TuneComp)")(
    _compress_args)
def _compress(args: argparse.Namespace) -> int:
    from .tasks.compress_job import run

    return run(args)


# --- tunecomp predict -------------------------------------------------------------------

def _predict_args(parser: argparse.ArgumentParser) -> None:
    from .tasks.predict import add_arguments

    add_arguments(parser)


@command("predict", "label the texts of a file with a model saved by tunecomp compress")(
    _predict_args)
def _predict(args: argparse.Namespace) -> int:
    from .tasks.predict import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tunecomp",
        description="Fine-tune and compress models into masked low-rank layers.")
    parser.add_argument("--version", action="version",
                        version=f"tunecomp_kernels {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _run) in _COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tunecomp`` command.

    Returns the exit status: 0 done, 2 a bad argument (one line on stderr, prefixed
    ``tunecomp <command>: error:``), or what the command returns.
    """
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command][2](args)
    except SystemExit as exc:
        # A command that stops with a message gets argparse's prefix and status 2.
        if isinstance(exc.code, str):
            print(f"tunecomp {args.command}: error: {exc.code}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
