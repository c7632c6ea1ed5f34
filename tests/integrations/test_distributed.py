"""TuneComp under torch.distributed: DDP and FSDP2 (``fully_shard``), gloo, 2 CPU processes.

One ``torchrun --standalone --nproc_per_node=2`` launch (this file is also the worker
script) runs a DDP and an FSDP2 job on a small model of ``MaskedLowRankLinear`` layers
driven by the TuneComp controller (blend, L1, hard shrink, budget pruning, teacher
freeing), each rank training on its own data. The tests then check, from what every rank
saved:

* parameters and masks are bitwise identical across ranks, and so are the pruning
  decisions at every step (the global budget is computed identically on every rank);
* both equal a single-process run on the union of the ranks' batches (up to rounding);
* ``check_in_sync`` / ``broadcast_controller`` / ``ddp_ignore_teachers`` behave;
* compaction during training stays off under DDP and FSDP2 (DDP sized its buckets and
  FSDP2 its shards at wrap time): the optimiser is attached, as a user would, yet every
  rank keeps all ranks stored, the dead ones masked; the single-process run compacts,
  and the two agree on the ranks it keeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
STEPS = 6
BATCH = 8


def _config():
    from tunecomp_kernels.compress import TuneCompConfig

    return TuneCompConfig(target_ratio=0.4, blend_steps=3, total_steps=STEPS, l1_lambda=1e-3,
                          l1_schedule="constant")


def _model():
    from tiny_models import block_net

    return block_net(seed=0, width=24, depth=2)


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(BATCH, 8, generator=g), torch.randint(0, 3, (BATCH,), generator=g))
            for _ in range(STEPS)]


def _train(model, controller, batches, record):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    controller.attach_optimizer(opt)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y) + controller.regularization()
        loss.backward()
        opt.step()
        controller.step()
        record.append({k: v.clone() for k, v in controller.alive_masks().items()})
    return controller.compaction_blocker  # while the optimiser is alive


def _full_state(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        full = getattr(p, "full_tensor", None)
        out[name.replace("module.", "", 1) if name.startswith("module.") else name] = (
            (full() if callable(full) else p).detach().clone())
    return out


# --- worker (run by torchrun) -------------------------------------------------------------


def _worker(out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tunecomp_kernels.compress import prepare
    from tunecomp_kernels.integrations.distributed import (
        broadcast_controller,
        check_in_sync,
        ddp_ignore_teachers,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    batches = _batches(rank)

    # DDP ------------------------------------------------------------------------------
    model = _model()
    controller = prepare(model, _config())
    ignored = ddp_ignore_teachers(model)
    import weakref

    teacher_ref = weakref.ref(next(iter(controller.layers.values())).teacher_weight)
    ddp = DDP(model)
    steps: list = []
    blocker = _train(ddp, controller, batches, steps)
    check_in_sync(controller, model, buffers=True)
    result = {"ddp": {"params": _full_state(model), "alive": steps,
                      "stats": controller.stats(), "ignored": ignored,
                      "teacher_released": teacher_ref() is None,
                      "blocker": blocker, "events": controller.compaction_events}}

    # broadcast_controller: make rank 1 disagree, then take rank 0's decisions
    if rank == 1:
        name = next(iter(controller.layers))
        alive = controller.alive_masks()[name]
        alive[alive.nonzero()[0]] = False
        state = controller.state_dict()
        state["alive"][name] = alive
        controller.load_state_dict(state)
    try:
        check_in_sync(controller)
        result["ddp"]["detected_divergence"] = False
    except RuntimeError:
        result["ddp"]["detected_divergence"] = True
    broadcast_controller(controller, src=0)
    check_in_sync(controller)

    # FSDP2 ----------------------------------------------------------------------------
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _model()
    controller = prepare(model, _config())
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = type(controller.layers["blocks.0.up"].mask).__name__
    steps = []
    blocker = _train(model, controller, batches, steps)
    check_in_sync(controller, model)
    result["fsdp2"] = {"params": _full_state(model), "alive": steps,
                       "stats": controller.stats(), "mask_type": sharded,
                       "blocker": blocker, "events": controller.compaction_events}

    # export: gather a full state dict to rank 0, load it into an unsharded model
    # prepared the same way (controller state first: the teachers are freed), finalize
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    x = _batches(0)[0][0]
    with torch.no_grad():
        sharded_out = model(x)
    if rank == 0:
        from tunecomp_kernels.compress import finalize

        plain = _model()
        plain_controller = prepare(plain, _config())
        plain_controller.load_state_dict(controller.state_dict())
        plain.load_state_dict(full)
        finalize(plain)
        with torch.no_grad():
            result["fsdp2"]["export_max_diff"] = float((plain(x) - sharded_out).abs().max())

    torch.save(result, out_dir / f"rank{rank}.pt")
    # a gloo rank that tears down while rank 0 is still exporting can abort ("terminate
    # called without an active exception"): every rank waits for the others first
    dist.barrier()
    dist.destroy_process_group()


# --- tests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single_process():
    """The same training on one process with the union of both ranks' batches (the
    gradient DDP/FSDP average equals the gradient of the union's mean loss)."""
    from tunecomp_kernels.compress import prepare

    torch.set_num_threads(1)
    model = _model()
    controller = prepare(model, _config())
    union = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
             for a, b in zip(_batches(0), _batches(1))]
    steps: list = []
    _train(model, controller, union, steps)
    return {"params": _full_state(model), "alive": steps, "stats": controller.stats(),
            "stored": controller.stored_ranks(), "events": controller.compaction_events}


def _assert_ranks_identical(r0: dict, r1: dict) -> None:
    assert r0["params"].keys() == r1["params"].keys()
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), f"{name} differs"
    for step, (a0, a1) in enumerate(zip(r0["alive"], r1["alive"]), 1):
        for layer in a0:
            assert torch.equal(a0[layer], a1[layer]), f"step {step}: {layer} pruned differently"
    assert r0["stats"] == r1["stats"]


def _stored_part(name: str, p: torch.Tensor, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ranks a compacted layer kept, out of a parameter that stores every rank."""
    layer, _, kind = name.rpartition(".")
    if layer not in stored or kind not in ("U", "mask", "V"):
        return p
    return p.index_select(1 if kind == "U" else 0, stored[layer])


def _assert_matches_single_process(run: dict, ref: dict) -> None:
    for name, p in ref["params"].items():
        got = _stored_part(name, run["params"][name], ref["stored"])
        torch.testing.assert_close(got, p, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for step, (a, b) in enumerate(zip(run["alive"], ref["alive"]), 1):
        for layer in a:
            assert torch.equal(a[layer], b[layer]), f"step {step}: {layer}"


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_ranks_agree_and_budget_met(ranks, kind):
    r0, r1 = ranks[0][kind], ranks[1][kind]
    _assert_ranks_identical(r0, r1)
    stats = r0["stats"]
    assert stats["step"] == STEPS and stats["teacher_freed"]
    assert stats["params"] <= stats["budget_params"]
    masks = [k for k in r0["params"] if k.endswith(".mask")]
    assert masks and any(bool((r0["params"][k] == 0).any()) for k in masks)  # pruned ranks
    for k in masks:  # a pruned rank's mask is exactly 0, on every rank
        dead = ~r0["alive"][-1][k.removesuffix(".mask")]
        assert torch.all(r0["params"][k][dead] == 0)


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_matches_single_process(ranks, single_process, kind):
    _assert_matches_single_process(ranks[0][kind], single_process)


@pytest.mark.parametrize(("kind", "reason"), [("ddp", "torch.distributed is initialised"),
                                              ("fsdp2", "sharded (FSDP2")])
def test_no_compaction_under_ddp_and_fsdp2(ranks, single_process, kind, reason):
    for r in ranks:
        run = r[kind]
        assert reason in run["blocker"] and run["events"] == 0
        for name, p in run["params"].items():  # every rank still stored, at full size
            assert p.shape == ranks[0][kind]["params"][name].shape
        for layer, alive in run["alive"][-1].items():
            assert run["params"][f"{layer}.mask"].shape == alive.shape
    # the single process compacted to exactly the ranks the distributed runs keep alive
    assert single_process["events"] >= 1
    for layer, alive in ranks[0][kind]["alive"][-1].items():
        assert torch.equal(single_process["stored"][layer], alive.nonzero().flatten())


def test_fsdp2_shards_the_student(ranks):
    assert ranks[0]["fsdp2"]["mask_type"] == "DTensor"


def test_fsdp2_model_exports_through_a_full_state_dict(ranks):
    assert ranks[0]["fsdp2"]["export_max_diff"] < 1e-5


def test_ddp_ignores_teachers_and_releases_them(ranks):
    ddp = ranks[0]["ddp"]
    assert ddp["ignored"] and all(n.endswith(("teacher_weight", "teacher_bias"))
                                  for n in ddp["ignored"])
    assert ddp["teacher_released"]  # DDP kept no reference once the blend ended


def test_divergence_detected_and_repaired_by_broadcast(ranks):
    # rank 1 was made to disagree; check_in_sync saw it on both ranks, and after
    # broadcast_controller(src=0) the final check_in_sync in the worker passed
    assert ranks[0]["ddp"]["detected_divergence"] and ranks[1]["ddp"]["detected_divergence"]


def test_helpers_are_no_ops_without_a_process_group():
    from tunecomp_kernels.compress import prepare
    from tunecomp_kernels.integrations.distributed import (
        broadcast_controller,
        check_in_sync,
        controller_fingerprint,
        teacher_buffer_names,
    )

    model = _model()
    controller = prepare(model, _config())
    names = teacher_buffer_names(model)
    assert len(names) == 2 * len(controller.layers)  # weight and bias per layer
    check_in_sync(controller, model)
    broadcast_controller(controller)
    fp = controller_fingerprint(controller)
    assert fp["step"] == 0 and len(fp["alive_sha256"]) == 64


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
