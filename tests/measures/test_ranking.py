"""Kendall's τ against scipy and the granulated τ on a hand-worked zoo."""

import random

import pytest
from scipy.stats import kendalltau

from hessgap.measures.ranking import granulated_tau, kendall_tau


@pytest.mark.parametrize("seed", range(6))
def test_kendall_tau_matches_scipy_with_ties(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 30)
    x = [rng.randint(0, 5) for _ in range(n)]  # many ties
    y = [rng.random() if seed % 2 else rng.randint(0, 3) for _ in range(n)]
    expected = kendalltau(x, y).statistic
    if expected != expected:  # scipy's NaN: a constant side
        assert kendall_tau(x, y) is None
    else:
        assert kendall_tau(x, y) == pytest.approx(expected, abs=1e-12)


def test_kendall_tau_edge_cases():
    assert kendall_tau([1.0], [2.0]) is None
    assert kendall_tau([1, 1, 1], [1, 2, 3]) is None
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1
    assert kendall_tau([1, None, 3, float("nan")], [1, 5, 2, 0]) == 1  # missing values are left out


def test_granulated_tau_by_hand():
    rows = []
    for b in (1, 2):
        for lr in (1, 2, 3):
            # the measure follows the gap along the batch axis, and against it along the learning rate
            rows.append({"batch_size": b, "lr": lr, "width": 1, "seed": 0, "value": b - 0.1 * lr, "gap": b + lr})
    out = granulated_tau(rows, ("batch_size", "lr", "width"), "value", "gap", fixed=("seed",))
    assert out["psi"] == {"batch_size": 1.0, "lr": -1.0, "width": None}
    assert out["groups"] == {"batch_size": 3, "lr": 2, "width": 0}
    assert out["value"] == 0.0
