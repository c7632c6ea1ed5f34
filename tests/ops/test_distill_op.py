"""The distill op (masked_lowrank_linear_distill) against the float64 reference: y, the
feature loss and all five gradients on every runnable backend, plus its contract."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import DEVICES, TOLERANCE, assert_close, backend_params, make_inputs, rel_err

from tunecomp_kernels import masked_lowrank_linear, masked_lowrank_linear_distill
from tunecomp_kernels.ops import reference
from tunecomp_kernels.ops.backends import (
    backend_serves,
    known_backends,
    load_backend,
    unavailable_reason,
)
from tunecomp_kernels.ops.reference import reference_distill_float64

GRAD_NAMES = ("x", "U", "mask", "V", "bias")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# (leading dims, in, out, rank): out is never a multiple of the 32-wide interpreter tile.
SHAPES = [
    pytest.param((3, 5), 37, 29, 11, id="odd-lead3x5"),
    pytest.param((1,), 37, 29, 11, id="N1"),
    pytest.param((8,), 16, 24, 1, id="r1"),
    pytest.param((2, 3, 4), 20, 9, 9, id="lead3d"),
    pytest.param((70,), 20, 40, 5, id="N70-gemm-t-2-col-tiles"),
]


def _any_device_backends() -> list:
    """Every known backend, skipped when it cannot run here; which device it serves is
    checked in the test (``_skip_unsupported``), so a GPU machine runs Triton on CUDA."""
    return [pytest.param(n, id=n, marks=[pytest.mark.skip(reason=unavailable_reason(n))]
                         if unavailable_reason(n) else []) for n in known_backends()]


def _skip_unsupported(backend: str, dtype: torch.dtype, device: str = "cpu") -> None:
    if not backend_serves(backend, device):
        pytest.skip(f"backend {backend} does not serve {device} tensors")
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 Triton is wrong in the CPU interpreter")


def _leaves(inputs: dict) -> dict:
    return {n: inputs[n].detach().clone().requires_grad_()
            for n in GRAD_NAMES if inputs[n] is not None}


def run_and_compare(backend, inputs, dtype, a=0.3, s=0.8, fw=0.7, x_view=None, seed=1):
    """y, loss and every gradient of the op against autograd of
    ``(y_ref · dy).sum() + fw·ℓ_ref`` in float64; returns the op's gradients."""
    leaves, refs = _leaves(inputs), _leaves(inputs)
    frozen = {k: inputs[k] for k in ("teacher_weight", "teacher_bias")}
    x = x_view(leaves["x"]) if x_view else leaves["x"]
    x_ref = x_view(refs["x"]) if x_view else refs["x"]
    y, loss = masked_lowrank_linear_distill(
        x, leaves["U"], leaves["mask"], leaves["V"], leaves.get("bias"), **frozen,
        teacher_scale=a, student_scale=s, feature_weight=fw, backend=backend)
    y_ref, loss_ref = reference_distill_float64(
        x_ref, refs["U"], refs["mask"], refs["V"], refs.get("bias"), frozen["teacher_weight"],
        frozen["teacher_bias"], a, s)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert loss.dtype == torch.float32 and loss.dim() == 0 and not loss.requires_grad
    assert_close(y, y_ref, dtype, "forward")
    # The loss is returned in float32 whatever x's dtype.
    assert_close(loss, loss_ref, torch.float32 if dtype == torch.float64 else dtype, "loss")
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype).to(y.device)
    y.backward(dy)
    ((y_ref * dy.to(torch.float64)).sum() + fw * loss_ref).backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        assert_close(leaf.grad, refs[name].grad, dtype, f"d{name}")
    for name, tensor in frozen.items():
        assert tensor is None or tensor.grad is None, f"frozen {name} received a gradient"
    return {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.filterwarnings("ignore::UserWarning")  # the CUDA backend's unverified-kernel note
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _any_device_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,in_f,out_f,rank", SHAPES)
def test_against_float64(backend, dtype, lead, in_f, out_f, rank, device):
    _skip_unsupported(backend, dtype, device)
    inputs = make_inputs(lead, in_f, out_f, rank, dtype, device, teacher=True)
    run_and_compare(backend, inputs, dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bias,teacher_bias", [(True, True), (True, False), (False, True),
                                               (False, False)])
def test_biases_present_or_absent(backend, bias, teacher_bias):
    inputs = make_inputs((3, 4), 18, 21, 6, torch.float32, bias=bias, teacher=True,
                         teacher_bias=teacher_bias)
    run_and_compare(backend, inputs, torch.float32)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous_x(backend, layout):
    inputs = make_inputs((3, 4), 18, 21, 6, torch.float32, teacher=True)

    def view(x):  # the same values, read through non-unit strides
        if layout == "strided":
            return torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]
        return x.transpose(0, 1).contiguous().transpose(0, 1)

    run_and_compare(backend, inputs, torch.float32, x_view=view)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("scales", [(0.0, 1.0), (1.0, 0.0), (0.5, 1.5)], ids=str)
def test_blend_scales_at_their_ends(backend, scales):
    """a = 0 keeps the teacher in D; s = 0 leaves the student's gradient to the feature term."""
    a, s = scales
    inputs = make_inputs((4, 3), 16, 20, 5, torch.float32, teacher=True)
    run_and_compare(backend, inputs, torch.float32, a=a, s=s, fw=2.0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_teacher(backend, teacher_dtype):
    """fp32 x with a bf16/fp16 teacher: compared with float64 of the stored (rounded) W0."""
    inputs = make_inputs((5, 3), 24, 19, 6, torch.float32, teacher=True)
    for name in ("teacher_weight", "teacher_bias"):
        inputs[name] = inputs[name].to(teacher_dtype)
    run_and_compare(backend, inputs, torch.float32)


def test_reference_teacher_upcast_in_blocks(monkeypatch):
    """The reference's block-wise upcast of a narrow teacher (several blocks of rows)."""
    monkeypatch.setattr(reference, "TEACHER_BLOCK_ELEMENTS", 3 * 24)
    inputs = make_inputs((5, 3), 24, 19, 6, torch.float32, teacher=True)
    for name in ("teacher_weight", "teacher_bias"):
        inputs[name] = inputs[name].to(torch.bfloat16)
    run_and_compare("torch", inputs, torch.float32)


@pytest.mark.parametrize("backend", backend_params())
def test_feature_term_is_present_and_scales(backend):
    """The comparison above sees the feature term: dropping it (fw = 0 on the reference
    side) misses by far more than the tolerance, and doubling fw changes the gradients."""
    inputs = make_inputs((4, 3), 16, 20, 5, torch.float32, teacher=True)
    with_term = run_and_compare(backend, inputs, torch.float32, fw=1.0)
    without = run_and_compare(backend, inputs, torch.float32, fw=0.0)
    for name in ("U", "mask", "V", "bias"):
        assert rel_err(with_term[name], without[name]) > 100 * TOLERANCE[torch.float32], name
    torch.testing.assert_close(with_term["x"], without["x"], rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_zero_feature_weight_gives_the_blend_gradients(backend, dtype):
    """feature_weight = 0: the blend op's y and gradients, bit for bit on the reference
    backend (the feature term is added as exact zeros); on Triton G_s = s·dy is rounded
    once more, so within the dtype's tolerance."""
    inputs = make_inputs((3, 5), 37, 29, 11, dtype, teacher=True)
    frozen = {k: inputs[k] for k in ("teacher_weight", "teacher_bias")}
    got, want = _leaves(inputs), _leaves(inputs)
    y, loss = masked_lowrank_linear_distill(
        *(got[n] for n in GRAD_NAMES), **frozen, teacher_scale=0.3, student_scale=0.8,
        feature_weight=0.0, backend=backend)
    y_ref = masked_lowrank_linear(*(want[n] for n in GRAD_NAMES), **frozen, teacher_scale=0.3,
                                  student_scale=0.8, backend=backend)
    assert loss > 0.1  # the layer is far from its teacher: the term would matter
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close(y, y_ref, dtype, "y")
    for name in GRAD_NAMES:
        if backend == "torch":
            assert torch.equal(got[name].grad, want[name].grad), name
        else:
            assert_close(got[name].grad, want[name].grad, dtype, f"d{name}")


@pytest.mark.parametrize("backend", backend_params())
def test_no_rows(backend):
    inputs = make_inputs((0, 3), 8, 6, 4, torch.float32, teacher=True)
    leaves = _leaves(inputs)
    y, loss = masked_lowrank_linear_distill(
        *(leaves[n] for n in GRAD_NAMES), teacher_weight=inputs["teacher_weight"],
        teacher_bias=inputs["teacher_bias"], teacher_scale=0.5, student_scale=1.0,
        feature_weight=1.0, backend=backend)
    assert y.shape == (0, 3, 6) and loss.item() == 0.0
    y.sum().backward()
    for name, leaf in leaves.items():
        assert torch.equal(leaf.grad, torch.zeros_like(leaf)), name


def test_tensor_scales_and_feature_weight_match_floats():
    inputs = make_inputs((4, 3), 16, 20, 5, torch.float32, teacher=True)
    frozen = {k: inputs[k] for k in ("teacher_weight", "teacher_bias")}
    args = [inputs[n] for n in GRAD_NAMES]
    y1, l1 = masked_lowrank_linear_distill(*args, **frozen, teacher_scale=0.3,
                                           student_scale=0.8, feature_weight=0.7)
    y2, l2 = masked_lowrank_linear_distill(
        *args, **frozen, teacher_scale=torch.tensor(0.3), student_scale=torch.tensor(0.8),
        feature_weight=torch.tensor(0.7, dtype=torch.float64))
    assert torch.equal(y1, y2) and torch.equal(l1, l2)


def _distill_ops(backend: str):
    """The backend's registered distill op pair (registering it on first use)."""
    from tunecomp_kernels.ops.api import DISTILL_MODULES

    load_backend(backend)
    return importlib.import_module(DISTILL_MODULES[backend]).OPS


def _op_args(inputs: dict, grad: bool = True) -> tuple:
    tensors = [inputs[n] for n in GRAD_NAMES]
    if grad:
        tensors = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    dev = inputs["x"].device
    return (*tensors, inputs["teacher_weight"], inputs["teacher_bias"],
            torch.tensor(0.4, device=dev), torch.tensor(1.3, device=dev),
            torch.tensor(0.9, device=dev))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("teacher_bias", [True, False])
def test_opcheck(backend, teacher_bias):
    """Schema, fake implementations, autograd registration and AOT dispatch of both ops."""
    ops = _distill_ops(backend)
    inputs = make_inputs((2, 3), 9, 7, 4, torch.float32, teacher=True, teacher_bias=teacher_bias)
    args = _op_args(inputs)
    torch.library.opcheck(ops.forward.default, args)
    with torch.no_grad():
        y, t, D, sums = ops.forward(*args)
    plain = [inputs[n] for n in ("x", "U", "mask", "V")]
    tail = (inputs["teacher_weight"], *args[7:])
    dy = torch.randn_like(y)
    torch.library.opcheck(ops.backward.default, (dy, *plain, t, D, sums, *tail, [True] * 5))
    torch.library.opcheck(ops.backward.default,
                          (dy, *plain, t, D, sums, *tail, [False, True, False, True, False]))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _any_device_backends())
@pytest.mark.parametrize("lead,out_f", [((5,), 29), ((70,), 40), ((3, 33), 7)])
def test_fused_forward_outputs_match_reference(backend, lead, out_f, device):
    """y, t, D and sums of each backend's forward op against the reference op: several row
    and column tiles, biases in the padding of partial tiles (which must not reach the sums)."""
    _skip_unsupported(backend, torch.float32, device)
    inputs = make_inputs(lead, 20, out_f, 6, torch.float32, device, teacher=True)
    args = _op_args(inputs, grad=False)
    got = _distill_ops(backend).forward(*args)
    want = _distill_ops("torch").forward(*args)
    for name, g, w in zip(("y", "t", "D", "sums"), got, want):
        assert g.dtype == w.dtype and g.is_contiguous(), name
        assert_close(g, w, torch.float32, name)
    D, sums = got[2], got[3]
    torch.testing.assert_close(sums, torch.stack((D.square().sum(), sums[1])))


@pytest.mark.parametrize("overrides,exc,message", [
    ({"teacher_weight": None}, ValueError, "needs teacher_weight"),
    ({"teacher_weight": [[1.0]]}, TypeError, "teacher_weight must be a torch.Tensor"),
    ({"teacher_weight": torch.randn(5, 8)}, ValueError, "teacher_weight must be"),
    ({"U": torch.randn(6, 3)}, ValueError, "rank mismatch"),
    ({"feature_weight": -0.5}, ValueError, "feature_weight must be a finite float >= 0"),
    ({"feature_weight": float("nan")}, ValueError, "feature_weight must be a finite float"),
    ({"feature_weight": True}, TypeError, "feature_weight must be a float"),
    ({"feature_weight": "0.5"}, TypeError, "feature_weight must be a float"),
    ({"feature_weight": torch.ones(2)}, ValueError, "feature_weight must be a float or a 0-d"),
    ({"feature_weight": torch.tensor(1)}, ValueError, "feature_weight must be a float or a 0-d"),
    ({"student_scale": float("inf")}, ValueError, "student_scale must be finite"),
    ({"backend": "nope"}, ValueError, "unknown backend"),
])
def test_bad_inputs_name_the_problem(overrides, exc, message):
    inputs = make_inputs((3,), 8, 6, 4, torch.float32, teacher=True)
    kwargs = {"teacher_weight": inputs["teacher_weight"], "teacher_bias": inputs["teacher_bias"],
              "teacher_scale": 0.5, "student_scale": 1.0, "feature_weight": 0.5}
    args = {n: inputs[n] for n in GRAD_NAMES}
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(exc, match=message):
        masked_lowrank_linear_distill(*args.values(), **kwargs)


def test_vmap_gives_each_sample_its_own_loss():
    inputs = make_inputs((4, 5), 12, 10, 3, torch.float32, teacher=True)
    kwargs = {"teacher_weight": inputs["teacher_weight"], "teacher_bias": inputs["teacher_bias"],
              "teacher_scale": 0.5, "student_scale": 1.0, "feature_weight": 0.5}
    params = [inputs[n] for n in GRAD_NAMES[1:]]

    def f(x):
        return masked_lowrank_linear_distill(x, *params, **kwargs)

    y, loss = torch.vmap(f)(inputs["x"])
    for i in range(4):
        y_i, loss_i = f(inputs["x"][i])
        torch.testing.assert_close(y[i], y_i)
        torch.testing.assert_close(loss[i], loss_i)


@pytest.mark.parametrize("backend", backend_params())
def test_autocast_runs_the_op_in_the_autocast_dtype(backend):
    """Under autocast the tensors are cast (as nn.Linear's are) and the gradients reach the
    fp32 parameters in fp32; the values are those of the op on bf16 tensors."""
    dtype = torch.float16 if backend == "triton" else torch.bfloat16  # bf16 Triton: see above
    inputs = make_inputs((3, 4), 16, 12, 4, torch.float32, teacher=True)
    leaves = _leaves(inputs)
    kwargs = {"teacher_weight": inputs["teacher_weight"], "teacher_bias": inputs["teacher_bias"],
              "teacher_scale": 0.5, "student_scale": 1.0, "feature_weight": 0.5,
              "backend": backend}
    with torch.autocast("cpu", dtype=dtype):
        y, loss = masked_lowrank_linear_distill(*(leaves[n] for n in GRAD_NAMES), **kwargs)
    cast = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    y_cast, loss_cast = masked_lowrank_linear_distill(
        *(inputs[n].to(dtype) for n in GRAD_NAMES), **cast)
    assert y.dtype == dtype and torch.equal(y, y_cast) and torch.equal(loss, loss_cast)
    y.float().sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32, name


def test_compiled_matches_eager():
    """torch.compile (fullgraph) of a step through the op, loss and backward: one graph,
    the eager values and gradients."""
    torch._dynamo.reset()
    inputs = make_inputs((3, 4), 16, 12, 4, torch.float32, teacher=True)
    frozen = {k: inputs[k] for k in ("teacher_weight", "teacher_bias")}

    def step(x, U, mask, V, bias):
        y, loss = masked_lowrank_linear_distill(
            x, U, mask, V, bias, **frozen, teacher_scale=0.5, student_scale=1.0,
            feature_weight=torch.tensor(0.5), backend="torch")
        return y.square().sum(), loss

    got, want = _leaves(inputs), _leaves(inputs)
    out_c, loss_c = torch.compile(step, fullgraph=True)(*(got[n] for n in GRAD_NAMES))
    out_e, loss_e = step(*(want[n] for n in GRAD_NAMES))
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(loss_c, loss_e)
    for name in GRAD_NAMES:
        torch.testing.assert_close(got[name].grad, want[name].grad)


@pytest.mark.parametrize("backend", backend_params())
def test_torch_func_grad_and_per_sample_grads(backend):
    """torch.func.grad gives the autograd gradient (feature term included), and
    vmap(grad) per-sample gradients equal one call per sample."""
    inputs = make_inputs((3, 4), 12, 10, 3, torch.float32, teacher=True)
    kwargs = {"teacher_weight": inputs["teacher_weight"], "teacher_bias": inputs["teacher_bias"],
              "teacher_scale": 0.5, "student_scale": 0.9, "feature_weight": 0.7,
              "backend": backend}

    def f(U, x):
        y, _loss = masked_lowrank_linear_distill(x, U, inputs["mask"], inputs["V"],
                                                 inputs["bias"], **kwargs)
        return y.square().sum()

    U = inputs["U"].detach().requires_grad_()
    f(U, inputs["x"]).backward()
    torch.testing.assert_close(torch.func.grad(f)(inputs["U"], inputs["x"]), U.grad)
    per_sample = torch.vmap(torch.func.grad(f), in_dims=(None, 0))(inputs["U"], inputs["x"])
    for i in range(3):
        torch.testing.assert_close(per_sample[i], torch.func.grad(f)(inputs["U"], inputs["x"][i]))
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(lambda u: f(u, inputs["x"]), (inputs["U"],), (torch.ones_like(U),))


def test_backend_without_distill_op_is_a_clear_error(monkeypatch):
    """A registered backend with no distill module (a later or third-party one) is refused
    by name, not with an AttributeError from torch.ops."""
    from tunecomp_kernels.ops import backends

    spec = backends.BackendSpec("blend_only", "tunecomp_kernels.ops.reference_op",
                                lambda: (), (), -1, lambda: None)
    monkeypatch.setitem(backends._REGISTRY, "blend_only", spec)
    inputs = make_inputs((3,), 8, 6, 4, torch.float32, teacher=True)
    with pytest.raises(RuntimeError, match="backend 'blend_only' has no distill op"):
        masked_lowrank_linear_distill(
            *(inputs[n] for n in GRAD_NAMES), teacher_weight=inputs["teacher_weight"],
            teacher_scale=0.5, student_scale=1.0, feature_weight=0.5, backend="blend_only")
