"""Clear, early errors for bad settings.

Every check names the parameter, the bad value and what is allowed, so that a
typo in a notebook's ``parameters`` cell fails before any training starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["ConfigError", "DataUnavailableError", "check_choice", "check_positive", "check_range", "check_bool"]


class ConfigError(ValueError):
    """A setting has a value the library cannot use."""


class DataUnavailableError(RuntimeError):
    """A dataset could not be found locally nor downloaded."""


def check_choice(param: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``; raise :class:`ConfigError` otherwise."""
    allowed = list(allowed)
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{param}={value!r} is not recognised; allowed values: {shown}")
    return value


def check_positive(param: str, value: Any, *, allow_zero: bool = False) -> Any:
    """Return ``value`` if it is a finite number > 0 (or >= 0 with ``allow_zero``); inf and NaN are refused."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{param}={value!r} is invalid; it must be a finite number {bound}")
    return value


def check_range(param: str, value: Any, low: float, high: float) -> Any:
    """Return ``value`` if ``low <= value <= high``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{param}={value!r} is out of range; allowed: {low} <= {param} <= {high}")
    return value


def check_bool(param: str, value: Any) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not ``"no"``, ``0`` or ``None``)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{param}={value!r} is invalid; it must be True or False")
    return value
