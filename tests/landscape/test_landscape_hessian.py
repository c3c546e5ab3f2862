"""Hessian directions against ``torch.linalg.eigh`` of the explicit Hessian of a tiny network."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from hessgap.landscape import landscape

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def explicit_hessian(model, data):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    count = sum(x.shape[0] for x, _ in data)

    def loss(flat):
        params = {n: piece.view(s) for n, piece, s in zip(names, torch.split(flat, sizes), shapes)}
        return sum(nn.functional.cross_entropy(functional_call(model, params, (x,)), y, reduction="sum")
                   for x, y in data) / count

    return torch.autograd.functional.hessian(loss, x0)


@pytest.fixture
def problem(ref):
    model = tiny()
    data = ref.batches((4,), samples=30, sizes=(12, 18), seed=3)
    values, vectors = torch.linalg.eigh(explicit_hessian(model, data))
    return model, data, values, vectors


def aligned(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(abs(a @ b) / (a.norm() * b.norm()))


def test_top_two_eigenvectors(problem, ref):
    model, data, values, vectors = problem
    result = landscape(model, data, directions="hessian", steps=3, span=0.5)
    assert result.kind == "hessian"
    np.testing.assert_allclose(result.eigenvalues, [values[-1], values[-2]], rtol=1e-6)
    assert aligned(result.directions[0], vectors[:, -1]) > 1 - 1e-8
    assert aligned(result.directions[1], vectors[:, -2]) > 1 - 1e-8
    torch.testing.assert_close(result.directions.norm(dim=1), torch.ones(2, dtype=torch.float64))
    loss, _ = ref.surface(model, data, result.directions, result.x, result.y)
    np.testing.assert_allclose(result.loss, loss, rtol=1e-10)
    # a fixed sign: the largest entry of each direction is positive
    for direction in result.directions:
        assert direction[direction.abs().argmax()] > 0


def test_most_negative_eigenvector(problem, ref):
    model, data, values, vectors = problem
    assert values[0] < 0  # the tiny network's minimum is not a minimum: there is a negative curvature
    line = landscape(model, data, directions="hessian-min", dims=1, steps=3, span=0.5)
    np.testing.assert_allclose(line.eigenvalues, [values[0]], rtol=1e-6)
    assert aligned(line.directions[0], vectors[:, 0]) > 1 - 1e-8
    plane = landscape(model, data, directions="hessian-min", steps=3, span=0.5)
    np.testing.assert_allclose(plane.eigenvalues, [values[-1], values[0]], rtol=1e-6)
    loss, _ = ref.surface(model, data, plane.directions, plane.x, plane.y)
    np.testing.assert_allclose(plane.loss, loss, rtol=1e-10)
