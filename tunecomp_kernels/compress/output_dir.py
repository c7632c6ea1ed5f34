"""Where a saved model may go, and how its files are put there without losing anyone's.

The library owns only the files it wrote into a model directory: the names listed in
that directory's metadata file (see :mod:`.export`). Everything else in the directory is
the user's and is never deleted or replaced. :func:`check_destination` is the up-front
check (before any training); :func:`install_files` moves a complete, verified set of new
files into place.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

from .checkpoint import current_umask, fsync_path

META_FILE = "tunecomp.json"


def owned_files(directory: Path) -> set[str]:
    """The file names a saved model in ``directory`` declares as its own (empty if the
    directory holds no readable metadata). Metadata written before the list existed
    owns the two model files."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        return set()
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, list):
        files = ["model.safetensors"]
    return {str(f) for f in files if isinstance(f, str) and "/" not in f} | {META_FILE}


def _protected_dirs() -> list[Path]:
    protected = [Path.home().resolve(), Path.cwd().resolve()]
    return protected + list(Path.cwd().resolve().parents)


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _probe_writable(directory: Path, target: Path) -> None:
    """Create and remove a temporary file in ``directory`` (os.access says yes to root
    even on a read-only mount)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".tunecomp-probe-", dir=directory)
    except OSError as exc:
        raise PermissionError(f"{target} cannot be written: {directory} is not writable "
                              f"({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_destination(path: str | os.PathLike[str], *, overwrite: bool = False,
                      allow_foreign: bool = False) -> Path:
    """Check that a model can be saved at directory ``path``, before any long work.

    Refused: the current directory, one of its parents or the home directory (they hold
    other files); a path that is or lies under a file; a location that cannot be
    written; a directory holding files this library did not write (unless
    ``allow_foreign``: then they are kept untouched); a saved model unless ``overwrite``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``path`` is the current, a parent or the home directory.
        FileExistsError: ``path`` is a file.
        NotADirectoryError: one of ``path``'s parents is a file.
        PermissionError: the nearest existing directory is not writable.
        FileExistsError: ``path`` holds foreign files, or a saved model without
            ``overwrite``.
    """
    path = Path(path)
    resolved = path.resolve()
    if resolved in _protected_dirs():
        raise ValueError(f"refusing to save a model into {path}: it is the current directory, "
                         "one of its parents or the home directory; name a new sub-directory")
    existing = _nearest_existing(resolved)
    if existing == resolved and not existing.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if not existing.is_dir():
        raise NotADirectoryError(f"{path} cannot be a model directory: it lies under "
                                 f"{existing}, which is not a directory")
    _probe_writable(existing, path)
    if existing != resolved:
        return path
    entries = {e.name for e in resolved.iterdir()}
    ours = owned_files(resolved) & entries
    foreign = sorted(entries - ours)
    if foreign and not allow_foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise FileExistsError(f"{path} holds files that this library did not write ({shown}): "
                              "refusing to overwrite it; choose a new or empty directory")
    if ours and not overwrite:
        raise FileExistsError(f"{path} already holds a saved model; pass overwrite=True "
                              "(--overwrite) to replace it, or choose another directory")
    return path


def staging_dir(path: Path) -> Path:
    """A new empty directory beside ``path`` (same file system, so renames are atomic)
    with the permissions a plain ``mkdir`` would give (``mkdtemp`` makes it private)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def install_files(staged: Path, path: Path, names: Iterable[str]) -> None:
    """Move the complete set of files ``names`` from ``staged`` into ``path``.

    Each file gets the permissions a plain ``open(name, "w")`` would give (some writers
    make them private). A new ``path`` is one atomic rename. Into an existing model
    directory the files are renamed one by one, metadata last, after the old metadata
    was set aside, so an interruption leaves no metadata that describes the wrong
    weights; files the old model owned and the new one does not are then removed, and
    any other file is left alone.
    """
    names = list(names)
    for name in names:
        os.chmod(staged / name, 0o666 & ~current_umask())
    if not path.exists():
        os.rename(staged, path)
        fsync_path(path.parent)
        return
    old = owned_files(path)
    aside = path / f".{META_FILE}.old-{uuid.uuid4().hex[:8]}"
    if (path / META_FILE).exists():
        os.rename(path / META_FILE, aside)
    names = [n for n in names if n != META_FILE] + [META_FILE]
    for name in names:
        os.replace(staged / name, path / name)
    for stale in old - set(names):
        (path / stale).unlink(missing_ok=True)
    aside.unlink(missing_ok=True)
    fsync_path(path)
    staged.rmdir()
