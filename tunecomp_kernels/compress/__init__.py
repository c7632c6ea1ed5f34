"""TuneComp joint fine-tuning and compression.

Typical use::

    from tunecomp_kernels.compress import (
        TuneCompConfig, prepare, train, finalize, compression_report, save_compressed,
        load_compressed)

    config = TuneCompConfig(target_ratio=0.5)                 # the validated recipe
    controller = prepare(model, config)                       # converts layers in place
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # after prepare
    train(model, optimizer, batches, controller=controller, steps=1000)  # or your loop:
    #   controller.fit_schedule(1000)   # the blend and budget are fractions of the run
    #   loss = task_loss + controller.regularization(outputs, batch)
    #   loss.backward(); optimizer.step(); controller.step()
    finalize(model)
    print(compression_report(model))
    save_compressed(model, "out/model")

``TuneCompCallback`` / ``TuneCompTrainer`` (Hugging Face ``Trainer``) live in
:mod:`tunecomp_kernels.integrations.hf_trainer`; importing them from here still works, on
first access, so ``transformers`` stays optional.
"""

from __future__ import annotations

from typing import Any

from .baselines import allocate_ranks, compress_to_budget
from .calibration import ActivationStats, collect_statistics
from .callbacks import ProgressBar, StepState
from .checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .config import JOINT_LR, RECIPE, Schedule, TuneCompConfig
from .controller import TuneCompController
from .export import load_compressed, read_metadata, save_compressed
from .finalize import finalize
from .hf_format import guard_save_pretrained
from .merge import merge_and_unload
from .pipelines import (
    TrainingPlan,
    compress_then_finetune,
    dense_finetune,
    finetune_then_compress,
    finetune_truncate_finetune,
    run_tunecomp,
    truncate_finetune,
    tunecomp_joint,
)
from .prepare import prepare
from .report import CompressionReport, LayerReport, compression_report
from .schedules import ScheduleError, blend_scales, budget_fraction, l1_weight
from .summary import compression_summary, print_compression_summary
from .targets import TargetInfo, find_targets
from .training import RunResult, TrainResult, train

_LAZY = {"TuneCompCallback", "TuneCompTrainer"}

__all__ = [
    "JOINT_LR",
    "RECIPE",
    "Schedule",
    "ScheduleError",
    "ActivationStats",
    "CheckpointError",
    "CompressionReport",
    "LayerReport",
    "ProgressBar",
    "RunResult",
    "StepState",
    "TargetInfo",
    "TrainResult",
    "TrainingPlan",
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
    "compression_summary",
    "dense_finetune",
    "finalize",
    "find_targets",
    "finetune_then_compress",
    "finetune_truncate_finetune",
    "guard_save_pretrained",
    "l1_weight",
    "list_checkpoints",
    "load_checkpoint",
    "load_compressed",
    "merge_and_unload",
    "prepare",
    "print_compression_summary",
    "read_checkpoint",
    "read_metadata",
    "run_tunecomp",
    "save_checkpoint",
    "save_compressed",
    "train",
    "truncate_finetune",
    "tunecomp_joint",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        # The HF Trainer callbacks live in integrations/; this keeps their old import path.
        from ..integrations import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
