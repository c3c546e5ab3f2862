"""PAC-Bayes σ search against a manual bisection (Jiang et al.'s on [0, 2]) on a quadratic with its draws
made again, and the accuracy deviation it reaches on a classifier."""

import pytest
import torch

import hessgap
from hessgap.measures.average_case import SALT_STRIDE
from hessgap.measures.pacbayes import MAGNITUDE_EPS, search_sigma

from measure_models import classification_data, fit, relu_net
from oracles import ONE_BATCH, Separable, identity_loss


def _bisect(deviation, target=0.1, tolerance=1e-2, depth=15):
    low, high = 0.0, 2.0
    for _ in range(depth):
        sigma = (low + high) / 2
        d = deviation(sigma)
        if abs(d - target) < tolerance:
            return sigma
        low, high = (low, sigma) if d > target else (sigma, high)
    return sigma


def test_search_on_a_known_curve():
    sigma, trail = search_sigma(lambda s: s**2)
    assert abs(sigma**2 - 0.1) < 1e-2 and sigma == pytest.approx(_bisect(lambda s: s**2))
    assert len(trail) <= 15


@pytest.mark.parametrize("magnitude", [False, True])
def test_loss_deviation_on_a_quadratic_matches_a_manual_bisection(magnitude):
    x, a = torch.tensor([0.5, -2.0, 1.0]), torch.tensor([1.0, 3.0, 0.5])
    model = Separable(x, a, -2 * a * x)  # a minimum at x: f(x + u) − f(x) = Σ a_i u_i²
    name = "pacbayes_mag_flatness" if magnitude else "pacbayes_flatness"
    result = hessgap.measures(model, ONE_BATCH, [name], loss_fn=identity_loss, check_invariance=False,
                              options={name: {"deviation": "loss", "samples": 5}})
    salt = 4 if magnitude else 3  # the measure's draws: seed 0, its salt, draw i from its own generator
    draws = [torch.randn(3, generator=torch.Generator().manual_seed(salt * SALT_STRIDE + i), dtype=torch.float64)
             for i in range(5)]
    x64, a64 = x.double(), a.double()

    def deviation(sigma):
        std = torch.sqrt(sigma**2 * x64**2 + MAGNITUDE_EPS**2) if magnitude else torch.full_like(x64, sigma)
        return sum(float((a64 * (std * z) ** 2).sum()) for z in draws) / 5

    sigma = _bisect(deviation)
    assert result.details[name]["sigma"] == pytest.approx(sigma, rel=1e-12)
    assert result.values[name] == pytest.approx(1 / sigma**2, rel=1e-12)


def test_accuracy_deviation_reaches_the_target_on_a_classifier():
    data = classification_data()
    model = fit(relu_net(), data)
    result = hessgap.measures(model, data, ["pacbayes_flatness", "pacbayes_mag_flatness"], check_invariance=False,
                              options={"pacbayes_flatness": {"samples": 4}, "pacbayes_mag_flatness": {"samples": 4}})
    for name in ("pacbayes_flatness", "pacbayes_mag_flatness"):
        details = result.details[name]
        assert details["statistic"] == "accuracy" and details["base"] > 0.8
        assert abs(details["deviation"] - 0.1) < 1e-2 or details["halvings"] == 15
        assert result.values[name] == pytest.approx(1 / details["sigma"] ** 2)
