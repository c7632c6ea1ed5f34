"""The compiled training step of ``bench/e2e.py``: ``train_dense_compiled``,
``train_joint_compiled`` and ``train_after_compact_compiled``.

Each is its eager method (same model, state, optimiser and step) with the model wrapped by
``torch.compile(model)`` — the usual user path: the model call, which computes the task
loss from ``labels``, runs as compiled forward + backward (AOT autograd). The rest of the
step stays eager: the optimiser step, ``controller.regularization`` (its λ is a Python
float that changes every step, so inside the graph it would be a constant to recompile
for) and ``controller.step()``. The blend scales are 0-d tensors, so the joint step keeps
one graph while α moves (README, torch.compile; docs/design.md#measuring).

Warm-up absorbs compilation: :func:`warm_up` runs ``WARMUP_STEPS`` steps before any
timing. Two, because a Hugging Face classifier sets ``config.problem_type`` in its first
forward and Dynamo guards on it, so step 2 captures a second graph. ``compile_s`` is the
time the warm-up spent beyond that many ordinary steps (:func:`compile_overhead`: Dynamo
capture + Inductor codegen of forward and backward, both captures). A backend that counts
its captures tells whether anything recompiled while timed (``graphs_*``). During the
blend the joint step compacts pruned ranks away now and then: U, mask and V shrink, and
Dynamo, which keeps parameter shapes static, recompiles at each such event.
"""

from __future__ import annotations

import time
from collections.abc import Callable

COMPILED_SUFFIX = "_compiled"
COMPILED_TRAIN_METHODS = ("train_dense_compiled", "train_joint_compiled",
                          "train_after_compact_compiled")
WARMUP_STEPS = 2  # step 1 compiles; step 2 recompiles (HF sets config.problem_type)


def base_method(method: str) -> str:
    """The eager method a compiled one mirrors (``train_joint_compiled`` ->
    ``train_joint``); other names come back unchanged."""
    return method.removesuffix(COMPILED_SUFFIX)


def is_compiled(method: str) -> bool:
    """Whether ``method`` (a name without ``@ratio``) is a compiled training method."""
    return method in COMPILED_TRAIN_METHODS


class CountingBackend:
    """A ``torch.compile`` backend that hands each captured graph to the named backend
    (``"inductor"``, ``"aot_eager"``, ...) and counts the captures: one per graph, so a
    graph break or a recompile shows as a count above 1."""

    def __init__(self, name: str = "inductor") -> None:
        import torch._dynamo

        self.name = name
        self.graphs = 0
        self._compile = torch._dynamo.lookup_backend(name)  # raises for an unknown name

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self._compile(gm, example_inputs)


def compile_model(model, backend: str = "inductor"):
    """``torch.compile(model)`` with a :class:`CountingBackend`; returns ``(compiled,
    counter)``. The compiled module shares the model's parameters, so the optimiser and
    the controller built on ``model`` drive it unchanged."""
    import torch

    counter = CountingBackend(backend)
    return torch.compile(model, backend=counter), counter


def warm_up(step: Callable[[], object], counter: CountingBackend,
            steps: int = WARMUP_STEPS) -> dict:
    """Run ``steps`` (>= 1) training steps before timing; the first compiles.

    Returns ``warmup_step_s`` (every warm-up step's wall time) and
    ``graphs_after_first_step`` / ``graphs_after_warmup``; ``compile_s`` comes after
    timing (:func:`recompile_report`). Raises ``ValueError`` for ``steps < 1``.
    """
    if steps < 1:
        raise ValueError(f"warm_up needs at least 1 step (the compiling one), got {steps}")
    times, graphs = [], []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        graphs.append(counter.graphs)
    return {"warmup_step_s": times,
            "graphs_after_first_step": graphs[0], "graphs_after_warmup": graphs[-1],
            "compile_backend": counter.name}


def compile_overhead(step_s: list[float], median_step_s: float,
                     steps: int = WARMUP_STEPS) -> float:
    """Seconds the first ``steps`` steps took beyond ``steps`` ordinary (median) steps:
    the compilation they absorbed."""
    return sum(step_s[:steps]) - len(step_s[:steps]) * median_step_s


def recompile_report(info: dict, counter: CountingBackend, median_step_s: float) -> dict:
    """After timing: ``compile_s`` (:func:`compile_overhead` of the warm-up), ``graphs_total``
    and ``recompiled_while_timed`` (captures after warm-up: each one is compilation time
    inside a timed step)."""
    return {"compile_s": compile_overhead(info["warmup_step_s"], median_step_s),
            "graphs_total": counter.graphs,
            "recompiled_while_timed": counter.graphs - info["graphs_after_warmup"]}


def guard_failures(limit: int = 5) -> dict[str, list[str]]:
    """Dynamo's recorded guard failures (why a cached graph was not reused) per compiled
    function, process-wide, at most ``limit`` reasons each. Several models of one class
    share code objects, so a model's first capture also shows as a failure of the others'
    identity guards."""
    import torch._dynamo.utils as dynamo_utils

    out = {}
    for code, reasons in getattr(dynamo_utils, "guard_failures", {}).items():
        key = f"{getattr(code, 'co_name', code)}:{getattr(code, 'co_firstlineno', '')}"
        out[key] = [str(r)[:300] for r in list(reasons)[:limit]]
    return out
