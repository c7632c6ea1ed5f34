"""``prepare``: convert a model's targeted linear layers into TuneComp students."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..nn.init import InitSVD, init_decomposition
from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .allocation import DENSE, plan_ranks, start_rank
from .budget import min_feasible_params
from .calibration import ActivationStats, collect_statistics
from .config import TuneCompConfig
from .controller import TuneCompController
from .hf_format import guard_save_pretrained
from .model_io import call_model
from .targets import (
    INFO_ATTR,
    TargetInfo,
    dense_weight,
    keep_layer_forwards,
    make_target_infos,
    select_layers,
    set_submodule,
)

CONFIG_ATTR = "tunecomp_config"


def init_svd(weight: torch.Tensor, init: str, stats: ActivationStats | None = None,
             asvd_alpha: float = 0.5) -> InitSVD:
    """The SVD ``init`` truncates for ``weight [out, in]``, with ``stats``' statistics
    (:func:`~tunecomp_kernels.nn.init.init_decomposition`): its spectrum and its factors
    at any rank."""
    return init_decomposition(
        weight, init,
        input_abs_mean=None if stats is None or init != "asvd" else stats.abs_mean,
        gram=None if stats is None else stats.gram, asvd_alpha=asvd_alpha,
    )


def factor_weight(
    weight: torch.Tensor,
    rank: int,
    init: str,
    stats: ActivationStats | None = None,
    asvd_alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U [out, rank]``, ``V [rank, in]`` (float64) with ``U·V ≈ weight [out, in]``
    (:func:`init_svd` truncated to ``rank``)."""
    return init_svd(weight, init, stats, asvd_alpha).factors(rank)


def build_lowrank(
    module: nn.Module,
    info: TargetInfo,
    rank: int,
    init: str,
    stats: ActivationStats | None,
    *,
    asvd_alpha: float = 0.5,
    backend: str = "auto",
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> MaskedLowRankLinear:
    """A :class:`MaskedLowRankLinear` of ``rank`` factored from ``module`` (Linear or
    Conv1D) by :meth:`MaskedLowRankLinear.from_dense` (``factors``: already computed),
    with a copy of its bias and ``info`` attached (no teacher)."""
    layer = MaskedLowRankLinear.from_dense(
        dense_weight(module), getattr(module, "bias", None), rank=rank, init=init,
        stats=stats, asvd_alpha=asvd_alpha, backend=backend, factors=factors,
    )
    setattr(layer, INFO_ATTR, info)
    return layer


def select_targets(model: nn.Module, config: TuneCompConfig) -> dict[str, nn.Module]:
    """The layers ``config`` selects in ``model``; a clear error when there are none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # layers an earlier prepare converted or kept dense are never selected again
    already = {n for n, m in model.named_modules() if isinstance(m, MaskedLowRankLinear)
               or isinstance(getattr(m, INFO_ATTR, None), TargetInfo)}
    targets, left_dense = select_layers(model, config.include_patterns(),
                                        config.exclude_patterns())
    targets = {n: m for n, m in targets.items() if n not in already}
    if not targets:
        hint = (f" (it already holds {len(already)} layers converted or kept dense by "
                "prepare: prepared twice?)" if already else "")
        if left_dense:
            kinds = sorted({kind for kind, _ in left_dense.values()})
            hint += (f" (the {len(left_dense)} layer(s) it selects are {'/'.join(kinds)}: see "
                     "the warning)")
        raise ValueError(
            f"no module of {type(model).__name__} matches the selection (include="
            f"{config.include!r}, exclude={config.exclude!r}): nothing to compress{hint}"
        )
    return targets


def check_finite(targets: dict[str, nn.Module]) -> None:
    """Raise if any targeted layer's weight or bias holds NaN or inf (SVD cannot factor it)."""
    for name, mod in targets.items():
        for what, tensor in (("weight", mod.weight), ("bias", getattr(mod, "bias", None))):
            if tensor is None:
                continue
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                raise ValueError(
                    f"layer {name!r}: {what} {list(tensor.shape)} has {bad} NaN/inf value(s); "
                    "a model with non-finite weights cannot be compressed"
                )


def _calibration_forward(forward: Callable[[nn.Module, Any], Any]) -> Callable[..., Any]:
    """``forward`` that names the calibration batch when the model fails on it."""
    count = 0

    def run(model: nn.Module, batch: Any) -> Any:
        nonlocal count
        count += 1
        try:
            return forward(model, batch)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
            raise ValueError(
                f"calibration batch {count - 1} ({type(batch).__name__}) does not fit the "
                f"model: {type(exc).__name__}: {exc}"
            ) from exc

    return run


class InfeasibleBudgetError(ValueError):
    """``target_ratio`` is below what the targeted layers cost at ``min_rank``."""


def check_feasible(infos: list[TargetInfo], config: TuneCompConfig) -> None:
    """Raise :class:`InfeasibleBudgetError` (a ``ValueError``) if ``target_ratio`` is below
    what every layer at ``min_rank`` already costs."""
    total = sum(i.dense_params for i in infos)
    budget = math.floor(config.target_ratio * total)
    floor_params = min_feasible_params(infos, config.min_rank)
    if budget < floor_params:
        raise InfeasibleBudgetError(
            f"target_ratio={config.target_ratio} is infeasible: the {len(infos)} targeted "
            f"layers cost {floor_params} parameters at min_rank={config.min_rank}, more than "
            f"the budget {budget} of {total}; use target_ratio >= {floor_params / total:.4f}"
        )


def _calibration_stats(
    model: nn.Module,
    targets: dict[str, nn.Module],
    config: TuneCompConfig,
    calibration: Iterable[Any] | None,
    forward: Callable[[nn.Module, Any], Any],
) -> dict[str, ActivationStats]:
    """The targeted layers' input statistics, checked (empty without calibration data)."""
    if config.needs_calibration and calibration is None:
        why = (f"init={config.init!r}" if config.init != "svd" else "score='activation'")
        raise ValueError(
            f"{why} needs calibration data: prepare(model, config, calibration=batches)"
        )
    if isinstance(calibration, (Mapping, torch.Tensor)):
        raise TypeError(
            f"calibration must be an iterable of batches, got a single "
            f"{type(calibration).__name__}; wrap one batch in a list: calibration=[batch]"
        )
    if calibration is None:
        return {}
    stats = collect_statistics(model, targets, calibration, gram=config.init == "svd_llm",
                               forward=_calibration_forward(forward))
    for name, s in stats.items():
        if not (torch.isfinite(s.abs_sum).all() and torch.isfinite(s.sq_sum).all()):
            raise ValueError(f"the calibration inputs of layer {name!r} contain NaN/inf")
    return stats


Factors = tuple[torch.Tensor, torch.Tensor]


def planned_ranks(targets: dict[str, nn.Module], infos: dict[str, TargetInfo],
                  config: TuneCompConfig, stats: dict[str, ActivationStats],
                  factor_ranks: dict[str, int] | None = None,
                  ) -> tuple[dict[str, int], dict[str, Factors]]:
    """Each target's final rank under ``config.allocation`` (:data:`~.allocation.DENSE`
    for one that stays dense), planned on the spectrum of the init's metric. With
    ``"adaptive"`` (and ``plan_dense``) the ``"global"`` plan decides which layers stay
    dense; the ranks of the others are then left to the controller.

    Also returns, for each layer named in ``factor_ranks``, its ``(U, V)`` at that rank in
    the layer's dtype, from the same SVD (so that a student built later does not factor
    its weight again)."""
    rule = "global" if config.allocation == "adaptive" else config.allocation
    spectra, factors = [], {}
    for name, mod in targets.items():
        weight = dense_weight(mod)
        svd = init_svd(weight, config.init, stats.get(name), config.asvd_alpha)
        spectra.append(svd.spectrum())
        if factor_ranks and name in factor_ranks:
            U, V = svd.factors(factor_ranks[name])
            factors[name] = (U.to(weight.dtype), V.to(weight.dtype))
        del svd  # one layer's full SVD at a time
    ranks = plan_ranks(spectra, [infos[n] for n in targets], rule,
                       config.target_ratio, min_rank=config.min_rank,
                       floor=config.allocation_floor)
    return dict(zip(targets, ranks)), factors


def _dense_to_keep(planned: dict[str, TargetInfo], targets: dict[str, nn.Module],
                   config: TuneCompConfig) -> dict[str, TargetInfo]:
    """With ``"adaptive"``: the layers ``plan_dense`` keeps dense, unless that is every
    one of them (a budget at or near full size): then every layer is converted, as with
    ``plan_dense=False``, so that such a run still blends (one warning)."""
    if not planned or len(planned) < len(targets):
        return planned
    warnings.warn(
        f"target_ratio={config.target_ratio} leaves every targeted layer dense under the "
        "global plan, so plan_dense keeps none: every layer is converted and exported "
        "dense unless pruned below its break-even rank", stacklevel=3)
    return {}


def _start_rank(info: TargetInfo, config: TuneCompConfig, final_rank: int | None) -> int:
    full = min(info.in_features, info.out_features)
    if final_rank is not None and config.prune_fraction is not None:
        return start_rank(final_rank, info, config.prune_fraction)
    rank = min(full, max(config.min_rank, math.ceil(config.init_rank_ratio * full)))
    # a planned layer never starts below its final rank
    return rank if final_rank is None else max(rank, final_rank)


def _student(mod: nn.Module, info: TargetInfo, config: TuneCompConfig,
             stats: ActivationStats | None, final_rank: int | None = None,
             factors: Factors | None = None) -> MaskedLowRankLinear:
    """The low-rank student of one layer at the starting rank, its teacher attached and
    its parameters trainable exactly where the original's were. ``factors``: its
    ``(U, V)`` at the starting rank when already computed (:func:`planned_ranks`)."""
    rank = _start_rank(info, config, final_rank)
    layer = build_lowrank(mod, info, rank, config.init, stats, asvd_alpha=config.asvd_alpha,
                          backend=config.backend, factors=factors)
    if config.keeps_teacher:
        layer.set_teacher(dense_weight(mod), getattr(mod, "bias", None),
                          dtype=_teacher_dtype(config))
    for p_new in (layer.U, layer.V, layer.mask):
        p_new.requires_grad_(mod.weight.requires_grad)
    if layer.bias is not None and mod.bias is not None:
        layer.bias.requires_grad_(mod.bias.requires_grad)
    return layer


def _teacher_dtype(config: TuneCompConfig) -> torch.dtype | None:
    return None if config.teacher_dtype is None else getattr(torch, config.teacher_dtype)


def check_teacher_dtype(targets: dict[str, nn.Module], config: TuneCompConfig) -> None:
    """A reduced ``teacher_dtype`` needs float32 layers (or layers already in that dtype);
    checked before any layer is converted."""
    dtype = _teacher_dtype(config)
    if dtype is None or not config.keeps_teacher:
        return
    for name, mod in targets.items():
        if mod.weight.dtype not in (torch.float32, dtype):
            raise ValueError(
                f"TuneCompConfig(teacher_dtype={config.teacher_dtype!r}) needs a float32 "
                f"model, but layer {name!r} is {str(mod.weight.dtype).removeprefix('torch.')}; "
                "leave teacher_dtype=None to store the teachers in the model's dtype")


def _convert(targets: dict[str, nn.Module], infos: dict[str, TargetInfo],
             config: TuneCompConfig, stats: dict[str, ActivationStats]) -> tuple[dict, dict, dict]:
    """``(students, kept dense, final ranks)``: the plan (when the config plans), then a
    student for every layer it does not keep dense, in the targets' order."""
    plans = config.planned_allocation or config.plan_dense
    # with "adaptive" the starting ranks are known before the plan: keep the factors at
    # those ranks from the plan's SVD (a planned allocation sets them from the plan)
    factor_ranks = (None if config.planned_allocation else
                    {n: _start_rank(infos[n], config, None) for n in targets})
    final, factors = (planned_ranks(targets, infos, config, stats, factor_ranks) if plans
                      else ({}, {}))
    kept_dense = {n: infos[n] for n, k in final.items() if k == DENSE}
    if not config.planned_allocation:
        final = {}  # "adaptive": only the dense layers are decided before training
        kept_dense = _dense_to_keep(kept_dense, targets, config)
    layers = {name: _student(mod, infos[name], config, stats.get(name), final.get(name),
                             factors.pop(name, None))
              for name, mod in targets.items() if name not in kept_dense}
    return layers, kept_dense, final


def prepare(
    model: nn.Module,
    config: TuneCompConfig | None = None,
    calibration: Iterable[Any] | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] = call_model,
) -> TuneCompController:
    """Convert ``model``'s targeted layers in place and return the controller.

    Every selected ``nn.Linear`` / HF ``Conv1D`` is replaced (``setattr`` on its parent)
    by a :class:`~tunecomp_kernels.MaskedLowRankLinear` of starting rank
    ``ceil(init_rank_ratio·min(in, out))``, factored from its weight by ``config.init``,
    carrying the original weight as its frozen teacher (unless ``blend_steps == 0``), with
    α_0 = 1 and α'_0 from the blend. Build the optimiser *after* calling this.

    With a planned ``config.allocation`` each layer's final rank is fixed first from the
    init's spectrum (:mod:`~.allocation`): a layer that would not end smaller than dense
    stays as it is (fine-tuned dense), the others start at
    ``ceil(final / (1 − prune_fraction))`` (or ``init_rank_ratio``). With ``"adaptive"``
    and ``plan_dense`` (the default) the ``"global"`` plan decides only which layers stay
    dense; the others share the rest of the budget during training.

    Args:
        model: any ``nn.Module`` with linear layers (HF BERT, GPT-2, Llama, ViT, ...).
        config: the run's :class:`TuneCompConfig` (default: ``TuneCompConfig()``).
        calibration: an iterable of model inputs (dicts of tensors, tensors or tuples);
            required for ``init="asvd"``/``"svd_llm"`` and ``score="activation"``.
        forward: how to call the model on one batch (default ``model(**batch)`` /
            ``model(*batch)`` / ``model(batch)``); also used for teacher forwards.

    Layers that converting would break are never converted: a layer whose weight is tied
    to another tensor, a module registered under several parents, a layer frozen by the
    user (``weight.requires_grad=False``) and a layer its parent reads ``.weight``/``.bias``
    from directly (``nn.MultiheadAttention.out_proj``). The default selection leaves them
    dense with one warning per kind; selecting one with ``include`` is an error.

    Raises:
        ValueError: no layer matches, ``include`` selects a layer that cannot be converted,
            the target is infeasible, calibration is missing or empty.
    """
    config = TuneCompConfig() if config is None else config
    if not isinstance(config, TuneCompConfig):
        raise TypeError(f"config must be a TuneCompConfig, got {type(config).__name__}")
    config = config.resolved(calibrated=calibration is not None)
    targets = select_targets(model, config)
    infos = make_target_infos(targets)
    check_feasible(list(infos.values()), config)
    check_finite(targets)
    check_teacher_dtype(targets, config)

    stats = _calibration_stats(model, targets, config, calibration, forward)
    layers, kept_dense, final = _convert(targets, infos, config, stats)
    if not layers:
        raise ValueError(
            f"allocation={config.allocation!r} keeps every targeted layer dense at "
            f"target_ratio={config.target_ratio}: nothing to compress; lower target_ratio")
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    for name, info in kept_dense.items():
        setattr(targets[name], INFO_ATTR, info)  # counted (dense) by reports and exports
    targets.clear()
    keep_layer_forwards(model, list(layers))

    setattr(model, CONFIG_ATTR, config)
    guard_save_pretrained(model)  # a plain save_pretrained would reload random layers
    rms = {n: s.rms.float() for n, s in stats.items() if n in layers}
    return TuneCompController(
        model, layers, config, activation_rms=rms, forward=forward,
        final_ranks={n: final[n] for n in layers} if final else None,
        dense_layers=kept_dense)
