"""CUDA backend: GPU correctness against the float64 reference, and (on any machine) the
bindings, the wrapper's validation, the verification / choice tables and "auto"'s rules.

The kernels themselves also run on the CPU through the emulator: tests/ops/test_cuda_emulated.py.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import TOLERANCE, assert_close, make_inputs

from tunecomp_kernels import MaskedLowRankLinear, _native, masked_lowrank_linear
from tunecomp_kernels.ops import backends, cuda_marshal, cuda_tables
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


# ================================================================================
# Verification table, choice table, warnings and "auto" (any machine)
# ================================================================================

GPU_NAME = "NVIDIA Test GPU"
KEY_MID = "le4096/256/192/64/float16"
KEY_DECODE = "le16/256/192/64/float16"


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """Point the tables at temporary files; returns a writer."""
    verified, choice = tmp_path / "verified.json", tmp_path / "choice.json"
    monkeypatch.setattr(cuda_tables, "VERIFIED_PATH", verified)
    monkeypatch.setattr(cuda_tables, "CHOICE_PATH", choice)
    monkeypatch.setattr(cuda_tables, "_WARNED", set())

    def write(entries=(), rows=()):
        verified.write_text(json.dumps({"schema": 1, "entries": list(entries)}))
        choice.write_text(json.dumps({"schema": 1, "rows": list(rows)}))
        cuda_tables.reload_tables()

    write()
    yield write
    cuda_tables.reload_tables()


def _entry(kernel, dtype="float16", gpu=GPU_NAME, passed=True):
    return {"kernel": kernel, "dtype": dtype, "gpu": gpu, "passed": passed, "torch": "2.11.0",
            "cuda": "13.0", "date": "2030-01-01"}


def _all_entries(dtype="float16", gpu=GPU_NAME):
    return [_entry(k, dtype, gpu) for k in cuda_tables.KERNELS]


def test_shipped_tables_are_valid_and_nothing_is_verified_yet():
    cuda_tables.reload_tables()
    verified = cuda_tables.load_verified()
    choice = cuda_tables.load_choice()
    assert verified["schema"] == 1 and choice["schema"] == 1
    # No GPU run has happened: an entry here must come from bench/cuda_verify.py on a GPU.
    for e in verified["entries"]:
        assert {"kernel", "dtype", "gpu", "torch", "cuda", "date", "passed"} <= set(e)
        assert e["kernel"] in cuda_tables.KERNELS and e["dtype"] in cuda_tables.DTYPES
    for row in choice["rows"]:
        assert row["winner"] in ("cuda", "triton")


def test_shape_key_and_buckets():
    x = torch.zeros(2, 3, 256, dtype=torch.float16)
    U = torch.zeros(192, 64, dtype=torch.float16)
    assert cuda_tables.shape_key(x, U) == "le16/256/192/64/float16"
    assert cuda_tables.shape_key(torch.zeros(300, 256), U.float()) == "le4096/256/192/64/float32"
    assert [cuda_tables.n_bucket(n) for n in (0, 16, 17, 256, 257, 4096, 4097)] == [
        "le16", "le16", "le256", "le256", "le4096", "le4096", "gt4096"]
    assert cuda_tables.parse_shape_key(KEY_MID) == {
        "n_bucket": "le4096", "in": 256, "out": 192, "r": 64, "dtype": "float16"}
    assert cuda_tables.parse_shape_key("") is None
    assert cuda_tables.parse_shape_key("a/b/c/d/e") is None


def test_shape_key_traces_under_compile_with_dynamic_rows():
    torch._dynamo.reset()

    def f(x, U):
        key = cuda_tables.shape_key(x, U)
        name = backends.resolve_backend("auto", x.device.type)
        return x.sum() + len(key) + len(name)

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    U = torch.zeros(6, 3)
    for n in (5, 40, 300):
        x = torch.ones(n, 8)
        assert compiled(x, U).item() == f(x, U).item()


def test_cuda_auto_allowed_needs_every_kernel_verified(tables):
    allowed = cuda_tables.cuda_auto_allowed
    assert not allowed(KEY_MID, triton_available=False, gpu=GPU_NAME)  # empty table
    tables(entries=[_entry("forward_fused"), _entry("backward")])
    assert not allowed(KEY_MID, triton_available=False, gpu=GPU_NAME)  # forward_split missing
    tables(entries=_all_entries())
    assert allowed(KEY_MID, triton_available=False, gpu=GPU_NAME)
    assert allowed(KEY_DECODE, triton_available=False, gpu=GPU_NAME)
    assert not allowed(KEY_MID, triton_available=False, gpu="Another GPU")  # other GPU
    assert not allowed(KEY_MID.replace("float16", "bfloat16"), triton_available=False,
                       gpu=GPU_NAME)  # other dtype
    assert not allowed(KEY_MID.replace("float16", "float64"), triton_available=False,
                       gpu=GPU_NAME)
    assert not allowed("", triton_available=False, gpu=GPU_NAME)  # shape unknown
    tables(entries=[_entry("forward_decode"), _entry("backward")])
    assert allowed(KEY_DECODE, triton_available=False, gpu=GPU_NAME)
    assert not allowed(KEY_MID, triton_available=False, gpu=GPU_NAME)
    tables(entries=[{**e, "passed": False} for e in _all_entries()])
    assert not allowed(KEY_MID, triton_available=False, gpu=GPU_NAME)


def test_choice_table_decides_between_cuda_and_triton(tables):
    allowed = cuda_tables.cuda_auto_allowed
    row = {"gpu": GPU_NAME, "n_bucket": "le4096", "in": 256, "out": 192, "r": 64,
           "dtype": "float16"}
    tables(entries=_all_entries())
    assert not allowed(KEY_MID, triton_available=True, gpu=GPU_NAME)  # no row -> Triton
    tables(entries=_all_entries(), rows=[{**row, "winner": "cuda"}])
    assert cuda_tables.choice_for(GPU_NAME, KEY_MID) == "cuda"
    assert allowed(KEY_MID, triton_available=True, gpu=GPU_NAME)
    assert cuda_tables.choice_for(GPU_NAME, KEY_DECODE) is None
    tables(entries=_all_entries(), rows=[{**row, "winner": "triton"}])
    assert not allowed(KEY_MID, triton_available=True, gpu=GPU_NAME)
    assert not allowed(KEY_MID, triton_available=False, gpu=GPU_NAME)
    tables(rows=[{**row, "winner": "cuda"}])  # a measured win never overrides verification
    assert not allowed(KEY_MID, triton_available=True, gpu=GPU_NAME)


def test_warning_once_per_unverified_kernel(tables):
    with pytest.warns(cuda_tables.UnverifiedKernelWarning, match="forward_split.*float16"):
        assert not cuda_tables.warn_if_unverified("forward_split", "float16", GPU_NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cuda_tables.warn_if_unverified("forward_split", "float16", GPU_NAME)  # once only
    with pytest.warns(cuda_tables.UnverifiedKernelWarning, match="backward.*bfloat16"):
        cuda_tables.warn_if_unverified("backward", "bfloat16", GPU_NAME)
    tables(entries=[_entry("forward_fused")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda_tables.warn_if_unverified("forward_fused", "float16", GPU_NAME)


def test_explicit_cuda_backend_warns_when_unverified(tables, monkeypatch):
    # Run the backend's Python layer on CPU tensors with the native launch faked out.
    from tunecomp_kernels.ops import cuda_backend

    calls = []

    def fake_forward(x2, U, mask, V, bias, w0, b0, a, s, path="auto"):
        calls.append(path)
        return x2.new_zeros(x2.shape[0], U.shape[0]), x2.new_zeros(x2.shape[0], U.shape[1]), \
            "split"

    def fake_backward(dy, x2, U, mask, V, t, w0, a, s, needs):
        return tuple(torch.zeros(0) for _ in range(5))

    monkeypatch.setattr(cuda_marshal, "masked_lowrank_forward_cuda", fake_forward)
    monkeypatch.setattr(cuda_marshal, "masked_lowrank_backward_cuda", fake_backward)
    monkeypatch.setattr(cuda_tables, "current_gpu_name", lambda: GPU_NAME)
    inputs = make_inputs((2, 3), 8, 6, 3, torch.float16)
    args = [inputs[n] for n in GRAD_NAMES] + [None, None, 0.0, 1.0]
    with pytest.warns(cuda_tables.UnverifiedKernelWarning, match="forward_split"):
        y, t = cuda_backend.forward(*args)
    assert y.shape == (2, 3, 6) and t.shape == (6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cuda_backend.forward(*args)  # warned once already
    with pytest.warns(cuda_tables.UnverifiedKernelWarning, match="backward"):
        cuda_backend.backward(torch.zeros(2, 3, 6, dtype=torch.float16), inputs["x"],
                              inputs["U"], inputs["mask"], inputs["V"], t, None, 0.0, 1.0,
                              [False] * 5)
    tables(entries=_all_entries())
    monkeypatch.setattr(cuda_tables, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cuda_backend.forward(*args)  # verified: silent
    # float64 never reaches the kernels
    inputs64 = make_inputs((4,), 8, 6, 3, torch.float64)
    y, _ = cuda_backend.forward(*[inputs64[n] for n in GRAD_NAMES], None, None, 0.0, 1.0)
    torch.testing.assert_close(y, reference_float64(*[inputs64[n] for n in GRAD_NAMES]))
    assert calls == ["auto", "auto", "auto"]


@pytest.fixture
def fake_gpu_backends(monkeypatch, tables):
    """Make "cuda" (and optionally "triton") look available, on a GPU named GPU_NAME."""
    state = {"triton": False}
    specs = dict(backends._REGISTRY)
    monkeypatch.setitem(backends._REGISTRY, "cuda",
                        _replace(specs["cuda"], unavailable_reason=lambda: None))
    monkeypatch.setitem(backends._REGISTRY, "triton", _replace(
        specs["triton"], unavailable_reason=lambda: None if state["triton"] else "off",
        device_types=lambda: ("cuda",)))
    monkeypatch.setattr(backends, "load_backend", lambda name: None)
    monkeypatch.setattr(cuda_tables, "current_gpu_name", lambda: GPU_NAME)
    return state


def _replace(spec, **changes):
    import dataclasses

    return dataclasses.replace(spec, **changes)


def test_auto_never_picks_unverified_cuda(fake_gpu_backends, tables):
    resolve = backends.resolve_backend
    assert resolve("auto", "cuda", KEY_MID) == "torch"  # nothing verified, no Triton
    assert resolve("auto", "cuda") == "torch"  # no shape key: never CUDA
    fake_gpu_backends["triton"] = True
    assert resolve("auto", "cuda", KEY_MID) == "triton"
    assert resolve("cuda", "cuda", KEY_MID) == "cuda"  # explicit still works


def test_auto_picks_verified_cuda_per_shape(fake_gpu_backends, tables):
    resolve = backends.resolve_backend
    tables(entries=_all_entries())
    assert resolve("auto", "cuda", KEY_MID) == "cuda"  # verified, Triton unavailable
    fake_gpu_backends["triton"] = True
    assert resolve("auto", "cuda", KEY_MID) == "triton"  # not measured: Triton
    row = {"gpu": GPU_NAME, "n_bucket": "le4096", "in": 256, "out": 192, "r": 64,
           "dtype": "float16", "winner": "cuda"}
    tables(entries=_all_entries(), rows=[row])
    assert resolve("auto", "cuda", KEY_MID) == "cuda"
    assert resolve("auto", "cuda", KEY_MID.replace("/64/", "/65/")) == "triton"  # other shape
    assert resolve("auto", "cpu", KEY_MID) == "torch"  # never on CPU tensors


def test_public_op_passes_shape_key_only_for_auto_on_cuda(monkeypatch):
    from tunecomp_kernels.ops import api

    seen = []

    def fake_resolve(requested, device_type, shape_key=""):
        seen.append((requested, device_type, shape_key))
        return "torch"

    monkeypatch.setattr(api, "resolve_backend", fake_resolve)
    inputs = make_inputs((3,), 8, 6, 3, torch.float32)
    masked_lowrank_linear(inputs["x"], inputs["U"], inputs["mask"], inputs["V"])
    masked_lowrank_linear(inputs["x"], inputs["U"], inputs["mask"], inputs["V"], backend="torch")
    assert seen == [("auto", "cpu", ""), ("torch", "cpu", "")]
    assert api._auto_shape_key("auto", torch.zeros(3, 8, device="meta"), inputs["U"]) == ""


def test_tolerances_cover_cuda_dtypes():
    assert set(DTYPES) <= set(TOLERANCE)


def test_verification_script_records_pass_and_fail(tables, monkeypatch):
    # The plumbing of bench/cuda_verify.py on the CPU, with the reference standing in for
    # the kernels (the kernels themselves are exercised by test_cuda_emulated.py).
    cv = pytest.importorskip("bench.cuda_verify")
    from tunecomp_kernels.ops import cuda_backend, reference

    monkeypatch.setattr(cv, "DEVICE", "cpu")
    monkeypatch.setattr(cv, "FORWARD_CASES", {p: c[:2] for p, c in cv.FORWARD_CASES.items()})
    monkeypatch.setattr(cv, "DTYPES", {"float32": torch.float32, "float16": torch.float16})
    monkeypatch.setattr(cuda_backend, "backward", reference.backward)
    broken = set()

    def stand_in(*args, path="auto"):
        y, t = reference.forward(*args)
        return (y * 1.01 if path in broken else y), t, f"forward_{path}"

    monkeypatch.setattr(cuda_backend, "run_forward", stand_in)
    versions = {"gpu": GPU_NAME, "capability": "9.0", "torch": torch.__version__,
                "cuda": "13.0"}
    results, report = cv.verify(lambda *_: None)
    assert set(results) == {(k, d) for k in cuda_tables.KERNELS for d in ("float32", "float16")}
    assert all(s["passed"] for s in results.values()), results
    assert len(report) == 2 * (6 + len(cv.NEEDS_SUBSETS) - 1) + len(cv.HALF_RANGE_CASES)
    cv.write_verified(results, versions, cuda_tables.VERIFIED_PATH)
    assert cuda_tables.is_verified("forward_fused", "float16", GPU_NAME)
    assert not cuda_tables.is_verified("forward_fused", "bfloat16", GPU_NAME)  # not run

    broken.add("split")  # a wrong kernel is recorded as failed, never as passed
    results, _ = cv.verify(lambda *_: None)
    assert not results[("forward_split", "float16")]["passed"]
    assert results[("forward_fused", "float16")]["passed"]
    table = cv.write_verified(results, versions, cuda_tables.VERIFIED_PATH)
    assert len(table["entries"]) == len(results)  # this GPU's entries replaced, not appended
    assert not cuda_tables.is_verified("forward_split", "float16", GPU_NAME)
    assert cuda_tables.is_verified("forward_fused", "float16", GPU_NAME)
    assert not cuda_tables.cuda_auto_allowed(KEY_MID, triton_available=False, gpu=GPU_NAME)
