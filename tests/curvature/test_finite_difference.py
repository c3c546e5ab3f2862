"""hvp(..., method="finite-difference") against the exact product, and the stochastic mode (resample=True)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hessgap
from hessgap.curvature.finite_difference import default_step
from hessgap.curvature.operator import HessianOperator
from hessgap.errors import HessgapError


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(dtype, batches=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 6, generator=g).to(dtype), torch.randint(0, 3, (5,), generator=g)) for _ in range(batches)]


@pytest.mark.parametrize("dtype, bound", [(torch.float64, 1e-8), (torch.float32, 3e-3)])
def test_finite_difference_product_is_close_to_the_exact_one(dtype, bound):
    model, data = _model(dtype), _data(dtype)
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(3, n, generator=torch.Generator().manual_seed(2)).to(dtype)
    exact = hessgap.hvp(model, data, V)
    approx = hessgap.hvp(model, data, V, method="finite-difference")
    relative = float((approx - exact).norm() / exact.norm())
    assert relative <= bound
    before = [p.detach().clone() for p in model.parameters()]
    hessgap.hvp(model, data, V, method="finite-difference")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # θ is put back bit-exactly


def test_finite_difference_operator_and_step_rule():
    model, data = _model(torch.float64), _data(torch.float64)
    exact = hessgap.eigenvalues(model, data, k=1, tol=1e-10).eigenvalues[0]
    approx = hessgap.eigenvalues(HessianOperator(model, data, method="finite-difference", cache_batches=True),
                                 k=1, tol=1e-8).eigenvalues[0]
    assert abs(approx - exact) <= 1e-6 * abs(exact)
    assert default_step(torch.float32, 3.0, 2.0) == pytest.approx(torch.finfo(torch.float32).eps ** (1 / 3) * 2.0)
    with pytest.raises(HessgapError, match="method"):
        hessgap.hvp(model, data, torch.zeros(1, 83, dtype=torch.float64), method="central")


def test_resample_takes_each_product_over_the_next_batch():
    model, data = _model(torch.float64), _data(torch.float64)
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(1, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    per_batch = [hessgap.hvp(model, [batch], v) for batch in data]
    operator = HessianOperator(model, data, resample=True)
    products = [operator.matmat(v) for _ in range(len(data) + 1)]
    for got, want in zip(products, per_batch + per_batch[:1]):  # a new epoch after the last batch
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(HessgapError, match="resample"):
        HessianOperator(model, data, resample=True, cache_batches=True)
    with pytest.raises(HessgapError, match="used up"):
        one_shot = HessianOperator(model, iter(data), resample=True)
        for _ in range(len(data) + 1):
            one_shot.matmat(v)
