"""Shared helpers of the benchmark scripts: environment record, side-by-side timing, RSS.

Timing rules (docs/design.md#measuring): this machine is shared and noisy, so every ratio is
measured side by side in one run. :func:`interleaved` runs the contenders round-robin (the order
rotates every repetition) and reports per-contender medians plus the median of the
*paired* ratios (each repetition's times divided by the baseline's time in that same
repetition), which cancels slow drifts in machine load.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def command_line() -> str:
    """The command that is running, as one shell-quoted line relative to the repo root."""
    argv = list(sys.argv)
    with contextlib.suppress(ValueError):  # a script outside the repo keeps its path
        argv[0] = str(Path(argv[0]).resolve().relative_to(REPO))
    return "python " + " ".join(shlex.quote(a) for a in argv)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int | None = None) -> dict:
    """What the numbers were measured on, for the JSON next to them."""
    import torch

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "command": command_line(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        env["load_average_at_start"] = list(os.getloadavg())
    return env


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``), MiB."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024.0


def trim_heap() -> bool:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so that memory a
    set-up phase freed is not counted as resident afterwards. False where unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (``VmHWM``; Linux: write 5 to
    ``/proc/self/clear_refs``). Returns False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mib() -> float | None:
    """``VmHWM`` of this process, MiB: the peak RSS since :func:`reset_peak_rss`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_mib() -> float:
    """Resident set size now, MiB (``/proc/self/statm``; falls back to the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def interleaved(
    contenders: dict[str, Callable[[], object]],
    *,
    baseline: str,
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, dict]:
    """Time each contender ``repeats`` times, round-robin with a rotating order.

    Returns per contender: ``times_s`` (all), ``median_s``, ``paired_ratio`` (median over
    repetitions of time / baseline's time in the same repetition) and ``ratio_of_medians``.
    """
    names = list(contenders)
    if baseline not in contenders:
        raise ValueError(f"baseline {baseline!r} is not a contender")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            contenders[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    base = times[baseline]
    out = {}
    for name in names:
        paired = [t / b for t, b in zip(times[name], base)]
        out[name] = {
            "times_s": times[name],
            "median_s": median(times[name]),
            "paired_ratio": median(paired),
            "ratio_of_medians": median(times[name]) / median(base),
        }
    return out


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
