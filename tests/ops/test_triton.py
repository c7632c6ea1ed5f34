"""Triton backend: every path (decode, fused, split) against the float64 reference.

Without a CUDA GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set below before triton is imported), with small shapes; bf16 ``tl.dot`` is wrong in
the interpreter, so bf16 runs upcast there and is checked for real only on a GPU
(``@pytest.mark.gpu``), together with shapes up to 4096.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from helpers import TOLERANCE, assert_close, make_inputs, op_recorder  # noqa: E402

from tunecomp_kernels import MaskedLowRankLinear, masked_lowrank_linear  # noqa: E402
from tunecomp_kernels.ops.backends import unavailable_reason  # noqa: E402
from tunecomp_kernels.ops.reference import reference_float64  # noqa: E402

if unavailable_reason("triton") is not None:  # e.g. TRITON_INTERPRET=0 set by the caller
    pytest.skip(f"triton backend unavailable: {unavailable_reason('triton')}",
                allow_module_level=True)

from tunecomp_kernels.ops import triton_backend as tb  # noqa: E402
from tunecomp_kernels.ops.triton_kernels import autotune as at  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_NAMES = ("x", "U", "mask", "V", "bias")
REPO = Path(__file__).resolve().parents[2]


def check(inputs: dict, dtype: torch.dtype, teacher_scale: float = 0.6,
          student_scale: float = 0.8, grads: tuple[str, ...] = GRAD_NAMES) -> None:
    """Forward and the gradients named in ``grads`` against the float64 reference."""
    leaves = {n: inputs[n].detach().clone().requires_grad_(n in grads)
              for n in GRAD_NAMES if inputs[n] is not None}
    refs = {n: t.detach().clone().requires_grad_(n in grads) for n, t in leaves.items()}
    frozen = {k: inputs[k] for k in ("teacher_weight", "teacher_bias")}
    if frozen["teacher_weight"] is None:
        teacher_scale = 0.0
    y = masked_lowrank_linear(
        leaves["x"], leaves["U"], leaves["mask"], leaves["V"], leaves.get("bias"), **frozen,
        teacher_scale=teacher_scale, student_scale=student_scale, backend="triton")
    y_ref = reference_float64(
        refs["x"], refs["U"], refs["mask"], refs["V"], refs.get("bias"), **frozen,
        teacher_scale=teacher_scale, student_scale=student_scale)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "forward")
    if not any(t.requires_grad for t in leaves.values()):
        return
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype).to(y.device)
    y.backward(dy)
    y_ref.backward(dy.to(torch.float64))
    for name, leaf in leaves.items():
        if name in grads:
            assert leaf.grad is not None and leaf.grad.dtype == dtype, name
            assert_close(leaf.grad, refs[name].grad, dtype, f"d{name}")
        else:
            assert leaf.grad is None, f"{name} got a gradient it did not ask for"


@pytest.fixture
def record_kernels(monkeypatch):
    """Names of the kernels each op call launches, in order."""
    names: list[str] = []
    real = tb.wrap_triton
    kernels = {id(getattr(tb, n)): n for n in
               ("fused_forward_kernel", "expand_kernel", "decode_shrink_kernel",
                "gemm_kernel", "dy_kernel")}

    def recording(kernel):
        names.append(kernels.get(id(kernel), "?"))
        return real(kernel)

    monkeypatch.setattr(tb, "wrap_triton", recording)
    return names


# --- the sweep the issue asks for: N x r x dtype, teacher and bias on ------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("rank", [1, 16, 64, 200])
@pytest.mark.parametrize("n", [1, 7, 130])
def test_sweep_against_reference(n, rank, dtype):
    inputs = make_inputs((n,), 45, 37, rank, dtype, DEVICE, teacher=True, seed=n + rank)
    check(inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bias,teacher", [(False, False), (True, False), (False, True)],
                         ids=["plain", "bias", "teacher-no-bias"])
@pytest.mark.parametrize("n", [5, 70])
def test_bias_and_teacher_variants(n, bias, teacher, dtype):
    inputs = make_inputs((n,), 29, 41, 13, dtype, DEVICE, bias=bias, teacher=teacher,
                         teacher_bias=False, zero_mask_frac=0.3)
    check(inputs, dtype, teacher_scale=-0.7, student_scale=1.7)


# --- each path, and that it is the one that runs ----------------------------------------

def test_paths_launch_the_expected_kernels(record_kernels):
    def run(n, rank):
        record_kernels.clear()
        inputs = make_inputs((n,), 33, 21, rank, torch.float32, DEVICE, teacher=True)
        check(inputs, torch.float32)
        return list(record_kernels)

    # decode: split-K shrink + expand; backward: dy (dU fused, one row tile) + dV + dx
    assert run(5, 12) == ["decode_shrink_kernel", "expand_kernel",
                          "dy_kernel", "gemm_kernel", "expand_kernel"]
    # fused forward: one kernel
    assert run(80, 12)[0:1] == ["fused_forward_kernel"]
    assert run(80, 12).count("fused_forward_kernel") == 1
    # split forward past FUSED_MAX_R: GEMM for t, then expand
    assert run(80, tb.FUSED_MAX_R + 3)[0:2] == ["gemm_kernel", "expand_kernel"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n", [7, 130])
def test_split_path_with_lowered_threshold(monkeypatch, record_kernels, n, dtype):
    """r > FUSED_MAX_R: t by a GEMM, rest fused; the dy kernel runs over several rank
    slices. The threshold is lowered so the shapes stay interpreter-sized."""
    monkeypatch.setattr(tb, "FUSED_MAX_R", 16)
    inputs = make_inputs((n,), 40, 36, 50, dtype, DEVICE, teacher=True, seed=3)
    check(inputs, dtype)
    if n > tb.TRITON_DECODE_MAX_N:
        assert record_kernels[:2] == ["gemm_kernel", "expand_kernel"]


@pytest.mark.parametrize("n", [7, 130])
def test_unfused_du_path(monkeypatch, record_kernels, n):
    """dU by the split-K GEMM instead of inside the dy kernel (the large-N policy)."""
    monkeypatch.setattr(tb, "FUSE_DU_MAX_N", 0)
    inputs = make_inputs((n,), 30, 26, 9, torch.float32, DEVICE, teacher=True)
    check(inputs, torch.float32)
    assert record_kernels.count("gemm_kernel") == 2  # dU and dV


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_du_over_several_row_tiles(monkeypatch, record_kernels, dtype):
    """dU inside the dy kernel with row tiles meeting through atomics (decode fuses it
    with a single row tile; this forces the multi-tile case)."""
    monkeypatch.setattr(tb, "FUSE_DU_MAX_N", 10**6)
    inputs = make_inputs((130,), 30, 26, 9, dtype, DEVICE, teacher=True)
    check(inputs, dtype)
    assert record_kernels.count("gemm_kernel") == 1  # dV only


def test_decode_path_up_to_its_limit(monkeypatch, record_kernels):
    monkeypatch.setattr(tb, "TRITON_DECODE_MAX_N", 40)
    inputs = make_inputs((40,), 70, 20, 24, torch.float16, DEVICE, teacher=True)
    check(inputs, torch.float16)
    assert record_kernels[0] == "decode_shrink_kernel"


def test_fused_or_split_model():
    """The roofline model picks the fused kernel for narrow layers, the split path where
    recomputing t per output group would outweigh t's round trip."""
    assert tb._fused_is_cheaper(130, 45, 37, 200)
    assert tb._fused_is_cheaper(1024, 1024, 1024, 64)
    assert not tb._fused_is_cheaper(8192, 4096, 4096, 256)
    assert not tb._fused_is_cheaper(100, 45, 37, tb.FUSED_MAX_R + 1)


def test_large_split_rank_natural_threshold():
    """r = 300 > 256 without patching: the real split path (BLOCK_R slices of 256)."""
    inputs = make_inputs((70,), 20, 24, 300, torch.float32, DEVICE, teacher=True)
    check(inputs, torch.float32)


# --- shapes, layouts, gradients subsets ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_leading_dims(dtype):
    inputs = make_inputs((2, 3, 11), 19, 23, 7, dtype, DEVICE, teacher=True)
    check(inputs, dtype)


def test_non_contiguous_inputs():
    inputs = make_inputs((9,), 17, 10, 5, torch.float32, DEVICE, teacher=True)
    base = torch.randn(9, 34, device=DEVICE)
    inputs["x"] = base[:, ::2]
    check(inputs, torch.float32)
    inputs["x"] = torch.randn(17, 66, device=DEVICE).t()  # transposed, fused path
    check(inputs, torch.float32)
    # transposed parameters: the kernels take strides, nothing is copied
    inputs["U"] = inputs["U"].t().contiguous().t()
    inputs["V"] = inputs["V"].t().contiguous().t()
    inputs["teacher_weight"] = inputs["teacher_weight"].t().contiguous().t()
    assert not inputs["U"].is_contiguous()
    check(inputs, torch.float32)


@pytest.mark.parametrize("grads", [("x",), ("U",), ("mask",), ("V",), ("bias",), ("U", "V"),
                                   ("mask", "bias")], ids="-".join)
def test_gradient_subsets(grads):
    inputs = make_inputs((6, 12), 21, 18, 8, torch.float32, DEVICE, teacher=True)
    check(inputs, torch.float32, grads=grads)


def test_backward_op_returns_fresh_empty_tensors_for_unneeded_grads():
    inputs = make_inputs((10,), 12, 9, 4, torch.float32, DEVICE, teacher=True)
    y, t = tb.OPS.forward(inputs["x"], inputs["U"], inputs["mask"], inputs["V"],
                          inputs["bias"], inputs["teacher_weight"], inputs["teacher_bias"],
                          torch.tensor(0.5), torch.tensor(1.0))
    dy = torch.randn_like(y)
    out = tb.OPS.backward(dy, inputs["x"], inputs["U"], inputs["mask"], inputs["V"], t,
                          inputs["teacher_weight"], torch.tensor(0.5), torch.tensor(1.0),
                          [False, True, False, False, True])
    assert [o.numel() for o in out] == [0, 9 * 4, 0, 0, 9]
    ptrs = [o.untyped_storage().data_ptr() for o in out if o.numel()]
    assert len(set(ptrs)) == len(ptrs)


def test_saved_t_is_fp32_for_half_inputs():
    inputs = make_inputs((70,), 16, 16, 8, torch.float16, DEVICE)
    _, t = tb.OPS.forward(inputs["x"], inputs["U"], inputs["mask"], inputs["V"],
                          inputs["bias"], None, None, torch.tensor(0.0), torch.tensor(1.0))
    assert t.dtype == torch.float32 and t.shape == (70, 8)
    expected = inputs["x"].double() @ inputs["V"].double().t()
    assert_close(t, expected, torch.float16, "t")


def test_empty_batch_and_zero_rank():
    inputs = make_inputs((0, 3), 8, 6, 3, torch.float32, DEVICE, teacher=True)
    check(inputs, torch.float32)
    inputs = make_inputs((4,), 8, 6, 3, torch.float32, DEVICE, teacher=True)
    for name, dim in (("U", 1), ("V", 0), ("mask", 0)):
        inputs[name] = inputs[name].narrow(dim, 0, 0)
    check(inputs, torch.float32)


def test_bf16_upcast_in_interpreter_or_real_on_gpu():
    inputs = make_inputs((70,), 24, 20, 8, torch.bfloat16, DEVICE, teacher=True)
    check(inputs, torch.bfloat16)


def test_float64_is_served():
    inputs = make_inputs((5,), 9, 7, 3, torch.float64, DEVICE, teacher=True)
    check(inputs, torch.float64)


# --- compacted ranks ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n", [3, 90])
def test_compacted_ranks(n, dtype, record_kernels):
    torch.manual_seed(0)
    layer = MaskedLowRankLinear(40, 30, 24, backend="triton").to(DEVICE, dtype)
    layer.set_teacher(torch.randn(30, 40, device=DEVICE) / 7, torch.randn(30, device=DEVICE))
    layer.teacher_scale, layer.student_scale = 0.4, 0.9
    with torch.no_grad():
        layer.mask[::3] = 0.0
    x = torch.randn(n, 40, device=DEVICE, dtype=dtype)
    y_full = layer(x)
    layer.compact()
    assert layer.rank == 16
    inputs = {"x": x, "U": layer.U.detach(), "mask": layer.mask.detach(),
              "V": layer.V.detach(), "bias": layer.bias.detach(),
              "teacher_weight": layer.teacher_weight, "teacher_bias": layer.teacher_bias}
    record_kernels.clear()
    check(inputs, dtype, teacher_scale=0.4, student_scale=0.9)
    assert_close(layer(x), y_full.double(), dtype, "compacted vs full forward")
    assert record_kernels  # the Triton kernels ran on the compacted tensors


# --- registration ---------------------------------------------------------------------------

def test_autotune_tables_are_well_formed():
    for table in (at.FUSED_FORWARD, at.EXPAND, at.GEMM, at.DECODE_SHRINK, at.DY):
        for cfg in table:
            for key, value in cfg.kwargs.items():
                assert value >= 1 and (value & (value - 1)) == 0, (key, value)
                if key.startswith("BLOCK"):
                    assert value >= 16, (key, value)
    assert at.n_bucket(1) == 1 and at.n_bucket(130) == 256 and at.n_bucket(10**6) == 16384


def test_autotune_switch_and_int32_guard(monkeypatch):
    monkeypatch.setattr(at, "interpreting", lambda: False)
    monkeypatch.setenv("TUNECOMP_TRITON_AUTOTUNE", "0")
    assert at.configs(at.GEMM, at.GEMM_INTERP) == at.GEMM[:1]
    monkeypatch.setenv("TUNECOMP_TRITON_AUTOTUNE", "1")
    assert at.configs(at.GEMM, at.GEMM_INTERP) == at.GEMM
    monkeypatch.setenv("TUNECOMP_TRITON_MAX_CONFIGS", "3")
    assert at.configs(at.GEMM, at.GEMM_INTERP) == at.GEMM[:3]
    # fused forward at r = 256 keeps only configs whose estimate fits the budget
    prune = at.make_pruner(at.FUSED_FORWARD, at.for_sm80(at.FUSED_FORWARD),
                           at.fused_forward_registers, at.FUSED_FORWARD_BUDGET)
    kept = prune(at.FUSED_FORWARD, {}, BLOCK_R=256)
    assert kept and all(at.fused_forward_registers(c, {"BLOCK_R": 256}) <= 160 for c in kept)
    assert not any(c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] == 128 for c in kept)
    assert len(prune(at.FUSED_FORWARD, {}, BLOCK_R=16)) > len(kept)
    # offsets past int32 go to the reference path
    assert tb._int32_indexable(4096, 4096, 4096, 256)
    assert not tb._int32_indexable(2**16, 2**15, 16, 16)
    huge = torch.empty(1).expand(2**16, 2**16)  # stride 0: spans nothing
    assert tb._int32_indexable(16, 16, 16, 16, huge)


#: dy configs (num_warps, BLOCK_M, BLOCK_O) that ptxas (Triton 3.9) spilled with the fused
#: dU and fp32 operands, by (arch, BLOCK_R): bench/results/compile-sm90-sm80-20261130-*.json.
DY_FUSED_SPILLS = {(80, 64): {(4, 16, 128)},
                   (80, 128): {(8, 32, 128), (4, 16, 64), (8, 64, 128), (4, 32, 64),
                               (4, 16, 128)},
                   (90, 128): {(4, 16, 128), (4, 64, 32)}}


@pytest.mark.parametrize("arch,block_r", sorted(DY_FUSED_SPILLS))
def test_dy_pruner_drops_the_fused_du_configs_that_spill(monkeypatch, arch, block_r):
    monkeypatch.setattr(at, "_capability", lambda named_args: divmod(arch, 10))
    prune = at.make_pruner(at.DY, at.for_sm80(at.DY), at.dy_registers, at.DY_BUDGET)
    table = at.DY if arch >= 90 else at.for_sm80(at.DY)
    kept = prune(table, {}, BLOCK_R=block_r, FUSE_DU=True)
    shapes = {(c.num_warps, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_O"]) for c in kept}
    assert shapes and not shapes & DY_FUSED_SPILLS[arch, block_r], shapes
    # without the fused dU nothing that compiled without spills is lost at r <= 128
    assert len(prune(table, {}, BLOCK_R=block_r, FUSE_DU=False)) == len(table)


def test_triton_op_registration_traces_kernels():
    """The GPU registration (``triton_op``) on this torch: schema from the type hints,
    fake shapes without running anything, and make_fx sees the kernels as graph nodes.
    Runs in a subprocess without TRITON_INTERPRET (no launch happens)."""
    code = textwrap.dedent("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from tunecomp_kernels.ops import contract, triton_backend as tb
        fwd = torch.ops.tunecomp.masked_lowrank_triton.default
        assert str(fwd._schema).endswith(contract.FORWARD_SCHEMA), fwd._schema
        f16 = dict(dtype=torch.float16)
        for n, r, kernels in ((5, 8, 2), (100, 8, 1), (100, 300, 2)):
            args = (torch.randn(n, 24, **f16), torch.randn(20, r, **f16),
                    torch.rand(r, **f16), torch.randn(r, 24, **f16), torch.randn(20, **f16),
                    torch.randn(20, 24, **f16), None, torch.tensor(0.5), torch.tensor(0.8))
            with FakeTensorMode() as mode:
                fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                        for a in args]
                y, t = fwd(*fake)
                assert y.shape == (n, 20) and y.dtype == torch.float16
                assert t.shape == (n, r) and t.dtype == torch.float32
                grads = tb.OPS.backward.default(
                    torch.empty_like(y), fake[0], fake[1], fake[2], fake[3], t, fake[5],
                    fake[7], fake[8], [True, True, True, True, True])
                assert [tuple(g.shape) for g in grads] == [(n, 24), (20, r), (r,), (r, 24),
                                                           (20,)]
            gm = make_fx(tb.forward, tracing_mode="fake")(*args)
            found = [nd for nd in gm.graph.nodes if "triton_kernel_wrapper" in str(nd.target)]
            assert len(found) == kernels, (n, r, gm.code)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter-specific")
def test_interpreter_works_when_triton_was_imported_first():
    """In a full pytest run torch imports triton.language before this module sets
    TRITON_INTERPRET=1; the kernels must not depend on triton's own jit functions."""
    code = textwrap.dedent("""
        import os, sys
        import triton.language
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, "tests")
        import torch
        from helpers import make_inputs
        from tunecomp_kernels import masked_lowrank_linear
        for n, r in ((3, 5), (70, 5), (70, 300)):
            i = make_inputs((n,), 20, 12, r, torch.float32, teacher=True)
            i["V"].requires_grad_()
            y = masked_lowrank_linear(i["x"], i["U"], i["mask"], i["V"], i["bias"],
                                      teacher_weight=i["teacher_weight"], teacher_scale=0.5,
                                      backend="triton")
            y.sum().backward()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


# --- GPU only ------------------------------------------------------------------------------

GPU_SHAPES = [
    pytest.param(16, 4096, 4096, 256, id="decode-4096-r256"),
    pytest.param(1000, 1024, 4096, 64, id="fused-1024to4096-r64"),
    pytest.param(2048, 4096, 1024, 256, id="split-4096to1024-r256"),
    pytest.param(777, 2048, 2048, 1024, id="split-2048-r1024"),
    pytest.param(4096, 4096, 4096, 256, id="split-4096-r256"),
    pytest.param(333, 1000, 1500, 200, id="odd"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,in_f,out_f,rank", GPU_SHAPES)
def test_gpu_large_shapes(n, in_f, out_f, rank, dtype):
    inputs = make_inputs((n,), in_f, out_f, rank, dtype, "cuda", teacher=True, seed=rank)
    check(inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_compile_fullgraph_and_opcheck(dtype):
    torch._dynamo.reset()
    layer = MaskedLowRankLinear(256, 192, 64, backend="triton").to("cuda", dtype)
    layer.set_teacher(torch.randn(192, 256, device="cuda") / 16)
    layer.teacher_scale, layer.student_scale = 0.3, 0.9
    x = torch.randn(4, 100, 256, device="cuda", dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = torch.compile(layer, fullgraph=True)(x)
    y_ref = layer(x_ref)
    assert_close(y, y_ref.double(), dtype, "compiled forward")
    y.float().square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    y_ref.float().square().sum().backward()
    for g, p in zip(grads, layer.parameters()):
        assert_close(g, p.grad.double(), dtype, "compiled grad")
    inputs = make_inputs((2, 3), 40, 24, 8, dtype, "cuda", teacher=True)
    args = (inputs["x"], inputs["U"], inputs["mask"], inputs["V"], inputs["bias"],
            inputs["teacher_weight"], inputs["teacher_bias"], torch.tensor(0.5, device="cuda"),
            torch.tensor(1.5, device="cuda"))
    torch.library.opcheck(tb.OPS.forward.default, args)


@pytest.mark.gpu
def test_gpu_one_op_boundary_per_call():
    """The GPU registration is a triton_op: an eager call is still one dispatcher op."""
    layer = MaskedLowRankLinear(64, 48, 16, backend="triton").to("cuda", torch.float16)
    layer.set_teacher(torch.randn(48, 64, device="cuda"))
    layer.teacher_scale = 0.5
    x = torch.randn(100, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad(), op_recorder() as rec:
        layer(x)
    assert rec.ops == ["tunecomp.masked_lowrank_triton.default"], rec.ops


def test_tolerances_cover_tested_dtypes():
    assert {torch.float32, torch.float16, torch.bfloat16} <= set(TOLERANCE)
