"""``compression_report``: parameter counts before and after, per layer and in total."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..nn.masked_lowrank_linear import MaskedLowRankLinear
from .budget import effective_cost, lowrank_is_smaller
from .targets import INFO_ATTR, TargetInfo


@dataclass
class LayerReport:
    """One targeted layer. ``rank`` is the active rank (``None`` once exported dense);
    ``kind`` is ``"low-rank"`` or ``"dense"`` (what the layer is, or will be when
    finalized); counts exclude biases and masks."""

    name: str
    kind: str
    in_features: int
    out_features: int
    rank: int | None
    params_before: int
    params_after: int

    @property
    def ratio(self) -> float:
        """``params_after / params_before``."""
        return self.params_after / self.params_before


@dataclass
class CompressionReport:
    """Per-layer and total parameter counts of the targeted layers, before and after.

    ``params_*`` count the targeted layers' weights (U and V, or dense ``in·out``);
    ``model_params_*`` count every parameter of the model (biases, embeddings, heads and
    the finalized masks included). ``target_ratio`` is the config's, if known.
    """

    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    model_params_before: int = 0
    model_params_after: int = 0
    target_ratio: float | None = None

    @property
    def ratio(self) -> float:
        """``params_after / params_before`` over the targeted layers."""
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def model_ratio(self) -> float:
        """``model_params_after / model_params_before``."""
        return self.model_params_after / self.model_params_before

    @property
    def within_budget(self) -> bool | None:
        """``params_after <= floor(target_ratio·params_before)`` (None without a target)."""
        if self.target_ratio is None:
            return None
        return self.params_after <= int(self.target_ratio * self.params_before)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the derived ratios."""
        return {
            "layers": [{**asdict(r), "ratio": r.ratio} for r in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "ratio": self.ratio,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_ratio": self.model_ratio,
            "target_ratio": self.target_ratio,
        }

    def __str__(self) -> str:
        width = max([len("layer")] + [len(r.name) for r in self.layers])
        head = (f"{'layer':<{width}}  {'kind':<8}  {'shape':>11}  {'rank':>5}  "
                f"{'before':>10}  {'after':>10}  {'kept':>6}")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r.out_features}x{r.in_features}"
            rank = "-" if r.rank is None else str(r.rank)
            lines.append(
                f"{r.name:<{width}}  {r.kind:<8}  {shape:>11}  {rank:>5}  "
                f"{r.params_before:>10,}  {r.params_after:>10,}  {r.ratio:>6.1%}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'targeted layers':<{width}}  {'':<8}  {'':>11}  {'':>5}  "
            f"{self.params_before:>10,}  {self.params_after:>10,}  {self.ratio:>6.1%}"
        )
        lines.append(
            f"{'whole model':<{width}}  {'':<8}  {'':>11}  {'':>5}  "
            f"{self.model_params_before:>10,}  {self.model_params_after:>10,}  "
            f"{self.model_ratio:>6.1%}"
        )
        if self.target_ratio is not None:
            verdict = "met" if self.within_budget else "NOT met"
            lines.append(f"target ratio {self.target_ratio:.4g}: budget {verdict}")
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> int:
    """Elements of ``model``'s parameters, each stored tensor counted once.

    Tied weights (one tensor under several names, or parameters viewing the same memory)
    count once: parameters are grouped by their storage and each distinct view of it
    (offset, shape, stride) is counted, so a storage is never counted twice.
    """
    seen: set[tuple] = set()
    total = 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if p.numel() and p.device.type != "meta":
            key = (p.device, p.untyped_storage().data_ptr(), p.storage_offset(),
                   tuple(p.shape), p.stride())
        else:
            key = ("id", id(p))
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def compression_report(model: nn.Module) -> CompressionReport:
    """Count the parameters of ``model``'s TuneComp layers before and after compression.

    Works on a prepared model mid-training (counting alive ranks and what the layer will
    be when finalized), on a finalized one and on one from ``load_compressed``. Every
    tensor is counted once, by storage (:func:`count_parameters`), so tied weights never
    count twice; ``prepare`` refuses to convert a layer whose weight is tied.

    Raises:
        ValueError: the model has no TuneComp layers.
    """
    rows: list[LayerReport] = []
    stored_now = 0  # weight parameters the targeted layers hold right now
    stored_after = 0  # ... and will hold once finalized (masks included)
    for _, mod in model.named_modules():
        info = getattr(mod, INFO_ATTR, None)
        if not isinstance(info, TargetInfo):
            continue
        if isinstance(mod, MaskedLowRankLinear):
            k = mod.active_rank
            stored_now += mod.U.numel() + mod.V.numel() + mod.mask.numel()
            smaller = lowrank_is_smaller(k, info)
            after = effective_cost(k, info)
            stored_after += after + (k if smaller else 0)
            rows.append(LayerReport(info.name, "low-rank" if smaller else "dense",
                                    info.in_features, info.out_features,
                                    k if smaller else None, info.dense_params, after))
        else:
            stored_now += mod.weight.numel()
            stored_after += info.dense_params
            rows.append(LayerReport(info.name, "dense", info.in_features, info.out_features,
                                    None, info.dense_params, info.dense_params))
    if not rows:
        raise ValueError("the model has no TuneComp layers: call prepare(model, config) first")
    total_now = count_parameters(model)
    config = getattr(model, "tunecomp_config", None)
    before = sum(r.params_before for r in rows)
    return CompressionReport(
        layers=rows,
        params_before=before,
        params_after=sum(r.params_after for r in rows),
        model_params_before=total_now - stored_now + before,
        model_params_after=total_now - stored_now + stored_after,
        target_ratio=getattr(config, "target_ratio", None),
    )
