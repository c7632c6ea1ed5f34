"""Shared test helpers: per-dtype tolerances, the float64 reference and input builders."""

from __future__ import annotations

import pytest
import torch

from tunecomp_kernels.ops.backends import backend_serves, known_backends, unavailable_reason

# Relative-norm tolerance ‖got − ref‖ / ‖ref‖ against the float64 reference
# (docs/design.md#measuring).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in norm; NaN or inf anywhere counts as failure (returns inf)."""
    got = got.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if not torch.isfinite(got).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (got - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = rel_err(got, ref)
    tol = TOLERANCE[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def backend_params(device: str = "cpu") -> list:
    """Every known backend, skipped with the reason when it cannot run on ``device``."""
    params = []
    for name in known_backends():
        reason = unavailable_reason(name)
        if reason is None and not backend_serves(name, device):
            reason = f"backend {name} does not serve {device} tensors"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def make_inputs(
    lead: tuple[int, ...],
    in_f: int,
    out_f: int,
    rank: int,
    dtype: torch.dtype,
    device: str = "cpu",
    *,
    bias: bool = True,
    teacher: bool = False,
    teacher_bias: bool = True,
    zero_mask_frac: float = 0.0,
    seed: int = 0,
) -> dict:
    """Random op inputs scaled like a trained layer (outputs O(1))."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    mask = torch.rand(rank, generator=g, dtype=torch.float64) + 0.5
    if zero_mask_frac > 0:
        mask[torch.rand(rank, generator=g) < zero_mask_frac] = 0.0
    inputs = {
        "x": rnd(*lead, in_f),
        "U": rnd(out_f, rank, scale=rank**-0.5),
        "mask": mask.to(dtype).to(device),
        "V": rnd(rank, in_f, scale=in_f**-0.5),
        "bias": rnd(out_f) if bias else None,
        "teacher_weight": rnd(out_f, in_f, scale=in_f**-0.5) if teacher else None,
        "teacher_bias": rnd(out_f) if teacher and teacher_bias else None,
    }
    return inputs


def op_recorder():
    """A ``TorchDispatchMode`` that lists every dispatcher op called inside it (``.ops``):
    how the tests check that a call crosses exactly one op boundary."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    return RecordOps()
