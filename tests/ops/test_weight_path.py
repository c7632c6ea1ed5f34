"""The torch backend's weight path (ops/reference.py, ``takes_weight_path``): in eager
mode a blend call with many rows and a wide student goes through the folded weight's
gradient ``dyᵀ·x`` (its own op pair) and saves no ``t = x·Vᵀ``. Every gradient against
float64, each one alone, the op pair's fake implementation, which op the public function
calls, and torch.compile / torch.export with a dynamic batch (no branch on the rows)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, make_inputs
from test_op import GRAD_NAMES, run_and_compare

from tunecomp_kernels import masked_lowrank_linear
from tunecomp_kernels.ops import reference
from tunecomp_kernels.ops.backends import load_backend
from tunecomp_kernels.ops.reference import (
    TEACHER_BLOCK_ELEMENTS,
    reference_float64,
    takes_weight_path,
)
from tunecomp_kernels.ops.reference_op import WEIGHT_PATH_OPS

# (leading dims, in, out, rank): many rows, a rank near min(in, out)
WEIGHT_PATH_SHAPES = [
    pytest.param((64,), 12, 10, 8, id="64x12->10-r8"),
    pytest.param((5, 13), 11, 17, 9, id="odd-lead5x13-11->17-r9"),
    pytest.param((70,), 9, 9, 9, id="r_full"),
]


def _takes(inputs: dict) -> bool:
    x, U, V, w0 = (inputs[k] for k in ("x", "U", "V", "teacher_weight"))
    return takes_weight_path(w0, x.dtype, x.numel() // x.shape[-1], U, V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("lead,in_f,out_f,rank", WEIGHT_PATH_SHAPES)
def test_weight_path_matches_float64(dtype, lead, in_f, out_f, rank):
    inputs = make_inputs(lead, in_f, out_f, rank, dtype, teacher=True, zero_mask_frac=0.3)
    assert _takes(inputs)
    run_and_compare("torch", inputs, dtype, teacher_scale=0.6, student_scale=0.8)


@pytest.mark.parametrize("wanted", GRAD_NAMES)
def test_weight_path_gives_each_gradient_alone(wanted):
    inputs = make_inputs((64,), 12, 10, 8, torch.float64, teacher=True)
    assert _takes(inputs)
    args = {n: inputs[n].clone().requires_grad_(n == wanted) for n in GRAD_NAMES}
    refs = {n: inputs[n].clone().requires_grad_(n == wanted) for n in GRAD_NAMES}
    frozen = {k: inputs[k] for k in ("teacher_weight", "teacher_bias")}
    y = masked_lowrank_linear(*args.values(), **frozen, teacher_scale=0.3,
                              student_scale=0.7, backend="torch")
    y_ref = reference_float64(*refs.values(), **frozen, teacher_scale=0.3, student_scale=0.7)
    dy = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, args[wanted], dy)
    (want,) = torch.autograd.grad(y_ref, refs[wanted], dy)
    assert_close(got, want, torch.float64, f"d{wanted}")


def _op_args(inputs: dict) -> tuple:
    return (inputs["x"], inputs["U"], inputs["mask"], inputs["V"], None,
            inputs["teacher_weight"], None, torch.tensor(0.5), torch.tensor(1.0))


def test_weight_path_saves_no_rank_sized_activation():
    """Autograd keeps x and the parameters, never an [N, r] tensor (t is [0, r])."""
    inputs = make_inputs((64,), 12, 10, 8, torch.float32, teacher=True)
    leaves = {n: inputs[n].clone().requires_grad_() for n in GRAD_NAMES}
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t,
                                                  lambda t: t):
        masked_lowrank_linear(*leaves.values(), teacher_weight=inputs["teacher_weight"],
                              teacher_scale=0.5, backend="torch")
    assert (0, 8) in saved
    assert (64, 8) not in saved


def test_each_op_returns_t_of_fixed_rows_and_the_public_function_chooses():
    """The torch op always returns t [N, r], the weight-path op [0, r]: output shapes never
    depend on the cost rule. The public function calls the weight-path op where the rule
    says so, in eager mode."""
    from helpers import op_recorder

    for rows in (4, 64):
        inputs = make_inputs((rows,), 12, 10, 8, torch.float32, teacher=True)
        assert load_backend("torch").forward(*_op_args(inputs))[1].shape == (rows, 8)
        assert WEIGHT_PATH_OPS.forward(*_op_args(inputs))[1].shape == (0, 8)
        with op_recorder() as rec:
            masked_lowrank_linear(*(inputs[n] for n in GRAD_NAMES),
                                  teacher_weight=inputs["teacher_weight"], teacher_scale=0.5,
                                  backend="torch")
        want = "torch_weight_path.default" if rows == 64 else "torch.default"
        assert [op for op in rec.ops if "tunecomp" in op][0].endswith(want), rec.ops
    with pytest.raises(ValueError, match="the weight path needs a teacher_weight"):
        inputs["teacher_weight"] = None
        WEIGHT_PATH_OPS.forward(*_op_args(inputs))


def test_other_calls_keep_the_rank_sized_path():
    w0 = torch.randn(384, 384)
    U, V = torch.randn(384, 288), torch.randn(288, 384)
    assert takes_weight_path(w0, torch.float32, 1300, U, V)  # a training batch, wide student
    assert not takes_weight_path(w0, torch.float32, 16, U, V)  # a few rows (decode)
    assert not takes_weight_path(None, torch.float32, 1300, U, V)  # no teacher
    assert not takes_weight_path(w0, torch.float32, 0, U, V)  # an empty batch
    narrow_U, narrow_V = torch.randn(384, 8), torch.randn(8, 384)
    assert not takes_weight_path(w0, torch.float32, 1300, narrow_U, narrow_V)  # low rank
    # a bf16 teacher folds (and so takes the path) only within one upcast block
    big = torch.empty(2048, TEACHER_BLOCK_ELEMENTS // 2048 + 1, dtype=torch.bfloat16)
    assert not takes_weight_path(big, torch.float32, 8192, torch.randn(2048, 1500),
                                 torch.randn(1500, big.shape[1]))
    assert takes_weight_path(w0.bfloat16(), torch.float32, 1300, U, V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_on_the_weight_path(dtype):
    ops = WEIGHT_PATH_OPS
    inputs = make_inputs((5, 13), 11, 17, 9, dtype, teacher=True)
    assert _takes(inputs)
    leaves = {n: inputs[n].detach().requires_grad_() for n in GRAD_NAMES}
    a, s = torch.tensor(0.5), torch.tensor(1.5)
    args = (*leaves.values(), inputs["teacher_weight"], inputs["teacher_bias"], a, s)
    torch.library.opcheck(ops.forward.default, args)
    with torch.no_grad():
        y, t = ops.forward(*args)
    plain = [inputs[n] for n in ("x", "U", "mask", "V")]
    for needs in ([True] * 5, [False, True, False, True, False], [True, False, False, False,
                                                                  False]):
        torch.library.opcheck(ops.backward.default,
                              (torch.randn_like(y), *plain, t, inputs["teacher_weight"], a,
                               s, needs))


def test_compiled_layer_matches_eager_with_no_guard_on_the_rows():
    """Under torch.compile the factored op runs (no branch on the number of rows): one
    dynamic graph serves batches on both sides of the eager cost rule, and equals eager
    (which takes the weight path for the large batch)."""
    import torch._dynamo.testing

    inputs = make_inputs((64,), 12, 10, 8, torch.float32, teacher=True)
    params = [inputs[n].clone().requires_grad_() for n in ("U", "mask", "V", "bias")]

    def f(x):
        return masked_lowrank_linear(x, *params, teacher_weight=inputs["teacher_weight"],
                                     teacher_scale=0.4, student_scale=0.9,
                                     backend="torch").square().sum()

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(f, backend=counter, dynamic=True, fullgraph=True)
    for rows in (5, 64, 300):
        x = torch.randn(rows, 12)
        assert _takes({**inputs, "x": x}) == (rows > 5)
        want = torch.autograd.grad(f(x), params)
        got = torch.autograd.grad(compiled(x), params)
        for g, w, name in zip(got, want, ("U", "mask", "V", "bias")):
            # the two paths associate the sums differently: fp32 rounding apart
            assert_close(g, w, torch.float32, f"d{name} at {rows} rows")
    assert counter.frame_count == 1


def test_export_with_a_dynamic_batch_and_a_teacher():
    from torch.export import Dim, export

    from tunecomp_kernels import MaskedLowRankLinear

    torch.manual_seed(0)
    layer = MaskedLowRankLinear(24, 20, 16, backend="torch")
    layer.set_teacher(torch.randn(20, 24))
    layer.teacher_scale = 0.5
    program = export(layer, (torch.randn(64, 24),),
                     dynamic_shapes={"x": {0: Dim("b", min=2, max=4096)}})
    for rows in (4, 300):
        x = torch.randn(rows, 24)
        torch.testing.assert_close(program.module()(x), layer(x))


def test_per_sample_gradients_on_the_weight_path():
    """vmap folds the samples into one op call (64 rows: the weight path) and runs the
    backward per sample: each sample's gradient equals its own autograd gradient."""
    inputs = make_inputs((64,), 12, 10, 8, torch.float64, teacher=True)
    X = inputs["x"].reshape(4, 16, 12)
    U = inputs["U"]

    def loss(U_, x):
        return masked_lowrank_linear(x, U_, inputs["mask"], inputs["V"], inputs["bias"],
                                     teacher_weight=inputs["teacher_weight"],
                                     teacher_scale=0.4, backend="torch").square().sum()

    per_sample = torch.vmap(torch.func.grad(loss), in_dims=(None, 0))(U, X)
    for i in range(4):
        U_i = U.clone().requires_grad_()
        (want,) = torch.autograd.grad(loss(U_i, X[i]), U_i)
        torch.testing.assert_close(per_sample[i], want)


def test_reference_forward_keeps_the_full_t_unless_told():
    """The Triton and CUDA backends' fallbacks into reference.forward get the contract's
    full t; only the weight-path op passes weight_path=True."""
    inputs = make_inputs((64,), 12, 10, 8, torch.float32, teacher=True)
    y_full, t_full = reference.forward(*_op_args(inputs))
    y, t = reference.forward(*_op_args(inputs), weight_path=True)
    assert t_full.shape == (64, 8) and t.shape == (0, 8)
    torch.testing.assert_close(y, y_full)
