"""Worst-case measures: the same numbers as hessgap.sharpness, and m-sharpness as the mean over its batches."""

import pytest

import hessgap
from hessgap.measures.worst_case import pair_samples, split_samples

from measure_models import classification_data, fit, relu_net


@pytest.fixture(scope="module")
def trained():
    data = classification_data()
    return fit(relu_net(), data), data


def test_keskar_and_adaptive_are_hessgap_sharpness(trained):
    model, data = trained
    result = hessgap.measures(model, data, ["keskar", "adaptive_linf", "adaptive_l2"], check_invariance=False)
    assert result.values["keskar"] == pytest.approx(hessgap.sharpness(model, data, epsilon=1e-3).value, rel=1e-9)
    assert result.values["adaptive_l2"] == pytest.approx(
        hessgap.adaptive_sharpness(model, data, rho=0.1, norm="l2").value, rel=1e-9)
    assert result.settings["adaptive_linf"] == {"rho": 2e-3, "solver": "auto", "max_iter": 10}


def test_m_sharpness_is_the_mean_over_disjoint_batches(trained):
    model, data = trained
    result = hessgap.measures(model, data, ["m_sharpness"], check_invariance=False,
                              options={"m_sharpness": {"m": 12, "batches": 3}})
    pairs = split_samples(pair_samples(data), 12, 3, seed=0)
    assert len(pairs) == 3 and all(x.shape[0] == 12 for x, _ in pairs)
    indices = [tuple(x[:, 0].tolist()) for x, _ in pairs]
    assert len(set(sum(indices, ()))) == 36  # disjoint
    expected = [hessgap.adaptive_sharpness(model, pair, rho=2e-3).value for pair in pairs]
    assert result.values["m_sharpness"] == pytest.approx(sum(expected) / 3, rel=1e-9)
    assert result.details["m_sharpness"]["per_batch"] == pytest.approx(expected, rel=1e-9)


def test_m_larger_than_the_data_is_not_applicable(trained):
    model, data = trained
    result = hessgap.measures(model, data, ["m_sharpness"], check_invariance=False,
                              options={"m_sharpness": {"m": 1000}})
    assert result.values["m_sharpness"] is None
    assert "fewer than m = 1000" in result.not_applicable["m_sharpness"]
