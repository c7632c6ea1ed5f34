"""Tests for the compiled module tunecomp_kernels._C and its wrapper _native."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tunecomp_kernels import _native

# Error allowed relative to sum_n |s * t * g| (a bound on the summation error);
# inputs are already in the tested dtype, so only accumulation error counts.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}
DTYPES = list(TOL)

requires_native = pytest.mark.skipif(
    not _native.native_available(), reason="tunecomp_kernels._C is not built"
)


def _nvcc_present() -> bool:
    if shutil.which("nvcc"):
        return True
    for var in ("CUDA_HOME", "CUDA_PATH"):
        base = os.environ.get(var)
        if base and (Path(base) / "bin" / "nvcc").is_file():
            return True
    return False


def _reference(t: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * (t.double() * g.double()).sum(0)


def _check(out: torch.Tensor, t: torch.Tensor, g: torch.Tensor, scale: float) -> None:
    n, r = t.shape
    expect_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    assert out.dtype == expect_dtype
    assert out.shape == (r,)
    assert out.device == t.device
    assert out.is_contiguous()
    out = out.double().cpu()
    ref = _reference(t, g, scale).cpu()
    bound = abs(scale) * (t.double().abs() * g.double().abs()).sum(0).cpu()
    assert not torch.isnan(out).any()
    err = (out - ref).abs()
    tol = TOL[t.dtype]
    bad = err > tol * bound + 1e-30
    assert not bad.any(), (
        f"{t.dtype} N={n} r={r}: max err {err.max().item():.3e}, "
        f"worst column {int(err.argmax())} (err / bound {(err / bound.clamp_min(1e-30)).max():.3e})"
    )


def _pair(n: int, r: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(n, r, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    g = torch.randn(n, r, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    return t, g


# --- build info -------------------------------------------------------------


def test_build_info_keys():
    info = _native.build_info()
    for key in ("native", "cuda", "cuda_archs", "cuda_version", "openmp"):
        assert key in info
    assert info["native"] is True, info.get("error")
    for key in ("version", "compiler", "build_type"):
        assert isinstance(info[key], str) and info[key]
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["cuda_archs"], list)
    if info["cuda"]:
        assert isinstance(info["cuda_version"], str)
        assert all(a.startswith("sm_") for a in info["cuda_archs"])
    else:
        assert info["cuda_archs"] == []
        assert info["cuda_version"] is None
    assert _native.cuda_kernels_compiled() is info["cuda"]


@requires_native
@pytest.mark.skipif(
    not _nvcc_present() or os.environ.get("TUNECOMP_NO_CUDA", "") not in ("", "0"),
    reason="no nvcc here, or the CUDA build is disabled",
)
def test_build_info_reports_cuda_archs_when_nvcc_present():
    info = _native.build_info()
    assert info["cuda"] is True
    assert "sm_80" in info["cuda_archs"]
    assert "sm_90a" in info["cuda_archs"]
    assert info["cuda_version"]


def test_build_info_without_native(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", ImportError("no module named _C"))
    info = _native.build_info()
    assert info["native"] is False
    assert info["cuda"] is False
    assert info["cuda_archs"] == []
    assert info["cuda_version"] is None
    assert "no module named _C" in info["error"]
    assert not _native.native_available()
    assert not _native.cuda_kernels_compiled()
    with pytest.raises(RuntimeError, match="not available"):
        _native.mask_grad(torch.ones(2, 2), torch.ones(2, 2), 1.0)


# --- CPU kernel ---------------------------------------------------------------


@requires_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 130])
@pytest.mark.parametrize("r", [1, 11, 200])
def test_mask_grad_cpu_matches_reference(dtype, n, r):
    t, g = _pair(n, r, dtype, seed=n * 1000 + r)
    _check(_native.mask_grad(t, g, 0.75), t, g, 0.75)


@requires_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,r", [(5000, 3), (4097, 40)])
def test_mask_grad_cpu_row_chunks(dtype, n, r):
    # n above the kernel's row-chunk size: partial sums per chunk, then a
    # second pass; also checks the result does not depend on timing.
    t, g = _pair(n, r, dtype, seed=3)
    out = _native.mask_grad(t, g, -1.5)
    _check(out, t, g, -1.5)
    assert torch.equal(out, _native.mask_grad(t, g, -1.5))


@requires_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [0, 5])
def test_mask_grad_cpu_empty(dtype, r):
    t = torch.empty(0, r, dtype=dtype)
    out = _native.mask_grad(t, t.clone(), 2.0)
    assert out.shape == (r,)
    assert torch.equal(out, torch.zeros(r, dtype=out.dtype))


@requires_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_grad_cpu_non_contiguous(dtype):
    # transposed views: stride (1, N)
    tt, gt = _pair(37, 130, dtype, seed=1)
    t, g = tt.t(), gt.t()
    assert not t.is_contiguous()
    _check(_native.mask_grad(t, g, 0.3), t, g, 0.3)
    # step-2 slices along both dims
    tb, gb = _pair(61, 46, dtype, seed=2)
    t, g = tb[:60:2, ::2], gb[1::2, ::2]
    assert t.shape == g.shape == (30, 23)
    _check(_native.mask_grad(t, g, 1.0), t, g, 1.0)
    # mixed layouts: one row-major, one column-major
    t = tb[:30, :20]
    g = gb[:20, :30].t()
    _check(_native.mask_grad(t, g, 1.0), t, g, 1.0)


@requires_native
def test_mask_grad_cpu_special_values():
    # fp16 subnormals, ±0, and inf propagate like the reference
    t = torch.tensor([[6e-8, -0.0, 65504.0], [1e-5, 1.0, float("inf")]], dtype=torch.float16)
    g = torch.tensor([[1.0, 3.0, 1.0], [2.0, -0.0, 1.0]], dtype=torch.float16)
    out = _native.mask_grad(t, g, 1.0)
    ref = _reference(t, g, 1.0).float()
    assert torch.equal(out[:2], ref[:2])
    assert out[2].item() == float("inf")
    # bfloat16 reads exactly the same values torch does
    tb = torch.randn(9, 4).to(torch.bfloat16)
    out = _native.mask_grad(tb, torch.ones_like(tb), 1.0)
    torch.testing.assert_close(out.double(), tb.double().sum(0), rtol=1e-6, atol=1e-6)


# --- validation ------------------------------------------------------------------


@requires_native
def test_mask_grad_rejects_bad_input():
    with pytest.raises(ValueError, match=r"same shape.*\(4, 3\).*\(4, 2\)"):
        _native.mask_grad(torch.ones(4, 3), torch.ones(4, 2), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        _native.mask_grad(torch.ones(4), torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="dtype"):
        _native.mask_grad(torch.ones(4, 3, dtype=torch.int32), torch.ones(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="dtypes differ"):
        _native.mask_grad(torch.ones(4, 3), torch.ones(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="tensors"):
        _native.mask_grad([[1.0]], torch.ones(1, 1))
    with pytest.raises(ValueError, match="device"):
        _native.mask_grad(torch.ones(4, 3, device="meta"), torch.ones(4, 3, device="meta"))


@requires_native
def test_native_module_validates_arguments():
    C = _native._C
    buf = torch.zeros(16)
    p = buf.data_ptr()
    with pytest.raises(ValueError, match="n must be >= 0"):
        C.mask_grad_cpu(p, p, p, -1, 2, 2, 1, 2, 1, 0, 1.0)
    with pytest.raises(ValueError, match="r must be >= 0"):
        C.mask_grad_cpu(p, p, p, 2, -2, 2, 1, 2, 1, 0, 1.0)
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        C.mask_grad_cpu(p, p, p, 2, 2, 2, 1, 2, 1, 7, 1.0)
    with pytest.raises(ValueError, match="null"):
        C.mask_grad_cpu(0, p, p, 2, 2, 2, 1, 2, 1, 0, 1.0)
    with pytest.raises(ValueError, match="null"):
        C.mask_grad_cpu(p, p, 0, 2, 2, 2, 1, 2, 1, 0, 1.0)
    # the CUDA entry point validates before touching the device
    with pytest.raises(ValueError, match="unknown dtype code"):
        C.mask_grad_cuda(p, p, p, 2, 2, 2, 1, 2, 1, 9, 1.0, 0)


# --- CUDA path -------------------------------------------------------------------


@requires_native
@pytest.mark.skipif(_native.cuda_kernels_compiled(), reason="module was built with CUDA")
def test_mask_grad_cuda_without_cuda_build():
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _native._C.mask_grad_cuda(16, 16, 16, 2, 2, 2, 1, 2, 1, 0, 1.0, 0)


@requires_native
@pytest.mark.skipif(not _native.cuda_kernels_compiled(), reason="module was built without CUDA")
def test_mask_grad_cuda_without_gpu_raises_cuda_error():
    if _native._C.cuda_device_count() > 0:
        pytest.skip("a CUDA device is visible")
    # No driver / device: the launch must fail with CUDA's message, not crash.
    # (Dummy pointers are safe only because no device exists.)
    with pytest.raises(RuntimeError, match="CUDA error"):
        _native._C.mask_grad_cuda(16, 16, 16, 2, 2, 2, 1, 2, 1, 0, 1.0, 0)


gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and _native.cuda_kernels_compiled()),
    reason="needs a CUDA GPU and a CUDA build of tunecomp_kernels._C",
)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "n,r",
    [(0, 5), (1, 1), (7, 11), (130, 200), (4097, 3), (100_000, 64), (3000, 1000)],
)
def test_mask_grad_cuda_matches_reference(dtype, n, r):
    t, g = _pair(n, r, dtype, device="cuda", seed=n + r)
    out = _native.mask_grad(t, g, 0.5)
    torch.cuda.synchronize()
    _check(out, t, g, 0.5)
    assert torch.equal(out, _native.mask_grad(t, g, 0.5))  # deterministic


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_grad_cuda_non_contiguous_and_stream(dtype):
    tt, gt = _pair(20_000, 24, dtype, device="cuda", seed=5)
    cases = [
        (tt.t().contiguous().t(), gt.t().contiguous().t()),  # column-major
        (tt[::2, ::3], gt[1::2, ::3]),  # step slices
        (tt, gt.t().contiguous().t()),  # mixed layouts
    ]
    side = torch.cuda.Stream()
    for t, g in cases:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = _native.mask_grad(t, g, 2.0)
        torch.cuda.synchronize()
        _check(out, t, g, 2.0)
