"""Initialisers: factor a dense weight W [out, in] into U [out, r] · V [r, in].

* ``svd``     — truncated SVD of W (best rank-r fit in Frobenius norm).
* ``asvd``    — activation-aware: SVD of W·S with S = diag(mean|x|^alpha) from calibration
               data, so that input channels that carry large activations are kept better.
* ``svd_llm`` — whitened: SVD of W·L with L the Cholesky factor of the input Gram matrix
               XᵀX, which makes the truncation minimise the *output* error ‖(W − UV)X‖.

The singular values are split evenly (√σ into each factor) so U and V are on one scale.
All factorisations run in float64; factors are returned in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

INIT_METHODS = ("svd", "asvd", "svd_llm")


def _split(P: torch.Tensor, S: torch.Tensor, Qh: torch.Tensor, rank: int):
    root = S[:rank].sqrt()
    return P[:, :rank] * root, root[:, None] * Qh[:rank]


@dataclass(frozen=True)
class InitSVD:
    """The SVD that an init truncates, ``W·M = P·diag(σ)·Qh`` (float64; M = I, S or L), and
    the map of its right factor back to W's inputs (``V·M⁻¹``). One per weight: the
    spectrum (for rank planning) and the factors at any rank come from the same SVD."""

    P: torch.Tensor
    S: torch.Tensor
    Qh: torch.Tensor
    unmix: Callable[[torch.Tensor], torch.Tensor]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``U [out, rank]``, ``V [rank, in]`` (float64) with ``U·V ≈ W``."""
        U, V = _split(self.P, self.S, self.Qh, rank)
        return U, self.unmix(V)

    def spectrum(self) -> torch.Tensor:
        """σ [min(in, out)] (float64, descending) as ``‖U[:, i]‖²`` of the full-rank U."""
        U, _ = _split(self.P, self.S, self.Qh, self.S.shape[0])
        return U.pow(2).sum(0)  # = σ_i: U = P·√σ with orthonormal P


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(matrix, full_matrices=False)


def _same(V: torch.Tensor) -> torch.Tensor:
    return V


def svd_decomposition(weight: torch.Tensor) -> InitSVD:
    """``svd``: the SVD of W itself."""
    return InitSVD(*_svd(weight.detach().to(torch.float64)), unmix=_same)


def asvd_decomposition(weight: torch.Tensor, input_abs_mean: torch.Tensor,
                       alpha: float = 0.5) -> InitSVD:
    """``asvd``: the SVD of W·S, S = diag(mean|x|^alpha) (``input_abs_mean`` [in])."""
    scale = input_abs_mean.detach().to(torch.float64).clamp_min(1e-6).pow(alpha)
    scale = scale / scale.mean()  # keep the factors' magnitude independent of the data scale
    return InitSVD(*_svd(weight.detach().to(torch.float64) * scale),
                   unmix=lambda V: V / scale)


def svd_llm_decomposition(weight: torch.Tensor, gram: torch.Tensor,
                          damping: float = 1e-4) -> InitSVD:
    """``svd_llm``: the SVD of W·L, G = L·Lᵀ the damped Gram matrix (``gram`` [in, in])."""
    G = gram.detach().to(torch.float64)
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    G = G + damping * G.diagonal().mean().clamp_min(1e-12) * eye  # keep Cholesky well-posed
    L = torch.linalg.cholesky(G)  # G = L Lᵀ

    def unmix(V: torch.Tensor) -> torch.Tensor:
        # V·L⁻¹ without forming the inverse: solve Lᵀ Zᵀ = Vᵀ.
        return torch.linalg.solve_triangular(L.t(), V.t(), upper=True).t()

    return InitSVD(*_svd(weight.detach().to(torch.float64) @ L), unmix=unmix)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD: returns U [out, rank], V [rank, in] (float64) with U·V ≈ weight."""
    return svd_decomposition(weight).factors(rank)


def asvd_factors(
    weight: torch.Tensor, rank: int, input_abs_mean: torch.Tensor, alpha: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware SVD. ``input_abs_mean`` [in] is mean |x_j| over calibration tokens."""
    return asvd_decomposition(weight, input_abs_mean, alpha).factors(rank)


def svd_llm_factors(
    weight: torch.Tensor, rank: int, gram: torch.Tensor, damping: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened (SVD-LLM) factors. ``gram`` [in, in] is Σ xᵀx over calibration tokens."""
    return svd_llm_decomposition(weight, gram, damping).factors(rank)


def init_decomposition(
    weight: torch.Tensor,
    init: str = "svd",
    *,
    input_abs_mean: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
    asvd_alpha: float = 0.5,
) -> InitSVD:
    """The :class:`InitSVD` that ``init`` truncates for ``weight [out, in]``.

    Raises:
        ValueError: unknown ``init``, or the statistic it needs is missing.
    """
    if init not in INIT_METHODS:
        raise ValueError(f"unknown init {init!r}; choose one of {list(INIT_METHODS)}")
    if init == "svd":
        return svd_decomposition(weight)
    if init == "asvd":
        if input_abs_mean is None:
            raise ValueError("init='asvd' needs input_abs_mean [in] from calibration data")
        return asvd_decomposition(weight, input_abs_mean, asvd_alpha)
    if gram is None:
        raise ValueError("init='svd_llm' needs gram [in, in] from calibration data "
                         "(the Gram matrix of the calibration inputs)")
    return svd_llm_decomposition(weight, gram)


def init_spectrum(
    weight: torch.Tensor,
    init: str = "svd",
    *,
    input_abs_mean: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
    asvd_alpha: float = 0.5,
) -> torch.Tensor:
    """The singular values ``σ [min(in, out)]`` (float64, descending) that ``init``
    truncates: of W (``svd``), of W·S (``asvd``), of W·L (``svd_llm``), i.e. each rank's
    importance in the init's own metric. Same arguments and errors as
    :func:`lowrank_factors`."""
    return init_decomposition(weight, init, input_abs_mean=input_abs_mean, gram=gram,
                              asvd_alpha=asvd_alpha).spectrum()


def lowrank_factors(
    weight: torch.Tensor,
    rank: int,
    init: str = "svd",
    *,
    input_abs_mean: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
    asvd_alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U [out, rank]``, ``V [rank, in]`` (float64) with ``U·V ≈ weight [out, in]`` by
    ``init``: ``"svd"``, ``"asvd"`` (needs ``input_abs_mean [in]``) or ``"svd_llm"`` (needs
    ``gram [in, in]``).

    Raises:
        ValueError: unknown ``init``, or the statistic it needs is missing.
    """
    return init_decomposition(weight, init, input_abs_mean=input_abs_mean, gram=gram,
                              asvd_alpha=asvd_alpha).factors(rank)
