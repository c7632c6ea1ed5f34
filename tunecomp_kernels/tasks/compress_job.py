"""``tunecomp compress``: the command-line adapter of the job in :mod:`.job`.

parse → :class:`~.settings.JobSettings` (``--quick`` picks the :func:`~.settings.quick`
preset, every option given overrides it) → check every output path → :func:`~.job.run_job`
→ exit status. The options, their defaults, help and choices come from the settings'
fields; :func:`flag_of` is the one place that maps a field name to its flag.

Exit status: 0 done; 2 a bad argument or data, reported as one line on stderr before any
training; 1 the model could not be saved where asked (the line says where it was kept);
130 interrupted (the line says how to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import settings as st

PROG = "tunecomp compress"
#: What a --quick run was measured to take (README, "The main job").
QUICK_MEASURED = ("measured: 58 s on 2 free CPU cores, 8 minutes while other jobs used "
                  "them (the default: 27.5 minutes on those busy cores)")
_FIELDS = {f.name: f for f in dataclasses.fields(st.JobSettings)}
_SIZES = ("train_size", "val_size", "test_size")
_METAVARS = {int: "N", float: "X", str: "NAME"}


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


def flag_of(name: str) -> str | None:
    """The command-line flag of settings field ``name`` (None: no flag)."""
    return _FIELDS[name].metadata.get("flag", "--" + name.replace("_", "-"))


def _type_of(f: dataclasses.Field) -> type:
    kind = str(f.type)
    return int if kind.startswith("int") else float if kind.startswith("float") else str


def _help(f: dataclasses.Field, full: st.JobSettings, quick: st.JobSettings) -> str:
    text = f.metadata.get("flag_help", f.metadata["help"])
    value, fast = getattr(full, f.name), getattr(quick, f.name)
    if f.name in _SIZES:  # None: the preset's size, shrunk to fit a smaller data set
        value, fast = (full.split_sizes[_SIZES.index(f.name)],
                       quick.split_sizes[_SIZES.index(f.name)])
    if value is not None and not isinstance(value, bool):
        text += f" (default {value:g}" if isinstance(value, float) else f" (default {value}"
        text += f"; {fast} with --quick)" if fast != value else ")"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every settings field that has a flag, and ``--quick``."""
    full, quick = st.full(), st.quick()
    groups: dict[str, Any] = {}
    for name, f in _FIELDS.items():
        flag = flag_of(name)
        if flag is None:
            continue
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": _help(f, full, quick)}
        if isinstance(f.default, bool):
            kwargs["action"] = "store_false" if f.default else "store_true"
        else:
            kwargs["type"] = _type_of(f)
            kwargs["metavar"] = f.metadata.get("metavar", _METAVARS[kwargs["type"]])
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
                del kwargs["metavar"]
        groups[group_name].add_argument(flag, **kwargs)
        if name == "compare_dense":
            groups[group_name].add_argument(
                "--quick", action="store_true",
                help="a smoke run: " + (st.quick.__doc__ or "").split(": ", 1)[-1].rstrip(".")
                + f"; {QUICK_MEASURED}")


def _translate(message: str, leading: str | None = None) -> str:
    """Field names in a library message -> this command's flags."""
    if leading and message.startswith(leading) and flag_of(leading):
        message = flag_of(leading) + message[len(leading):]
    for name in sorted(_FIELDS, key=len, reverse=True):
        flag = flag_of(name)
        if flag is None:
            continue
        word = rf"(?<![-\w]){name}"  # not inside a longer name or an existing flag
        message = re.sub(rf"{word}=True \({flag}\)", flag, message)
        message = re.sub(rf"{word}=True\b", flag, message)
        message = re.sub(rf"{word}=", f"{flag}=", message)
        message = re.sub(rf"{word} (?=[<>]=? )", f"{flag} ", message)  # "use ratio >= 0.05"
        if "_" in name:
            message = re.sub(rf"(?<![-\w]){name}\b", flag, message)
    return message


def settings_from_args(args: argparse.Namespace) -> st.JobSettings:
    """The run's settings: the preset, then every option given.

    Raises:
        UsageError: a bad value (the message names the flag).
    """
    given = {k: v for k, v in vars(args).items() if k in _FIELDS}
    try:
        settings = (st.quick if getattr(args, "quick", False) else st.full)(**given)
    except st.SettingsError as exc:
        raise UsageError(_translate(str(exc), exc.field)) from None
    if settings.output is None:
        if settings.resume:
            raise UsageError("--resume needs --output: the directory of the interrupted run")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        settings = settings.replace(output=str(Path("runs") / f"tunecomp-{stamp}"))
    return settings


def _interrupted(settings: st.JobSettings, paths, state) -> str:
    where = f"interrupted at step {state.step} of {state.total} ({state.phase})" \
        if state.total else "interrupted before training"
    last = paths.last_checkpoint() if paths is not None else None
    if last is None:
        return f"{PROG}: {where}; no checkpoint was written yet: run the command again"
    return (f"{PROG}: {where}; the {last[0]} phase's checkpoint of step {last[1]} is in "
            f"{paths.checkpoints}: to continue, run the same command with --output "
            f"{settings.output} --resume")


def run(args: argparse.Namespace) -> int:
    """Run ``tunecomp compress``; returns the exit status."""
    from ..compress.prepare import InfeasibleBudgetError
    from .data import DataError
    from .job import JobState, SaveError, run_job
    from .run_dir import RunPathError, check_run_paths

    settings = paths = None
    state = JobState()
    try:
        settings = settings_from_args(args)
        paths = check_run_paths(settings.output, overwrite=settings.overwrite or
                                settings.resume, resume=settings.resume)
        return run_job(settings, paths, state)
    except (UsageError, RunPathError, DataError) as exc:
        field = str(exc).split(":", 1)[0] if isinstance(exc, RunPathError) else None
        print(f"{PROG}: error: {_translate(str(exc), field)}", file=sys.stderr)
        return 2
    except InfeasibleBudgetError as exc:  # known only once the model's layers are
        print(f"{PROG}: error: {_translate(st.in_job_terms(str(exc)))}", file=sys.stderr)
        return 2
    except SaveError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        print(_interrupted(settings, paths, state), file=sys.stderr)
        return 130
