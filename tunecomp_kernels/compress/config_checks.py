"""Checks of single ``TuneCompConfig`` fields: each raises ``TypeError`` for a wrong type
and ``ValueError`` for a wrong value, naming the field and the value."""

from __future__ import annotations

import math
import re

from ..nn.init import INIT_METHODS

#: Lower-precision dtypes the frozen teachers of a float32 model may be stored in.
TEACHER_DTYPES = ("bfloat16", "float16")

def number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def boolean(name: str, value: object) -> None:
    if not isinstance(value, bool):
        kind = type(value)
        where = "" if kind.__module__ == "builtins" else kind.__module__.split(".")[0] + "."
        raise TypeError(f"{name} must be a bool (True or False), got {where}"
                        f"{kind.__name__} {value!r}")


def fraction(name: str, value: object) -> float:
    value = number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def integer(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_teacher_dtype(teacher_dtype: object) -> None:
    if teacher_dtype is None:
        return
    if teacher_dtype not in TEACHER_DTYPES:
        raise ValueError(f"unknown teacher_dtype {teacher_dtype!r}; choose None (the "
                         f"model's dtype) or one of {list(TEACHER_DTYPES)}")


def choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


def patterns(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(
            f"{name} must be a sequence of regular expressions, got {type(value).__name__}"
        )
    out = []
    for pattern in value:
        if not isinstance(pattern, str):
            raise TypeError(f"{name} patterns must be str, got {type(pattern).__name__}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{name} pattern {pattern!r} is not a valid regex: {exc}") from exc
        out.append(pattern)
    return tuple(out)


def check_init(init: object) -> None:
    """``init`` is one of :data:`~tunecomp_kernels.nn.init.INIT_METHODS` or ``"auto"``."""
    if init != "auto" and init not in INIT_METHODS:
        raise ValueError(f"unknown init {init!r}; choose one of {list(INIT_METHODS)} or "
                         "'auto' (svd_llm with calibration data, svd without)")
