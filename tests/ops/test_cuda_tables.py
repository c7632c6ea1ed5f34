"""The CUDA backend's tables and "auto"'s rules (any machine): the verification table
(cuda_verified.json), the measured choice table (backend_choice.json), the unverified-kernel
warning and the verification script's plumbing. Split from test_cuda_backend.py.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import TOLERANCE, make_inputs

from tunecomp_kernels import masked_lowrank_linear
from tunecomp_kernels.ops import backends, cuda_marshal, cuda_tables
from tunecomp_kernels.ops.reference import reference_float64

GRAD_NAMES = ("x", "U", "mask", "V", "bias")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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
