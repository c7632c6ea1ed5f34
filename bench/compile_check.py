"""Static check of the Triton kernels' autotune configs, no GPU needed.

    python -m bench.compile_check [--arch 90 80] [--dtype bf16] [--kernels dy gemm ...] [--list]

Runs the Triton launcher (``ops/triton_backend.py``: ``forward`` and ``backward``) on
``meta`` tensors with a stand-in for ``wrap_triton`` that records each kernel launch
instead of running it, over calls that reach every path the launcher picks (decode,
fused, split forward; dy with and without the fused dU; the dU/dV GEMMs; dx). Each
distinct launch (kernel, argument dtypes, constexprs) is then compiled for every GPU
config of its autotune table (the sm_90 list for ``--arch 90``, its sm_80 variants for
``--arch 80``) with the installed Triton, through ptxas, specialised by Triton itself
from the recorded arguments (unit strides become constants; pointers of fresh tensors
and dims that are multiples of 16 are 16-divisible, as for contiguous tensors). It
records the shared memory each config needs, ptxas' register/spill report, and whether
the autotuner's pruner (``triton_kernels/autotune.py``) keeps the config for that launch
on that architecture (``kept``), so the register estimates can be checked against ptxas.
Writes ``bench/results/compile-<arch...>-<timestamp>.json``.

These are compile-time facts for one Triton version (the GPU machine runs 3.6, this
repository's CI 3.9): they say nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes per block (opt-in maximum)
#: Constexprs that name a launch's tile shape in its case name.
SHAPE_CONSTEXPRS = ("BLOCK_R", "BLOCK_M")


@dataclass
class Launch:
    """One distinct kernel launch of the launcher: the autotuned kernel, its runtime
    arguments by name, the constexprs the launcher passes, and where it came from."""

    kernel: object
    args: dict
    kwargs: dict
    callers: list[str] = field(default_factory=list)
    tag: str = ""  # what sets the scenario apart, e.g. a reduced-precision teacher

    @property
    def short(self) -> str:
        return self.kernel.fn.__name__.removesuffix("_kernel")

    @property
    def name(self) -> str:
        func = self.callers[0].split(":")[0] if self.callers else "?"
        shape = [f"{k}={self.kwargs[k]}" for k in SHAPE_CONSTEXPRS if k in self.kwargs]
        flags = "+".join(k for k, v in self.kwargs.items() if v is True)
        return " ".join([f"{self.short}[{func}]", *shape, flags, self.tag]).strip()


def _caller() -> str:
    """The launcher's outermost frame in triton_backend.py (``forward``/``backward``) and
    the source line it is on."""
    found = "?"
    for frame in inspect.stack(context=1):
        if frame.filename.endswith("triton_backend.py"):
            line = (frame.code_context or [""])[0].strip()
            found = f"{frame.function}: {line[:70]}"
    return found


class _Recorder:
    """Stands in for ``torch.library.wrap_triton``: ``wrap(kernel)[grid](*args, **kw)``
    records the launch instead of running it."""

    def __init__(self) -> None:
        self.launches: list[tuple] = []
        self.tag = ""

    def __call__(self, kernel):  # noqa: ANN001, ANN204
        recorder = self

        class _Grid:
            def __getitem__(self, grid):  # noqa: ANN001, ANN204
                def launch(*args: object, **kwargs: object) -> None:
                    recorder.launches.append((kernel, args, kwargs, _caller(),
                                              recorder.tag))
                return launch
        return _Grid()


def scenarios(dtype) -> list[dict]:  # noqa: ANN001
    """Calls that reach every path the launcher picks, built from its own limits: each
    ``BLOCK_R`` up to ``FUSED_MAX_R`` on the fused forward and the dy kernel, decode for
    every power-of-two row block up to ``TRITON_DECODE_MAX_N`` (which also fuses dU up to
    ``FUSE_DU_MAX_N`` rows and ``FUSE_DU_MAX_R`` ranks), the split forward past
    ``FUSED_MAX_R``; with a teacher and biases (the heaviest variant), and once without;
    then fused, split and decode once more with each lower-precision teacher dtype the op
    accepts next to ``dtype`` x (``validation.REDUCED_TEACHER_DTYPES``)."""
    from tunecomp_kernels.ops import triton_backend as tb
    from tunecomp_kernels.ops.validation import REDUCED_TEACHER_DTYPES

    ranks = [16]
    while ranks[-1] < tb.FUSED_MAX_R:
        ranks.append(ranks[-1] * 2)
    rows = 4 * max(tb.TRITON_DECODE_MAX_N, tb.FUSE_DU_MAX_N)  # past decode and fused dU
    out = [dict(n=rows, k=256, o=256, r=r, teacher=True) for r in ranks]
    out.append(dict(n=rows, k=256, o=256, r=64, teacher=False))
    for teacher in (True, False):  # split: t GEMM + expand; dy over two rank slices
        out.append(dict(n=rows, k=4096, o=4096, r=2 * tb.FUSED_MAX_R, teacher=teacher))
    n = 16
    while n <= tb.TRITON_DECODE_MAX_N:
        out += [dict(n=n, k=256, o=256, r=r, teacher=True) for r in ranks]
        n *= 2
    for teacher in REDUCED_TEACHER_DTYPES.get(dtype, ()):
        out += [dict(n=rows, k=256, o=256, r=r, teacher=teacher) for r in (64, ranks[-1])]
        out += [dict(n=n, k=4096, o=4096, r=2 * tb.FUSED_MAX_R, teacher=teacher)
                for n in (rows, 16)]
    return out


def _run_scenario(sc: dict, dtype) -> None:  # noqa: ANN001
    """One forward and one full backward of the launcher on ``meta`` tensors of ``dtype``;
    ``sc["teacher"]``: True (x's dtype), False, or the teacher's own dtype."""
    import torch

    from tunecomp_kernels.ops import triton_backend as tb
    from tunecomp_kernels.ops.contract import scale_dtype

    def new(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dt, device="meta")

    n, k, o, r = sc["n"], sc["k"], sc["o"], sc["r"]
    x, U, mask, V = new(n, k), new(o, r), new(r), new(r, k)
    teacher_dtype = dtype if sc["teacher"] is True else sc["teacher"]
    w0, b0 = (new(o, k, dt=teacher_dtype), new(o, dt=teacher_dtype)) if sc["teacher"] \
        else (None, None)
    a, s = new(dt=scale_dtype(dtype)), new(dt=scale_dtype(dtype))
    _, t = tb.forward(x, U, mask, V, new(o), w0, b0, a, s)
    tb.backward(new(n, o), x, U, mask, V, t, w0, a, s, [True] * 5)


def record_launches(dtype: str) -> list[Launch]:
    """Run the launcher's forward and backward on ``meta`` tensors for each scenario and
    return its distinct kernel launches (same kernel, argument types and constexprs)."""
    import torch

    from tunecomp_kernels.ops import triton_backend as tb

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    recorder = _Recorder()
    saved = tb.wrap_triton
    tb.wrap_triton = recorder
    try:
        for sc in scenarios(torch_dtype):
            teacher = sc["teacher"]
            recorder.tag = "" if isinstance(teacher, bool) else \
                f"teacher={str(teacher).removeprefix('torch.')}"
            _run_scenario(sc, torch_dtype)
    finally:
        tb.wrap_triton = saved
    distinct: dict[tuple, Launch] = {}
    for kernel, args, kwargs, caller, tag in recorder.launches:
        named = dict(zip(kernel.fn.arg_names, args))
        launch = distinct.setdefault(_launch_key(kernel, named, kwargs),
                                     Launch(kernel, named, dict(kwargs), tag=tag))
        if caller not in launch.callers:
            launch.callers.append(caller)
    return list(distinct.values())


def _specialisation(value: object) -> tuple[str, object]:
    """Triton's own specialisation of one runtime argument: (type, 'D' | '' | constant)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, value, False, True, True)


def _launch_key(kernel, named: dict, kwargs: dict) -> tuple:  # noqa: ANN001
    spec = tuple((name, *_specialisation(value)) for name, value in named.items())
    return kernel.fn.__name__, spec, tuple(sorted(kwargs.items()))


def arch_configs(launch: Launch, arch: int) -> list:
    """The config table of the launch's kernel (``autotune.<KERNEL NAME>``) for ``arch``."""
    from tunecomp_kernels.ops.triton_kernels import autotune as at

    table = getattr(at, launch.short.upper())
    return list(table) if arch >= 90 else at.for_sm80(table)


def kept_by_pruner(launch: Launch, arch: int) -> set | None:
    """Signatures of the configs the kernel's autotune pruner keeps for this launch on a
    GPU of ``sm_<arch>`` (None when the kernel has no pruner)."""
    from tunecomp_kernels.ops.triton_kernels import autotune as at

    prune = launch.kernel.early_config_prune
    if prune is None:
        return None
    saved = at._capability
    at._capability = lambda named_args: divmod(arch, 10)
    try:
        kept = prune(launch.kernel.configs, launch.args, **launch.kwargs)
    finally:
        at._capability = saved
    return {at._signature(c) for c in kept}


def compile_config(launch: Launch, cfg, arch: int) -> dict:  # noqa: ANN001
    """Compile one config of a recorded launch for ``sm_<arch>``, specialised as Triton
    specialises that launch. Returns smem, registers and spills."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    jit = launch.kernel.fn
    constexprs = {**launch.kwargs, **cfg.kwargs}
    signature, attrs = {}, {}
    for index, name in enumerate(jit.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind, spec = _specialisation(launch.args[name])
        if kind == "constexpr":
            signature[name], constexprs[name] = "constexpr", spec
        else:
            signature[name] = kind
            if spec:
                attrs[(index,)] = BaseBackend.parse_attr(spec)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            ASTSource(jit, signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    smem = int(compiled.metadata.shared)
    return {"smem": smem, "smem_ok": smem <= SMEM_LIMIT[arch],
            "registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None}


def check_launch(launch: Launch, arch: int) -> list[dict]:
    """Compile every config of one launch for ``sm_<arch>``; one result row per config."""
    from tunecomp_kernels.ops.triton_kernels.autotune import _signature

    kept = kept_by_pruner(launch, arch)
    rows = []
    for cfg in arch_configs(launch, arch):
        row = {"arch": f"sm_{arch}", "case": launch.name, "callers": launch.callers,
               "config": dict(cfg.kwargs), "num_warps": cfg.num_warps,
               "num_stages": cfg.num_stages,
               "kept": None if kept is None else _signature(cfg) in kept}
        try:
            row.update(compile_config(launch, cfg, arch))
        except Exception as exc:  # noqa: BLE001 - report and go on
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        rows.append(row)
        print(f"sm_{arch} {launch.name:<58} {str(cfg.kwargs):<58} "
              f"w{cfg.num_warps} s{cfg.num_stages} smem={row.get('smem')} "
              f"regs={row.get('registers')} spill={row.get('spill_stores')} kept={row['kept']}"
              + (f" ERROR {row['error'][:120]}" if "error" in row else ""), flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    """One line of totals, then each kept config that spills (the estimate let it through)."""
    kept_spilling = [r for r in rows if r.get("kept") and (r.get("spill_stores") or 0) > 0]
    lines = [f"{len(rows)} compiles; {sum('error' in r for r in rows)} errors; "
             f"{sum(not r.get('smem_ok', True) for r in rows)} over shared memory; "
             f"{sum((r.get('spill_stores') or 0) > 0 for r in rows)} spilling; "
             f"{len(kept_spilling)} kept by the pruner yet spilling"]
    lines += [f"  kept+spill: {r['arch']} {r['case']} {r['config']} w{r['num_warps']} "
              f"s{r['num_stages']} regs={r['registers']} spill={r['spill_stores']}"
              for r in kept_spilling]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=[80, 90])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="dtype of x and the parameters (scales, t and h follow the "
                             "launcher)")
    parser.add_argument("--kernels", nargs="*", default=None,
                        help="run the cases whose name starts with or contains one of "
                             "these, e.g. dy gemm teacher=bfloat16 (default: all)")
    parser.add_argument("--list", action="store_true",
                        help="only list the launches the launcher makes, compile nothing")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    # Compile for a GPU, over the full tables: the interpreter and the tuning caps of
    # short GPU runs must not shape the kernels' config lists (read at import).
    for var in ("TRITON_INTERPRET", "TUNECOMP_TRITON_AUTOTUNE", "TUNECOMP_TRITON_MAX_CONFIGS"):
        os.environ.pop(var, None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="tunecomp-compile-check-")
    import triton

    launches = [la for la in record_launches(args.dtype)
                if not args.kernels or any(k in la.name for k in args.kernels)]
    if args.list:
        for la in launches:
            print(f"{la.name}\n    " + "\n    ".join(la.callers))
        return 0
    rows, start = [], time.time()
    for arch in args.arch:
        for launch in launches:
            rows += check_launch(launch, arch)
    print(f"\n{time.time() - start:.0f} s; " + summary(rows))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compile-{'-'.join(f'sm{a}' for a in args.arch)}-{stamp}.json"
    path.write_text(json.dumps({
        "command": " ".join(["python -m bench.compile_check",
                             *(argv if argv is not None else sys.argv[1:])]),
        "triton": triton.__version__, "dtype": args.dtype, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
