"""Kendall's τ against scipy and the granulated τ on a hand-worked zoo."""

import random

import pytest
from scipy.stats import kendalltau

from hessgap.measures.ranking import granulated_tau, kendall_tau, sign_error


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


def test_sign_error_by_hand():
    """Pairs that differ in one hyperparameter only: along the batch axis the measure moves with the gap (error
    0), along the learning rate against it (1) or not at all (½); pairs of two seeds are never compared."""
    rows = []
    for seed in (0, 1):
        for b in (1, 2):
            for lr in (1, 2, 3):
                value = b - 0.1 * lr if lr < 3 else b - 0.1 * 2  # lr 2 → 3 leaves the measure unchanged
                rows.append({"batch_size": b, "lr": lr, "width": 1, "seed": seed, "value": value, "gap": b + lr})
    out = sign_error(rows, ("batch_size", "lr", "width"), "value", "gap", fixed=("seed",))
    # per seed: 3 batch pairs (error 0); lr pairs (1,2): 1, (1,3): 1, (2,3): ½, for each of 2 batch sizes
    assert out["pairs"] == {"batch_size": 6, "lr": 12, "width": 0}
    assert out["by_axis"] == {"batch_size": 0.0, "lr": pytest.approx(2.5 / 3), "width": None}
    assert out["value"] == pytest.approx((0 * 6 + 12 * 2.5 / 3) / 18)
    assert out["robust"] == pytest.approx(2.5 / 3)


def test_sign_error_without_pairs_or_values():
    rows = [{"a": 1, "b": 1, "value": 1.0, "gap": 1.0}, {"a": 2, "b": 2, "value": None, "gap": 2.0}]
    out = sign_error(rows, ("a", "b"), "value", "gap")
    assert out == {"value": None, "by_axis": {"a": None, "b": None}, "pairs": {"a": 0, "b": 0}, "robust": None}
