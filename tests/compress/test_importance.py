"""SensitivityScore (compress/importance.py): AdaLoRA's smoothed sensitivity per rank.

Checked against a float64 hand computation of the EMAs; hook mode against explicit
update(); gradient accumulation; compaction; checkpoint/resume bit for bit; agreement of
the scores across 2 gloo processes that see different data.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from helpers import assert_close
from torch import nn

from tunecomp_kernels.compress.compaction import RankStorage, resize_layer
from tunecomp_kernels.compress.importance import SensitivityScore, rank_positions
from tunecomp_kernels.nn.masked_lowrank_linear import MaskedLowRankLinear

PARAMS = (("U", 1), ("mask", 0), ("V", 0))


class TwoLayer(nn.Module):
    """x [b, 6] -> a (rank 3) -> tanh -> b (rank 2) -> [b, 4]; ``use_b=False`` skips b
    (its parameters get no gradient that step)."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = MaskedLowRankLinear(6, 5, 3, dtype=dtype)
        self.b = MaskedLowRankLinear(5, 4, 2, dtype=dtype)
        with torch.no_grad():  # masks away from 1, so w·g differs per rank
            self.a.mask.uniform_(0.5, 1.5)
            self.b.mask.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor, use_b: bool = True) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h) if use_b else h[:, :4]


def batch(step: int, part: int = 0, rank: int = 0, dtype=torch.float32) -> tuple:
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + part)
    return (torch.randn(4, 6, generator=g, dtype=dtype),
            torch.randn(4, 4, generator=g, dtype=dtype))


def loss_of(model: TwoLayer, data: tuple, use_b: bool = True) -> torch.Tensor:
    x, y = data
    return ((model(x, use_b) - y) ** 2).mean()


def layers(model: TwoLayer) -> list[MaskedLowRankLinear]:
    return [model.a, model.b]


def products(model: TwoLayer) -> list[dict[str, torch.Tensor]]:
    """float64 w·∂L/∂w per layer and parameter, from the current weights and grads
    (zeros where a parameter has no gradient)."""
    out = []
    for m in layers(model):
        entry = {}
        for name, _ in PARAMS:
            p = getattr(m, name)
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            entry[name] = p.detach().double() * g.double()
        out.append(entry)
    return out


def reference_scores(importances: list, beta1: float, beta2: float) -> list[torch.Tensor]:
    """Hand computation in float64: importances[t][layer][name] is I_t of every entry."""
    avg = [{n: torch.zeros_like(t) for n, t in e.items()} for e in importances[0]]
    unc = copy.deepcopy(avg)
    for step in importances:
        for i, entry in enumerate(step):
            for name, ipt in entry.items():
                avg[i][name] = beta1 * avg[i][name] + (1 - beta1) * ipt
                unc[i][name] = beta2 * unc[i][name] + (1 - beta2) * (ipt - avg[i][name]).abs()
    out = []
    for a, u in zip(avg, unc):
        s = {n: a[n] * u[n] for n in a}
        out.append(s["mask"] + s["U"].mean(dim=0) + s["V"].mean(dim=1))
    return out


def train(model: TwoLayer, scorer: SensitivityScore, steps: range, *, mode: str = "update",
          micro: int = 1, use_b=lambda t: True, record: list | None = None) -> None:
    """SGD steps on ``model``. mode "update": scorer.update() before optimizer.step();
    "hooks": the scorer is attached and step_end() runs after zero_grad (HF Trainer's
    order); "accumulate": accumulate() after every micro-batch, step_end() at the end."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for t in steps:
        for k in range(micro):
            loss_of(model, batch(t, k), use_b(t)).backward()
            if mode == "accumulate":
                scorer.accumulate()
        if record is not None:
            record.append(products(model))
        if mode == "update":
            scorer.update()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mode in ("hooks", "accumulate"):
            scorer.step_end()


def assert_same(a: SensitivityScore, b: SensitivityScore) -> None:
    for x, y in zip(a.scores(), b.scores()):
        assert torch.equal(x, y)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["steps"] == sb["steps"]
    for la, lb in zip(sa["layers"], sb["layers"]):
        for name, _ in PARAMS:
            assert la[name].keys() == lb[name].keys()
            for key in la[name]:
                assert torch.equal(la[name][key], lb[name][key]), (name, key)


# --- the formula ----------------------------------------------------------------------


def test_zeros_before_any_update():
    model = TwoLayer()
    out = SensitivityScore(layers(model)).scores()
    assert [s.shape for s in out] == [(3,), (2,)]
    assert all(s.dtype == torch.float64 and s.device.type == "cpu" and not s.any()
               for s in out)


@pytest.mark.parametrize("betas", [(0.85, 0.85), (0.5, 0.9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_hand_computation(betas, dtype):
    """Three steps; layer b gets no gradient at step 1 (I = 0: its EMAs decay)."""
    model = TwoLayer(dtype=dtype)
    scorer = SensitivityScore(layers(model), *betas)
    seen: list = []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for t in range(3):
        loss_of(model, batch(t, dtype=dtype), use_b=t != 1).backward()
        seen.append(products(model))
        scorer.update()
        opt.step()
        opt.zero_grad(set_to_none=True)
        got = scorer.scores()
        ref = reference_scores([[{n: v.abs() for n, v in e.items()} for e in s] for s in seen],
                               *betas)
        for i, (g, r) in enumerate(zip(got, ref)):
            assert r.abs().max() > 0
            assert_close(g, r, torch.float32, f"step {t} layer {i}")
    assert scorer.steps == 3
    # the state is fp32 on the parameters' device, per entry
    state = scorer.state_dict()["layers"][0]["U"]
    assert set(state) == {"avg", "unc"} and state["avg"].dtype == torch.float32
    assert state["avg"].shape == model.a.U.shape


def test_rank_without_effect_on_the_loss_scores_zero():
    """Rank 1 of b with U[:, 1] = 0: the loss does not depend on its mask or V (zero
    gradients) and U[:, 1] = 0, so I = 0 for all its entries at the first step, however
    large V[1] is; rank 0 scores > 0."""
    model = TwoLayer()
    with torch.no_grad():
        model.b.U[:, 1] = 0.0
        model.b.V[1] *= 100.0
    scorer = SensitivityScore(layers(model))
    train(model, scorer, range(1))
    s = scorer.scores()[1]
    assert s[1] == 0.0 and s[0] > 0


# --- hook mode and gradient accumulation --------------------------------------------------


def test_hook_mode_equals_update():
    base = TwoLayer()
    m1, m2, m3 = base, copy.deepcopy(base), copy.deepcopy(base)
    explicit, hooked, both = (SensitivityScore(layers(m)) for m in (m1, m2, m3))
    hooked.attach()
    both.attach()
    both.attach()  # idempotent: one hook per parameter
    skip_b = lambda t: t != 2  # noqa: E731
    train(m1, explicit, range(4), use_b=skip_b)
    train(m2, hooked, range(4), mode="hooks", use_b=skip_b)
    train(m3, both, range(4), mode="update", use_b=skip_b)  # update() adds nothing more
    assert_same(explicit, hooked)
    assert_same(explicit, both)
    assert explicit.scores()[0].abs().max() > 0


def test_detach_stops_recording():
    model = TwoLayer()
    scorer = SensitivityScore(layers(model))
    scorer.attach()
    assert scorer.attached
    scorer.detach()
    assert not scorer.attached
    loss_of(model, batch(0)).backward()
    assert not scorer.pending
    with pytest.raises(RuntimeError, match="no gradient was recorded"):
        scorer.step_end()


def test_forgotten_scorer_does_not_break_backward():
    model = TwoLayer()
    SensitivityScore(layers(model)).attach()  # dropped at once; its hooks stay
    loss_of(model, batch(0)).backward()
    assert model.a.U.grad is not None


@pytest.mark.parametrize("mode", ["hooks", "accumulate"])
def test_micro_batches_sum_importance_per_backward(mode):
    """Two micro-batches per step: I_t = |w·g_1| + |w·g_2| (hooks, or accumulate() after
    each backward); update() after both uses the summed gradient, |w·(g_1 + g_2)|."""
    base = TwoLayer()
    model, summed = base, copy.deepcopy(base)
    scorer, plain = SensitivityScore(layers(model)), SensitivityScore(layers(summed))
    if mode == "hooks":
        scorer.attach()
    importances, totals = [], []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for t in range(3):
        parts = []
        for k in range(2):
            before = products(model)
            loss_of(model, batch(t, k)).backward()
            after = products(model)
            parts.append([{n: (a[n] - b[n]).abs() for n in a} for a, b in zip(after, before)])
            if mode == "accumulate":
                scorer.accumulate()
        importances.append([{n: p0[n] + p1[n] for n in p0} for p0, p1 in zip(*parts)])
        totals.append([{n: v.abs() for n, v in e.items()} for e in products(model)])
        opt.step()
        opt.zero_grad(set_to_none=True)
        scorer.step_end()
    train(summed, plain, range(3), micro=2)
    for g, r in zip(scorer.scores(), reference_scores(importances, 0.85, 0.85)):
        assert_close(g, r, torch.float32, "micro-batch sum")
    for g, r in zip(plain.scores(), reference_scores(totals, 0.85, 0.85)):
        assert_close(g, r, torch.float32, "summed gradient")
    # the two semantics differ (|a| + |b| >= |a + b|, strictly somewhere)
    assert (scorer.scores()[0] - plain.scores()[0]).abs().max() > 1e-6


def test_hooks_and_accumulate_agree_bitwise():
    base = TwoLayer()
    m1, m2 = base, copy.deepcopy(base)
    a, b = SensitivityScore(layers(m1)), SensitivityScore(layers(m2))
    b.attach()
    train(m1, a, range(3), mode="accumulate", micro=2)
    train(m2, b, range(3), mode="hooks", micro=2)
    assert_same(a, b)


# --- compaction -------------------------------------------------------------------------


def test_compact_keeps_the_kept_ranks_state():
    model = TwoLayer()
    scorer = SensitivityScore(layers(model))
    scorer.attach()
    train(model, scorer, range(3), mode="hooks")
    before = scorer.scores()[0]
    old = scorer.state_dict()["layers"][0]
    keep = torch.tensor([2, 0])
    resize_layer(model.a, keep)
    with pytest.raises(RuntimeError, match=r"call SensitivityScore.compact"):
        scorer.scores()
    scorer.compact(0, keep)
    assert torch.equal(scorer.scores()[0], before[keep])
    new = scorer.state_dict()["layers"][0]
    for name, dim in PARAMS:
        for key in ("avg", "unc"):
            assert torch.equal(new[name][key], old[name][key].index_select(dim, keep))
    # the hooks follow the resized parameters; the next steps run on the smaller layer
    train(model, scorer, range(3, 5), mode="hooks")
    assert scorer.scores()[0].shape == (2,) and scorer.steps == 5


def test_compact_new_rank_has_zero_state_and_bad_keep_raises():
    model = TwoLayer()
    scorer = SensitivityScore(layers(model))
    train(model, scorer, range(2))
    before = scorer.scores()[1]
    scorer.compact(1, torch.tensor([1, -1, 0]))
    resize_layer(model.b, torch.tensor([1, -1, 0]))
    got = scorer.scores()[1]
    assert got[1] == 0.0 and torch.equal(got[[0, 2]], before[[1, 0]])
    for keep in (torch.tensor([3]), torch.tensor([-2]), torch.tensor([[0]]),
                 torch.tensor([0.0])):
        with pytest.raises(ValueError, match="keep"):
            scorer.compact(1, keep)
    with pytest.raises(IndexError):
        scorer.compact(2, torch.tensor([0]))


def test_compact_follows_rank_storage():
    """With the controller's RankStorage: stored ranks before/after -> rank_positions."""
    model = TwoLayer()
    scorer = SensitivityScore(layers(model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    storage = RankStorage(layers(model), enabled=True)
    storage.attach(opt)
    for t in range(2):
        loss_of(model, batch(t)).backward()
        scorer.update()
        opt.step()
        opt.zero_grad()
    full = scorer.scores()
    before = [s.clone() for s in storage.stored]
    alive = [torch.tensor([True, False, True]), torch.tensor([True, True])]
    assert storage.compact(alive, budget_met=True) == [0]
    for i in range(2):
        scorer.compact(i, rank_positions(before[i], storage.stored[i]))
    got = scorer.scores()
    assert torch.equal(got[0], full[0][[0, 2]]) and torch.equal(got[1], full[1])
    assert torch.equal(storage.expand(0, got[0], 3), full[0] * torch.tensor([1.0, 0, 1]))
    loss_of(model, batch(2)).backward()
    scorer.update()  # the state fits the compacted layer
    assert torch.equal(rank_positions(torch.tensor([0, 2]), torch.tensor([0, 1, 2])),
                       torch.tensor([0, -1, 1]))


# --- checkpointing ------------------------------------------------------------------------


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("mode", ["update", "hooks"])
def test_resume_equals_uninterrupted_run(mode):
    base = TwoLayer()
    full_model = copy.deepcopy(base)
    full = SensitivityScore(layers(full_model))
    first_model = copy.deepcopy(base)
    first = SensitivityScore(layers(first_model))
    if mode == "hooks":
        full.attach()
        first.attach()
    train(full_model, full, range(5), mode=mode)
    train(first_model, first, range(2), mode=mode)
    saved = _roundtrip({"model": first_model.state_dict(), "scorer": first.state_dict()})
    assert all(t.device.type == "cpu" for layer in saved["scorer"]["layers"]
               for entry in layer.values() for t in entry.values())
    resumed_model = TwoLayer(seed=7)
    resumed_model.load_state_dict(saved["model"])
    resumed = SensitivityScore(layers(resumed_model))
    resumed.load_state_dict(saved["scorer"])
    if mode == "hooks":
        resumed.attach()
    train(resumed_model, resumed, range(2, 5), mode=mode)
    assert_same(full, resumed)


def test_resume_mid_step_keeps_pending_records():
    """A checkpoint between two micro-batches of a step keeps what was recorded."""
    base = TwoLayer()
    m1, m2 = base, copy.deepcopy(base)
    a, b = SensitivityScore(layers(m1)), SensitivityScore(layers(m2))
    a.attach()
    b.attach()
    for m in (m1, m2):
        loss_of(m, batch(0, 0)).backward()
    state = _roundtrip(b.state_dict())
    b.detach()
    b = SensitivityScore(layers(m2))
    b.load_state_dict(state)
    b.attach()
    assert b.pending
    for m, s in ((m1, a), (m2, b)):
        loss_of(m, batch(0, 1)).backward()
        s.step_end()
    assert_same(a, b)


def test_load_state_dict_rejects_mismatches_and_changes_nothing():
    model = TwoLayer()
    scorer = SensitivityScore(layers(model))
    train(model, scorer, range(2))
    good = scorer.state_dict()
    before = scorer.scores()
    other = SensitivityScore(layers(model), beta1=0.5)
    bad_shape = copy.deepcopy(good)
    bad_shape["layers"][1]["V"]["avg"] = torch.zeros(3, 5)
    one_ema = copy.deepcopy(good)
    del one_ema["layers"][0]["mask"]["unc"]
    bad_last = copy.deepcopy(good)  # layer 0 fine, layer 1 bad: nothing may be loaded
    bad_last["layers"][0]["U"]["avg"] = good["layers"][0]["U"]["avg"] * 2
    bad_last["layers"][1]["U"] = "x"
    cases = [({"steps": 1}, "not a SensitivityScore state"), (good, "beta1=0.85"),
             ({**good, "layers": good["layers"][:1]}, "1 layers"),
             (bad_shape, "expected a tensor of shape"), (one_ema, "one EMA"),
             (bad_last, "layer 1")]
    for state, message in cases:
        target = other if state is good else scorer
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(state)
    for x, y in zip(scorer.scores(), before):
        assert torch.equal(x, y)


# --- bad input ----------------------------------------------------------------------------


def test_bad_arguments_raise():
    model = TwoLayer()
    with pytest.raises(ValueError, match="at least one layer"):
        SensitivityScore([])
    with pytest.raises(TypeError, match="MaskedLowRankLinear"):
        SensitivityScore([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="more than once"):
        SensitivityScore([model.a, model.a])
    for beta, error in ((1.0, ValueError), (-0.1, ValueError), (math.nan, ValueError),
                        ("0.9", TypeError), (True, TypeError)):
        with pytest.raises(error, match="beta2"):
            SensitivityScore(layers(model), beta2=beta)
    with pytest.raises(RuntimeError, match="no gradient was recorded"):
        SensitivityScore(layers(model)).update()  # no backward: nothing in .grad
    with pytest.raises(ValueError, match="1-D integer"):
        rank_positions(torch.tensor([0.0]), torch.tensor([0]))


# --- torch.distributed ---------------------------------------------------------------------


def _dist_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model = TwoLayer()  # same weights, different data on each rank
        scorer = SensitivityScore(layers(model))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for t in range(3):
            loss_of(model, batch(t, rank=rank)).backward()
            scorer.update()
            opt.step()
            opt.zero_grad()
        local = [s.double() for s in _local_scores(scorer)]
        torch.save({"scores": scorer.scores(), "local": local}, f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _local_scores(scorer: SensitivityScore) -> list[torch.Tensor]:
    state = scorer.state_dict()["layers"]
    return [e["mask"]["avg"] * e["mask"]["unc"] + (e["U"]["avg"] * e["U"]["unc"]).mean(0)
            + (e["V"]["avg"] * e["V"]["unc"]).mean(1) for e in state]


def test_scores_identical_across_processes(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_dist_worker, args=(init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for s0, s1, l0, l1 in zip(r0["scores"], r1["scores"], r0["local"], r1["local"]):
        assert s0.dtype == torch.float64 and s0.device.type == "cpu"
        assert torch.equal(s0, s1)  # bit-identical on both processes
        assert not torch.allclose(l0, l1)  # the processes saw different data
        assert_close(s0, (l0 + l1) / 2, torch.float32, "average over processes")
