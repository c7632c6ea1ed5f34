"""TuneComp joint fine-tuning and compression.

Typical use::

    from tunecomp_kernels.compress import (
        TuneCompConfig, prepare, train, finalize, compression_report, save_compressed,
        load_compressed)

    config = TuneCompConfig(target_ratio=0.5, blend_steps=500, total_steps=1000)
    controller = prepare(model, config)                       # converts layers in place
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # after prepare
    train(model, optimizer, batches, controller=controller)  # or your own loop:
    #   loss = task_loss + controller.regularization(outputs, batch)
    #   loss.backward(); optimizer.step(); controller.step()
    finalize(model)
    print(compression_report(model))
    save_compressed(model, "out/model")

``TuneCompCallback`` / ``TuneCompTrainer`` (Hugging Face ``Trainer``) are imported on
first access, so ``transformers`` stays optional.
"""

from __future__ import annotations

from typing import Any

from .baselines import (
    allocate_ranks,
    compress_then_finetune,
    compress_to_budget,
    finetune_then_compress,
)
from .calibration import ActivationStats, collect_statistics
from .config import TuneCompConfig
from .controller import TuneCompController
from .export import load_compressed, read_metadata, save_compressed
from .finalize import finalize
from .prepare import prepare
from .report import CompressionReport, LayerReport, compression_report
from .schedules import blend_scales, budget_fraction, l1_weight
from .targets import TargetInfo, find_targets
from .training import (
    CheckpointError,
    RunResult,
    TrainResult,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    run_tunecomp,
    save_checkpoint,
    train,
)

_LAZY = {"TuneCompCallback", "TuneCompTrainer"}

__all__ = [
    "ActivationStats",
    "CheckpointError",
    "CompressionReport",
    "LayerReport",
    "RunResult",
    "TargetInfo",
    "TrainResult",
    "TuneCompCallback",
    "TuneCompConfig",
    "TuneCompController",
    "TuneCompTrainer",
    "allocate_ranks",
    "blend_scales",
    "budget_fraction",
    "collect_statistics",
    "compress_then_finetune",
    "compress_to_budget",
    "compression_report",
    "finalize",
    "find_targets",
    "finetune_then_compress",
    "l1_weight",
    "list_checkpoints",
    "load_checkpoint",
    "load_compressed",
    "prepare",
    "read_checkpoint",
    "read_metadata",
    "run_tunecomp",
    "save_checkpoint",
    "save_compressed",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import hf_callback

        return getattr(hf_callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
