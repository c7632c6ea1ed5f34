"""Saving never deletes or replaces a file the library did not write, and checks the
destination before any work (issue: "--overwrite deletes whatever is in the output
directory")."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from tiny_models import block_net

from tunecomp_kernels.compress import (
    TuneCompConfig,
    compress_to_budget,
    finalize,
    load_compressed,
    save_compressed,
)
from tunecomp_kernels.compress.export import add_files
from tunecomp_kernels.compress.output_dir import check_destination, owned_files


def _saved_model(seed: int = 0):
    model = block_net(seed)
    compress_to_budget(model, TuneCompConfig(target_ratio=0.5, blend_steps=0, total_steps=1))
    return finalize(model)


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_current_and_parent_and_home_directories_are_refused(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "ok.csv").write_text("text,label\n")
    (project / "src" / "train.py").write_text("print(1)\n")
    monkeypatch.chdir(project)
    before = _snapshot(project)
    for where in (".", "..", str(project), os.path.expanduser("~")):
        with pytest.raises(ValueError, match="current directory"):
            check_destination(where, overwrite=True)
        with pytest.raises(ValueError, match="current directory"):
            save_compressed(_saved_model(), where, overwrite=True)
    assert _snapshot(project) == before


def test_a_directory_with_foreign_files_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        check_destination(out, overwrite=True)
    with pytest.raises(FileExistsError, match="did not write"):
        save_compressed(_saved_model(), out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("below", ["", "sub", "sub/deeper"])
def test_a_path_at_or_under_a_file_is_refused_up_front(tmp_path, below):
    data = tmp_path / "ok.csv"
    data.write_text("a,b\n")
    error = NotADirectoryError if below else FileExistsError
    with pytest.raises(error, match="ok.csv"):
        check_destination(data / below if below else data)
    assert data.read_text() == "a,b\n"


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="root can write into read-only directories")
def test_an_unwritable_directory_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            check_destination(locked / "model")
    finally:
        locked.chmod(stat.S_IRWXU)


def test_an_existing_model_needs_overwrite(tmp_path):
    out = tmp_path / "model"
    save_compressed(_saved_model(0), out)
    with pytest.raises(FileExistsError, match="overwrite"):
        check_destination(out)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_compressed(_saved_model(1), out, overwrite=False)
    assert check_destination(out, overwrite=True) == out


def test_overwrite_replaces_only_our_files(tmp_path):
    out = tmp_path / "model"
    first = _saved_model(0)
    save_compressed(first, out, extra_files={"summary.json": b"{}"})
    (out / "README.user").write_text("the user's notes")
    second = _saved_model(1)
    save_compressed(second, out, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    # the old summary was ours and the new model has none: it goes; the user's file stays
    assert names == ["README.user", "model.safetensors", "tunecomp.json"]
    assert (out / "README.user").read_text() == "the user's notes"
    reloaded = load_compressed(out, block_net(1))
    x = torch.randn(4, 8)
    assert torch.equal(reloaded(x), second(x))
    assert not list(tmp_path.glob(".model.*"))  # no staging directory left behind


def test_a_failed_save_leaves_the_previous_model_intact(tmp_path, monkeypatch):
    out = tmp_path / "model"
    save_compressed(_saved_model(0), out)
    before = _snapshot(out)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tunecomp_kernels.compress.export.save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_compressed(_saved_model(1), out, overwrite=True)
    assert _snapshot(out) == before
    assert not list(tmp_path.glob(".model.*"))


def test_saved_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = save_compressed(_saved_model(), tmp_path / "model")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_add_files_are_owned_and_atomic(tmp_path):
    out = save_compressed(_saved_model(), tmp_path / "model")
    add_files(out, {"summary.json": json.dumps({"a": 1}).encode()})
    assert "summary.json" in owned_files(out)
    assert json.loads((out / "summary.json").read_text()) == {"a": 1}
    with pytest.raises(ValueError, match="reserved"):
        add_files(out, {"model.safetensors": b""})
    with pytest.raises(FileNotFoundError):
        add_files(tmp_path / "nothing", {"x.txt": b""})
