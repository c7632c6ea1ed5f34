"""CUDA backend: GPU correctness against the float64 reference, and (on any machine) the
bindings, the wrapper's validation, the verification / choice tables and "auto"'s rules.

The kernels themselves also run on the CPU through the emulator: tests/ops/test_cuda_emulated.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, make_inputs

from tunecomp_kernels import MaskedLowRankLinear, _native, masked_lowrank_linear
from tunecomp_kernels.ops import cuda_marshal
from tunecomp_kernels.ops.reference import reference_float64

requires_native = pytest.mark.skipif(not _native.native_available(), reason="_C is not built")
gpu = pytest.mark.gpu
needs_cuda_build = pytest.mark.skipif(
    not (torch.cuda.is_available() and _native.cuda_kernels_compiled()),
    reason="needs a CUDA GPU and a CUDA build of tunecomp_kernels._C",
)
GRAD_NAMES = ("x", "U", "mask", "V", "bias")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ================================================================================
# GPU: forward and every gradient against the float64 reference
# ================================================================================

def _compare(inputs, dtype, teacher_scale, student_scale, *, path="auto", needs=None):
    """Run forward (forced path) and backward through the CUDA wrappers, check vs float64."""
    from tunecomp_kernels.ops import cuda_backend

    tensors = [inputs[n] for n in GRAD_NAMES]
    w0, b0 = inputs["teacher_weight"], inputs["teacher_bias"]
    y, t, kernel = cuda_backend.run_forward(*tensors, w0, b0, teacher_scale, student_scale,
                                            path=path)
    torch.cuda.synchronize()
    leaves = {n: v.detach().double().requires_grad_() for n, v in inputs.items()
              if n in GRAD_NAMES and v is not None}
    y_ref = reference_float64(leaves["x"], leaves["U"], leaves["mask"], leaves["V"],
                              leaves.get("bias"), w0, b0, teacher_scale, student_scale)
    assert y.dtype == dtype and t.dtype == torch.float32
    assert_close(y, y_ref, dtype, f"forward ({kernel})")
    x2 = inputs["x"].double().reshape(-1, inputs["x"].shape[-1])
    assert_close(t, x2 @ inputs["V"].double().t(), dtype, f"t ({kernel})")

    gen = torch.Generator().manual_seed(7)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype).to(y.device)
    y_ref.backward(dy.double())
    needs = needs or [True, True, True, True, inputs["bias"] is not None]
    grads = cuda_backend.backward(dy, inputs["x"], inputs["U"], inputs["mask"], inputs["V"], t,
                                  w0, teacher_scale, student_scale, needs)
    torch.cuda.synchronize()
    for name, grad, need in zip(GRAD_NAMES, grads, needs):
        if not need:
            assert grad.numel() == 0
            continue
        assert grad.dtype == dtype
        assert_close(grad, leaves[name].grad, dtype, f"d{name} ({kernel})")
    return kernel


GPU_SHAPES = [  # (lead, in, out, r)
    pytest.param((3, 5), 37, 29, 11, id="odd-lead3x5"),
    pytest.param((1,), 37, 29, 11, id="N1"),
    pytest.param((16,), 64, 48, 16, id="N16"),
    pytest.param((4096,), 256, 192, 64, id="N4096"),
    pytest.param((2, 3, 7), 70, 45, 1, id="r1"),
    pytest.param((33,), 40, 24, 0, id="r0"),
    pytest.param((130,), 130, 131, 129, id="r129-odd"),
    pytest.param((257,), 96, 136, 128, id="r128"),
]


@gpu
@needs_cuda_build
@pytest.mark.filterwarnings("ignore::tunecomp_kernels.ops.cuda_tables.UnverifiedKernelWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,in_f,out_f,rank", GPU_SHAPES)
@pytest.mark.parametrize("teacher", [False, True], ids=["student", "teacher"])
@pytest.mark.parametrize("path", ["auto", "fused", "split", "decode"])
def test_gpu_kernels_match_reference(dtype, lead, in_f, out_f, rank, teacher, path):
    n = 1
    for d in lead:
        n *= d
    if path == "decode" and n > 16:
        pytest.skip("decode serves N <= 16")
    if path == "fused" and not 1 <= rank <= 128:
        pytest.skip("fused serves 1 <= r <= 128")
    inputs = make_inputs(lead, in_f, out_f, rank, dtype, "cuda", teacher=teacher, seed=n + rank)
    kernel = _compare(inputs, dtype, 0.6 if teacher else 0.0, 0.8, path=path)
    if path != "auto":
        assert kernel == f"forward_{path}"


@gpu
@needs_cuda_build
@pytest.mark.filterwarnings("ignore::tunecomp_kernels.ops.cuda_tables.UnverifiedKernelWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_public_op_autograd_and_compacted_ranks(dtype):
    torch.manual_seed(0)
    layer = MaskedLowRankLinear(70, 50, 24, backend="cuda").to("cuda", dtype)
    layer.set_teacher(torch.randn(50, 70, device="cuda", dtype=dtype) / 9,
                      torch.randn(50, device="cuda", dtype=dtype))
    layer.teacher_scale, layer.student_scale = 0.4, 0.9
    with torch.no_grad():
        layer.mask[::3] = 0.0  # pruned ranks ...
    layer.compact()  # ... dropped: r = 16
    assert layer.rank == 16
    x = torch.randn(3, 41, 70, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)
    ref = reference_float64(x.double(), layer.U.double(), layer.mask.double(),
                            layer.V.double(), layer.bias.double(),
                            layer.teacher_weight.double(), layer.teacher_bias.double(), 0.4, 0.9)
    assert_close(y, ref, dtype, "compacted forward")
    y.float().square().sum().backward()
    for p in (x, layer.U, layer.mask, layer.V, layer.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all()


@gpu
@needs_cuda_build
@pytest.mark.filterwarnings("ignore::tunecomp_kernels.ops.cuda_tables.UnverifiedKernelWarning")
@pytest.mark.parametrize("needs", [[True, False, False, False, False],
                                   [False, True, True, False, False],
                                   [False, False, False, True, True]])
def test_gpu_backward_subsets(needs):
    inputs = make_inputs((100,), 40, 30, 12, torch.float16, "cuda", teacher=True)
    _compare(inputs, torch.float16, 0.5, 1.1, path="split", needs=needs)


@gpu
@needs_cuda_build
@pytest.mark.filterwarnings("ignore::tunecomp_kernels.ops.cuda_tables.UnverifiedKernelWarning")
def test_gpu_float64_falls_back_to_reference_and_non_contiguous_inputs():
    from tunecomp_kernels.ops import cuda_backend

    inputs = make_inputs((9,), 17, 10, 5, torch.float64, "cuda", teacher=True)
    assert cuda_backend.run_forward(*[inputs[n] for n in GRAD_NAMES], inputs["teacher_weight"],
                                    inputs["teacher_bias"], 0.3, 1.0)[2] == "reference"
    inputs = make_inputs((11,), 17, 10, 5, torch.float32, "cuda", teacher=True)
    inputs["x"] = torch.randn(17, 11, device="cuda").t()  # transposed view
    _compare(inputs, torch.float32, 0.4, 0.9)


@gpu
@needs_cuda_build
@pytest.mark.filterwarnings("ignore::tunecomp_kernels.ops.cuda_tables.UnverifiedKernelWarning")
def test_gpu_deterministic_and_on_current_stream():
    inputs = make_inputs((3000,), 96, 80, 32, torch.bfloat16, "cuda", teacher=True)
    args = [inputs[n] for n in GRAD_NAMES] + [inputs["teacher_weight"], inputs["teacher_bias"]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y1 = masked_lowrank_linear(*args[:5], teacher_weight=args[5], teacher_bias=args[6],
                                   teacher_scale=0.5, backend="cuda")
        y2 = masked_lowrank_linear(*args[:5], teacher_weight=args[5], teacher_bias=args[6],
                                   teacher_scale=0.5, backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(y1, y2)


@gpu
@needs_cuda_build
@pytest.mark.filterwarnings("ignore::tunecomp_kernels.ops.cuda_tables.UnverifiedKernelWarning")
@pytest.mark.parametrize("teacher", [False, True])
def test_gpu_opcheck(teacher):
    from tunecomp_kernels.ops.backends import load_backend

    ops = load_backend("cuda")
    inputs = make_inputs((2, 3), 9, 7, 4, torch.float32, "cuda", teacher=teacher)
    for name in GRAD_NAMES:
        inputs[name].requires_grad_()
    scales = (torch.tensor(0.5 if teacher else 0.0, device="cuda"),
              torch.tensor(1.5, device="cuda"))
    args = (*[inputs[n] for n in GRAD_NAMES], inputs["teacher_weight"], inputs["teacher_bias"],
            *scales)
    torch.library.opcheck(ops.forward.default, args)


@gpu
@needs_cuda_build
@pytest.mark.filterwarnings("ignore::tunecomp_kernels.ops.cuda_tables.UnverifiedKernelWarning")
def test_gpu_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        MaskedLowRankLinear(48, 40, 8, backend="cuda"), torch.nn.GELU(),
        MaskedLowRankLinear(40, 24, 4, backend="cuda"),
    ).to("cuda")
    model[0].set_teacher(torch.randn(40, 48, device="cuda") / 7)
    model[0].teacher_scale = 0.3
    x = torch.randn(2, 70, 48, device="cuda", requires_grad=True)
    y = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ================================================================================
# Bindings and wrapper (any machine)
# ================================================================================

@requires_native
def test_bindings_exist():
    for name in ("mlr_forward_cuda", "mlr_backward_cuda", "mlr_forward_plan",
                 "mlr_backward_plan"):
        assert hasattr(_native._C, name), name


@requires_native
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_bindings_raise_runtime_error_without_gpu():
    C = _native._C
    # Dummy pointers are safe only because no device exists: the launch must fail cleanly.
    # (..., n, k, m, r, dtype, scales pointer, path, sms, stream)
    fwd = (16, 16, 16, 16, 0, 0, 0, 16, 16, 256, 1 << 20, 2, 4, 4, 2, 1, 16, 2, 4, 0)
    with pytest.raises(RuntimeError, match="CUDA error|built without CUDA"):
        C.mlr_forward_cuda(*fwd)
    bwd = (16,) * 7 + (16,) * 5 + (256, 1 << 20, 2, 4, 4, 2, 1, 16, 31, 4, 0)
    with pytest.raises(RuntimeError, match="CUDA error|built without CUDA"):
        C.mlr_backward_cuda(*bwd)
    with pytest.raises(RuntimeError, match="CUDA error|built without CUDA"):  # decode path
        C.mlr_forward_cuda(*fwd[:17], 3, *fwd[18:])


@requires_native
def test_native_validation_errors():
    C = _native._C
    ok = dict(n=4, k=4, m=4, r=2, dtype=1, path=0, sms=4)
    with pytest.raises(ValueError, match="float64 is not supported"):
        C.mlr_forward_plan(**{**ok, "dtype": 3})
    with pytest.raises(ValueError, match="unknown dtype code 9"):
        C.mlr_forward_plan(**{**ok, "dtype": 9})
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        C.mlr_forward_plan(**{**ok, "r": -1})
    with pytest.raises(ValueError, match="unknown path code 7"):
        C.mlr_forward_plan(**{**ok, "path": 7})
    with pytest.raises(ValueError, match="decode path serves n <= 16"):
        C.mlr_forward_plan(**{**ok, "n": 17, "path": 3})
    with pytest.raises(ValueError, match="fused path serves 1 <= r <= 128"):
        C.mlr_forward_plan(**{**ok, "r": 0, "path": 1})
    with pytest.raises(ValueError, match="sms must be >= 1"):
        C.mlr_forward_plan(**{**ok, "sms": 0})
    with pytest.raises(ValueError, match="5-bit mask"):
        C.mlr_backward_plan(4, 4, 4, 2, 1, 32, 4)
    p = 256
    base = [p, p, p, p, 0, 0, 0, p, p, p, 1 << 20, 20, 4, 4, 2, 1, p, 2, 4, 0]
    with pytest.raises(ValueError, match="x pointer is null"):
        C.mlr_forward_cuda(0, *base[1:])
    with pytest.raises(ValueError, match="workspace of 0 bytes is smaller"):
        C.mlr_forward_cuda(*base[:10], 0, *base[11:])
    with pytest.raises(ValueError, match="teacher_bias given without teacher_weight"):
        C.mlr_forward_cuda(*base[:6], p, *base[7:])
    with pytest.raises(ValueError, match="scales pointer is null"):
        C.mlr_forward_cuda(*base[:16], 0, *base[17:])
    bwd = [p] * 12 + [p, 1 << 20, 20, 4, 4, 2, 1, p, 31, 4, 0]
    with pytest.raises(ValueError, match="dU pointer is null"):
        C.mlr_backward_cuda(*bwd[:8], 0, *bwd[9:])
    with pytest.raises(ValueError, match="t pointer is null"):
        C.mlr_backward_cuda(*bwd[:5], 0, *bwd[6:])
    with pytest.raises(ValueError, match="scales pointer is null"):
        C.mlr_backward_cuda(*bwd[:19], 0, *bwd[20:])


@requires_native
def test_forward_plan_picks_path_by_shape():
    plan = _native.mlr_forward_plan
    assert plan(1, 4096, 4096, 64, torch.float16, sms=132)[0] == "decode"
    assert plan(16, 4096, 4096, 64, torch.float16, sms=132)[0] == "decode"
    assert plan(17, 4096, 4096, 64, torch.float16, sms=132)[0] == "split"
    assert plan(4096, 4096, 4096, 64, torch.float16, sms=132)[0] == "split"
    assert plan(32768, 4096, 4096, 64, torch.float16, sms=132)[0] == "fused"
    assert plan(32768, 4096, 4096, 256, torch.float16, sms=132)[0] == "split"  # r > 128
    assert plan(32768, 4096, 4096, 0, torch.float32, sms=132) == ("split", 0)
    assert plan(32768, 4096, 4096, 64, torch.bfloat16, sms=132)[1] == 0  # fused: no workspace
    name, ws = plan(4096, 4096, 4096, 64, torch.float16, path="split", sms=132)
    assert name == "split" and ws >= 4096 * 64 * (4 + 2)  # fp32 partials + half tm
    assert _native.mlr_backward_plan(4096, 512, 256, 64, torch.float16, [True] * 5) > 0
    assert _native.mlr_backward_plan(4096, 512, 256, 64, torch.float16, [False] * 5) == 0
    with pytest.raises(ValueError, match="unknown forward path"):
        plan(4, 4, 4, 4, torch.float16, path="fast")
    with pytest.raises(ValueError, match="not torch.float64"):
        plan(4, 4, 4, 4, torch.float64)


@requires_native
def test_wrapper_validation_errors():
    # The public op checks shapes, dtypes and devices; the marshalling checks the rest.
    inputs = make_inputs((5,), 8, 6, 3, torch.float32)
    args = [inputs[n] for n in GRAD_NAMES]
    fwd = cuda_marshal.masked_lowrank_forward_cuda
    with pytest.raises(ValueError, match="need CUDA tensors, got cpu"):
        fwd(*args, None, None, 0.0, 1.0)
    with pytest.raises(ValueError, match="x must be a tensor"):
        fwd([[1.0]], *args[1:], None, None, 0.0, 1.0)
    bwd = cuda_marshal.masked_lowrank_backward_cuda
    t = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        bwd(torch.zeros(5, 6), args[0], args[1], args[2], args[3], t, None, 0.0, 1.0, [True] * 5)


def test_wrapper_checks_what_the_op_does_not(monkeypatch):
    # Pretend CPU tensors are CUDA tensors to reach the later checks here.
    def fake_check(who, x):
        cuda_marshal._check_kernel_dtype(who, x.dtype)
        return x.dtype, x.device

    monkeypatch.setattr(cuda_marshal, "_check_cuda", fake_check)
    monkeypatch.setattr(_native, "require_native", lambda: object())
    x, U, mask, V = torch.zeros(5, 8), torch.zeros(6, 3), torch.zeros(3), torch.zeros(3, 8)
    fwd = cuda_marshal.masked_lowrank_forward_cuda
    with pytest.raises(ValueError, match="run float32, float16 and bfloat16, not torch.float64"):
        fwd(x.double(), U.double(), mask.double(), V.double(), None, None, None, 0.0, 1.0)
    with pytest.raises(ValueError, match="unknown path"):
        fwd(x, U, mask, V, None, None, None, 0.0, 1.0, path="fastest")
    bwd = cuda_marshal.masked_lowrank_backward_cuda
    with pytest.raises(ValueError, match="t must be the float32"):
        bwd(torch.zeros(5, 6), x, U, mask, V, torch.zeros(5, 3).double(), None, 0.0, 1.0,
            [True] * 5)
    with pytest.raises(ValueError, match=r"t must be the float32 \[5, 3\]"):
        bwd(torch.zeros(5, 6), x, U, mask, V, torch.zeros(4, 3), None, 0.0, 1.0, [True] * 5)
    with pytest.raises(ValueError, match=r"grad_y must be \[5, 6\]"):
        bwd(torch.zeros(5, 7), x, U, mask, V, torch.zeros(5, 3), None, 0.0, 1.0, [True] * 5)
    with pytest.raises(ValueError, match="5 flags"):
        bwd(torch.zeros(5, 6), x, U, mask, V, torch.zeros(5, 3), None, 0.0, 1.0, [True] * 4)


def test_scales_reach_the_kernels_as_one_device_array():
    a, s = torch.tensor(0.25), 0.75  # a 0-d tensor and a float both work
    scales = cuda_marshal._scales(a, s, torch.device("cpu"))
    assert scales.dtype == torch.float32 and scales.tolist() == [0.25, 0.75]
