"""``MaskedLowRankLinear``: a drop-in for ``nn.Linear`` whose weight is U·diag(mask)·V."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..ops.api import masked_lowrank_linear, masked_lowrank_linear_distill
from ..ops.backends import check_backend_name
from ..ops.validation import REDUCED_TEACHER_DTYPES, SUPPORTED_DTYPES
from .init import INIT_METHODS, lowrank_factors


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class FactorStats(NamedTuple):
    """Calibration statistics a data-aware init reads (any object with these attributes
    works): ``abs_mean [in]`` for ASVD, ``gram [in, in]`` for SVD-LLM."""

    abs_mean: torch.Tensor | None = None
    gram: torch.Tensor | None = None


class MaskedLowRankLinear(nn.Module):
    """``y = s·((x Vᵀ ⊙ mask) Uᵀ + bias) + a·(x W0ᵀ + b0)``, a drop-in for ``nn.Linear``.

    Parameters: ``U [out, rank]``, ``mask [rank]``, ``V [rank, in]``, ``bias [out]``.
    An optional frozen teacher ``W0 [out, in]``/``b0 [out]`` (buffers, no gradient) is
    blended in with ``teacher_scale`` (a) while ``student_scale`` (s) grows — the TuneComp
    schedule sets both. With no teacher and ``s = 1`` it is exactly a low-rank linear layer.

    Args:
        in_features, out_features: as ``nn.Linear``.
        rank: number of rank-1 components, ``1 <= rank <= min(in, out)``.
        bias: learn an additive bias.
        backend: op backend, ``"auto"`` or a name from ``available_backends()``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        in_features = _check_size("in_features", in_features)
        out_features = _check_size("out_features", out_features)
        rank = _check_size("rank", rank)
        if rank > min(in_features, out_features):
            raise ValueError(
                f"rank={rank} exceeds min(in_features, out_features)="
                f"{min(in_features, out_features)}; a larger rank cannot add expressiveness"
            )
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"dtype must be float16, bfloat16, float32 or float64, got {dtype}"
            )
        check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.mask = nn.Parameter(torch.ones(rank, **factory))
        self.V = nn.Parameter(torch.empty(rank, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("teacher_weight", None)
        self.register_buffer("teacher_bias", None)
        # The blend scales reach the op as these 0-d tensors, updated in place by the
        # teacher_scale / student_scale setters: torch.compile reads them as data, so a
        # new α does not recompile. Non-persistent: state_dict keys are unchanged.
        scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for name in ("teacher_scale_tensor", "student_scale_tensor", "feature_scale_tensor"):
            self.register_buffer(name, torch.zeros((), dtype=scale_dtype, device=device),
                                 persistent=False)
        self.teacher_scale = 0.0
        self.student_scale = 1.0
        self.feature_weight = 0.0
        #: ℓ of the last forward with a feature weight (detached 0-d fp32), else None.
        self.feature_loss: torch.Tensor | None = None
        self.reset_parameters()

    # --- nn.Linear compatibility -------------------------------------------------------

    def reset_parameters(self) -> None:
        """Random init with nn.Linear's output variance: Var(UV)_ij = 1 / (3·in)."""
        bound_v = 1.0 / math.sqrt(self.in_features)
        bound_u = math.sqrt(3.0 / self.rank)
        with torch.no_grad():
            nn.init.uniform_(self.V, -bound_v, bound_v)
            nn.init.uniform_(self.U, -bound_u, bound_u)
            self.mask.fill_(1.0)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound_v, bound_v)

    @property
    def rank(self) -> int:
        """Number of stored rank-1 components (including pruned ones until ``compact()``)."""
        return self.mask.shape[0]

    @property
    def active_rank(self) -> int:
        """Components whose mask is non-zero."""
        return int(torch.count_nonzero(self.mask.detach()))

    @property
    def weight(self) -> torch.Tensor:
        """Read-only dense view ``U diag(mask) V`` [out, in] of the student, for code that reads
        ``.weight``. It is a fresh tensor: writing to it changes nothing."""
        return (self.U * self.mask) @ self.V

    def __setattr__(self, name: str, value: object) -> None:
        if name == "weight":
            raise AttributeError(
                "MaskedLowRankLinear.weight is read-only (it is U·diag(mask)·V); "
                "set U, mask and V instead"
            )
        super().__setattr__(name, value)

    # --- blend scales ------------------------------------------------------------------

    @property
    def teacher_scale(self) -> float:
        """The teacher's blend scale ``a`` (a float; the forward passes the 0-d buffer
        ``teacher_scale_tensor``, which the setter updates in place)."""
        return self._teacher_scale

    @teacher_scale.setter
    def teacher_scale(self, value: float) -> None:
        self._teacher_scale = self._set_scale("teacher_scale", value)

    @property
    def student_scale(self) -> float:
        """The student's blend scale ``s`` (a float; see :attr:`teacher_scale`)."""
        return self._student_scale

    @student_scale.setter
    def student_scale(self, value: float) -> None:
        self._student_scale = self._set_scale("student_scale", value)

    @property
    def feature_weight(self) -> float:
        """β, the weight of this layer's feature loss ``ℓ = Σ(y_s − y_t)² / Σ y_t²``
        (student branch against teacher branch on the same forward,
        :func:`~tunecomp_kernels.ops.masked_lowrank_linear_distill`); its gradient is
        injected into U, mask, V and bias while a teacher is present and β > 0. Default 0."""
        return self._feature_weight

    @feature_weight.setter
    def feature_weight(self, value: float) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"feature_weight must be >= 0, got {value}")
        # its 0-d buffer is feature_scale_tensor: like the blend scales, a scale of a term
        self._feature_weight = self._set_scale("feature_weight", value, "feature_scale")
        # a bool for the forward's branch: torch.compile guards on it, not on β's value
        self.feature_loss_active = self._feature_weight > 0

    def _set_scale(self, name: str, value: float, buffer: str | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        with torch.no_grad():
            getattr(self, f"{buffer or name}_tensor").fill_(value)
        return value

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202  (nn.Module's signature)
        super()._apply(fn, recurse)
        # .half() / .to(torch.bfloat16) would round the scales (0.3 -> 0.2998): keep fp32.
        # to_empty() (meta-device loading) leaves them uninitialised, and they are not in
        # the state_dict: refill them from the float values every time.
        for name, value in (("teacher_scale_tensor", self._teacher_scale),
                            ("student_scale_tensor", self._student_scale),
                            ("feature_scale_tensor", self._feature_weight)):
            buf = self._buffers.get(name)
            if buf is None:
                continue
            if buf.dtype not in (torch.float32, torch.float64):
                buf = self._buffers[name] = torch.empty((), dtype=torch.float32,
                                                        device=buf.device)
            with torch.no_grad():
                buf.fill_(value)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        teacher = self.teacher_weight
        # Eager calls skip a zero-weight teacher; a compiled graph must not read the float
        # (Dynamo would guard on its value), so it always blends the present teacher in.
        if not torch.compiler.is_compiling() and self._teacher_scale == 0.0:
            teacher = None
        if teacher is not None and self.feature_loss_active:
            y, self.feature_loss = masked_lowrank_linear_distill(
                x, self.U, self.mask, self.V, self.bias, teacher_weight=teacher,
                teacher_bias=self.teacher_bias, teacher_scale=self.teacher_scale_tensor,
                student_scale=self.student_scale_tensor,
                feature_weight=self.feature_scale_tensor, backend=self.backend)
            return y
        return masked_lowrank_linear(
            x, self.U, self.mask, self.V, self.bias,
            teacher_weight=teacher,
            teacher_bias=self.teacher_bias if teacher is not None else None,
            teacher_scale=self.teacher_scale_tensor,
            student_scale=self.student_scale_tensor,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"rank={self.rank}",
        ]
        active = self.active_rank
        if active != self.rank:
            parts.append(f"active_rank={active}")
        parts.append(f"bias={self.bias is not None}")
        if self.teacher_weight is not None:
            parts.append(f"teacher_scale={self.teacher_scale:.4g}")
        if self.student_scale != 1.0:
            parts.append(f"student_scale={self.student_scale:.4g}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    # --- teacher -------------------------------------------------------------------------

    def set_teacher(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Attach a frozen dense teacher ``W0 [out, in]`` (and ``b0 [out]``) as buffers.

        ``dtype``: the dtype the teacher is stored in; ``None`` (default) is the layer's.
        A float32 layer may store it in ``torch.bfloat16`` or ``torch.float16`` (half the
        bytes; the op upcasts it and accumulates in fp32, with the stored, rounded values).

        Raises:
            ValueError: a shape that does not fit, or a dtype the op cannot blend with the
                layer's (anything but the layer's own, or bf16/fp16 for a float32 layer).
        """
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"teacher weight must be {list(expected)}, got {list(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(
                f"teacher bias must be [{self.out_features}], got {list(bias.shape)}"
            )
        like = self.U
        dtype = like.dtype if dtype is None else dtype
        allowed = (like.dtype, *REDUCED_TEACHER_DTYPES.get(like.dtype, ()))
        if dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            raise ValueError(f"teacher dtype {dtype} cannot be blended with this "
                             f"{str(like.dtype).removeprefix('torch.')} layer; use one of: "
                             f"{names}")
        self.teacher_weight = weight.detach().to(device=like.device, dtype=dtype).clone()
        self.teacher_bias = (
            None if bias is None
            else bias.detach().to(device=like.device, dtype=dtype).clone()
        )

    def drop_teacher(self) -> None:
        """Free the teacher's memory; the layer becomes the student alone."""
        self.teacher_weight = None
        self.teacher_bias = None
        self.teacher_scale = 0.0

    # --- conversion ----------------------------------------------------------------------

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        rank: int | None = None,
        init: str = "svd",
        stats: FactorStats | None = None,
        asvd_alpha: float = 0.5,
        backend: str = "auto",
        factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> MaskedLowRankLinear:
        """The one constructor from a dense layer: factor ``weight [out, in]`` into
        ``U [out, rank]``, ``V [rank, in]`` and copy ``bias [out]``. ``factors``: that
        ``(U, V)`` already computed by ``init`` (``InitSVD.factors(rank)``, any float
        dtype), copied as given (rounded to the layer's dtype) instead of factoring
        ``weight`` again; ``init`` and ``stats`` are then not used, and ``rank`` must
        still be given (or is ``min(in, out)``).

        ``init`` is ``"svd"`` (truncated SVD), ``"asvd"`` (needs ``stats.abs_mean [in]``,
        mean |x| per input channel) or ``"svd_llm"`` (needs ``stats.gram [in, in]``, Σ xᵀx);
        ``stats`` is any object with those attributes, e.g. the compress package's
        ``ActivationStats``. ``rank=None`` keeps full rank ``min(in, out)``, which reproduces
        ``x Wᵀ + b`` to rounding. Factors are computed in float64; the layer gets
        ``weight``'s device and dtype, no teacher, a mask of ones and scale 1. An HF
        ``Conv1D`` stores its weight ``[in, out]``: pass ``conv.weight.t()``.

        Raises:
            TypeError: ``weight`` is not a tensor.
            ValueError: ``weight`` is not 2-D, holds NaN/inf or has an unsupported dtype;
                ``bias`` or a statistic has the wrong shape; ``rank`` is out of
                ``[1, min(in, out)]``; ``init`` is unknown or its statistic is missing
                (without ``factors``); ``factors`` do not have shapes ``[out, rank]`` and
                ``[rank, in]``.
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {list(weight.shape)}")
        if init not in INIT_METHODS:
            raise ValueError(f"unknown init {init!r}; choose one of {list(INIT_METHODS)}")
        out_f, in_f = weight.shape
        rank = min(in_f, out_f) if rank is None else rank
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias must have shape [{out_f}] for weight [{out_f}, {in_f}], "
                             f"got {list(bias.shape)}")
        if weight.is_floating_point():
            bad = int((~torch.isfinite(weight.detach())).sum())
            if bad:
                raise ValueError(f"weight [{out_f}, {in_f}] has {bad} NaN/inf values; "
                                 "cannot factor it")
        abs_mean = getattr(stats, "abs_mean", None)
        gram = getattr(stats, "gram", None)
        for what, stat, expected in (("input_abs_mean", abs_mean, (in_f,)),
                                     ("gram", gram, (in_f, in_f))):
            if stat is not None and tuple(stat.shape) != expected:
                raise ValueError(f"{what} must have shape {list(expected)} for a Linear with "
                                 f"in_features={in_f}, got {list(stat.shape)}")
        layer = cls(in_f, out_f, rank, bias=bias is not None,
                    device=weight.device, dtype=weight.dtype, backend=backend)
        if factors is None:
            factors = lowrank_factors(weight, rank, init, input_abs_mean=abs_mean, gram=gram,
                                      asvd_alpha=asvd_alpha)
        U, V = factors
        if tuple(U.shape) != (out_f, rank) or tuple(V.shape) != (rank, in_f):
            raise ValueError(f"factors must have shapes [{out_f}, {rank}] and [{rank}, {in_f}], "
                             f"got {list(U.shape)} and {list(V.shape)}")
        with torch.no_grad():
            layer.U.copy_(U)
            layer.V.copy_(V)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        init: str = "svd",
        *,
        input_abs_mean: torch.Tensor | None = None,
        gram: torch.Tensor | None = None,
        asvd_alpha: float = 0.5,
        backend: str = "auto",
    ) -> MaskedLowRankLinear:
        """Factor ``linear``'s weight by truncated SVD (or ASVD / SVD-LLM, which need
        calibration statistics: ``input_abs_mean [in]`` or ``gram [in, in]``); see
        :meth:`from_dense`, which this calls.

        ``rank=None`` keeps full rank ``min(in, out)``, which reproduces the Linear's output
        to rounding. The result has ``linear``'s device and dtype and a copy of its bias.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        out_f, in_f = linear.weight.shape
        bad = int((~torch.isfinite(linear.weight.detach())).sum())
        if bad:  # named after the Linear's attribute, which is what the caller passed
            raise ValueError(f"linear.weight [{out_f}, {in_f}] has {bad} NaN/inf values; "
                             "cannot factor it")
        return cls.from_dense(linear.weight, linear.bias, rank=rank, init=init,
                              stats=FactorStats(input_abs_mean, gram),
                              asvd_alpha=asvd_alpha, backend=backend)

    @torch.no_grad()
    def compact(self) -> MaskedLowRankLinear:
        """Drop the ranks whose mask is exactly 0, in place; returns ``self``.

        The output is unchanged (those ranks contribute exactly 0). The U, mask and V
        parameters are replaced, so build the optimiser after compacting.
        """
        keep = (self.mask != 0).nonzero().flatten()
        if keep.numel() == self.rank:
            return self
        self.U = nn.Parameter(self.U.index_select(1, keep), self.U.requires_grad)
        self.mask = nn.Parameter(self.mask.index_select(0, keep), self.mask.requires_grad)
        self.V = nn.Parameter(self.V.index_select(0, keep), self.V.requires_grad)
        return self

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (teacher blend included)."""
        weight = self.student_scale * self.weight
        bias = None if self.bias is None else self.student_scale * self.bias
        if self.teacher_weight is not None and self.teacher_scale != 0.0:
            # a bf16/fp16 teacher is upcast before scaling: a·W0 rounded to bf16 would
            # lose what the op keeps (it accumulates the blend in fp32)
            weight = weight + self.teacher_scale * self.teacher_weight.to(weight.dtype)
            if self.teacher_bias is not None:
                teacher_b = self.teacher_scale * self.teacher_bias.to(weight.dtype)
                bias = teacher_b if bias is None else bias + teacher_b
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear
