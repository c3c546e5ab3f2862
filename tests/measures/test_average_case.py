"""Average-case sharpness against closed forms on a quadratic and brute-force Monte Carlo on a network."""

import math

import pytest
import torch
from torch import nn

import hessgap
from hessgap.measures.average_case import SALT_STRIDE

from measure_models import classification_data, relu_net
from oracles import ONE_BATCH, Separable, identity_loss


def _gaussian(model, data, name, **options):
    return hessgap.measures(model, data, [name], loss_fn=identity_loss if data is ONE_BATCH else None,
                            options={name: options}, check_invariance=False)


@pytest.mark.parametrize("adaptive", [False, True])
def test_quadratic_closed_form(adaptive):
    # a minimum at x (b = −2ax): f(x + δ) − f(x) = Σ a_i δ_i², of mean ρ² Σ a_i c_i², c = 1 (plain) or |x| (adaptive)
    x, a = torch.tensor([0.5, -2.0, 1.0]), torch.tensor([1.0, 3.0, 0.5])
    model = Separable(x, a, -2 * a * x)
    name, rho = ("gaussian_adaptive", 0.2) if adaptive else ("gaussian", 0.1)
    result = _gaussian(model, ONE_BATCH, name, rho=rho, samples=4000)
    c2 = x.double() ** 2 if adaptive else torch.ones(3, dtype=torch.float64)
    expected = rho**2 * float((a.double() * c2).sum())
    assert abs(result.values[name] - expected) < 4 * result.stderr[name]
    assert result.stderr[name] < 0.05 * expected


def test_network_against_brute_force_monte_carlo():
    torch.manual_seed(0)
    model, data = relu_net(), classification_data()
    result = _gaussian(model, data, "gaussian_adaptive", rho=0.05, samples=8)
    # the same draws, made again: draw i from its own generator (seed 0, salt 2 for adaptive, index i), one
    # N(0, I) tensor per parameter
    params = list(model.parameters())
    draws = []
    for i in range(8):
        generator = torch.Generator().manual_seed(2 * SALT_STRIDE + i)
        draws.append([torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params])
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        base = float(nn.functional.cross_entropy(model(x), y))
        rises = []
        for z in draws:
            twin = relu_net()
            for p, q, zi in zip(twin.parameters(), params, z):
                p.copy_(q + 0.05 * q.abs() * zi)
            rises.append(float(nn.functional.cross_entropy(twin(x), y)) - base)
    mean = sum(rises) / 8
    std = math.sqrt(sum((r - mean) ** 2 for r in rises) / 7)
    assert result.values["gaussian_adaptive"] == pytest.approx(mean, rel=1e-9)
    assert result.stderr["gaussian_adaptive"] == pytest.approx(std / math.sqrt(8), rel=1e-9)
