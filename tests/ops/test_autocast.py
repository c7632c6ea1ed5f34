"""The op and MaskedLowRankLinear under torch.autocast behave like nn.Linear.

The fault: under ``torch.autocast("cpu", dtype=torch.bfloat16)`` a prepared BERT crashed,
because attention gave bf16 activations and the fp32 layer raised ``ValueError: dtype
mismatch ... x=bfloat16, U=float32``. Now the fp32 tensors are cast to the autocast dtype
(by the public function, and by an autocast rule on every backend's op for direct op
calls), accumulation stays fp32, the output has the autocast dtype and the gradients reach
the fp32 parameters in fp32. Values are compared with the float64 reference of the
autocast-dtype-rounded inputs (bf16 tolerance 1e-2, fp16 1e-3).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import TOLERANCE, backend_params, make_inputs, rel_err
from tiny_models import text_batches, tiny_bert

from tunecomp_kernels import MaskedLowRankLinear, masked_lowrank_linear
from tunecomp_kernels.ops.backends import load_backend
from tunecomp_kernels.ops.reference import reference_float64

GRADS = ("x", "U", "mask", "V", "bias")
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def reference_of_cast(inputs: dict, dtype: torch.dtype, a: float, s: float, dy: torch.Tensor):
    """float64 reference output and gradients at the dtype-rounded inputs."""
    leaves = {k: inputs[k].detach().to(dtype).double().requires_grad_() for k in GRADS}
    frozen = [None if inputs[k] is None else inputs[k].to(dtype).double()
              for k in ("teacher_weight", "teacher_bias")]
    y = reference_float64(*leaves.values(), *frozen, a, s)
    y.backward(dy.double())
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def check_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = rel_err(got, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.2e} ({dtype})"


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("teacher", [False, True], ids=["student", "blend"])
@pytest.mark.parametrize("backend", backend_params())
def test_op_under_cpu_autocast(backend, teacher, dtype):
    inputs = make_inputs((3, 5), 24, 20, 6, torch.float32, teacher=teacher)
    leaves = {k: inputs[k].clone().requires_grad_() for k in GRADS}
    a, s = (0.4, 0.7) if teacher else (0.0, 0.7)
    with torch.autocast("cpu", dtype=dtype):
        y = masked_lowrank_linear(*leaves.values(), teacher_weight=inputs["teacher_weight"],
                                  teacher_bias=inputs["teacher_bias"], teacher_scale=a,
                                  student_scale=s, backend=backend)
    assert y.dtype == dtype  # like nn.Linear under autocast
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(dy)
    y_ref, grads_ref = reference_of_cast(inputs, dtype, a, s, dy)
    check_close(y, y_ref, dtype, "forward")
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == torch.float32, name  # fp32 parameters get fp32 gradients
        check_close(leaf.grad, grads_ref[name], dtype, f"d{name}")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_direct_op_call_has_an_autocast_rule(backend, dtype):
    # torch.ops.tunecomp.masked_lowrank_<backend> itself, without the public function
    ops = load_backend(backend)
    inputs = make_inputs((4,), 12, 10, 3, torch.float32, teacher=True)
    args = [inputs[k] for k in ("x", "U", "mask", "V", "bias", "teacher_weight",
                                "teacher_bias")]
    scales = (torch.tensor(0.25), torch.tensor(0.5))
    with torch.autocast("cpu", dtype=dtype):
        y, t = ops.forward(*args, *scales)
    assert y.dtype == dtype and t.dtype == torch.float32
    y_ref, _ = reference_of_cast(inputs, dtype, 0.25, 0.5, torch.zeros(4, 10))
    check_close(y, y_ref, dtype, "forward")


def test_layer_with_teacher_under_autocast_and_float64_untouched():
    layer = MaskedLowRankLinear(16, 12, 4)
    layer.set_teacher(torch.randn(12, 16) / 4, torch.randn(12))
    layer.teacher_scale, layer.student_scale = 0.6, 0.4
    x = torch.randn(2, 7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y64 = layer.double()(x.double())  # autocast leaves float64 alone, like nn.Linear
    assert y.dtype == torch.bfloat16 and y64.dtype == torch.float64
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in (layer.U, layer.mask, layer.V, layer.bias))


def test_autocast_inside_torch_compile():
    torch._dynamo.reset()
    layer = MaskedLowRankLinear(8, 6, 3)
    x = torch.randn(5, 8)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, f(x))


pytest.importorskip("transformers")


def test_prepared_bert_trains_under_autocast():
    from tunecomp_kernels.compress import TuneCompConfig, prepare

    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=4, total_steps=8))
    batch = text_batches(1, batch=3, length=8)[0]
    for _ in range(2):  # the blend is active: teacher and student both run
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        controller.step()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
               for g in grads)


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers.Trainer needs accelerate")
def test_hf_trainer_with_bf16(tmp_path, monkeypatch):
    import transformers

    from tunecomp_kernels.compress import TuneCompConfig, prepare
    from tunecomp_kernels.integrations.hf_trainer import TuneCompCallback

    monkeypatch.chdir(tmp_path)
    batch = text_batches(1, batch=8, length=8)[0]
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(batch["input_ids"],
                                                               batch["labels"])]
    model = tiny_bert()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=1, total_steps=2))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), bf16=True, use_cpu=True, max_steps=2,
        per_device_train_batch_size=4, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   callbacks=[TuneCompCallback(controller)])
    result = trainer.train()
    assert controller.step_count == 2
    assert result.training_loss == result.training_loss  # not NaN
