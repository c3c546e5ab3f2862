"""hessgap._checks: every value check accepts what it should and names the argument when it refuses."""

import math

import pytest

from hessgap import _checks
from hessgap.errors import HessgapError


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3", None])
def test_positive_int_refuses(bad):
    with pytest.raises(HessgapError, match="max_iter must be a positive integer"):
        _checks.positive_int(bad, "max_iter")


def test_positive_int_accepts_and_allows_none_when_asked():
    assert _checks.positive_int(3, "k") == 3
    assert _checks.positive_int(None, "k", allow_none=True) is None
    assert _checks.nonnegative_int(0, "k") == 0
    with pytest.raises(HessgapError, match="k must be an integer ≥ 0, got -1; a hint"):
        _checks.nonnegative_int(-1, "k", "a hint")


@pytest.mark.parametrize("bad", [0, -1e-3, math.nan, math.inf, "1", True])
def test_positive_number_refuses(bad):
    with pytest.raises(HessgapError, match="epsilon must be a finite number > 0"):
        _checks.positive_number(bad, "epsilon")


def test_numbers_intervals_seeds_and_choices():
    assert _checks.positive_number(2, "x") == 2.0
    assert _checks.nonnegative_number(0, "x") == 0.0
    assert _checks.in_unit_interval(0.0, "m") == 0.0
    with pytest.raises(HessgapError, match=r"m must be in \[0, 1\)"):
        _checks.in_unit_interval(1.0, "m")
    assert _checks.in_unit_interval(1.0, "q", closed_high=True) == 1.0
    assert _checks.seed(7) == 7
    with pytest.raises(HessgapError, match="seed must be below 2\\*\\*63"):
        _checks.seed(2**64)
    for bad in ("a", 1.5, -1, True):
        with pytest.raises(HessgapError, match="seed must be an integer"):
            _checks.seed(bad)
    assert _checks.choice("lbfgsb", ("auto", "lbfgsb"), "solver") == "lbfgsb"
    with pytest.raises(HessgapError, match="unknown solver 'x'; choose one of auto, lbfgsb"):
        _checks.choice("x", ("auto", "lbfgsb"), "solver")
