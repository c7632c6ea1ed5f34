"""Tests for the compiled module tunecomp_kernels._C and its loader _native."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tunecomp_kernels import _native

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
        _native.require_native()


# --- what _native still exposes -----------------------------------------------------


def test_moved_names_stay_importable_from_native():
    # the CUDA marshalling moved beside the CUDA backend; the old names still resolve
    from tunecomp_kernels.ops import cuda_marshal

    for name in ("masked_lowrank_forward_cuda", "masked_lowrank_backward_cuda",
                 "mlr_forward_plan", "mlr_backward_plan", "CUDA_KERNEL_DTYPES",
                 "FORWARD_PATHS"):
        assert getattr(_native, name) is getattr(cuda_marshal, name)
    with pytest.raises(AttributeError, match="no attribute 'mask_grad'"):
        _native.mask_grad  # noqa: B018  (removed: it was on no op path)


@requires_native
def test_native_module_has_no_mask_grad_kernel():
    assert not hasattr(_native._C, "mask_grad_cpu")
    assert not hasattr(_native._C, "mask_grad_cuda")
