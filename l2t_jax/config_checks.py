"""One-line checks of config fields, shared by the validators of every config section.

Each check returns ``(ok, message)``: whether a field's value is valid and the one line
to raise if not, which starts with the field's full path (``config.train.batch_size``),
says what the value must be and shows the value given. A check never raises (a value of
the wrong type is simply not ok), so a validator lists its checks and `check_fields`
raises the first failure.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np

from l2t_jax.errors import ConfigError

Check = tuple[bool, str]


def check_fields(checks: Iterable[Check]) -> None:
    """Raises a `ConfigError` with the message of the first failed ``(ok, message)``."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def is_integer(value: Any) -> bool:
    """Whether `value` is an integer (a bool is not)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_number(value: Any) -> bool:
    """Whether `value` is a finite real number (a bool is not)."""
    return (isinstance(value, int | float | np.integer | np.floating)
            and not isinstance(value, bool | np.bool_) and math.isfinite(value))


def integer(path: str, value: Any, minimum: int = 1, maximum: int | None = None,
            note: str = "") -> Check:
    """An integer in ``[minimum, maximum]`` (no upper bound when `maximum` is None).

    Args:
        path: the field's full path, e.g. ``"config.train.batch_size"``.
        value: its value.
        minimum: the smallest valid value.
        maximum: the largest valid value, or None.
        note: appended to the requirement, e.g. ``" (0: never)"``.
    """
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    ok = is_integer(value) and value >= minimum and (maximum is None or value <= maximum)
    return ok, f"{path} must be an integer {bounds}{note}, got {value!r}"


def number(path: str, value: Any, *, above: float | None = None,
           at_least: float | None = None, below: float | None = None,
           at_most: float | None = None, note: str = "") -> Check:
    """A finite number within the given bounds (give at most one lower and one upper).

    Args:
        path: the field's full path.
        value: its value.
        above: the value must be > this.
        at_least: the value must be >= this.
        below: the value must be < this.
        at_most: the value must be <= this.
        note: appended to the requirement.
    """
    low, low_open = (above, True) if above is not None else (at_least, False)
    high, high_open = (below, True) if below is not None else (at_most, False)
    ok = is_number(value) and (
        low is None or (value > low if low_open else value >= low)) and (
        high is None or (value < high if high_open else value <= high))
    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"{'>' if low_open else '>='} {low}"
    else:
        bounds = f"{'<' if high_open else '<='} {high}"
    requirement = bounds if is_number(value) else f"a finite number {bounds}"
    return ok, f"{path} must be {requirement}{note}, got {value!r}"


def one_of(path: str, value: Any, choices: Collection, note: str = "") -> Check:
    """One of `choices`."""
    choices = tuple(choices)
    return value in choices, f"{path} must be one of {choices}{note}, got {value!r}"


def flag(path: str, value: Any) -> Check:
    """A bool."""
    return isinstance(value, bool | np.bool_), f"{path} must be True or False, got {value!r}"


def sizes(path: str, value: Any) -> Check:
    """A non-empty tuple of integers >= 1 (layer widths)."""
    ok = (isinstance(value, tuple | list) and len(value) > 0
          and all(is_integer(v) and v >= 1 for v in value))
    return ok, f"{path} must be a non-empty tuple of integers >= 1, got {value!r}"


def _is_interval(value: Any, at_least: float | None = None) -> bool:
    return (isinstance(value, tuple | list) and len(value) == 2
            and all(is_number(v) for v in value) and value[0] < value[1]
            and (at_least is None or value[0] >= at_least))


def interval(path: str, value: Any, at_least: float | None = None) -> Check:
    """A pair ``(low, high)`` of finite numbers, ``at_least <= low < high``."""
    low = "low" if at_least is None else f"{at_least} <= low"
    return (_is_interval(value, at_least),
            f"{path} must be a pair (low, high) of numbers with {low} < high, got {value!r}")


def inside(path: str, value: Any, interval_path: str, bounds: Any) -> Check:
    """A number strictly inside the interval ``bounds`` (the field `interval_path`)."""
    ok = _is_interval(bounds) and is_number(value) and bounds[0] < value < bounds[1]
    return ok, f"{path} must be inside {interval_path} {bounds!r}, got {value!r}"
