"""Compaction during training: pruned ranks leave U, mask, V, their gradients and the
optimiser state in place, and the run equals the masked (uncompacted) run to rounding."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import block_net, ce_loss, forward_x, vector_batches

from tunecomp_kernels.compress import (
    TuneCompConfig,
    finalize,
    load_checkpoint,
    prepare,
    run_tunecomp,
    save_checkpoint,
    train,
)
from tunecomp_kernels.compress.compaction import COMPACT_SHARE

STEPS = 10
BASE = {"target_ratio": 0.4, "blend_steps": 4, "total_steps": STEPS, "l1_lambda": 1e-3,
        "l1_schedule": "constant"}

OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9, nesterov=True),
    "sgd_plain": lambda p: torch.optim.SGD(p, lr=5e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "asgd": lambda p: torch.optim.ASGD(p, lr=1e-2, t0=2),
    "rprop": lambda p: torch.optim.Rprop(p, lr=1e-3),
}


def _run(optimizer: str = "adamw", *, compact: bool = True, dtype=torch.float64,
         steps: int = STEPS, **cfg):
    model = block_net(seed=0).to(dtype)
    controller = prepare(model, TuneCompConfig(**{**BASE, "total_steps": steps, **cfg,
                                                  "compact_during_training": compact}))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZERS[optimizer](params)
    batches = [(x.to(dtype), y) for x, y in vector_batches(steps)]
    seen = []
    history = train(model, opt, batches, controller=controller, forward=forward_x,
                    loss_fn=ce_loss, callbacks=[lambda s: seen.append(_sizes(controller))])
    return model, controller, opt, history, seen


def _sizes(controller) -> dict[str, tuple[int, int]]:
    """Per layer: (ranks stored, ranks alive)."""
    alive = controller.alive_masks()
    return {n: (m.rank, int(alive[n].sum())) for n, m in controller.layers.items()}


def _assert_alive_sized(controller, opt) -> None:
    """After the budget is met, every stored rank is alive: parameters, gradients and
    every optimiser state tensor have the alive ranks' size."""
    alive = controller.alive_masks()
    for name, m in controller.layers.items():
        k = int(alive[name].sum())
        assert m.U.shape[1] == m.mask.shape[0] == m.V.shape[0] == k, name
        for p in (m.U, m.mask, m.V):
            assert p.grad is None or p.grad.shape == p.shape, name
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim():
                    assert value.shape == p.shape, (name, key, value.shape, p.shape)
        assert torch.equal(controller.stored_ranks()[name], alive[name].nonzero().flatten())


def _assert_close(a, b, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


def _finalized_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in finalize(model).state_dict().items()}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_equals_the_masked_run_to_rounding(optimizer):
    model, controller, opt, history, seen = _run(optimizer)
    ref_model, ref_controller, _, ref_history, ref_seen = _run(optimizer, compact=False)
    assert controller.compaction_blocker is None and controller.compaction_events >= 1
    assert ref_controller.compaction_blocker == "TuneCompConfig(compact_during_training=False)"
    # the masked run stores every rank to the end, the compacted one only the alive ones
    assert all(stored == 18 for stored, _ in ref_seen[-1].values())
    _assert_alive_sized(controller, opt)
    assert [{n: a for n, (_, a) in s.items()} for s in seen] == [
        {n: a for n, (_, a) in s.items()} for s in ref_seen]  # same pruning at every step
    torch.testing.assert_close(torch.tensor(history.losses), torch.tensor(ref_history.losses),
                               rtol=1e-10, atol=1e-12)
    assert history.stats == ref_history.stats
    # finalize gives the same model
    _assert_close(_finalized_state(model), _finalized_state(ref_model), 1e-10)


def test_adafactor_factored_statistics_follow_the_rank_dimension():
    # row_var [out, 1] of U is reduced over the ranks and stays; col_var [1, r] shrinks.
    # The reduced statistics counted the dead ranks' zero gradients, so this run is close
    # to, not equal to, the masked one.
    model = block_net(seed=0)
    controller = prepare(model, TuneCompConfig(**BASE))
    opt = torch.optim.Adafactor([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, opt, vector_batches(STEPS), controller=controller, forward=forward_x,
          loss_fn=ce_loss)
    assert controller.compaction_events >= 1 and controller.compaction_blocker is None
    for m in controller.layers.values():
        k = m.rank
        assert opt.state[m.U]["col_var"].shape == (1, k)
        assert opt.state[m.U]["row_var"].shape == (m.U.shape[0], 1)
        assert opt.state[m.V]["row_var"].shape == (k, 1)
        assert opt.state[m.V]["col_var"].shape == (1, m.V.shape[1])
        assert opt.state[m.mask]["variance"].shape == (k,)


def test_parameters_keep_their_identity_and_the_optimizer_keeps_working():
    model = block_net(seed=0)
    controller = prepare(model, TuneCompConfig(**BASE))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    controller.attach_optimizer(opt)
    ids = {n: (id(m.U), id(m.mask), id(m.V)) for n, m in controller.layers.items()}
    events = []
    for x, y in vector_batches(STEPS):
        opt.zero_grad()
        # the previous step's graph (``loss``) is still referenced while this one is built
        loss = ce_loss(model(x), (x, y)) + controller.regularization()
        loss.backward()
        opt.step()
        before = controller.compaction_events
        controller.step()  # gradients are still there: they shrink with the parameters
        if controller.compaction_events > before:
            events.append(controller.step_count)
            for m in controller.layers.values():
                for p in (m.U, m.mask, m.V):
                    assert p.grad is not None and p.grad.shape == p.shape
                    assert opt.state[p]["exp_avg"].shape == p.shape
                    assert opt.state[p]["step"].dim() == 0  # scalar state is kept
    assert events and ids == {n: (id(m.U), id(m.mask), id(m.V))
                              for n, m in controller.layers.items()}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}
    _assert_alive_sized(controller, opt)


def test_events_are_batched_and_the_budget_step_compacts_everything():
    steps, prune_end = 40, 30
    model, controller, opt, _, seen = _run(steps=steps, blend_steps=10, prune_end=prune_end,
                                           budget_schedule="linear", dtype=torch.float32)
    assert 2 <= controller.compaction_events <= 8, controller.compaction_events
    for t, sizes in enumerate(seen, 1):
        for name, (stored, alive) in sizes.items():
            if t >= prune_end:  # from the budget on, nothing dead is stored
                assert stored == alive, (t, name)
            else:  # before it, no layer keeps more than its share of dead ranks
                assert stored - alive <= COMPACT_SHARE * stored, (t, name)
    start = {n: (18, 18) for n in seen[0]}
    changes = sum(1 for a, b in zip([start, *seen], seen) if any(a[n][0] != b[n][0] for n in a))
    assert changes == controller.compaction_events


def test_no_optimizer_attached_means_no_compaction():
    model = block_net(seed=0)
    controller = prepare(model, TuneCompConfig(**BASE))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert "no optimiser is attached" in controller.compaction_blocker
    for x, y in vector_batches(STEPS):  # a loop that never hands its optimiser over
        opt.zero_grad()
        ce_loss(model(x), (x, y)).backward()
        opt.step()
        controller.step()
    assert controller.compaction_events == 0
    assert all(m.rank == 18 for m in controller.layers.values())
    assert any(bool((m.mask == 0).any()) for m in controller.layers.values())


def test_attach_rejects_what_cannot_be_kept_in_step():
    controller = prepare(block_net(seed=0), TuneCompConfig(**BASE))
    with pytest.raises(TypeError, match="needs a torch.optim.Optimizer"):
        controller.attach_optimizer(object())
    lbfgs = torch.optim.LBFGS(controller.layers["blocks.0.up"].parameters())
    with pytest.raises(ValueError, match="LBFGS"):
        controller.attach_optimizer(lbfgs)
    with pytest.raises(TypeError, match="compact_during_training must be a bool"):
        TuneCompConfig(compact_during_training="yes")


class FlatState(torch.optim.SGD):
    """An optimiser whose state does not follow the parameter's shape."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].setdefault("flat", torch.zeros(p.numel() + 1))
        return super().step(closure)


def test_unsupported_optimizer_state_falls_back_to_masking_with_a_warning():
    model = block_net(seed=0)
    controller = prepare(model, TuneCompConfig(**BASE))
    opt = FlatState([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.warns(UserWarning, match="'flat'"):
        train(model, opt, vector_batches(STEPS), controller=controller, forward=forward_x,
              loss_fn=ce_loss)
    assert controller.compaction_events == 0 and "'flat'" in controller.compaction_blocker
    assert all(m.rank == 18 for m in controller.layers.values())
    assert controller.current_params <= controller.budget_params


def test_run_tunecomp_compacts_and_finalizes_like_the_masked_run():
    results = []
    for compact in (True, False):
        cfg = TuneCompConfig(**BASE, compact_during_training=compact)
        model = block_net(seed=0).double()
        batches = [(x.double(), y) for x, y in vector_batches(STEPS)]
        res = run_tunecomp(model, cfg, lambda p: torch.optim.AdamW(p, lr=1e-2), batches,
                           forward=forward_x, loss_fn=ce_loss)
        results.append(res)
    assert results[0].controller.compaction_events >= 1
    assert results[1].controller.compaction_events == 0
    _assert_close(results[0].model.state_dict(), results[1].model.state_dict(), 1e-10)
    assert results[0].report.ratio == results[1].report.ratio


# --- checkpoints ---------------------------------------------------------------------------


def _resumable(tmp_path, **cfg):
    model = block_net(seed=0)
    controller = prepare(model, TuneCompConfig(**{**BASE, **cfg}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, controller, opt


def test_resume_after_a_compaction_is_bit_identical(tmp_path):
    kw = {"forward": forward_x, "loss_fn": ce_loss, "checkpoint_every": 3,
          "keep_checkpoints": 10}
    model, controller, opt = _resumable(tmp_path)
    sizes = []
    full = train(model, opt, vector_batches(STEPS), controller=controller,
                 checkpoint_dir=tmp_path / "a", callbacks=[lambda s: sizes.append(
                     {n: m.rank for n, m in controller.layers.items()})], **kw)
    assert any(r < 18 for r in sizes[2].values())  # compacted by step 3 ...
    assert sizes[2] != sizes[-1]  # ... and again later
    ckpt = tmp_path / "a" / "ckpt-00000003.pt"

    fresh, fresh_controller, fresh_opt = _resumable(tmp_path)  # full size again
    resumed = train(fresh, fresh_opt, vector_batches(STEPS), controller=fresh_controller,
                    checkpoint_dir=tmp_path / "c", resume=ckpt, steps=STEPS, **kw)
    assert resumed.losses == full.losses  # bit-identical floats
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(opt.param_groups[0]["params"], fresh_opt.param_groups[0]["params"]):
        for key, value in opt.state[p].items():
            assert torch.equal(value, fresh_opt.state[q][key])
    _assert_alive_sized(fresh_controller, fresh_opt)


def test_load_checkpoint_controller_first_then_model_and_optimizer(tmp_path):
    model, controller, opt = _resumable(tmp_path)
    train(model, opt, vector_batches(6), controller=controller, steps=6, forward=forward_x,
          loss_fn=ce_loss)
    save_checkpoint(tmp_path / "c.pt", model, opt, controller)
    fresh, fresh_controller, fresh_opt = _resumable(tmp_path)
    fresh_controller.attach_optimizer(fresh_opt)
    load_checkpoint(tmp_path / "c.pt", fresh, fresh_opt, fresh_controller)
    for name, m in fresh_controller.layers.items():
        assert m.rank == controller.layers[name].rank
    assert all(torch.equal(fresh_controller.stored_ranks()[n], s)
               for n, s in controller.stored_ranks().items())
    for p, q in zip(opt.param_groups[0]["params"], fresh_opt.param_groups[0]["params"]):
        assert torch.equal(p, q) and opt.state[p]["exp_avg"].shape == q.shape


def test_weights_loaded_before_the_controller_state(tmp_path):
    """What an HF Trainer resume does: weights first (the layers take the saved rank
    count), the controller state afterwards (it says which ranks they are)."""
    model, controller, opt = _resumable(tmp_path)
    train(model, opt, vector_batches(STEPS), controller=controller, forward=forward_x,
          loss_fn=ce_loss)
    weights, state = model.state_dict(), controller.state_dict()
    fresh, fresh_controller, _ = _resumable(tmp_path)
    fresh.load_state_dict(weights, strict=False)  # the teachers are gone from the weights
    with pytest.raises(RuntimeError, match="without the controller state saved with them"):
        fresh_controller.step()
    fresh_controller.load_state_dict(state)
    assert all(torch.equal(fresh_controller.stored_ranks()[n], s)
               for n, s in controller.stored_ranks().items())
    _assert_close(_finalized_state(fresh), _finalized_state(model), 0.0)


def test_resume_with_compaction_switched_off_and_older_states(tmp_path):
    model, controller, opt = _resumable(tmp_path)
    train(model, opt, vector_batches(6), controller=controller, steps=6, forward=forward_x,
          loss_fn=ce_loss)
    save_checkpoint(tmp_path / "c.pt", model, opt, controller)
    off, off_controller, off_opt = _resumable(tmp_path, compact_during_training=False)
    load_checkpoint(tmp_path / "c.pt", off, off_opt, off_controller)  # an execution setting
    train(off, off_opt, vector_batches(4), controller=off_controller, steps=4,
          forward=forward_x, loss_fn=ce_loss)
    assert off_controller.compaction_events == 0 and off_controller.schedule_complete
    # a state written before compaction existed has no "stored": every rank is stored
    older = controller.state_dict()
    older.pop("stored")
    fresh, fresh_controller, _ = _resumable(tmp_path)
    fresh_controller.load_state_dict(older)
    assert all(m.rank == 18 for m in fresh_controller.layers.values())


@pytest.mark.parametrize(("stored", "needle"), [
    (lambda s: s.flip(0), "ascending integer indices"),
    (lambda s: s + 100, r"in \[0, 18\)"),
    (lambda s: s.float(), "ascending integer indices"),
    (lambda s: s[1:], "an alive rank is not among the stored ranks"),
])
def test_bad_stored_ranks_are_refused_before_anything_changes(tmp_path, stored, needle):
    model, controller, opt = _resumable(tmp_path)
    train(model, opt, vector_batches(6), controller=controller, steps=6, forward=forward_x,
          loss_fn=ce_loss)
    state = controller.state_dict()
    name = "blocks.0.up"
    state["stored"][name] = stored(state["stored"][name])
    fresh, fresh_controller, _ = _resumable(tmp_path)
    with pytest.raises(ValueError, match=needle) as err:
        fresh_controller.load_state_dict(state)
    assert name in str(err.value)
    assert all(m.rank == 18 for m in fresh_controller.layers.values())
    assert fresh_controller.step_count == 0


def test_no_warning_on_a_normal_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run("adamw", dtype=torch.float32)


def test_reloading_an_earlier_checkpoint_into_a_more_compacted_model(tmp_path):
    """Controller state first: ranks the model no longer stores come back (zeros, with
    zero optimiser state) for the weights and optimiser state loaded next to fill."""
    model, controller, opt = _resumable(tmp_path, blend_steps=2, prune_end=8)
    sizes = []
    kw = {"forward": forward_x, "loss_fn": ce_loss}
    train(model, opt, vector_batches(3), controller=controller, steps=3, **kw,
          callbacks=[lambda s: sizes.append(_sizes(controller))])
    save_checkpoint(tmp_path / "early.pt", model, opt, controller)
    early = {k: v.clone() for k, v in model.state_dict().items()}
    early_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()}
                   for p in opt.param_groups[0]["params"]}
    train(model, opt, vector_batches(STEPS), controller=controller, steps=STEPS - 3, **kw)
    assert any(r < 18 for r, _ in sizes[-1].values())  # compacted by step 3 ...
    assert any(m.rank < sizes[-1][n][0] for n, m in controller.layers.items())  # ... and more
    load_checkpoint(tmp_path / "early.pt", model, opt, controller)
    assert controller.step_count == 3
    for name, m in controller.layers.items():
        assert m.rank == sizes[-1][name][0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, early[k]), k
    for p in opt.param_groups[0]["params"]:
        for key, value in early_state[id(p)].items():
            assert torch.equal(opt.state[p][key], value), key
    # and the run goes on from there
    train(model, opt, vector_batches(STEPS), controller=controller, steps=STEPS - 3, **kw)
    _assert_alive_sized(controller, opt)
