"""User-facing errors and the checks that raise them.

The CLI prints a :class:`RelposError` as one line (``relpos-train: error: ...``) and
exits 2. Every ``check_*`` helper names the option and says what would be valid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class RelposError(Exception):
    """A problem with the user's input or environment, stated so they can fix it."""


class RelposConfigError(RelposError, ValueError):
    """A bad option: the message names the option and the valid values."""


def check_positive_int(option: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RelposConfigError(f"{option} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive_float(option: str, value, *, allow_zero: bool = False) -> float:
    what = "a number >= 0" if allow_zero else "a positive number"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RelposConfigError(f"{option} must be {what}, got {value!r}") from None
    if isinstance(value, bool) or not ((v >= 0 if allow_zero else v > 0) and math.isfinite(v)):
        finite = "a finite number >= 0" if allow_zero else "a positive finite number"
        raise RelposConfigError(f"{option} must be {finite}, got {value!r}")
    return v


def check_nonnegative_float(option: str, value) -> float:
    return check_positive_float(option, value, allow_zero=True)


def check_choice(option: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise RelposConfigError(
            f"{option} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
