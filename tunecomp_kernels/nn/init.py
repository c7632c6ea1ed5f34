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

import torch

INIT_METHODS = ("svd", "asvd", "svd_llm")


def _split(P: torch.Tensor, S: torch.Tensor, Qh: torch.Tensor, rank: int):
    root = S[:rank].sqrt()
    return P[:, :rank] * root, root[:, None] * Qh[:rank]


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD: returns U [out, rank], V [rank, in] (float64) with U·V ≈ weight."""
    P, S, Qh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return _split(P, S, Qh, rank)


def asvd_factors(
    weight: torch.Tensor, rank: int, input_abs_mean: torch.Tensor, alpha: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware SVD. ``input_abs_mean`` [in] is mean |x_j| over calibration tokens."""
    scale = input_abs_mean.detach().to(torch.float64).clamp_min(1e-6).pow(alpha)
    scale = scale / scale.mean()  # keep the factors' magnitude independent of the data scale
    P, S, Qh = torch.linalg.svd(weight.detach().to(torch.float64) * scale, full_matrices=False)
    U, V = _split(P, S, Qh, rank)
    return U, V / scale


def svd_llm_factors(
    weight: torch.Tensor, rank: int, gram: torch.Tensor, damping: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened (SVD-LLM) factors. ``gram`` [in, in] is Σ xᵀx over calibration tokens."""
    G = gram.detach().to(torch.float64)
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    G = G + damping * G.diagonal().mean().clamp_min(1e-12) * eye  # keep Cholesky well-posed
    L = torch.linalg.cholesky(G)  # G = L Lᵀ
    P, S, Qh = torch.linalg.svd(weight.detach().to(torch.float64) @ L, full_matrices=False)
    U, V = _split(P, S, Qh, rank)
    # V·L⁻¹ without forming the inverse: solve Lᵀ Zᵀ = Vᵀ.
    V = torch.linalg.solve_triangular(L.t(), V.t(), upper=True).t()
    return U, V


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
    U, V = lowrank_factors(weight, min(weight.shape), init, input_abs_mean=input_abs_mean,
                           gram=gram, asvd_alpha=asvd_alpha)
    # ‖U[:, i]‖ = √σ_i for every init (U = P·√σ with orthonormal P)
    return U.pow(2).sum(0)


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
    if init not in INIT_METHODS:
        raise ValueError(f"unknown init {init!r}; choose one of {list(INIT_METHODS)}")
    if init == "svd":
        return svd_factors(weight, rank)
    if init == "asvd":
        if input_abs_mean is None:
            raise ValueError("init='asvd' needs input_abs_mean [in] from calibration data")
        return asvd_factors(weight, rank, input_abs_mean, asvd_alpha)
    if gram is None:
        raise ValueError("init='svd_llm' needs gram [in, in] from calibration data "
                         "(the Gram matrix of the calibration inputs)")
    return svd_llm_factors(weight, rank, gram)
