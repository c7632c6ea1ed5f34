"""Static check of the Triton kernels' autotune configs, no GPU needed.

    python -m bench.compile_check [--arch 90 80] [--kernels fused_forward dy ...]

Compiles every GPU config of every kernel (the sm_90 list for ``--arch 90``, its sm_80
variants for ``--arch 80``) with the installed Triton for that target, through ptxas,
specialised as a launch on contiguous, 16-aligned tensors would be, and records the
shared memory each needs and ptxas' register/spill report. Beside each config it says
whether the launcher's register estimate keeps it for that call (``kept``), so the
estimates in ``triton_kernels/autotune.py`` can be checked against ptxas. Writes
``bench/results/compile-<arch...>-<timestamp>.json``.

These are compile-time facts for one Triton version (the GPU machine runs 3.6, this
repository's CI 3.9): they say nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes per block (opt-in maximum)
FLOAT_ARGS = {"teacher_scale", "student_scale", "scale1", "alpha2", "beta1", "beta2", "alpha"}


def cases() -> list[dict]:
    """(kernel, constexprs, pointer dtypes) combinations the launcher really uses."""
    from tunecomp_kernels.ops.triton_kernels import autotune as at
    from tunecomp_kernels.ops.triton_kernels import backward, decode, forward, gemm

    common = {"UPCAST": False, "PRECISION": "ieee"}
    out = []
    for block_r in (16, 64, 128, 256):
        out.append(dict(name=f"fused_forward r{block_r}", kernel=forward.fused_forward_kernel,
                        configs=at.FUSED_FORWARD, registers=at.fused_forward_registers,
                        budget=at.FUSED_FORWARD_BUDGET, ptrs={"t_ptr": "fp32"},
                        meta=dict(HAS_BIAS=True, HAS_TEACHER=True, HAS_TEACHER_BIAS=True,
                                  BLOCK_R=block_r, **common),
                        unit=("stride_xk", "stride_vk", "stride_ur", "stride_wk", "stride_yo",
                              "stride_tr")))
    for block_r, fuse in ((64, True), (128, True), (64, False), (128, False), (256, False)):
        out.append(dict(name=f"dy r{block_r}{' fused-dU' if fuse else ''}",
                        kernel=backward.dy_kernel, configs=at.DY, registers=at.dy_registers,
                        budget=at.DY_BUDGET,
                        ptrs={"t_ptr": "fp32", "du_ptr": "fp32", "dmask_ptr": "fp32",
                              "dbias_ptr": "fp32"},
                        meta=dict(FUSE_DU=fuse, NEED_MASK=True, NEED_H=True, NEED_BIAS=True,
                                  BLOCK_R=block_r, **common),
                        unit=("stride_dyo", "stride_ur", "stride_tr", "stride_hr", "stride_dur")))
    out.append(dict(name="expand (forward)", kernel=forward.expand_kernel, configs=at.EXPAND,
                    ptrs={"a1_ptr": "fp32"},
                    meta=dict(HAS_MASK=True, HAS_SECOND=True, HAS_BIAS1=True, HAS_BIAS2=True,
                              **common),
                    unit=("stride_a1r", "stride_b1r", "stride_a2k", "stride_b2k", "stride_cn")))
    out.append(dict(name="expand (dx)", kernel=forward.expand_kernel, configs=at.EXPAND,
                    ptrs={}, meta=dict(HAS_MASK=False, HAS_SECOND=True, HAS_BIAS1=False,
                                       HAS_BIAS2=False, **common),
                    unit=("stride_a1r", "stride_b1n", "stride_a2k", "stride_b2n", "stride_cn")))
    out.append(dict(name="gemm (dU: B fp32)", kernel=gemm.gemm_kernel, configs=at.GEMM,
                    ptrs={"b_ptr": "fp32", "c_ptr": "fp32"}, meta=dict(HAS_SCALE=True, **common),
                    unit=("stride_am", "stride_bn", "stride_cn")))
    out.append(dict(name="gemm (t = x·Vᵀ)", kernel=gemm.gemm_kernel, configs=at.GEMM,
                    ptrs={"c_ptr": "fp32"}, meta=dict(HAS_SCALE=False, **common),
                    unit=("stride_ak", "stride_bk", "stride_cn")))
    out.append(dict(name="gemm (dV = hᵀ·x)", kernel=gemm.gemm_kernel, configs=at.GEMM,
                    ptrs={"c_ptr": "fp32"}, meta=dict(HAS_SCALE=False, **common),
                    unit=("stride_am", "stride_bn", "stride_cn")))
    for block_m in (16, 64):
        out.append(dict(name=f"decode_shrink m{block_m}", kernel=decode.decode_shrink_kernel,
                        configs=at.DECODE_SHRINK, ptrs={"t_ptr": "fp32"},
                        meta=dict(BLOCK_M=block_m, **common),
                        unit=("stride_xk", "stride_vk", "stride_tr")))
    return out


def compile_config(kernel, cfg, meta: dict, ptrs: dict, dtype: str, arch: int,
                   unit: tuple[str, ...] = ()) -> dict:
    """Compile one config for ``sm_<arch>`` as a real launch would specialise it: the
    ``unit`` strides are the constant 1, pointers and other integers are assumed
    16-aligned (as for contiguous tensors with dims that are multiples of 16). Returns
    smem, registers and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = kernel.fn
    constexprs = {**meta, **cfg.kwargs, **{name: 1 for name in unit}}
    signature = {}
    attrs = {}
    for index, name in enumerate(jit.arg_names):
        if name not in constexprs and name not in FLOAT_ARGS:
            attrs[(index,)] = [["tt.divisibility", 16]]
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + ptrs.get(name, dtype)
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=[80, 90])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--kernels", nargs="*", default=None,
                        help="name prefixes of the cases to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="tunecomp-compile-check-")
    import triton

    from tunecomp_kernels.ops.triton_kernels.autotune import for_sm80

    dtype = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[args.dtype]
    rows = []
    start = time.time()
    for arch in args.arch:
        for case in cases():
            if args.kernels and not any(case["name"].startswith(k) for k in args.kernels):
                continue
            configs = case["configs"] if arch >= 90 else for_sm80(case["configs"])
            for cfg in configs:
                kept = None
                if case.get("registers"):
                    limit = case["budget"][0] if arch >= 90 else case["budget"][1]
                    kept = case["registers"](cfg, case["meta"]) <= limit
                row = {"arch": f"sm_{arch}", "case": case["name"], "config": dict(cfg.kwargs),
                       "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                       "kept_by_estimate": kept}
                try:
                    row.update(compile_config(case["kernel"], cfg, case["meta"], case["ptrs"],
                                              dtype, arch, case.get("unit", ())))
                except Exception as exc:  # noqa: BLE001 - report and go on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:400]
                rows.append(row)
                spills = row.get("spill_stores")
                print(f"sm_{arch} {case['name']:<22} {str(cfg.kwargs):<62} "
                      f"w{cfg.num_warps} s{cfg.num_stages} smem={row.get('smem')} "
                      f"regs={row.get('registers')} spill={spills} kept={kept}"
                      + (f" ERROR {row['error'][:120]}" if "error" in row else ""), flush=True)
    bad = [r for r in rows if r.get("kept_by_estimate") and (r.get("spill_stores") or 0) > 64]
    print(f"\n{len(rows)} compiles in {time.time() - start:.0f} s; "
          f"{sum('error' in r for r in rows)} errors; "
          f"{sum(not r.get('smem_ok', True) for r in rows)} over shared memory; "
          f"{len(bad)} kept by the estimate yet spilling > 64 bytes")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compile-{'-'.join(f'sm{a}' for a in args.arch)}-{stamp}.json"
    path.write_text(json.dumps({
        "command": " ".join(["python -m bench.compile_check",
                             *(argv if argv is not None else sys.argv[1:])]),
        "triton": triton.__version__, "dtype": dtype, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
