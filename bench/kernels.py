"""Kernel benchmark: masked low-rank op vs dense and unfused PyTorch, per backend.

    python -m bench.kernels [--device cuda] [--quick] [--include-interpreter]

One table per shape ``(N, in = out = d, r)``. Rows:

* ``dense``            nn.Linear(d, d), trainable (fwd+bwd computes dx and dW)
* ``dense-frozen``     nn.Linear with a frozen weight (fwd+bwd computes dx only): the
                       teacher-blend baseline
* ``unfused``          PyTorch low-rank in three ops: ``x@Vᵀ``, ``*mask``, ``addmm(b, ·, Uᵀ)``
* ``unfused+teacher``  the same plus ``a·F.linear(x, W0, b0)``
* ``<backend>`` and ``<backend>+teacher`` for every backend in
  ``tunecomp_kernels.available_backends()`` that serves the device (the Triton CPU
  interpreter only with ``--include-interpreter``)

Columns: forward and forward+backward time (median), and the fraction of the roofline
reached, ``max(FLOPs / peak, bytes / bandwidth) / time``, with the H200 figures of
docs/design.md#measuring (790 TFLOP/s bf16 dense, 4.3 TB/s) on a GPU; "n/a" on a CPU. Bytes count
each input and output once (the minimum any implementation must move). Below each
table: fwd+bwd speed-up over ``unfused`` and, with the teacher, the time against the
ideal ``(1 + 3r/d) x dense-frozen`` from the issue. Results go to
``bench/results/kernels-<device>-<timestamp>.json`` with versions and the command.
Timings are measurements on a possibly shared machine: compare rows within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

H200_PEAK_FLOPS = 790e12  # bf16 dense GEMM, docs/design.md#measuring
H200_BANDWIDTH = 4.3e12  # bytes/s, measured copy bandwidth, docs/design.md#measuring

FULL_SHAPES = [(n, d, r) for n in (16, 2048, 8192) for d in (1024, 4096) for r in (64, 256, 1024)]
GPU_QUICK_SHAPES = [(16, 4096, 256), (16, 4096, 1024), (2048, 4096, 256), (8192, 4096, 256),
                    (8192, 4096, 1024), (8192, 1024, 64)]
CPU_SHAPES = [(16, 1024, 64), (2048, 1024, 64), (2048, 1024, 256), (2048, 4096, 256)]
CPU_QUICK_SHAPES = [(16, 1024, 64), (2048, 1024, 64), (2048, 1024, 256)]
INTERPRETER_SHAPES = [(16, 256, 32), (128, 256, 64)]  # the interpreter is very slow

TEACHER_SCALE, STUDENT_SCALE = 0.5, math.sqrt(1 - 0.5**2)


@dataclass
class Row:
    """One implementation at one shape."""

    impl: str
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_roofline: float | None = None
    fwdbwd_roofline: float | None = None
    fwd_flops: float = 0.0
    fwd_bytes: float = 0.0
    fwdbwd_flops: float = 0.0
    fwdbwd_bytes: float = 0.0
    error: str | None = None


@dataclass
class ShapeResult:
    n: int
    d: int
    r: int
    rows: list[Row] = field(default_factory=list)
    ratios: dict[str, float | None] = field(default_factory=dict)


# --- cost model -----------------------------------------------------------------------------

def costs(kind: str, n: int, d: int, r: int, es: int) -> tuple[float, float, float, float]:
    """(fwd FLOPs, fwd bytes, fwd+bwd FLOPs, fwd+bwd bytes) for in = out = d, element size
    ``es``. Bytes: every tensor read or written once (the minimum)."""
    act = n * d * es  # x, y, dy or dx: each [N, d]
    if kind.startswith("dense"):
        w = d * d * es
        fwd_f, fwd_b = 2 * n * d * d, 2 * act + w
        if kind == "dense":  # dx and dW
            return fwd_f, fwd_b, 3 * fwd_f, fwd_b + 3 * act + 2 * w
        return fwd_f, fwd_b, 2 * fwd_f, fwd_b + 2 * act + w  # frozen: dx only
    uv = 2 * r * d * es
    fwd_f, fwd_b = 2 * n * r * 2 * d, 2 * act + uv
    bwd_f, bwd_b = 2 * fwd_f, 3 * act + 2 * uv  # g, dU, dV, dx; read dy, x, U, V; write dx, dU, dV
    if kind.endswith("+teacher"):
        w0 = d * d * es
        fwd_f, fwd_b = fwd_f + 2 * n * d * d, fwd_b + w0
        bwd_f, bwd_b = bwd_f + 2 * n * d * d, bwd_b + w0
    return fwd_f, fwd_b, fwd_f + bwd_f, fwd_b + bwd_b


def roofline(flops: float, nbytes: float, ms: float | None, gpu: bool) -> float | None:
    if ms is None or not gpu:
        return None
    return max(flops / H200_PEAK_FLOPS, nbytes / H200_BANDWIDTH) / (ms * 1e-3)


# --- timing ---------------------------------------------------------------------------------

def time_ms(fn: Callable[[], object], device: str) -> float:
    """Median time of ``fn`` in milliseconds, after warmup."""
    fn()  # first call: compilation / autotuning
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=0.3).median * 1e3


# --- implementations ------------------------------------------------------------------------

def make_case(n: int, d: int, r: int, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    return {
        "x": rnd(n, d), "dy": rnd(n, d, grad=False),
        "U": rnd(d, r, scale=r**-0.5), "V": rnd(r, d, scale=d**-0.5),
        "mask": (torch.rand(r, generator=g) + 0.5).to(device=device, dtype=dtype)
        .requires_grad_(),
        "bias": rnd(d), "W0": rnd(d, d, scale=d**-0.5, grad=False), "b0": rnd(d, grad=False),
        "W": rnd(d, d, scale=d**-0.5),
    }


def impls(case: dict, backends: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
    from tunecomp_kernels import masked_lowrank_linear

    c = case
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "dense": lambda: F.linear(c["x"], c["W"], c["bias"]),
        "dense-frozen": lambda: F.linear(c["x"], c["W0"], c["b0"]),
        "unfused": lambda: torch.addmm(c["bias"], (c["x"] @ c["V"].t()) * c["mask"],
                                       c["U"].t()),
        "unfused+teacher": lambda: (
            STUDENT_SCALE * torch.addmm(c["bias"], (c["x"] @ c["V"].t()) * c["mask"], c["U"].t())
            + TEACHER_SCALE * F.linear(c["x"], c["W0"], c["b0"])),
    }
    for name in backends:
        fns[name] = (lambda b=name: masked_lowrank_linear(
            c["x"], c["U"], c["mask"], c["V"], c["bias"], backend=b))
        fns[f"{name}+teacher"] = (lambda b=name: masked_lowrank_linear(
            c["x"], c["U"], c["mask"], c["V"], c["bias"], teacher_weight=c["W0"],
            teacher_bias=c["b0"], teacher_scale=TEACHER_SCALE, student_scale=STUDENT_SCALE,
            backend=b))
    return fns


def bench_shape(n: int, d: int, r: int, dtype: torch.dtype, device: str,
                backends: list[str]) -> ShapeResult:
    gpu = device == "cuda"
    case = make_case(n, d, r, dtype, device)
    leaves = [t for t in case.values() if t.requires_grad]
    result = ShapeResult(n, d, r)
    es = torch.finfo(dtype).bits // 8
    for name, fn in impls(case, backends).items():
        kind = name if name.startswith(("dense", "unfused")) else (
            "lowrank+teacher" if name.endswith("+teacher") else "lowrank")
        ff, fb, bf, bb = costs(kind, n, d, r, es)
        row = Row(name, fwd_flops=ff, fwd_bytes=fb, fwdbwd_flops=bf, fwdbwd_bytes=bb)

        def fwd(fn: Callable[[], torch.Tensor] = fn) -> None:
            with torch.no_grad():
                fn()

        def fwdbwd(fn: Callable[[], torch.Tensor] = fn) -> None:
            for t in leaves:
                t.grad = None
            fn().backward(case["dy"])

        try:
            row.fwd_ms = time_ms(fwd, device)
            row.fwdbwd_ms = time_ms(fwdbwd, device)
        except Exception as exc:  # noqa: BLE001 - a failing row must not end the run
            row.error = f"{type(exc).__name__}: {exc}"[:500]
            if gpu:
                torch.cuda.empty_cache()
        row.fwd_roofline = roofline(ff, fb, row.fwd_ms, gpu)
        row.fwdbwd_roofline = roofline(bf, bb, row.fwdbwd_ms, gpu)
        result.rows.append(row)
    result.ratios = ratios(result)
    return result


def ratios(res: ShapeResult) -> dict[str, float | None]:
    """fwd+bwd speed-up over ``unfused`` and teacher-blend time over its ideal."""
    t = {row.impl: row.fwdbwd_ms for row in res.rows}
    out: dict[str, float | None] = {}
    ideal = None
    if t.get("dense-frozen") is not None:
        ideal = (1 + 3 * res.r / res.d) * t["dense-frozen"]
        out["teacher_ideal_ms"] = ideal
    for impl, ms in t.items():
        if impl.startswith(("dense", "unfused")) or ms is None:
            continue
        if impl.endswith("+teacher"):
            out[f"{impl}_over_ideal"] = ms / ideal if ideal else None
            if t.get("unfused+teacher"):
                out[f"{impl}_speedup_vs_unfused+teacher"] = t["unfused+teacher"] / ms
        elif t.get("unfused"):
            out[f"{impl}_speedup_vs_unfused"] = t["unfused"] / ms
    return out


# --- output ---------------------------------------------------------------------------------

def fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def print_table(res: ShapeResult, dtype: torch.dtype) -> None:
    print(f"\nN={res.n}  in=out={res.d}  r={res.r}  {str(dtype).removeprefix('torch.')}")
    head = f"{'impl':<18} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd roof':>9} {'f+b roof':>9}"
    print(head)
    print("-" * len(head))
    for row in res.rows:
        if row.error:
            print(f"{row.impl:<18} error: {row.error[:80]}")
            continue
        print(f"{row.impl:<18} {fmt(row.fwd_ms):>9} {fmt(row.fwdbwd_ms):>11} "
              f"{fmt(row.fwd_roofline, True):>9} {fmt(row.fwdbwd_roofline, True):>9}")
    for key, value in res.ratios.items():
        print(f"  {key}: {fmt(value)}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    info = {
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
    else:
        info["device_name"] = _cpu_name()
        info["cpu_threads"] = torch.get_num_threads()
    info["tuning_env"] = {k: v for k, v in os.environ.items()
                          if k.startswith(("TUNECOMP_", "TRITON_"))}
    if hasattr(os, "getloadavg"):  # a shared machine: say how busy it was
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a subset of the shapes")
    parser.add_argument("--include-interpreter", action="store_true",
                        help="on CPU, also time the Triton interpreter (tiny shapes only)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU")
    if args.include_interpreter and device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device == "cuda" else "fp32")]

    from tunecomp_kernels import available_backends
    from tunecomp_kernels.ops.backends import backend_serves

    backends = [b for b in available_backends() if backend_serves(b, device)]
    if device == "cpu" and not args.include_interpreter:
        backends = [b for b in backends if b != "triton"]
    if device == "cuda":
        shapes = GPU_QUICK_SHAPES if args.quick else FULL_SHAPES
    elif args.include_interpreter:
        shapes = INTERPRETER_SHAPES
    else:
        shapes = CPU_QUICK_SHAPES if args.quick else CPU_SHAPES

    env = environment(device)
    print(f"device={device} ({env['device_name']}) dtype={dtype} torch={env['torch']} "
          f"triton={env['triton']} backends={backends}")
    if device == "cpu":
        print("roofline: n/a on CPU (the H200 figures of docs/design.md apply to the GPU only)")
    results = []
    start = time.time()
    for n, d, r in shapes:
        res = bench_shape(n, d, r, dtype, device, backends)
        print_table(res, dtype)
        results.append(res)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {
        "command": " ".join(["python -m bench.kernels", *(argv if argv is not None
                                                          else sys.argv[1:])]),
        "timestamp": stamp, "device": device, "dtype": str(dtype).removeprefix("torch."),
        "backends": backends, "environment": env, "wall_s": round(time.time() - start, 1),
        "roofline_model": ({"peak_flops": H200_PEAK_FLOPS, "bandwidth_bytes_s": H200_BANDWIDTH,
                            "source": "docs/design.md (H200)"} if device == "cuda" else None),
        "results": [asdict(r) for r in results],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels-{device}-{stamp}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
