"""A Hugging Face sequence classifier from a local directory: load it (with a padding
token for decoder models), its optimiser groups and learning-rate schedule, evaluation,
prediction, CPU latency and size on disk.

Everything runs offline: models come from a local directory and nothing is downloaded.
Problems the user can fix raise :class:`~.data.DataError` with a one-line message.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .data import DataError

# --- model ---------------------------------------------------------------------------------

def check_model_dir(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise DataError(f"model directory not found: {path}")
    if not path.is_dir():
        raise DataError(f"model path is not a directory: {path}")
    if not (path / "config.json").is_file():
        raise DataError(f"{path}: no config.json; expected a Hugging Face model directory")
    return path


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    path = check_model_dir(model_dir)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None


def padding_token_id(tokenizer, model_dir: str | os.PathLike = "") -> int:
    """The token id that pads a batch: the tokenizer's padding token, else its
    end-of-sequence token (decoder models such as GPT-2 and Llama often define only
    that); the tokenizer's ``pad_token`` is set to it, so both sides agree.

    Raises:
        DataError: the tokenizer has neither, so texts of different lengths cannot be
            batched.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return int(tokenizer.eos_token_id)
    raise DataError(f"{model_dir}: the tokenizer has no padding token and no end-of-sequence "
                    "token, so texts of different lengths cannot be batched; add a pad_token "
                    "to its tokenizer_config.json")


def load_classifier(
    model_dir: str | os.PathLike, label_names: Sequence[str], seed: int = 0,
    pad_token_id: int | None = None,
) -> nn.Module:
    """``AutoModelForSequenceClassification`` from a local directory with a fresh head for
    ``label_names`` (seeded, so the head is the same for every method of one seed).

    ``pad_token_id`` (see :func:`padding_token_id`) is set on the model's config when the
    config has none: decoder classifiers (GPT-2, Llama) find each text's last token by it
    and refuse batches of more than one text without it.

    Raises:
        DataError: the directory is not a model directory or cannot be loaded.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = check_model_dir(model_dir)
    id2label = dict(enumerate(label_names))
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected here
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=len(label_names), id2label=id2label,
            label2id={v: k for k, v in id2label.items()}, local_files_only=True,
            ignore_mismatched_sizes=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot load a classification model "
                        f"({str(exc).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    if getattr(model.config, "pad_token_id", None) is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


# --- training ------------------------------------------------------------------------------

def linear_schedule(steps: int, warmup_ratio: float = 0.06):
    """Linear warm-up then linear decay to 0, as a LambdaLR multiplier."""
    warmup = max(1, round(warmup_ratio * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float):
    """A ``LambdaLR`` with :func:`linear_schedule` over ``steps`` (one training phase)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(steps, warmup_ratio))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01,
                   mask_lr: float | None = None):
    """AdamW with no weight decay on biases, LayerNorms and masks; the rank masks of
    ``MaskedLowRankLinear`` layers get their own learning rate ``mask_lr`` (default ``lr``)."""
    decay, no_decay, masks = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".mask") and p.ndim == 1:
            masks.append(p)
        elif p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if masks:
        groups.append({"params": masks, "weight_decay": 0.0,
                       "lr": lr if mask_lr is None else mask_lr})
    return torch.optim.AdamW(groups, lr=lr)


# --- evaluation ----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Accuracy and mean cross-entropy over ``batches``; restores the model's mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    try:
        for batch in batches:
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            loss_sum += nn.functional.cross_entropy(logits.float(), batch["labels"],
                                                    reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            total += batch["labels"].numel()
    finally:
        model.train(was_training)
    return {"accuracy": correct / max(1, total), "loss": loss_sum / max(1, total), "n": total}


@torch.no_grad()
def predict(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Logits of every example, in batch order."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(input_ids=b["input_ids"],
                                attention_mask=b["attention_mask"]).logits for b in batches])
    finally:
        model.train(was_training)


@torch.no_grad()
def measure_latency(
    model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 20, warmup: int = 3
) -> float:
    """Median wall time (ms) of one forward pass over ``batch`` on its device."""
    was_training = model.training
    model.eval()
    times = []
    try:
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return 1000.0 * statistics.median(times)


def measure_latency_pair(
    first: nn.Module, second: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 20,
    warmup: int = 3,
) -> tuple[float, float]:
    """Median forward time (ms) of two models on ``batch``, timed alternately so that
    background load affects both alike (:func:`measure_latency_spread` on one batch)."""
    result = measure_latency_spread(first, second, [batch], repeats=repeats, warmup=warmup)
    return result["first"]["median"], result["second"]["median"]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (q1, q3), interquartile range, min and max of ``values``.

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("spread() needs at least one value")
    ordered = sorted(values)
    if len(ordered) == 1:
        q1 = q3 = ordered[0]
    else:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": ordered[0], "max": ordered[-1]}


def _forward_seconds(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return time.perf_counter() - start


@torch.no_grad()
def measure_latency_spread(
    first: nn.Module, second: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
    repeats: int = 20, warmup: int = 2,
) -> dict[str, dict[str, float]]:
    """Forward time of two models over several batches, interleaved, with its spread.

    One repeat runs every batch of ``batches`` through both models, batch by batch,
    alternating which model goes first, so that background load and cache state affect
    both alike; a repeat's time is the mean over the batches, in ms. Returns
    ``{"first": spread, "second": spread, "ratio": spread}`` (see :func:`spread`) over the
    ``repeats`` repeats; ``ratio`` is each repeat's first / second time (> 1: ``second``
    is faster). Both models' train/eval modes are restored.

    Raises:
        ValueError: no batches, or ``repeats`` < 1.
    """
    if not batches or repeats < 1:
        raise ValueError(f"need batches and repeats >= 1, got {len(batches)} batches and "
                         f"repeats={repeats}")
    modes = [(m, m.training) for m in (first, second)]
    times: tuple[list[float], list[float]] = ([], [])
    try:
        for m, _ in modes:
            m.eval()
        for i in range(warmup + repeats):
            total = [0.0, 0.0]
            for j, batch in enumerate(batches):
                order = (0, 1) if (i + j) % 2 == 0 else (1, 0)
                for k in order:
                    total[k] += _forward_seconds((first, second)[k], batch)
            if i >= warmup:
                for k in (0, 1):
                    times[k].append(1000.0 * total[k] / len(batches))
    finally:
        for m, mode in modes:
            m.train(mode)
    ratios = [a / b for a, b in zip(*times)]
    return {"first": spread(times[0]), "second": spread(times[1]), "ratio": spread(ratios)}


def saved_size(model: nn.Module) -> int:
    """Bytes on disk of ``model.save_pretrained`` (safetensors), in a temporary directory
    that is removed afterwards; no Hugging Face progress bar."""
    import tempfile

    from transformers.utils import logging as hf_logging

    bar_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return dir_size(tmp)
    finally:
        if bar_on:
            hf_logging.enable_progress_bar()


def dir_size(path: str | os.PathLike) -> int:
    """Total bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux/macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
