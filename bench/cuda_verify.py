"""Verify every CUDA kernel of the "cuda" backend on this GPU and record the result.

    python -m bench.cuda_verify [--out-dir DIR] [--no-write] [--choose | --choose-only]
                                [--memcheck-case]

Runs each kernel family -- ``forward_fused``, ``forward_split``, ``forward_decode`` and
``backward`` -- in float32, float16 and bfloat16 over a fixed set of cases (odd shapes,
leading dims, N in {1, 5, 16, 4096}, r in {0, 1, 11, 128, 129}, teacher on and off, pruned
ranks, every backward subset; for float16 also inputs whose intermediates leave the fp16
range, ``HALF_RANGE_CASES``) and compares against the float64 reference with the
tolerances of tests/helpers.py (relative norm error; NaN/inf fail). It also checks that
two runs give bit-identical results (the kernels use no atomics).

Then it rewrites ``tunecomp_kernels/ops/cuda_verified.json`` for this GPU: one entry per
(kernel, dtype) with ``passed``, the GPU name and capability, torch / CUDA / module
versions, the git commit and the date (entries for other GPUs are kept). ``backend="auto"``
only ever picks kernels recorded here as passed on the current GPU. A copy of the table and
a per-case report go to ``--out-dir``.

``--choose`` also times the CUDA and Triton backends side by side (forward + backward,
teacher on and off) on the benchmark shapes and writes the winners to
``tunecomp_kernels/ops/backend_choice.json`` (only for shapes whose CUDA kernels passed);
``--choose-only`` does just that, from the table an earlier run wrote.

``--memcheck-case`` runs one tiny case of every kernel and dtype and exits; it is what
``bench/gpu_check.sh`` runs under ``compute-sanitizer``.

Exit status: 0 when every kernel passed, 1 otherwise, 2 without a GPU / CUDA build.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import TOLERANCE, make_inputs, rel_err  # noqa: E402

from tunecomp_kernels import _native  # noqa: E402
from tunecomp_kernels.ops import cuda_tables  # noqa: E402
from tunecomp_kernels.ops.reference import reference_float64  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GRADS = ("x", "U", "mask", "V", "bias")

# (lead dims, in, out, r, teacher, zero-mask fraction)
FORWARD_CASES = {
    "fused": [((3, 50), 37, 29, 11, True, 0.0), ((150,), 64, 48, 16, False, 0.0),
              ((257,), 96, 136, 128, True, 0.0), ((2, 3, 7), 70, 45, 1, True, 0.0),
              ((4096,), 256, 192, 64, True, 0.3), ((300,), 130, 131, 100, False, 0.0)],
    "split": [((3, 50), 37, 29, 11, True, 0.0), ((150,), 64, 48, 16, False, 0.0),
              ((130,), 130, 131, 129, True, 0.0), ((33,), 40, 24, 0, True, 0.0),
              ((4096,), 256, 192, 64, True, 0.3), ((17,), 520, 72, 24, False, 0.0),
              ((1,), 37, 29, 11, True, 0.0)],
    "decode": [((1,), 37, 29, 11, True, 0.0), ((16,), 64, 48, 16, True, 0.0),
               ((5,), 1030, 300, 24, False, 0.0), ((2, 8), 520, 41, 130, True, 0.3),
               ((5,), 40, 24, 0, True, 0.0), ((1,), 4096, 4096, 64, True, 0.0)],
}
#: float16 only: (path, case, x/V scale, U scale, dy scale): t = x·Vᵀ ~ 4e5 > 65504 with
#: h ~ 4e-6 (subnormal), or t ~ 4e-6; y and every gradient stay in fp16's range.
HALF_RANGE_CASES = [(path, ((n,), 16, 12, 4, teacher, 0.0), big, small, dy)
                    for path, n in (("fused", 4096), ("split", 150), ("decode", 8))
                    for teacher in (False, True)
                    for big, small, dy in ((300.0, 1e-3, 1e-3), (1e-3, 300.0, 16.0))]
#: Device the cases run on ("cuda"; tests run the plumbing on "cpu" with a stand-in backend).
DEVICE = "cuda"
NEEDS_SUBSETS = [[True] * 5, [True, False, False, False, False], [False, True, True, False, False],
                 [False, False, False, True, True], [False, False, True, False, False]]


def _inputs(case, dtype, seed):
    lead, in_f, out_f, r, teacher, zero_frac = case
    return make_inputs(lead, in_f, out_f, r, dtype, DEVICE, teacher=teacher,
                       zero_mask_frac=zero_frac, seed=seed)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def check_case(path: str, case, dtype: torch.dtype, seed: int, needs=None,
               magnitudes: tuple[float, float, float] | None = None) -> dict:
    """Forward via `path` and backward; relative errors vs float64 per output.
    ``magnitudes`` (x/V, U, dy scales) turns the case into a HALF_RANGE_CASES one."""
    from tunecomp_kernels.ops import cuda_backend

    inputs = _inputs(case, dtype, seed)
    if magnitudes is not None:
        big, small, _ = magnitudes
        for name, factor in (("x", big), ("V", big * case[1] ** 0.5), ("U", small),
                             ("teacher_weight", 1.0 / big)):
            if inputs[name] is not None:
                inputs[name] = (inputs[name].double() * factor).to(dtype)
    teacher = case[4]
    a, s = (0.6 if teacher else 0.0), 0.8
    args = [inputs[n] for n in GRADS]
    w0, b0 = inputs["teacher_weight"], inputs["teacher_bias"]
    y, t, kernel = cuda_backend.run_forward(*args, w0, b0, a, s, path=path)
    y2, t2, _ = cuda_backend.run_forward(*args, w0, b0, a, s, path=path)
    _sync()
    leaves = {n: v.detach().double().requires_grad_() for n, v in inputs.items()
              if n in GRADS and v is not None}
    y_ref = reference_float64(leaves["x"], leaves["U"], leaves["mask"], leaves["V"],
                              leaves.get("bias"), w0, b0, a, s)
    x2 = inputs["x"].double().reshape(-1, inputs["x"].shape[-1])
    errors = {"y": rel_err(y, y_ref), "t": rel_err(t, x2 @ inputs["V"].double().t())}
    deterministic = torch.equal(y, y2) and torch.equal(t, t2)

    gen = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    if magnitudes is not None:
        dy = torch.full(y.shape, magnitudes[2], dtype=torch.float64)
    dy = dy.to(dtype).to(DEVICE)
    y_ref.backward(dy.double())
    needs = needs or [True] * 5
    grads = cuda_backend.backward(dy, inputs["x"], inputs["U"], inputs["mask"], inputs["V"], t,
                                  w0, a, s, needs)
    grads2 = cuda_backend.backward(dy, inputs["x"], inputs["U"], inputs["mask"], inputs["V"], t,
                                   w0, a, s, needs)
    _sync()
    for name, g, g2, need in zip(GRADS, grads, grads2, needs):
        if need:
            errors[f"d{name}"] = rel_err(g, leaves[name].grad)
            deterministic = deterministic and torch.equal(g, g2)
        elif g.numel() != 0:
            errors[f"d{name}"] = math.inf  # an unneeded gradient must be a 0-element tensor
    tol = TOLERANCE[dtype]
    fwd_ok = all(errors[k] <= tol for k in ("y", "t"))
    bwd_ok = all(v <= tol for k, v in errors.items() if k.startswith("d"))
    return {"kernel": kernel, "forward_ok": fwd_ok and deterministic,
            "backward_ok": bwd_ok and deterministic, "deterministic": deterministic,
            "errors": errors, "tol": tol}


def verify(log) -> tuple[dict, list]:
    """Run every case; returns ({(kernel, dtype): summary}, per-case report rows)."""
    results: dict[tuple[str, str], dict] = {}
    report = []

    def record(kernel, dtype_name, ok, worst):
        cur = results.setdefault((kernel, dtype_name), {"passed": True, "cases": 0,
                                                        "max_err_over_tol": 0.0})
        cur["passed"] = cur["passed"] and ok
        cur["cases"] += 1
        cur["max_err_over_tol"] = max(cur["max_err_over_tol"], worst)

    for dtype_name, dtype in DTYPES.items():
        seed = 0
        for path, cases in FORWARD_CASES.items():
            for case in cases:
                seed += 1
                try:
                    res = check_case(path, case, dtype, seed)
                except Exception as e:  # a crash is a failure of the kernel under test
                    res = {"kernel": f"forward_{path}", "forward_ok": False,
                           "backward_ok": False, "deterministic": False,
                           "errors": {"exception": repr(e)}, "tol": TOLERANCE[dtype]}
                fwd_worst = max((v for k, v in res["errors"].items()
                                 if k in ("y", "t") and isinstance(v, float)), default=math.inf)
                bwd_worst = max((v for k, v in res["errors"].items()
                                 if k.startswith("d") and isinstance(v, float)),
                                default=math.inf)
                record(f"forward_{path}", dtype_name, res["forward_ok"], fwd_worst / res["tol"])
                record("backward", dtype_name, res["backward_ok"], bwd_worst / res["tol"])
                report.append({"path": path, "case": list(map(str, case)), "dtype": dtype_name,
                               **res})
                log(f"{dtype_name:9s} {path:6s} {case!s:40s} "
                    f"{'ok' if res['forward_ok'] and res['backward_ok'] else 'FAIL'} "
                    + " ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in res["errors"].items()))
        for needs in NEEDS_SUBSETS[1:]:
            seed += 1
            res = check_case("split", ((70,), 24, 20, 9, True, 0.0), dtype, seed, needs=needs)
            bwd_worst = max((v for k, v in res["errors"].items() if k.startswith("d")),
                            default=0.0)
            record("backward", dtype_name, res["backward_ok"], bwd_worst / res["tol"])
            report.append({"path": "split", "needs": needs, "dtype": dtype_name, **res})
            log(f"{dtype_name:9s} needs={needs} {'ok' if res['backward_ok'] else 'FAIL'}")
        if dtype == torch.float16:
            seed = _verify_half_range(dtype_name, dtype, seed, record, report, log)
    return results, report


def _verify_half_range(dtype_name, dtype, seed, record, report, log) -> int:
    """The HALF_RANGE_CASES: fp32-range intermediates through the fp16 kernels."""
    for path, case, *magnitudes in HALF_RANGE_CASES:
        seed += 1
        res = check_case(path, case, dtype, seed, magnitudes=tuple(magnitudes))
        worst = max((v for v in res["errors"].values() if isinstance(v, float)),
                    default=math.inf)
        record(f"forward_{path}", dtype_name, res["forward_ok"], worst / res["tol"])
        record("backward", dtype_name, res["backward_ok"], worst / res["tol"])
        report.append({"path": path, "case": list(map(str, case)), "dtype": dtype_name,
                       "magnitudes": magnitudes, **res})
        log(f"{dtype_name:9s} {path:6s} range x{magnitudes[0]:g} "
            f"{'ok' if res['forward_ok'] and res['backward_ok'] else 'FAIL'} "
            + " ".join(f"{k}={v:.1e}" for k, v in res["errors"].items()))
    return seed


def _versions() -> dict:
    info = _native.build_info()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu": torch.cuda.get_device_name(),
        "capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "native_version": info.get("version"),
        "nvcc": info.get("cuda_version"),
        "cuda_archs": info.get("cuda_archs"),
        "git_commit": commit,
        "csrc_dirty": dirty,
        "python": platform.python_version(),
    }


def write_verified(results: dict, versions: dict, path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        table = {"schema": 1, "entries": []}
    gpu = versions["gpu"]
    kept = [e for e in table.get("entries", []) if e.get("gpu") != gpu]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for (kernel, dtype_name), summary in sorted(results.items()):
        kept.append({"kernel": kernel, "dtype": dtype_name, "passed": summary["passed"],
                     "cases": summary["cases"],
                     "max_err_over_tol": round(summary["max_err_over_tol"], 4),
                     **versions, "date": date})
    table["entries"] = kept
    table["schema"] = 1
    path.write_text(json.dumps(table, indent=2) + "\n")
    cuda_tables.reload_tables()
    return table


# --- backend choice (--choose) --------------------------------------------------------

def _bench_shapes() -> list[tuple[int, int, int]]:
    try:
        from bench.kernels import GPU_QUICK_SHAPES  # (N, d, r), in = out = d

        return list(GPU_QUICK_SHAPES)
    except Exception:  # the benchmark module is optional here
        return [(16, 4096, 256), (2048, 4096, 256), (8192, 4096, 256), (8192, 1024, 64)]


def _time_ms(fn, iters=20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def choose(log, shapes, dtypes=("float16", "bfloat16")) -> list[dict]:
    from tunecomp_kernels import masked_lowrank_linear
    from tunecomp_kernels.ops.backends import unavailable_reason

    if unavailable_reason("triton") is not None:
        log(f"--choose: Triton unavailable ({unavailable_reason('triton')}); nothing to compare")
        return []
    gpu = torch.cuda.get_device_name()
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for n, d, r in shapes:
            key = f"{cuda_tables.n_bucket(n)}/{d}/{d}/{r}/{dtype_name}"
            if not all(cuda_tables.is_verified(k, dtype_name, gpu)
                       for k in cuda_tables.kernels_for(cuda_tables.n_bucket(n))):
                log(f"--choose: skip {key}: CUDA kernels not verified")
                continue
            totals = {}
            for backend in ("cuda", "triton"):
                total = 0.0
                for teacher in (False, True):
                    inputs = make_inputs((n,), d, d, r, dtype, "cuda", teacher=teacher)
                    leaves = [inputs[k].requires_grad_() for k in GRADS]
                    dy = torch.randn(n, d, device="cuda", dtype=dtype)

                    def step(leaves=leaves, inputs=inputs, dy=dy, teacher=teacher,
                             backend=backend):
                        y = masked_lowrank_linear(
                            *leaves, teacher_weight=inputs["teacher_weight"],
                            teacher_bias=inputs["teacher_bias"],
                            teacher_scale=0.5 if teacher else 0.0, backend=backend)
                        y.backward(dy)

                    total += _time_ms(step)
                totals[backend] = total
            winner = "cuda" if totals["cuda"] < totals["triton"] else "triton"
            rows.append({"gpu": gpu, "n_bucket": cuda_tables.n_bucket(n), "in": d, "out": d,
                         "r": r, "dtype": dtype_name, "winner": winner, "n": n,
                         "cuda_ms": round(totals["cuda"], 4),
                         "triton_ms": round(totals["triton"], 4)})
            log(f"--choose {key}: cuda {totals['cuda']:.3f} ms, triton {totals['triton']:.3f} ms"
                f" (fwd+bwd, teacher off + on) -> {winner}")
    return rows


def write_choice(rows: list[dict], path: Path) -> None:
    try:
        table = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        table = {"schema": 1, "rows": []}
    new_keys = {(r["gpu"], r["n_bucket"], r["in"], r["out"], r["r"], r["dtype"]) for r in rows}
    kept = [r for r in table.get("rows", [])
            if (r.get("gpu"), r.get("n_bucket"), r.get("in"), r.get("out"), r.get("r"),
                r.get("dtype")) not in new_keys]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    table["rows"] = kept + [{**r, "date": date, "torch": torch.__version__} for r in rows]
    table["schema"] = 1
    path.write_text(json.dumps(table, indent=2) + "\n")
    cuda_tables.reload_tables()


# --- memcheck case ---------------------------------------------------------------------

def memcheck_case() -> int:
    """One tiny case per kernel family and dtype (for compute-sanitizer)."""
    small = {"fused": ((40,), 37, 29, 11, True, 0.0), "split": ((40,), 37, 29, 11, True, 0.0),
             "decode": ((5,), 37, 29, 11, True, 0.0)}
    aligned = {"fused": ((40,), 64, 48, 16, True, 0.0), "split": ((40,), 64, 48, 16, True, 0.0),
               "decode": ((5,), 64, 48, 16, True, 0.0)}
    ok = True
    for dtype in DTYPES.values():
        for cases in (small, aligned):
            for path, case in cases.items():
                res = check_case(path, case, dtype, seed=1)
                ok = ok and res["forward_ok"] and res["backward_ok"]
                print(f"memcheck case {path} {dtype} {case}: "
                      f"{'ok' if res['forward_ok'] and res['backward_ok'] else 'FAIL'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="also write cuda_verified.json and a report here")
    parser.add_argument("--no-write", action="store_true",
                        help="do not rewrite the package's tables")
    parser.add_argument("--choose", action="store_true",
                        help="time CUDA vs Triton and write backend_choice.json")
    parser.add_argument("--choose-only", action="store_true",
                        help="skip verification; time CUDA vs Triton for the kernels already "
                             "verified on this GPU and write backend_choice.json")
    parser.add_argument("--memcheck-case", action="store_true",
                        help="run one tiny case per kernel and exit (for compute-sanitizer)")
    args = parser.parse_args(argv)

    if not (torch.cuda.is_available() and _native.cuda_kernels_compiled()):
        print("cuda_verify: needs a CUDA GPU and a CUDA build of tunecomp_kernels._C",
              file=sys.stderr)
        return 2
    warnings.simplefilter("ignore", cuda_tables.UnverifiedKernelWarning)
    if args.memcheck_case:
        return memcheck_case()
    if args.choose_only:
        rows = choose(print, _bench_shapes())
        if rows and not args.no_write:
            write_choice(rows, cuda_tables.CHOICE_PATH)
            print(f"wrote {cuda_tables.CHOICE_PATH}")
            if args.out_dir is not None:
                args.out_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(cuda_tables.CHOICE_PATH, args.out_dir / "backend_choice.json")
        return 0

    started = time.time()
    results, report = verify(print)
    versions = _versions()
    print(f"\n{versions['gpu']} (sm_{versions['capability'].replace('.', '')}), torch "
          f"{versions['torch']}, CUDA {versions['cuda']}, {time.time() - started:.0f} s")
    for (kernel, dtype_name), summary in sorted(results.items()):
        print(f"  {kernel:15s} {dtype_name:9s} {'PASS' if summary['passed'] else 'FAIL'} "
              f"({summary['cases']} cases, worst error {summary['max_err_over_tol']:.2f} x tol)")
    table = None
    if not args.no_write:
        table = write_verified(results, versions, cuda_tables.VERIFIED_PATH)
        print(f"wrote {cuda_tables.VERIFIED_PATH}")
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        if table is not None:
            shutil.copy(cuda_tables.VERIFIED_PATH, args.out_dir / "cuda_verified.json")
        (args.out_dir / "cuda_verify_report.json").write_text(json.dumps(
            {"versions": versions, "command": " ".join([sys.executable, *sys.argv]),
             "cwd": os.getcwd(), "cases": report}, indent=1, default=str) + "\n")
    if args.choose:
        rows = choose(print, _bench_shapes())
        if rows and not args.no_write:
            write_choice(rows, cuda_tables.CHOICE_PATH)
            print(f"wrote {cuda_tables.CHOICE_PATH}")
            if args.out_dir is not None:
                shutil.copy(cuda_tables.CHOICE_PATH, args.out_dir / "backend_choice.json")
    return 0 if all(s["passed"] for s in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
