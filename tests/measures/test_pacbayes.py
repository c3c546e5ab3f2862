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


def test_search_treats_a_deviation_that_is_not_finite_as_too_much_noise():
    """Was: a NaN deviation (the loss overflowed under large noise) compared below the target, so the
    bisection moved towards more noise and ended at σ ≈ 2 with deviation NaN."""
    sigma, trail = search_sigma(lambda s: s**2 if s < 0.6 else float("nan"))
    assert abs(sigma**2 - 0.1) < 1e-2 and sigma == pytest.approx(_bisect(lambda s: s**2))


class _NaNWherePositive(torch.nn.Module):
    """A classifier whose outputs are NaN for the samples whose first feature is positive."""

    def __init__(self):
        super().__init__()
        self.net = fit(relu_net(), classification_data())

    def forward(self, x):
        return self.net(x).masked_fill((x[:, :1] > 0), float("nan"))


def test_samples_whose_outputs_are_not_finite_count_as_misclassified():
    """Was: NaN outputs scored the share of class-0 targets (the argmax of NaN logits is class 0)."""
    from hessgap.measures.context import Context, accuracy

    data = classification_data()
    model = relu_net()
    with torch.no_grad():
        model[-1].bias[0] = float("nan")
    ctx = Context(model, data)
    assert accuracy(ctx, ctx.objective()) == 0.0
    model = _NaNWherePositive()  # some samples' outputs are NaN, the others classified
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    with torch.no_grad():
        expected = float(((model.net(x).argmax(1) == y) & (x[:, 0] <= 0)).double().mean())
    ctx = Context(model, data)
    assert 0 < expected and accuracy(ctx, ctx.objective()) == pytest.approx(expected, rel=1e-12)
