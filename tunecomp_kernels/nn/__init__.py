"""Modules built on the op, and their initialisers."""

from .init import INIT_METHODS, asvd_factors, lowrank_factors, svd_factors, svd_llm_factors
from .masked_lowrank_linear import FactorStats, MaskedLowRankLinear

__all__ = [
    "INIT_METHODS",
    "FactorStats",
    "MaskedLowRankLinear",
    "asvd_factors",
    "lowrank_factors",
    "svd_factors",
    "svd_llm_factors",
]
