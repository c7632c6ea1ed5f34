"""Deterministic mode: bit-identical results from run to run.

``tunecomp_kernels.deterministic()`` switches it on for the whole process;
``with tunecomp_kernels.deterministic(): ...`` switches it on for a block and restores the
previous settings afterwards (also on error). It

* calls ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic
  implementation then raises, or only warns with ``warn_only=True``), turns off cuDNN
  benchmarking and sets ``CUBLAS_WORKSPACE_CONFIG`` if unset (cuBLAS needs it);
* makes the op avoid nondeterministic backends: ``backend="auto"`` skips them (the
  Triton backend reduces split-K, dmask, dbias and fused dU with atomic adds, whose order
  varies between runs) and asking for one by name raises a ``RuntimeError`` (a warning
  with ``warn_only=True``) — the same contract as torch's own flag;
* with ``seed=``, seeds torch (CPU and CUDA), Python's ``random`` and NumPy.

The op follows torch's flag, so ``torch.use_deterministic_algorithms(True)`` on its own
also keeps the op on deterministic backends. On the CPU the reference backend is
deterministic for a fixed thread count; on a GPU results are run-to-run identical on the
same hardware and software, not across GPUs or library versions.
"""

from __future__ import annotations

import os
import random
from types import TracebackType

import torch

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"


def is_deterministic() -> bool:
    """Whether deterministic mode (torch's deterministic-algorithms flag) is on."""
    return torch.are_deterministic_algorithms_enabled()


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), Python's ``random`` and NumPy with ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r})")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return
    np.random.seed(seed)


class deterministic:  # noqa: N801 - used like a function, as torch.no_grad is
    """Turn deterministic mode on (or off with ``enabled=False``); see the module docs.

    Calling it applies the settings at once; used as a context manager it also restores
    the previous settings on exit::

        tunecomp_kernels.deterministic(seed=0)       # for the rest of the process
        with tunecomp_kernels.deterministic():       # for one block
            run()

    Args:
        enabled: switch deterministic mode on (True) or off (False).
        warn_only: forwarded to ``torch.use_deterministic_algorithms``: warn instead of
            raising when a nondeterministic op or backend is asked for by name.
        seed: if given, also seed torch, ``random`` and NumPy.
    """

    def __init__(self, enabled: bool = True, *, warn_only: bool = False,
                 seed: int | None = None) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        if not isinstance(warn_only, bool):
            raise TypeError(f"warn_only must be a bool, got {type(warn_only).__name__}")
        self._previous = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
            os.environ.get(CUBLAS_ENV),
        )
        if seed is not None:
            seed_everything(seed)
        if enabled:
            os.environ.setdefault(CUBLAS_ENV, ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = enabled
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)

    def __enter__(self) -> deterministic:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        enabled, warn_only, cudnn_det, cudnn_bench, cublas = self._previous
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.deterministic = cudnn_det
        torch.backends.cudnn.benchmark = cudnn_bench
        if cublas is None:
            os.environ.pop(CUBLAS_ENV, None)
        else:
            os.environ[CUBLAS_ENV] = cublas

    def __repr__(self) -> str:
        return f"deterministic(enabled={is_deterministic()})"
