"""The controller's rank scores (compress/scoring.py): the task-aware sensitivity score
drives pruning, follows compaction and resumes bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tunecomp_kernels.compress import TuneCompConfig, prepare
from tunecomp_kernels.compress.importance import SensitivityScore


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)) for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # noqa: ANN001, ANN201
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def _data(n: int):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def _config(**kw) -> TuneCompConfig:
    base = {"target_ratio": 0.4, "score": "sensitivity", "total_steps": 8,
            "prune_start_fraction": 0.25, "prune_end_fraction": 0.75}
    return TuneCompConfig(**{**base, **kw})


def _run(model, controller, opt, batches):
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        controller.step()


def _fresh(config: TuneCompConfig):
    torch.manual_seed(0)
    model = _Blocks()
    controller = prepare(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller.attach_optimizer(opt)
    return model, controller, opt


@pytest.mark.parametrize("allocation", ["adaptive", "uniform"])
def test_sensitivity_scores_follow_the_gradients_and_compaction(allocation):
    extra = {"allocation": allocation, "prune_fraction": 0.3} if allocation != "adaptive" else {}
    model, controller, opt = _fresh(_config(**extra))
    assert controller.score_kind == "sensitivity"
    # a reference scorer on the same layers sees the same gradients until compaction
    reference = SensitivityScore(list(controller.layers.values()))
    for x, y in _data(2):  # at step 0 the student's scale α'_0 is 0: no gradient yet
        nn.functional.cross_entropy(model(x), y).backward()
        reference.update()
        opt.step()
        opt.zero_grad()
        controller.step()
    for mine, ref in zip(controller.scores(), reference.scores()):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
        assert bool((mine > 0).all())
    _run(model, controller, opt, _data(6))
    assert controller.budget_params >= controller.current_params
    assert controller.compaction_events > 0
    for scores, alive, layer in zip(controller.scores(), controller.alive_masks().values(),
                                    controller.layers.values()):
        assert layer.rank == int(alive.sum())  # compacted to the alive ranks
        assert bool((scores[~alive] == 0).all()) and bool((scores[alive] > 0).all())


def test_a_sensitivity_run_resumes_bit_for_bit():
    config = _config()
    batches = _data(8)
    model, controller, opt = _fresh(config)
    _run(model, controller, opt, batches)

    model2, controller2, opt2 = _fresh(config)
    _run(model2, controller2, opt2, batches[:3])
    saved = copy.deepcopy((controller2.state_dict(), model2.state_dict(), opt2.state_dict()))
    model3, controller3, opt3 = _fresh(config)
    controller3.load_state_dict(saved[0])
    model3.load_state_dict(saved[1])
    opt3 = torch.optim.AdamW([p for p in model3.parameters() if p.requires_grad], lr=1e-2)
    opt3.load_state_dict(saved[2])
    controller3.attach_optimizer(opt3)
    _run(model3, controller3, opt3, batches[3:])
    for (name, a), (_, b) in zip(model.state_dict().items(), model3.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(controller.scores(), controller3.scores()):
        assert torch.equal(a, b)


def test_a_checkpoint_without_sensitivity_state_is_refused():
    model, controller, _ = _fresh(_config(score="magnitude"))
    state = controller.state_dict()
    assert state["scorer"] is None
    _, sens_controller, _ = _fresh(_config())
    with pytest.raises(ValueError, match="score"):
        sens_controller.load_state_dict(state)
