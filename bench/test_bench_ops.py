"""Op benchmarks (pytest-benchmark): every available backend of ``masked_lowrank_linear``
against dense ``nn.Linear`` and unfused PyTorch low-rank, forward and forward+backward.

Run (not part of the test suite: ``pytest`` alone collects ``tests/`` only)::

    pytest bench/ --benchmark-only
    pytest bench/ --benchmark-only --benchmark-json bench/results/ops_cpu.json

Each benchmark group is one (shape, pass, teacher) case; inside a group compare the rows
(pytest-benchmark prints them side by side). Contenders:

* ``dense``       — ``F.linear(x, W, b)`` (``W [out, in]``); with ``teacher`` the dense
  reference is the blend ``a·(x W0ᵀ + b0) + s·(x Wᵀ + b)`` written as two ``F.linear``;
* ``unfused``     — low-rank in plain PyTorch autograd: ``((x Vᵀ) ⊙ mask) Uᵀ + b`` (plus
  the teacher term), the code a user would write without this library;
* ``op-<backend>``— :func:`tunecomp_kernels.masked_lowrank_linear` with that backend; an
  unavailable backend is skipped with the reason (the Triton interpreter is skipped: it
  is a correctness tool, not something to time).

``TUNECOMP_BENCH_THREADS`` sets torch's intra-op threads (default 1: the shared CI machine
has 2 busy cores). On a CUDA machine the same cases also run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tunecomp_kernels import masked_lowrank_linear
from tunecomp_kernels.ops.backends import backend_serves, known_backends, unavailable_reason

THREADS = int(os.environ.get("TUNECOMP_BENCH_THREADS", "1"))

# (N tokens, in, out, rank): a MiniLM FFN up-projection at 32×128 tokens with the rank a
# 50 % budget gives it, a 1024-wide square layer at d/8 and d/2, and a decode-size batch.
SHAPES = {
    "minilm-ffn-N4096-384x1536-r96": (4096, 384, 1536, 96),
    "sq1024-N4096-r128": (4096, 1024, 1024, 128),
    "sq1024-N4096-r512": (4096, 1024, 1024, 512),
    "sq1024-N16-r128": (16, 1024, 1024, 128),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _contenders(device: str) -> list:
    params = [pytest.param("dense", id="dense"), pytest.param("unfused", id="unfused")]
    for name in known_backends():
        reason = unavailable_reason(name)
        if reason is None and not backend_serves(name, device):
            reason = f"backend {name} does not serve {device} tensors"
        if reason is None and name == "triton" and device == "cpu":
            reason = "Triton on CPU is the interpreter (TRITON_INTERPRET=1): not timed"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(f"op-{name}", id=f"op-{name}", marks=marks))
    return params


def _inputs(n, in_f, out_f, rank, device, teacher, grad):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    t = {
        "x": rnd(n, in_f),
        "U": rnd(out_f, rank, scale=rank**-0.5),
        "mask": (torch.rand(rank, generator=g) + 0.5).to(device),
        "V": rnd(rank, in_f, scale=in_f**-0.5),
        "bias": rnd(out_f),
        "W": rnd(out_f, in_f, scale=in_f**-0.5),  # the dense contender's weight
        "W0": rnd(out_f, in_f, scale=in_f**-0.5) if teacher else None,
        "b0": rnd(out_f) if teacher else None,
    }
    if grad:
        for k in ("x", "U", "mask", "V", "bias", "W"):
            t[k].requires_grad_()
    return t


def _forward_fn(contender: str, t: dict, teacher: bool):
    a, s = (0.3, 0.95) if teacher else (0.0, 1.0)
    x = t["x"]
    if contender == "dense":
        def f():
            y = F.linear(x, t["W"], t["bias"])
            if teacher:
                y = s * y + a * F.linear(x, t["W0"], t["b0"])
            return y
    elif contender == "unfused":
        def f():
            y = F.linear((x @ t["V"].t()) * t["mask"], t["U"], t["bias"])
            if teacher:
                y = s * y + a * F.linear(x, t["W0"], t["b0"])
            return y
    else:
        backend = contender.removeprefix("op-")

        def f():
            return masked_lowrank_linear(
                x, t["U"], t["mask"], t["V"], t["bias"], teacher_weight=t["W0"],
                teacher_bias=t["b0"], teacher_scale=a, student_scale=s, backend=backend)
    return f


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("teacher", [False, True], ids=["student", "blend"])
@pytest.mark.parametrize("pass_", ["forward", "full"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("contender", _contenders("cpu"))
def test_op(benchmark, contender, shape, pass_, teacher, device):
    if device == "cuda" and contender.startswith("op-"):
        name = contender.removeprefix("op-")
        if unavailable_reason(name) is not None or not backend_serves(name, "cuda"):
            pytest.skip(f"backend {name} cannot run on cuda here")
    n, in_f, out_f, rank = SHAPES[shape]
    if pass_ == "full" and n < 64:
        pytest.skip("decode-size shapes are inference only")
    t = _inputs(n, in_f, out_f, rank, device, teacher, grad=pass_ == "full")
    fwd = _forward_fn(contender, t, teacher)
    sync = _sync(device)
    dy = torch.randn(n, out_f, generator=torch.Generator().manual_seed(1)).to(device)

    if pass_ == "forward":
        def run():
            with torch.inference_mode():
                fwd()
            sync()
    else:
        leaves = [v for v in t.values() if isinstance(v, torch.Tensor) and v.requires_grad]

        def run():
            for v in leaves:
                v.grad = None
            fwd().backward(dy)
            sync()

    benchmark.group = f"{device} {shape} {pass_} {'blend' if teacher else 'student'}"
    flops_dense = 2 * n * in_f * out_f
    flops_lowrank = 2 * n * rank * (in_f + out_f)
    benchmark.extra_info.update({
        "threads": torch.get_num_threads(), "n": n, "in": in_f, "out": out_f, "rank": rank,
        "ideal_lowrank_over_dense": flops_lowrank / flops_dense,
        "torch": torch.__version__,
    })
    benchmark(run)
