"""Checkpointed compression runs: SIGKILL and resume, corrupt checkpoints, failed writes."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import (
    block_net,
    ce_loss,
    forward_x,
    vector_batches,
)

from tunecomp_kernels.compress import (
    CheckpointError,
    TuneCompConfig,
    list_checkpoints,
    load_checkpoint,
    prepare,
    read_checkpoint,
    run_tunecomp,
    save_checkpoint,
    train,
)
from tunecomp_kernels.compress import training as training_mod

SCRIPT = Path(__file__).parent / "scripts" / "killable_run.py"
STEPS = 8
CONFIG = {"target_ratio": 0.4, "blend_steps": 4, "total_steps": STEPS, "l1_lambda": 1e-2,
          "shrink_threshold": 0.02}


def launch(ckpt_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(ckpt_dir), str(out), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output.decode(errors="replace")


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    reference = launch(tmp_path / "ref_ckpt", tmp_path / "ref.pt")
    victim = launch(tmp_path / "ckpt", tmp_path / "run.pt", "--delay", "0.4")
    try:
        first = tmp_path / "ckpt" / "ckpt-00000003.pt"
        deadline = time.monotonic() + 90
        while not first.exists():
            assert victim.poll() is None, victim.communicate()[0].decode(errors="replace")
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "run.pt").exists()  # it really died mid-run
    steps_done = [int(p.stem.split("-")[1]) for p in list_checkpoints(tmp_path / "ckpt")]
    assert steps_done and max(steps_done) < 12

    finish(launch(tmp_path / "ckpt", tmp_path / "run.pt", "--resume"))
    finish(reference)
    got = torch.load(tmp_path / "run.pt", weights_only=True)
    want = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert got["steps"] == want["steps"] == 12
    assert got["losses"] == want["losses"]  # bit-identical floats
    assert got["stats"] == want["stats"]
    assert got["report"] == want["report"]
    for key in ("masks", "alive", "state"):
        assert sorted(got[key]) == sorted(want[key])
        for name, value in want[key].items():
            assert torch.equal(got[key][name], value), (key, name)


# --- in-process runs on the plain BlockNet (milliseconds per step) ------------------------


def setup_run(seed: int = 0):
    torch.manual_seed(seed)
    model = block_net()
    controller = prepare(model, TuneCompConfig(**CONFIG), forward=forward_x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    return model, controller, optimizer


def noisy_loss(outputs, batch):
    """Cross-entropy plus noise from torch, random and NumPy: RNG state matters."""
    noise = torch.rand(()) * 1e-3 + random.random() * 1e-3 + float(np.random.rand()) * 1e-3
    return ce_loss(outputs, batch) + noise


def run(ckpt_dir=None, *, steps=None, resume=False, callback=None, every=2, keep=2):
    model, controller, optimizer = setup_run()
    history = train(model, optimizer, vector_batches(3), controller=controller, steps=steps,
                    forward=forward_x, loss_fn=noisy_loss, callback=callback,
                    checkpoint_dir=ckpt_dir, checkpoint_every=every if ckpt_dir else None,
                    keep_checkpoints=keep, resume=resume)
    return model, controller, history


def assert_same_run(a, b):
    (model_a, ctl_a, hist_a), (model_b, ctl_b, hist_b) = a, b
    assert hist_a.losses == hist_b.losses and hist_a.stats == hist_b.stats
    assert hist_a.steps == hist_b.steps
    state_b = model_b.state_dict()
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, state_b[key]), key
    alive_b = ctl_b.alive_masks()
    assert all(torch.equal(v, alive_b[k]) for k, v in ctl_a.alive_masks().items())


def interrupt_at(step_to_fail: int):
    def callback(step, _info):
        if step == step_to_fail:
            raise KeyboardInterrupt  # a fault after this step's checkpoint decision

    return callback


def seed_all():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_interrupted_train_resumes_bit_identically(tmp_path):
    seed_all()
    reference = run()
    seed_all()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, callback=interrupt_at(5))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt",
                                                            "ckpt-00000004.pt"]
    random.seed(123)  # whatever the new process does before resuming is overwritten
    resumed = run(tmp_path, resume=True)
    assert_same_run(resumed, reference)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000006.pt",
                                                            "ckpt-00000008.pt"]


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path):
    seed_all()
    reference = run()
    seed_all()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, callback=interrupt_at(7))
    newest = tmp_path / "ckpt-00000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    good = tmp_path / "ckpt-00000004.pt"
    good_digest = digest(good)
    with pytest.warns(UserWarning, match=r"skipping unreadable checkpoint: .*ckpt-00000006"):
        resumed = run(tmp_path, resume=True)
    assert_same_run(resumed, reference)
    assert not good.exists() or digest(good) == good_digest


def test_every_checkpoint_corrupt_is_a_clear_error(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, callback=interrupt_at(5))
    for path in list_checkpoints(tmp_path):
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint in"), \
            pytest.warns(UserWarning, match="skipping unreadable"):
        run(tmp_path, resume=True)


def corrupt(kind: str, path: Path) -> None:
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        path.write_bytes(bytes(data[: len(data) * 2 // 3]))
    elif kind == "flipped_byte":
        payload = data.index(b"data/0") + 200  # inside the first tensor's bytes
        data[payload] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 50)
    elif kind == "foreign":
        torch.save([1, 2, 3], path)


@pytest.mark.parametrize(("kind", "message"), [
    ("truncated", "truncated or corrupt"),
    ("flipped_byte", "fails its CRC check"),
    ("empty", "truncated or corrupt"),
    ("garbage", "truncated or corrupt"),
    ("foreign", "is not a TuneComp checkpoint"),
])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, kind, message):
    model, controller, optimizer = setup_run()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, optimizer, controller)
    read_checkpoint(path)  # fine before
    corrupt(kind, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path, model, optimizer, controller)
    assert str(path) in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_missing_checkpoint_names_the_path(tmp_path):
    model, controller, optimizer = setup_run()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint file at .*nowhere\.pt"):
        load_checkpoint(tmp_path / "nowhere.pt", model, optimizer, controller)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        run(tmp_path, resume=tmp_path / "nowhere.pt")


def test_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, callback=interrupt_at(3))
    good = tmp_path / "ckpt-00000002.pt"
    good_digest = digest(good)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # half of it reached the disk, then the disk filled up
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training_mod.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path, resume=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000002.pt"]  # no partial or temp file
    assert digest(good) == good_digest
    read_checkpoint(good)


def test_temp_file_of_a_killed_write_is_ignored_and_removed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, callback=interrupt_at(3))
    stale = tmp_path / ".ckpt-00000004.pt.abc123.tmp"  # what SIGKILL mid-write leaves
    stale.write_bytes(b"half a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt"]
    run(tmp_path, resume=True)
    assert not stale.exists()


def test_nan_loss_stops_before_a_bad_checkpoint(tmp_path):
    def nan_at_five(outputs, batch):
        loss = ce_loss(outputs, batch)
        return loss * float("nan") if nan_at_five.calls == 5 else loss

    def count(step, _info):
        nan_at_five.calls = step + 1

    nan_at_five.calls = 1
    model, controller, optimizer = setup_run()
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 5.*ckpt-00000004"):
        train(model, optimizer, vector_batches(3), controller=controller, forward=forward_x,
              loss_fn=nan_at_five, callback=count, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt",
                                                            "ckpt-00000004.pt"]
    model.blocks[0].up.U.data[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"'blocks.0.up.U' holds NaN/inf"):
        save_checkpoint(tmp_path / "ckpt-00000004.pt", model, optimizer, controller)
    read_checkpoint(tmp_path / "ckpt-00000004.pt")  # the good one is untouched


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, callback=interrupt_at(3))
    with pytest.raises(FileExistsError, match="already holds checkpoints .*resume=True"):
        run(tmp_path)
    with pytest.warns(UserWarning, match="holds no checkpoint: starting from step 0"):
        run(tmp_path / "empty", resume=True, steps=1)


def test_run_tunecomp_resumes_with_an_iterator(tmp_path):
    def go(**kwargs):
        seed_all()
        torch.manual_seed(0)
        return run_tunecomp(
            block_net(), TuneCompConfig(**CONFIG),
            lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
            iter(vector_batches(STEPS)), forward=forward_x, loss_fn=noisy_loss,
            make_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, 0.5), **kwargs)

    reference = go()
    with pytest.raises(KeyboardInterrupt):
        go(checkpoint_dir=tmp_path, checkpoint_every=3, callback=interrupt_at(5))
    resumed = go(checkpoint_dir=tmp_path, checkpoint_every=3, resume=True)
    assert resumed.history.losses == reference.history.losses
    assert resumed.report.to_dict() == reference.report.to_dict()
    want = reference.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in resumed.model.state_dict().items())


def test_save_checkpoint_restores_every_rng(tmp_path):
    model, controller, optimizer = setup_run()
    save_checkpoint(tmp_path / "c.pt", model, optimizer, controller, epoch=3)
    draws = (torch.rand(3), random.random(), np.random.rand(2))
    torch.rand(5), random.random(), np.random.rand(7)
    assert load_checkpoint(tmp_path / "c.pt", model, optimizer, controller) == {"epoch": 3}
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1]
    assert np.array_equal(draws[2], again[2])
