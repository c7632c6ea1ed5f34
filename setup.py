"""Build script for the native extension ``tunecomp_kernels._C``.

Project metadata lives in pyproject.toml; this file only drives CMake (see
CMakeLists.txt) from a setuptools ``build_ext`` so that ``pip install .`` and
``pip install -e .`` both produce the module.

Without a C++ toolchain (CMake, a C++ compiler, pybind11) the native module is skipped
with one line in the build log and the package installs as pure Python: everything but
the CUDA backend works (``tunecomp info`` says which case holds).

Environment variables:
  TUNECOMP_NO_NATIVE=1         skip the native module even if a toolchain is present
  TUNECOMP_REQUIRE_NATIVE=1    fail instead of skipping it when no toolchain is found
  TUNECOMP_NO_CUDA=1           build the CPU path only, even if nvcc is present
  TUNECOMP_REQUIRE_CUDA=1      fail instead of silently building CPU-only
  TUNECOMP_CUDA_ARCHS="80;90a" CUDA architectures (CMAKE_CUDA_ARCHITECTURES syntax)
  TUNECOMP_BUILD_TYPE=Release  CMake build type (Debug with ``build_ext --debug``)
  CMAKE_BUILD_PARALLEL_LEVEL   build jobs (default: all cores)
  CMAKE_GENERATOR              generator (default: Ninja when available)
  CMAKE_ARGS                   extra arguments for the CMake configure step
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;90a"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class CMakeExtension(Extension):
    """An extension whose sources are built by CMake, not by setuptools."""

    def __init__(self, name: str, sourcedir: str | os.PathLike[str] = ".") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


def _cmake_command() -> str:
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:  # the PyPI "cmake" package, as listed in build-system.requires
        import cmake  # type: ignore[import-not-found]

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError as e:
        raise RuntimeError("CMake >= 3.24 is required to build tunecomp_kernels._C") from e


def _ninja_command() -> str | None:
    exe = shutil.which("ninja")
    if exe:
        return exe
    try:
        import ninja  # type: ignore[import-not-found]

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        return None


def _pybind11_cmake_dir() -> str | None:
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pybind11", "--cmakedir"],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _nvcc_outside_path() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH / /usr/local/cuda when it is not on PATH."""
    if os.environ.get("CUDACXX") or shutil.which("nvcc"):
        return None  # CMake finds these by itself
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (Path(base) / "bin" / "nvcc").is_file():
            return str(Path(base) / "bin" / "nvcc")
    return None


def _cxx_compiler() -> str | None:
    """The C++ compiler CMake would use: $CXX if set, else c++ / g++ / clang++ on PATH."""
    if os.environ.get("CXX"):
        words = shlex.split(os.environ["CXX"])
        return shutil.which(words[0]) if words else None
    return next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)


def native_skip_reason() -> str | None:
    """Why the native module cannot (or must not) be built here; None when it can."""
    if _env_flag("TUNECOMP_NO_NATIVE"):
        return "TUNECOMP_NO_NATIVE is set"
    try:
        _cmake_command()
    except RuntimeError:
        return "CMake >= 3.24 was not found"
    if _cxx_compiler() is None:
        return ("no C++ compiler was found ($CXX, c++, g++ or clang++ on PATH)"
                if not os.environ.get("CXX") else f"CXX={os.environ['CXX']!r} was not found")
    if _pybind11_cmake_dir() is None:
        return "pybind11 is not installed"
    return None


SKIP_LINE = ("tunecomp_kernels: skipping the native module (_C): {reason}; installing without "
             "it (everything but the CUDA backend works; `tunecomp info` shows this)")


class CMakeBuild(build_ext):
    def run(self) -> None:
        reason = native_skip_reason() if any(
            isinstance(e, CMakeExtension) for e in self.extensions) else None
        if reason is not None:
            if _env_flag("TUNECOMP_REQUIRE_NATIVE"):
                raise RuntimeError(f"TUNECOMP_REQUIRE_NATIVE is set but {reason}")
            print(SKIP_LINE.format(reason=reason), file=sys.stderr, flush=True)
            self.extensions = [e for e in self.extensions if not isinstance(e, CMakeExtension)]
        super().run()

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return

        # Put the module exactly where setuptools expects it, so regular,
        # editable and in-place builds all find it.
        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        suffix = ext_fullpath.name[len(ext.name.rsplit(".", 1)[-1]) :]

        build_type = os.environ.get("TUNECOMP_BUILD_TYPE") or ("Debug" if self.debug else "Release")
        no_cuda = _env_flag("TUNECOMP_NO_CUDA")
        cmake = _cmake_command()

        cmake_args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DTUNECOMP_VERSION={self.distribution.get_version()}",
            f"-DTUNECOMP_EXT_SUFFIX={suffix}",
            f"-DTUNECOMP_WITH_CUDA={'OFF' if no_cuda else 'ON'}",
            f"-DTUNECOMP_REQUIRE_CUDA={'ON' if _env_flag('TUNECOMP_REQUIRE_CUDA') else 'OFF'}",
            f"-DTUNECOMP_CUDA_ARCHS={os.environ.get('TUNECOMP_CUDA_ARCHS') or DEFAULT_CUDA_ARCHS}",
        ]
        pybind11_dir = _pybind11_cmake_dir()
        if pybind11_dir:
            cmake_args.append(f"-Dpybind11_DIR={pybind11_dir}")
        nvcc = None if no_cuda else _nvcc_outside_path()
        if nvcc:
            cmake_args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        generator = os.environ.get("CMAKE_GENERATOR")
        if not generator:
            ninja = _ninja_command()
            if ninja:
                generator = "Ninja"
                cmake_args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        if generator:
            cmake_args.append(f"-G{generator}")
        cmake_args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        build_args = ["--config", build_type]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build_args.append(f"-j{self.parallel or os.cpu_count() or 1}")

        build_temp = Path(self.build_temp) / ext.name
        self._reset_stale_cache(build_temp, [cmake, generator or "", *cmake_args])
        build_temp.mkdir(parents=True, exist_ok=True)

        subprocess.run([cmake, ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", *build_args], cwd=build_temp, check=True)
        if not ext_fullpath.is_file():
            raise RuntimeError(f"CMake did not produce {ext_fullpath}")

    @staticmethod
    def _reset_stale_cache(build_temp: Path, key: list[str]) -> None:
        # A cache made by another CMake, Python or generator (e.g. a throw-away
        # isolated build env) cannot be reused; start that build dir afresh.
        stamp = build_temp / "tunecomp-configure.json"
        wanted = json.dumps(key)
        if build_temp.exists() and (not stamp.is_file() or stamp.read_text() != wanted):
            shutil.rmtree(build_temp)
        build_temp.mkdir(parents=True, exist_ok=True)
        stamp.write_text(wanted)


setup(
    ext_modules=[CMakeExtension("tunecomp_kernels._C", sourcedir=ROOT)],
    cmdclass={"build_ext": CMakeBuild},
)
