"""Checks on the plain values users pass (counts, sizes, seeds, choices), each raising a
:class:`~hessgap.errors.HessgapError` that names the argument, what it got and what it needs.

Every public call and the command line use these, so the same mistake gets the same message everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real

from .errors import HessgapError


def _hint(hint: str) -> str:
    return f"; {hint}" if hint else ""


def is_int(value) -> bool:
    """A true integer (``bool`` is not one, although Python says it is)."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value, name: str, hint: str = "", *, allow_none: bool = False) -> int | None:
    """``value`` when it is an integer ≥ 1 (or None, when allowed)."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < 1:
        raise HessgapError(f"{name} must be a positive integer, got {value!r}{_hint(hint)}")
    return value


def nonnegative_int(value, name: str, hint: str = "", *, allow_none: bool = False) -> int | None:
    """``value`` when it is an integer ≥ 0 (or None, when allowed)."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < 0:
        raise HessgapError(f"{name} must be an integer ≥ 0, got {value!r}{_hint(hint)}")
    return value


def positive_number(value, name: str, hint: str = "", *, allow_none: bool = False) -> float | None:
    """``value`` as a float when it is a finite real number > 0 (or None, when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise HessgapError(f"{name} must be a finite number > 0, got {value!r}{_hint(hint)}")
    return float(value)


def nonnegative_number(value, name: str, hint: str = "") -> float:
    """``value`` as a float when it is a finite real number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise HessgapError(f"{name} must be a finite number ≥ 0, got {value!r}{_hint(hint)}")
    return float(value)


def finite_number(value, name: str, hint: str = "") -> float:
    """``value`` as a float when it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise HessgapError(f"{name} must be a finite number, got {value!r}{_hint(hint)}")
    return float(value)


def in_unit_interval(value, name: str, *, closed_low: bool = True, closed_high: bool = False) -> float:
    """``value`` as a float in [0, 1) by default (the ends as asked)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= 0 if closed_low else value > 0) and (value <= 1 if closed_high else value < 1)
    if not ok:
        interval = ("[" if closed_low else "(") + "0, 1" + ("]" if closed_high else ")")
        raise HessgapError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def seed(value, name: str = "seed") -> int:
    """A random seed: an integer in [0, 2⁶³) (what torch's generators take)."""
    if not is_int(value) or value < 0:
        raise HessgapError(f"{name} must be an integer ≥ 0, got {value!r}")
    if value >= 2**63:
        raise HessgapError(f"{name} must be below 2**63 (the largest seed torch's generators take), got {value!r}")
    return value


def flag(value, name: str) -> bool:
    """``value`` when it is True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise HessgapError(f"{name} must be True or False, got {value!r}")
    return value


def choice(value, choices: Iterable[str], name: str) -> str:
    """``value`` when it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise HessgapError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")
    return value
