"""torch.compile over whole models with compressed layers (a 1-layer tiny BERT from a config;
Dynamo's tracing time grows with depth and every layer is alike).

The op-level compile tests live in test_registration.py; here a Hugging Face model runs
with ``fullgraph=True`` (any graph break — ours or the model's — is an error):

* the exported model (``compress_to_budget`` + ``finalize``: two small matmuls per layer)
  compiled gives the eager outputs;
* a TuneComp training step while the teacher blend is active (fixed α) — forward and
  backward through AOT autograd — gives the eager loss and gradients;
* a whole blend (a new α every step) compiles once: the blend scales reach the op as 0-d
  tensors (non-persistent buffers updated in place), not as Python floats that Dynamo
  would specialise on (it used to recompile for every α and fail at the recompile limit).

Both use the ``aot_eager`` backend (Dynamo capture + AOT autograd, no code generation) to
keep CI fast; Inductor over the op is tested in test_registration.py, and over the
compressed MiniLM in ``bench/e2e.py`` (``infer_compiled``: graph breaks, max |Δ|, speed).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    block_net,
    text_batches,
    tiny_bert,
)

pytest.importorskip("transformers")

from tunecomp_kernels.compress import (  # noqa: E402
    TuneCompConfig,
    compress_to_budget,
    finalize,
    prepare,
)


def inputs(with_labels: bool = False) -> dict:
    batch = text_batches(1, batch=3, length=8)[0]
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, -2:] = 0  # padding goes through the attention mask path
    if not with_labels:
        batch.pop("labels")
    return batch


class CountCompiles:
    """A torch.compile backend that runs the captured graph eagerly and counts captures."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


class CountAotCompiles(CountCompiles):
    """Counts Dynamo captures and compiles each with ``aot_eager`` (backward included)."""

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs += 1
        return aot_eager(gm, example_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_exported_model_compiles_fullgraph_and_matches_eager():
    model = tiny_bert(layers=1)
    compress_to_budget(model, TuneCompConfig(target_ratio=0.5))
    finalize(model)
    model.eval()
    batch = inputs()
    with torch.no_grad():
        ref = model(**batch).logits
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(**batch).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_blend_training_step_compiles_fullgraph_and_matches_eager():
    model = tiny_bert(layers=1)
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=10,
                                               total_steps=20))
    for _ in range(4):  # mid-blend: teacher and student both active
        controller.step()
    assert 0.0 < controller.alpha < 1.0 and not controller.teacher_freed
    batch = inputs(with_labels=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fn):
        for p in params:
            p.grad = None
        loss = fn(**batch).loss + controller.l1_penalty()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    counter = CountCompiles()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ref_loss, ref_grads = loss_and_grads(model)
    loss, grads = loss_and_grads(compiled)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r, (name, _) in zip(grads, ref_grads,
                               [(n, p) for n, p in model.named_parameters() if p.requires_grad]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # a second step at the same α reuses the graph
    torch.compile(model, fullgraph=True, backend=counter)(**batch)
    torch.compile(model, fullgraph=True, backend=counter)(**batch)
    assert counter.graphs == 1


def test_changing_alpha_does_not_recompile():
    model = block_net()  # any model shows it; a plain one traces in well under a second
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=10,
                                               total_steps=20))
    counter = CountCompiles()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(4, 8)
    with torch.no_grad():
        for _ in range(4):
            controller.step()  # a new α
            torch.testing.assert_close(compiled(x), model(x))
    assert counter.graphs == 1


def test_whole_blend_training_step_compiles_once_fullgraph():
    """A training step (forward + backward) compiled with fullgraph=True over a whole blend
    (blend_steps=20, a new α and α' every step): the scales reach the op as 0-d tensors,
    so Dynamo never specialises on them. It used to raise FailOnRecompileLimitHit at step
    8. The teacher is dropped at the end of the blend, which changes the graph once."""
    model = block_net()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=20,
                                               total_steps=30))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    counter = CountAotCompiles()  # forward and backward through AOT autograd
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(4, 8)
    alphas = []
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        for _ in range(24):
            opt.zero_grad()
            loss = compiled(x).square().mean()
            loss.backward()
            opt.step()
            controller.step()
            alphas.append(controller.alpha)
            assert torch.isfinite(loss)
    assert len(set(alphas)) > 15  # α really moved during the run
    assert counter.graphs <= 3, counter.graphs  # blend, after the blend (no teacher)


def test_compiled_blend_step_matches_eager_at_every_alpha():
    model = block_net()
    controller = prepare(model, TuneCompConfig(target_ratio=0.5, blend_steps=6,
                                               total_steps=8))
    counter = CountCompiles()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(4, 8)
    for _ in range(5):
        controller.step()
        torch.testing.assert_close(compiled(x), model(x))
    assert counter.graphs == 1
