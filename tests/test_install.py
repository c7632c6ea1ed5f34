"""Installing the package with and without a C++ toolchain.

Each test builds a wheel from a copy of the sources (``pip wheel --no-deps
--no-build-isolation``), unpacks it into a fresh directory and imports the package from
there in a new interpreter. Without a toolchain (PATH hidden) the native module is
skipped with one line in the build log and everything but the CUDA backend works.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["setup.py", "pyproject.toml", "README.md", "CMakeLists.txt", "csrc",
           "python_bindings", "tunecomp_kernels"]
SKIP_LINE = "tunecomp_kernels: skipping the native module (_C): "

# Runs from the unpacked wheel: the op on the torch backend against float64, a
# MaskedLowRankLinear, the compress package and `tunecomp info`.
CHECK = r"""
import contextlib, io, json, sys
# Only the unpacked wheel: drop the development checkout's editable-install finder.
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, SITE)
import torch
import tunecomp_kernels as t
from tunecomp_kernels import MaskedLowRankLinear, masked_lowrank_linear
from tunecomp_kernels._native import native_available
from tunecomp_kernels.cli import main
from tunecomp_kernels.compress import TuneCompConfig, compress_to_budget

g = torch.Generator().manual_seed(0)
x, U, V = (torch.randn(*s, generator=g) for s in ((5, 8), (6, 3), (3, 8)))
mask, b = torch.rand(3, generator=g), torch.randn(6, generator=g)
y = masked_lowrank_linear(x, U, mask, V, b, backend="torch")
ref = x.double() @ V.double().t() @ (U.double() * mask.double()).t() + b.double()
net = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(8, 8)]))
compress_to_budget(net, TuneCompConfig(target_ratio=0.5))
out = io.StringIO()
with contextlib.redirect_stdout(out):
    main(["info"])
print(json.dumps({
    "file": t.__file__, "native": native_available(), "backends": t.available_backends(),
    "files": [m.__file__ for n, m in sys.modules.items()
              if n.startswith("tunecomp_kernels") and getattr(m, "__file__", None)],
    "op_err": float((y.double() - ref).norm() / ref.norm()),
    "layer": MaskedLowRankLinear(8, 6, 3)(x).shape == (5, 6),
    "converted": type(net[0][0]).__name__, "info": out.getvalue()}))
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the sources to build from (a build writes into its source tree)."""
    src = tmp_path_factory.mktemp("install") / "src"
    src.mkdir()
    junk = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=junk)
        else:
            shutil.copy2(ROOT / name, src / name)
    return src


def _env(tmp: Path, toolchain: bool, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "TUNECOMP_")) and k not in ("CXX", "CC")}
    if not toolchain:  # an empty PATH: no compiler, no cmake executable
        (tmp / "empty_bin").mkdir(exist_ok=True)
        env["PATH"] = str(tmp / "empty_bin")
    env.update(extra)
    return env


def build_wheel(source: Path, tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    shutil.rmtree(source / "build", ignore_errors=True)
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-v", str(source), "-w", str(tmp / "wheels")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def run_from_wheel(tmp: Path, env: dict[str, str]) -> dict:
    wheel, = (tmp / "wheels").glob("tunecomp_kernels-*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    proc = subprocess.run([sys.executable, "-c", f"SITE = {str(site)!r}\n{CHECK}"],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    outside = [f for f in result["files"] if not f.startswith(str(site))]
    assert not outside, outside
    return result


def _check_runs(result: dict) -> None:
    assert result["op_err"] < 1e-5
    assert result["layer"] is True
    assert result["converted"] == "MaskedLowRankLinear"
    assert "torch" in result["backends"] and "cuda" not in result["backends"]


def test_install_without_a_toolchain_skips_the_native_module(source, tmp_path):
    env = _env(tmp_path, toolchain=False)
    proc = build_wheel(source, tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    lines = [ln.strip() for ln in log.splitlines() if SKIP_LINE in ln]
    assert len(lines) == 1, lines
    assert "no C++ compiler was found" in lines[0]
    wheel, = (tmp_path / "wheels").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("tunecomp_kernels/_C") for n in names)
    assert "tunecomp_kernels/compress/templates/modeling_tunecomp.py" in names
    result = run_from_wheel(tmp_path, env)
    assert result["native"] is False
    _check_runs(result)
    assert "native module: not built: installed without a C++ toolchain" in result["info"]


def test_no_native_variable_skips_and_require_native_fails(source, tmp_path):
    proc = build_wheel(source, tmp_path, _env(tmp_path, toolchain=True, TUNECOMP_NO_NATIVE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{SKIP_LINE}TUNECOMP_NO_NATIVE is set" in proc.stdout + proc.stderr
    shutil.rmtree(tmp_path / "wheels")
    proc = build_wheel(source, tmp_path,
                       _env(tmp_path, toolchain=False, TUNECOMP_REQUIRE_NATIVE="1"))
    assert proc.returncode != 0
    assert "TUNECOMP_REQUIRE_NATIVE is set but no C++ compiler" in proc.stdout + proc.stderr
    assert not (tmp_path / "wheels").exists() or not any((tmp_path / "wheels").iterdir())


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="needs a C++ compiler")
def test_install_with_a_toolchain_builds_the_native_module(source, tmp_path):
    # CPU-only (TUNECOMP_NO_CUDA) and unoptimised (Debug) keep the compile short.
    env = _env(tmp_path, toolchain=True, TUNECOMP_NO_CUDA="1", TUNECOMP_BUILD_TYPE="Debug")
    proc = build_wheel(source, tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert SKIP_LINE not in proc.stdout + proc.stderr
    result = run_from_wheel(tmp_path, env)
    assert result["native"] is True
    _check_runs(result)
    assert "native module: built without CUDA kernels" in result["info"]
