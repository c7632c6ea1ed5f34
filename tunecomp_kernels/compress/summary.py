"""A one-screen summary of a TuneComp model, in the spirit of PEFT's
``print_trainable_parameters``: what trains now, what the targeted layers cost now and
what they will cost at the end of the run."""

from __future__ import annotations

from torch import nn

from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .controller import controller_of
from .report import compression_report, count_parameters


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n:,}"


def _teacher_bytes(model: nn.Module) -> int:
    total = 0
    for module in model.modules():
        if isinstance(module, MaskedLowRankLinear):
            for t in (module.teacher_weight, module.teacher_bias):
                if t is not None:
                    total += t.numel() * t.element_size()
    return total


def _schedule_line(model: nn.Module) -> str | None:
    controller = controller_of(model)
    if controller is None:
        return None
    schedule = controller.schedule
    if schedule is None:
        return (f"schedule: step {controller.step_count}; its length is fitted when training "
                "starts (fractions of the run)")
    return (f"schedule: step {controller.step_count} of {schedule.total_steps}; blend ends at "
            f"step {schedule.blend_steps}, budget met at step {schedule.prune_end}")


def compression_summary(model: nn.Module) -> str:
    """The summary as text (see :func:`print_compression_summary`).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the model has no TuneComp layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    report = compression_report(model)
    if not report.layers:
        raise ValueError("the model has no TuneComp layers: call prepare (or "
                         "compress_to_budget) first")
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()
                    if p.requires_grad)
    everything = count_parameters(model)
    lines = [
        f"trainable params: {trainable:,} || all params: {everything:,} || "
        f"trainable%: {100 * trainable / max(everything, 1):.2f}",
        f"targeted layers: {len(report.layers)} ({_millions(report.params_before)} weights "
        f"dense) -> {_millions(report.params_after)} ({report.ratio:.1%}) with the ranks "
        "alive now",
    ]
    if report.target_ratio is not None:
        budget = int(report.target_ratio * report.params_before)
        lines.append(f"at the end: at most {_millions(budget)} "
                     f"({report.target_ratio:.1%} target)")
    teacher = _teacher_bytes(model)
    if teacher:
        lines.append(f"frozen teachers: {teacher / 2**20:.1f} MiB (freed when the blend ends)")
    schedule = _schedule_line(model)
    if schedule:
        lines.append(schedule)
    return "\n".join(lines)


def print_compression_summary(model: nn.Module) -> None:
    """Print trainable and total parameters, the targeted layers' size now and at the end,
    the frozen teachers' memory and the schedule's position, e.g.::

        trainable params: 1,041,411 || all params: 1,107,203 || trainable%: 94.06
        targeted layers: 36 (10.62M weights dense) -> 7.97M (75.0%) with the ranks alive now
        at the end: at most 5.31M (50.0% target)
        frozen teachers: 40.5 MiB (freed when the blend ends)
        schedule: step 0 of 200; blend ends at step 100, budget met at step 100

    Works on a prepared model, during training, after ``finalize`` and on a loaded one.
    Raises what :func:`compression_summary` raises.
    """
    print(compression_summary(model))
