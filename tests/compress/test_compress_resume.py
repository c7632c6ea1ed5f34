"""Resuming from a checkpoint gives bit-for-bit the uninterrupted run (CPU)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    text_batches,
    tiny_bert,
    tiny_llama,
)

from tunecomp_kernels.compress import (
    TuneCompConfig,
    load_checkpoint,
    prepare,
    save_checkpoint,
    train,
)

STEPS = 8
CONFIG = {"target_ratio": 0.35, "blend_steps": 4, "total_steps": STEPS, "init": "asvd",
          "l1_lambda": 1e-2, "shrink_threshold": 0.02}


def start(make_model, batches):
    model = make_model()
    controller = prepare(model, TuneCompConfig(**CONFIG), calibration=batches[:2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, controller, optimizer, scheduler


@pytest.mark.parametrize("split", [2, 4, 6])  # mid-blend, at T (teacher just freed), after
@pytest.mark.parametrize("make_model", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_resume_equals_uninterrupted(make_model, split, tmp_path):
    classes = 3 if make_model is tiny_bert else None
    batches = text_batches(STEPS, classes=classes)

    model, controller, opt, sched = start(make_model, batches)
    train(model, opt, batches, controller=controller, scheduler=sched)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    reference_alive = controller.alive_masks()
    assert controller.step_count == STEPS

    model, controller, opt, sched = start(make_model, batches)
    train(model, opt, batches[:split], controller=controller, scheduler=sched, steps=split)
    save_checkpoint(tmp_path / "ckpt.pt", model, opt, controller, sched, epoch=0)
    del model, controller, opt, sched

    model, controller, opt, sched = start(make_model, batches)  # a fresh process would do this
    extra = load_checkpoint(tmp_path / "ckpt.pt", model, opt, controller, sched)
    assert extra == {"epoch": 0} and controller.step_count == split
    assert controller.teacher_freed == (split >= CONFIG["blend_steps"])
    train(model, opt, batches[split:], controller=controller, scheduler=sched)

    state = model.state_dict()
    assert sorted(state) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    alive = controller.alive_masks()
    assert all(torch.equal(alive[k], reference_alive[k]) for k in reference_alive)
    assert controller.step_count == STEPS


def test_controller_state_checks(tmp_path):
    batches = text_batches(2)
    model, controller, *_ = start(tiny_bert, batches)
    state = controller.state_dict()
    other = prepare(tiny_bert(), TuneCompConfig(**{**CONFIG, "target_ratio": 0.5}),
                    calibration=batches[:1])
    with pytest.raises(ValueError, match=r"different TuneCompConfig; differing fields: "
                                         r"target_ratio=0.35 \(now 0.5\)"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a TuneCompController state"):
        controller.load_state_dict({"step": 3})
    bad = dict(state, alive={k + "x": v for k, v in state["alive"].items()})
    with pytest.raises(ValueError, match="layers differ"):
        controller.load_state_dict(bad)
