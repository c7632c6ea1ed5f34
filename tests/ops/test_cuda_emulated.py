"""The CUDA kernel sources, run on the CPU through the emulator in csrc/common/cuda_emu.h.

csrc/cuda/mlr_*.cu are compiled as host C++ (``g++ -x c++ -DTC_EMULATE``) together with
tests/cuda_emu/driver.cpp into a small shared library called through ctypes. Every CUDA
thread of a block is a host thread, so barriers, shared-memory tiling, cp.async groups
(deferred until waited for), bounds checks, split-K partitions and epilogues are the real
code paths; shared memory starts as NaN so a read of an unwritten element fails the
comparison. What this cannot show: the GPU's real WMMA fragment layout (the kernels never
depend on it), timing, register or shared-memory limits of the hardware. Those need the
GPU run (bench/gpu_check.sh).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCE, rel_err

from tunecomp_kernels.ops.reference import reference_float64

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "csrc" / "cuda" / f for f in
           ("mlr_api.cu", "mlr_f32.cu", "mlr_f16.cu", "mlr_bf16.cu")]
DRIVER = ROOT / "tests" / "ops" / "cuda_emu" / "driver.cpp"
HEADERS = sorted((ROOT / "csrc").rglob("*.h")) + sorted((ROOT / "csrc").rglob("*.cuh"))
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ALL_GRADS = 31  # dx, dU, dmask, dV, dbias

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")


def _build() -> Path:
    digest = hashlib.sha256()
    for f in [*SOURCES, DRIVER, *HEADERS]:
        digest.update(f.read_bytes())
    out_dir = ROOT / "build" / "cuda_emu" / digest.hexdigest()[:16]
    lib = out_dir / "libtc_emu.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"libtc_emu.{os.getpid()}.so"
    cmd = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wall",
           "-Wno-unknown-pragmas", "-DTC_EMULATE", f"-I{ROOT / 'csrc'}", "-x", "c++",
           *map(str, SOURCES), str(DRIVER), "-o", str(tmp)]
    subprocess.run(cmd, check=True)
    tmp.replace(lib)
    return lib


@pytest.fixture(scope="module")
def emu():
    lib = ctypes.CDLL(str(_build()))
    u64, i64 = ctypes.c_uint64, ctypes.c_int64
    err = [ctypes.c_char_p, ctypes.c_int]
    lib.tc_emu_forward.argtypes = [u64] * 11 + [i64] * 5 + [u64, i64, i64] + err
    lib.tc_emu_backward.argtypes = [u64] * 14 + [i64] * 5 + [u64, i64, i64] + err
    lib.tc_emu_forward_plan.argtypes = [i64] * 7 + [ctypes.POINTER(i64)] * 2 + err
    lib.tc_emu_backward_plan.argtypes = [i64] * 7 + [ctypes.POINTER(i64)] + err
    return lib


def _p(t):
    return 0 if t is None else t.data_ptr()


def _call(fn, *args):
    err = ctypes.create_string_buffer(1024)
    rc = fn(*args, err, 1024)
    if rc == 1:
        raise ValueError(err.value.decode())
    if rc != 0:
        raise RuntimeError(err.value.decode())


def _scales(a, s):
    """The [a, s] fp32 array the kernels load the blend scales from."""
    return torch.tensor([a, s], dtype=torch.float32)


def emu_forward(lib, x, U, mask, V, bias, W0, b0, a, s, path, sms):
    n, k = x.shape
    m, r = U.shape
    used, ws_bytes = ctypes.c_int64(), ctypes.c_int64()
    _call(lib.tc_emu_forward_plan, n, k, m, r, CODES[x.dtype], path, sms, ctypes.byref(used),
          ctypes.byref(ws_bytes))
    ws = torch.full((max(ws_bytes.value, 1),), 0xFF, dtype=torch.uint8)
    y = torch.full((n, m), float("nan"), dtype=x.dtype)
    t = torch.full((n, r), float("nan"), dtype=torch.float32)
    scales = _scales(a, s)
    _call(lib.tc_emu_forward, _p(x), _p(U), _p(mask), _p(V), _p(bias), _p(W0), _p(b0), _p(y),
          _p(t), _p(ws), ws.numel(), n, k, m, r, CODES[x.dtype], _p(scales), path, sms)
    return y, t, used.value


def emu_backward(lib, dy, x, U, mask, V, t, W0, a, s, needs, sms):
    n, k = x.shape
    m, r = U.shape
    ws_bytes = ctypes.c_int64()
    _call(lib.tc_emu_backward_plan, n, k, m, r, CODES[x.dtype], needs, sms,
          ctypes.byref(ws_bytes))
    ws = torch.full((max(ws_bytes.value, 1),), 0xFF, dtype=torch.uint8)
    shapes = [(n, k), (m, r), (r,), (r, k), (m,)]
    grads = [torch.full(sh, float("nan"), dtype=x.dtype) for sh in shapes]
    scales = _scales(a, s)
    _call(lib.tc_emu_backward, _p(dy), _p(x), _p(U), _p(mask), _p(V), _p(t), _p(W0),
          *map(_p, grads), _p(ws), ws.numel(), n, k, m, r, CODES[x.dtype], _p(scales), needs,
          sms)
    return grads


def run_case(lib, n, k, m, r, dtype, *, teacher, path, sms=4, needs=ALL_GRADS, seed=0,
             zero_mask=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = rnd(n, k)
    U = rnd(m, r, scale=max(r, 1) ** -0.5)
    mask = torch.rand(r, generator=g, dtype=torch.float64) + 0.5
    if zero_mask:
        mask[::3] = 0.0
    mask = mask.to(dtype)
    V = rnd(r, k, scale=max(k, 1) ** -0.5)
    bias = rnd(m)
    W0 = rnd(m, k, scale=max(k, 1) ** -0.5) if teacher else None
    b0 = rnd(m) if teacher else None
    a, s = (0.6 if teacher else 0.0), 0.8

    y, t, used = emu_forward(lib, x, U, mask, V, bias, W0, b0, a, s, path, sms)
    leaves = [v.double().requires_grad_() for v in (x, U, mask, V, bias)]
    y_ref = reference_float64(*leaves, W0, b0, a, s)
    tol = TOLERANCE[dtype]
    errors = {"y": rel_err(y, y_ref), "t": rel_err(t, x.double() @ V.double().t())}
    dy = rnd(n, m)
    y_ref.backward(dy.double())
    grads = emu_backward(lib, dy, x, U, mask, V, t, W0, a, s, needs, sms)
    for bit, (name, got, leaf) in enumerate(zip(("dx", "dU", "dmask", "dV", "dbias"), grads,
                                                leaves)):
        if needs & (1 << bit):
            errors[name] = rel_err(got, leaf.grad)
    bad = {k_: v for k_, v in errors.items() if not v <= tol}
    assert not bad, f"{dtype} n={n} k={k} m={m} r={r} path {path}->{used}: {bad}"
    return used


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FUSED, SPLIT, DECODE, AUTO = 1, 2, 3, 0

# (n, in, out, r, teacher, path, sms, expected path)
CASES = [
    pytest.param(150, 37, 29, 11, True, FUSED, 4, FUSED, id="fused-odd"),
    pytest.param(150, 37, 29, 11, True, SPLIT, 4, SPLIT, id="split-odd"),
    pytest.param(5, 37, 29, 11, True, DECODE, 4, DECODE, id="decode-odd"),
    pytest.param(300, 64, 48, 16, True, FUSED, 4, FUSED, id="fused-aligned-cp.async"),
    pytest.param(300, 64, 48, 16, False, SPLIT, 4, SPLIT, id="split-aligned-cp.async"),
    pytest.param(16, 64, 48, 16, True, DECODE, 4, DECODE, id="decode-N16-aligned"),
    pytest.param(1, 520, 40, 24, True, DECODE, 64, DECODE, id="decode-N1-splitK"),
    pytest.param(17, 72, 136, 130, True, AUTO, 4, SPLIT, id="auto-split-r130"),
    pytest.param(33, 40, 24, 0, True, SPLIT, 4, SPLIT, id="r0-split"),
    pytest.param(5, 40, 24, 0, True, DECODE, 4, DECODE, id="r0-decode"),
    pytest.param(33, 40, 24, 1, False, FUSED, 4, FUSED, id="r1-fused"),
    pytest.param(129, 8, 8, 8, True, AUTO, 4, FUSED, id="auto-fused"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,m,r,teacher,path,sms,expected", CASES)
def test_emulated_kernels_match_reference(emu, dtype, n, k, m, r, teacher, path, sms, expected):
    assert run_case(emu, n, k, m, r, dtype, teacher=teacher, path=path, sms=sms) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emulated_fused_multi_tile_with_column_groups(emu, dtype):
    # 3 row tiles x 2 column tiles, r = 128 (a full on-chip t tile), 8 SMs -> 2 groups:
    # each block recomputes its t tile and only group 0 writes t.
    run_case(emu, 260, 72, 140, 128, dtype, teacher=True, path=FUSED, sms=8)


def _split_counts(n, k, m, r, sms):
    # Recover the split counts from the plan's workspace sizes (common/mlr.h layout; each
    # buffer is padded to 256 bytes, less than one split's size for these shapes).
    from tunecomp_kernels import _native

    _, fwd_ws = _native.mlr_forward_plan(n, k, m, r, torch.float16, "split", sms)
    t_splits = (fwd_ws - _round256(n * r * 2)) // (n * r * 4)  # buffers are 256-aligned
    du_ws = _native.mlr_backward_plan(n, k, m, r, torch.float16, [False, True] + [False] * 3,
                                      sms)
    du_splits = (du_ws - _round256(n * r * 2)) // (m * r * 4)
    return t_splits, du_splits


def _round256(b):
    return (b + 255) // 256 * 256


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_split_k_partials(emu, dtype):
    pytest.importorskip("tunecomp_kernels._C")
    # forward: t = x V^T split 2 ways over in = 520
    assert _split_counts(17, 520, 40, 24, 64)[0] == 2
    run_case(emu, 17, 520, 40, 24, dtype, teacher=True, path=SPLIT, sms=64)
    # backward: dU, dV and dbias split 2 ways over N = 520, dmask over 5 row tiles
    assert _split_counts(520, 40, 24, 9, 64)[1] == 2
    run_case(emu, 520, 40, 24, 9, dtype, teacher=True, path=SPLIT, sms=64)


@pytest.mark.parametrize("needs", [1, 2, 4, 8, 16, 1 | 8, 2 | 4])
def test_emulated_backward_subsets(emu, needs):
    run_case(emu, 70, 24, 20, 9, torch.float16, teacher=True, path=SPLIT, needs=needs)


def test_emulated_zero_masks_and_no_teacher(emu):
    # pruned (zero) ranks before compaction: dmask must still be exact
    run_case(emu, 40, 33, 21, 12, torch.float32, teacher=False, path=FUSED, zero_mask=True)


def test_emulated_results_are_deterministic(emu):
    torch.manual_seed(0)
    x = torch.randn(200, 48, dtype=torch.float16)
    U, mask = torch.randn(40, 24, dtype=torch.float16), torch.rand(24, dtype=torch.float16)
    V = torch.randn(24, 48, dtype=torch.float16)
    runs = [emu_forward(emu, x, U, mask, V, None, None, None, 0.0, 1.0, SPLIT, 64)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_emulated_launcher_rejects_bad_arguments(emu):
    x = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="decode path serves n <= 16"):
        emu_forward(emu, torch.zeros(17, 4), torch.zeros(4, 2), torch.zeros(2),
                    torch.zeros(2, 4), None, None, None, 0.0, 1.0, DECODE, 4)
    with pytest.raises(ValueError, match="fused path serves 1 <= r <= 128"):
        emu_forward(emu, x, torch.zeros(4, 129), torch.zeros(129), torch.zeros(129, 4), None,
                    None, None, 0.0, 1.0, FUSED, 4)


@pytest.mark.parametrize("path", [FUSED, SPLIT, DECODE])
def test_emulated_empty_batch_and_empty_features(emu, path):
    # N = 0: empty y and t, and gradients of the weights are exact zeros.
    x = torch.zeros(0, 8, dtype=torch.float16)
    U, mask = torch.randn(6, 3).half(), torch.ones(3, dtype=torch.float16)
    V = torch.randn(3, 8).half()
    y, t, _ = emu_forward(emu, x, U, mask, V, None, None, None, 0.0, 1.0, path, 4)
    assert y.shape == (0, 6) and t.shape == (0, 3)
    grads = emu_backward(emu, torch.zeros(0, 6, dtype=torch.float16), x, U, mask, V, t, None,
                         0.0, 1.0, ALL_GRADS, 4)
    assert [tuple(g.shape) for g in grads] == [(0, 8), (6, 3), (3,), (3, 8), (6,)]
    assert all(bool((g == 0).all()) for g in grads[1:])
    # in = 0: t = 0, y = s * bias, dbias = s * N
    n = 5 if path == DECODE else 40
    bias = torch.randn(6)
    y, t, _ = emu_forward(emu, torch.zeros(n, 0), U.float(), mask.float(), torch.zeros(3, 0),
                          bias, None, None, 0.0, 0.5, path, 4)
    assert torch.equal(t, torch.zeros(n, 3))
    torch.testing.assert_close(y, (0.5 * bias).expand(n, 6))
    grads = emu_backward(emu, torch.ones(n, 6), torch.zeros(n, 0), U.float(), mask.float(),
                         torch.zeros(3, 0), t, None, 0.0, 0.5, ALL_GRADS, 4)
    torch.testing.assert_close(grads[4], torch.full((6,), 0.5 * n))
    assert bool((grads[1] == 0).all()) and bool((grads[2] == 0).all())


def _extreme(n, kind, teacher, dtype=torch.float16, seed=0):
    """fp16 inputs whose intermediates leave the fp16 range (tests/ops/test_half_range.py):
    "large" t = x·Vᵀ ~ 4e5 with h ~ 4e-6, "small" t ~ 4e-6; y and every gradient in range."""
    g = torch.Generator().manual_seed(seed)
    big, small = (300.0, 1e-3) if kind == "large" else (1e-3, 300.0)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    inp = {"x": rnd(n, 16, scale=big), "U": rnd(12, 4, scale=small),
           "mask": torch.ones(4, dtype=dtype), "V": rnd(4, 16, scale=big),
           "bias": rnd(12, scale=1.0),
           "W0": rnd(12, 16, scale=1.0 / big) if teacher else None,
           "b0": rnd(12, scale=1.0) if teacher else None}
    dy = torch.full((n, 12), 1e-3 if kind == "large" else 16.0, dtype=dtype)
    return inp, dy


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("teacher", [False, True], ids=["student", "blend"])
@pytest.mark.parametrize("kind", ["large", "small"])
@pytest.mark.parametrize("path,n", [(FUSED, 150), (SPLIT, 150), (DECODE, 8)],
                         ids=["fused", "split", "decode"])
def test_emulated_half_intermediates_out_of_range(emu, path, n, kind, teacher, dtype):
    """The fp16 kernels range-scale t·s·mask and h before rounding them to fp16 (they used
    to overflow to inf/NaN, or lose precision as subnormals); fp32-accumulation results.
    bf16 has fp32's range and needs no scaling: the same inputs pass unscaled."""
    inp, dy = _extreme(n, kind, teacher, dtype)
    a, s = (0.4, 0.7) if teacher else (0.0, 0.7)
    y, t, used = emu_forward(emu, inp["x"], inp["U"], inp["mask"], inp["V"], inp["bias"],
                             inp["W0"], inp["b0"], a, s, path, 4)
    assert used == path
    leaves = [inp[k].double().requires_grad_() for k in ("x", "U", "mask", "V", "bias")]
    y_ref = reference_float64(*leaves, inp["W0"], inp["b0"], a, s)
    y_ref.backward(dy.double())
    grads = emu_backward(emu, dy, inp["x"], inp["U"], inp["mask"], inp["V"], t, inp["W0"], a, s,
                         ALL_GRADS, 4)
    errors = {"y": rel_err(y, y_ref)}
    errors.update({name: rel_err(got, leaf.grad) for name, got, leaf
                   in zip(("dx", "dU", "dmask", "dV", "dbias"), grads, leaves)})
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= TOLERANCE[dtype]}
    assert not bad, f"{dtype} {kind} path {path}: {bad}"
