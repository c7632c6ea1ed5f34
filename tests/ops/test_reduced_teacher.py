"""A frozen teacher stored in bf16/fp16 next to fp32 x (the "cheap teacher").

The op accepts W0/b0 in bfloat16 or float16 when x (and U, mask, V, bias) are float32; the
product accumulates in fp32, so the result equals the float64 reference computed with the
teacher's *stored* (rounded) values within fp32's tolerance. Every other mix is refused
with a message naming the tensors. The torch backend upcasts W0 block by block
(``reference.TEACHER_BLOCK_ELEMENTS``), so the multi-block path is forced here too; the
Triton kernels convert each loaded tile (checked in the CPU interpreter with fp16 and bf16
teachers: the tile is converted to fp32 before ``tl.dot``, so the interpreter's bf16 dot is
not involved).
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, TOLERANCE, assert_close, backend_params, make_inputs, rel_err

from tunecomp_kernels import MaskedLowRankLinear, masked_lowrank_linear
from tunecomp_kernels.ops import reference
from tunecomp_kernels.ops.backends import backend_serves, load_backend
from tunecomp_kernels.ops.reference import reference_float64

GRADS = ("x", "U", "mask", "V", "bias")
REDUCED = [torch.bfloat16, torch.float16]


def reduced_inputs(lead: tuple[int, ...], in_f: int, out_f: int, rank: int,
                   teacher_dtype: torch.dtype, device: str = "cpu", *,
                   teacher_bias: bool = True, seed: int = 0) -> dict:
    inputs = make_inputs(lead, in_f, out_f, rank, torch.float32, device, teacher=True,
                         teacher_bias=teacher_bias, seed=seed)
    for key in ("teacher_weight", "teacher_bias"):
        if inputs[key] is not None:
            inputs[key] = inputs[key].to(teacher_dtype)
    return inputs


def record_upcasts(monkeypatch) -> list[int]:
    """Patch ``Tensor.to`` to record the size of every bf16 -> fp32 copy; returns the list
    (undo with ``monkeypatch.undo()``)."""
    sizes: list[int] = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.dtype == torch.bfloat16 and out.dtype == torch.float32:
            sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    return sizes


def check_against_float64(inputs: dict, backend: str, a: float = 0.6, s: float = 0.8) -> None:
    """Forward and every gradient against float64 with the stored teacher values."""
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in GRADS}
    refs = {k: inputs[k].detach().double().requires_grad_() for k in GRADS}
    frozen = {k: inputs[k] for k in ("teacher_weight", "teacher_bias")}
    y = masked_lowrank_linear(*leaves.values(), **frozen, teacher_scale=a, student_scale=s,
                              backend=backend)
    y_ref = reference_float64(*refs.values(), **frozen, teacher_scale=a, student_scale=s)
    assert y.dtype == torch.float32
    assert_close(y, y_ref, torch.float32, "forward")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.device)
    y.backward(dy)
    y_ref.backward(dy.double())
    for name in GRADS:
        assert leaves[name].grad.dtype == torch.float32, name
        assert_close(leaves[name].grad, refs[name].grad, torch.float32, f"d{name}")


@pytest.mark.parametrize("teacher_dtype", REDUCED, ids=str)
@pytest.mark.parametrize("teacher_bias", [True, False], ids=["b0", "no-b0"])
@pytest.mark.parametrize("blocks", ["one-block", "many-blocks", "folded", "weight-path"])
def test_torch_backend_against_float64(monkeypatch, teacher_dtype, teacher_bias, blocks):
    # 24 rows: no fold; 48 rows (more than in and out): the fold, unless W0 is more than
    # one block, as with 3 output rows per block (29 rows make 10 blocks); 96 rows and a
    # rank near in and out: the weight path (reference.takes_weight_path)
    lead = {"one-block": (4, 6), "weight-path": (96,)}.get(blocks, (8, 6))
    if blocks == "many-blocks":
        monkeypatch.setattr(reference, "TEACHER_BLOCK_ELEMENTS", 3 * 33)
    rank = 25 if blocks == "weight-path" else 7
    inputs = reduced_inputs(lead, 33, 29, rank, teacher_dtype, teacher_bias=teacher_bias)
    takes = reference.takes_weight_path(inputs["teacher_weight"], torch.float32, 96,
                                        inputs["U"], inputs["V"])
    assert takes == (blocks == "weight-path")
    check_against_float64(inputs, "torch")


@pytest.mark.parametrize("rank", [5, 14], ids=["factored", "weight-path"])
@pytest.mark.parametrize("block", [4 * 16, 40 * 16], ids=["W0 over a block", "W0 in a block"])
def test_a_training_batch_upcasts_at_most_a_block(monkeypatch, block, rank):
    """With more rows than in and out, the op folds the student into W0 (and, for a wide
    student, takes the weight path) only when the folded weight fits in one block;
    otherwise it upcasts block by block."""
    monkeypatch.setattr(reference, "TEACHER_BLOCK_ELEMENTS", block)
    inputs = reduced_inputs((64,), 16, 40, rank, torch.bfloat16)
    takes = reference.takes_weight_path(inputs["teacher_weight"], torch.float32, 64,
                                        inputs["U"], inputs["V"])
    assert takes == (rank == 14 and block == 40 * 16)
    sizes = record_upcasts(monkeypatch)
    x = inputs["x"].clone().requires_grad_()
    y = masked_lowrank_linear(x, *(inputs[k] for k in GRADS[1:]),
                              teacher_weight=inputs["teacher_weight"],
                              teacher_bias=inputs["teacher_bias"], teacher_scale=0.6,
                              student_scale=0.8, backend="torch")
    y.sum().backward()
    monkeypatch.undo()
    assert sizes and max(sizes) == min(block, 40 * 16)


@pytest.mark.parametrize("teacher_dtype", REDUCED, ids=str)
def test_the_comparison_sees_the_teacher_rounding(teacher_dtype):
    """The check above can fail: against the unrounded fp32 teacher the same output is
    off by far more than fp32's tolerance (so a teacher rounded twice, or read at the
    wrong precision, would be caught)."""
    fp32 = make_inputs((4, 6), 33, 29, 7, torch.float32, teacher=True)
    inputs = reduced_inputs((4, 6), 33, 29, 7, teacher_dtype)
    y = masked_lowrank_linear(*(inputs[k] for k in GRADS), teacher_weight=inputs[
        "teacher_weight"], teacher_bias=inputs["teacher_bias"], teacher_scale=0.6,
        student_scale=0.8, backend="torch")
    unrounded = reference_float64(*(fp32[k].double() for k in GRADS), fp32["teacher_weight"],
                                  fp32["teacher_bias"], 0.6, 0.8)
    assert rel_err(y, unrounded) > 10 * TOLERANCE[torch.float32]


def test_block_loop_never_upcasts_more_than_a_block(monkeypatch):
    """The torch backend's transient fp32 copy of W0 is one block, not the whole W0."""
    monkeypatch.setattr(reference, "TEACHER_BLOCK_ELEMENTS", 4 * 16)
    w0 = torch.randn(40, 16).to(torch.bfloat16)
    sizes = record_upcasts(monkeypatch)
    x2 = torch.randn(5, 16)
    y = reference._teacher_forward(x2, w0, None, 1.0)
    dx = torch.zeros(5, 16)
    reference._teacher_backward(dx, torch.ones(5, 40), w0)
    assert sizes and max(sizes) == 4 * 16
    monkeypatch.undo()
    torch.testing.assert_close(y, x2 @ w0.float().t())
    torch.testing.assert_close(dx, torch.ones(5, 40) @ w0.float())


@pytest.mark.parametrize("teacher_dtype", REDUCED, ids=str)
@pytest.mark.parametrize("n", [5, 80, 130], ids=["decode", "fused", "fused-2"])
def test_triton_backend_against_float64(teacher_dtype, n):
    pytest.importorskip("triton")
    from tunecomp_kernels.ops.backends import unavailable_reason

    if unavailable_reason("triton") is not None:
        pytest.skip(unavailable_reason("triton"))
    inputs = reduced_inputs((n,), 45, 37, 12, teacher_dtype, seed=n)
    check_against_float64(inputs, "triton")


def test_triton_split_path_with_reduced_teacher(monkeypatch):
    pytest.importorskip("triton")
    from tunecomp_kernels.ops.backends import unavailable_reason

    if unavailable_reason("triton") is not None:
        pytest.skip(unavailable_reason("triton"))
    from tunecomp_kernels.ops import triton_backend as tb

    monkeypatch.setattr(tb, "FUSED_MAX_R", 16)  # r = 50 takes the split (GEMM + expand) path
    check_against_float64(reduced_inputs((130,), 40, 36, 50, torch.float16, seed=3), "triton")


@pytest.mark.parametrize("teacher_dtype", REDUCED, ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_every_backend_against_float64(backend, teacher_dtype):
    """Whatever runs here (torch; Triton in the interpreter; CUDA on a GPU)."""
    device = "cuda" if backend == "cuda" else "cpu"
    inputs = reduced_inputs((3, 7), 24, 20, 6, teacher_dtype, device)
    check_against_float64(inputs, backend)


# --- what validation accepts and refuses ------------------------------------------------

def _call(x_dtype, w0_dtype, b0_dtype=None, student_dtype=None):
    student_dtype = student_dtype or x_dtype
    return masked_lowrank_linear(
        torch.randn(3, 8, dtype=x_dtype), torch.randn(6, 4, dtype=student_dtype),
        torch.ones(4, dtype=student_dtype), torch.randn(4, 8, dtype=student_dtype),
        teacher_weight=torch.randn(6, 8).to(w0_dtype),
        teacher_bias=None if b0_dtype is None else torch.randn(6).to(b0_dtype),
        teacher_scale=0.5)


@pytest.mark.parametrize("teacher_dtype", REDUCED, ids=str)
def test_validation_accepts_the_reduced_teacher(teacher_dtype):
    assert _call(torch.float32, teacher_dtype, teacher_dtype).dtype == torch.float32
    assert _call(torch.float32, teacher_dtype).dtype == torch.float32


@pytest.mark.parametrize("x_dtype,w0_dtype,b0_dtype,message", [
    (torch.float16, torch.bfloat16, None,
     r"with x in float16 the teacher must be float16 too .*teacher_weight=bfloat16"),
    (torch.bfloat16, torch.float16, torch.float16, r"x=bfloat16, teacher_weight=float16"),
    (torch.float32, torch.float64, None, r"x=float32, teacher_weight=float64"),
    (torch.float64, torch.float32, None, r"with x in float64 the teacher must be float64"),
    (torch.float32, torch.bfloat16, torch.float16,
     r"weight and bias alike.*teacher_weight=bfloat16, teacher_bias=float16"),
    (torch.float32, torch.bfloat16, torch.float32, r"teacher_bias=float32"),
    (torch.float32, torch.int8, None, r"teacher_weight=int8"),
], ids=["fp16-x", "bf16-x", "wider", "fp64-x", "mixed-teacher", "fp32-b0", "int8"])
def test_validation_refuses_other_mixes(x_dtype, w0_dtype, b0_dtype, message):
    with pytest.raises(ValueError, match=message):
        _call(x_dtype, w0_dtype, b0_dtype)


def test_student_tensors_must_still_share_x_dtype():
    with pytest.raises(ValueError, match=r"all tensors must share one dtype.*U=bfloat16"):
        _call(torch.float32, torch.bfloat16, student_dtype=torch.bfloat16)


# --- registration: opcheck, autocast, compile ------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")  # the CUDA backend's unverified-kernel note
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", backend_params())
def test_opcheck_with_reduced_teacher(backend, device):
    if not backend_serves(backend, device):
        pytest.skip(f"backend {backend} does not serve {device}")
    ops = load_backend(backend)
    inputs = reduced_inputs((2, 3), 9, 7, 4, torch.bfloat16, device)
    a = torch.tensor(0.4, device=device)
    s = torch.tensor(0.7, device=device)
    leaves = {n: inputs[n].detach().requires_grad_() for n in GRADS}
    args = (*leaves.values(), inputs["teacher_weight"], inputs["teacher_bias"], a, s)
    torch.library.opcheck(ops.forward.default, args)
    with torch.no_grad():
        y, t = ops.forward(*args)
    plain = [v.detach() for v in list(leaves.values())[:4]]
    torch.library.opcheck(ops.backward.default, (torch.randn_like(y), *plain, t,
                                                 inputs["teacher_weight"], a, s, [True] * 5))


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_autocast_casts_the_reduced_teacher_like_the_rest(backend, autocast_dtype):
    """Under autocast every tensor takes the autocast dtype (as nn.Linear's do), the
    reduced teacher included, so an fp16 teacher under bf16 autocast is not a mix."""
    inputs = reduced_inputs((3, 5), 24, 20, 6, torch.float16)
    with torch.autocast("cpu", dtype=autocast_dtype):
        y = masked_lowrank_linear(*(inputs[k] for k in GRADS),
                                  teacher_weight=inputs["teacher_weight"],
                                  teacher_bias=inputs["teacher_bias"], teacher_scale=0.4,
                                  student_scale=0.7, backend=backend)
    assert y.dtype == autocast_dtype
    cast = [inputs[k].to(autocast_dtype).double() for k in (*GRADS, "teacher_weight",
                                                           "teacher_bias")]
    y_ref = reference_float64(*cast, 0.4, 0.7)
    assert rel_err(y, y_ref) <= TOLERANCE[autocast_dtype]


def test_compiled_layer_with_bf16_teacher_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MaskedLowRankLinear(16, 12, 5, backend="torch")
    layer.set_teacher(torch.randn(12, 16), torch.randn(12), dtype=torch.bfloat16)
    layer.teacher_scale, layer.student_scale = 0.3, 0.8
    x = torch.randn(4, 16, requires_grad=True)

    def f(x):
        return layer(x).square().sum()

    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(x), [x, *layer.parameters()])
    ref = torch.autograd.grad(f(x), [x, *layer.parameters()])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
