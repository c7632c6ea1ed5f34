"""fp16 inputs whose intermediates leave the fp16 range: every path must give the
fp32-accumulation result (README "Failure modes", Numerics).

The fault: the kernels rounded the fp32 intermediate t = x·Vᵀ (times s·mask), and in the
backward h = s·(dy·U)·mask, to fp16 before the second product. With x, V ~ 300 the true
t ~ 4e5 overflows (y became inf, dU NaN) although y ~ 1e3 is in range; with dy, U ~ 1e-3
h ~ 4e-6 is an fp16 subnormal (dx, dV off by ~1e-2). Both are checked against the float64
reference of the same fp16 inputs, on the Triton paths (interpreter: fp16 only, its bf16
dot is wrong) and on the CUDA kernel sources run by the host emulator.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TOLERANCE, rel_err

from tunecomp_kernels import masked_lowrank_linear
from tunecomp_kernels.ops.backends import unavailable_reason
from tunecomp_kernels.ops.reference import reference_float64

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "U", "mask", "V", "bias")


def extreme_inputs(n: int, kind: str, *, teacher: bool, seed: int = 0) -> dict:
    """The fault's inputs (in = 16, out = 12, r = 4), fp16. "large": x, V ~ 300 and
    U ~ 1e-3 (t ~ 4e5 > 65504, y ~ 1e3) and upstream gradient 1e-3 (h ~ 4e-6, an fp16
    subnormal); "small": x, V ~ 1e-3, U ~ 300 and gradient 16 (t ~ 4e-6, y ~ 1e-3). Every
    true output and gradient is in the fp16 normal range."""
    g = torch.Generator().manual_seed(seed)
    big, small = (300.0, 1e-3) if kind == "large" else (1e-3, 300.0)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).half()

    return {
        "x": rnd(n, 16, scale=big), "U": rnd(12, 4, scale=small),
        "mask": torch.ones(4, dtype=torch.float16), "V": rnd(4, 16, scale=big),
        "bias": rnd(12, scale=1.0),
        "teacher_weight": rnd(12, 16, scale=1.0 / big) if teacher else None,
        "teacher_bias": rnd(12, scale=1.0) if teacher else None,
        "dy": torch.full((n, 12), 1e-3 if kind == "large" else 16.0, dtype=torch.float16),
    }


def reference(inp: dict, a: float, s: float) -> dict[str, torch.Tensor]:
    leaves = [inp[k].detach().double().requires_grad_() for k in NAMES]
    y = reference_float64(*leaves, inp["teacher_weight"], inp["teacher_bias"], a, s)
    y.backward(inp["dy"].double())
    return {"y": y.detach(), **{k: leaf.grad for k, leaf in zip(NAMES, leaves)}}


def assert_matches(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str):
    tol = TOLERANCE[torch.float16]
    errors = {k: rel_err(got[k], ref[k]) for k in got}
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= tol}
    assert not bad, f"{what}: relative error above {tol} (inf: non-finite values): {bad}"


# --- Triton: decode, fused and split forward; fused and unfused dU --------------------------

triton_only = pytest.mark.skipif(
    unavailable_reason("triton") is not None, reason=str(unavailable_reason("triton")))


def run_triton(inp: dict, a: float, s: float) -> dict[str, torch.Tensor]:
    leaves = {k: inp[k].detach().to(DEVICE).requires_grad_() for k in NAMES}
    w0, b0 = (None if inp[k] is None else inp[k].to(DEVICE)
              for k in ("teacher_weight", "teacher_bias"))
    y = masked_lowrank_linear(*leaves.values(), teacher_weight=w0, teacher_bias=b0,
                              teacher_scale=a, student_scale=s, backend="triton")
    y.backward(inp["dy"].to(DEVICE))
    return {"y": y.detach().cpu(), **{k: v.grad.cpu() for k, v in leaves.items()}}


@triton_only
@pytest.mark.parametrize("kind", ["large", "small"])
@pytest.mark.parametrize("path", ["decode", "fused", "split", "fused-dU-tiles"])
@pytest.mark.parametrize("teacher", [False, True], ids=["student", "blend"])
def test_triton_half_intermediates_out_of_range(monkeypatch, kind, path, teacher):
    from tunecomp_kernels.ops import triton_backend as tb

    n = 8 if path == "decode" else 80  # decode: N <= TRITON_DECODE_MAX_N (64)
    if path == "split":
        monkeypatch.setattr(tb, "_fused_is_cheaper", lambda *args: False)
    if path == "fused-dU-tiles":  # dU inside the dy kernel over several row tiles
        monkeypatch.setattr(tb, "FUSE_DU_MAX_N", 10**6)
    inp = extreme_inputs(n, kind, teacher=teacher)
    a, s = (0.4, 0.7) if teacher else (0.0, 0.7)
    assert_matches(run_triton(inp, a, s), reference(inp, a, s), f"triton {path} {kind}")


def test_torch_backend_is_the_baseline():
    # the reference backend computes in fp32 from the start: the ground truth here
    inp = extreme_inputs(8, "large", teacher=True)
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in NAMES}
    y = masked_lowrank_linear(*leaves.values(), teacher_weight=inp["teacher_weight"],
                              teacher_bias=inp["teacher_bias"], teacher_scale=0.4,
                              student_scale=0.7, backend="torch")
    y.backward(inp["dy"])
    got = {"y": y.detach(), **{k: v.grad for k, v in leaves.items()}}
    assert_matches(got, reference(inp, 0.4, 0.7), "torch")
    assert float(reference(inp, 0.4, 0.7)["y"].abs().max()) < 65504  # y itself is in range
