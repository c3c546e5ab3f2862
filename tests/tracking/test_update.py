"""The optimizer's next update, computed on a copy, equals the step the optimizer then really takes; SGD's
stability limit against simulated gradient descent on a quadratic."""

import copy

import pytest
import torch
from torch import nn

from hessgap import HessgapError
from hessgap.tracking.update import gd_stability_factor, learning_rate, next_update, unwrap_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "two-groups": lambda p: torch.optim.Adam([{"params": p[:2], "lr": 1e-2}, {"params": p[2:], "lr": 3e-2}]),
}


def network():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def gradients(model, seed):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 2, (16,), generator=generator)
    return torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_next_update_is_the_step_the_optimizer_then_takes(name):
    model = network()
    params = list(model.parameters())
    optimizer = OPTIMIZERS[name](params)
    for seed in range(3):  # a state to carry: moments, buffers, step counts
        for p, g in zip(params, gradients(model, seed)):
            p.grad = g
        optimizer.step()
    grads = gradients(model, 10)
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    update = next_update(optimizer, params, grads)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert str(optimizer.state_dict()) == str(state)
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    for p, b, u in zip(params, before, update):
        assert torch.equal(p.detach() - b, u)  # the very same arithmetic: bit for bit


def test_parameters_outside_the_optimizer_or_without_gradient_do_not_move():
    model = network()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params[:2], lr=0.1)
    grads = gradients(model, 1)
    update = next_update(optimizer, params, grads)
    assert update[0].abs().sum() > 0 and torch.equal(update[2], torch.zeros_like(params[2]))
    partial = next_update(optimizer, params[:1], grads[:1])
    assert partial[0].abs().sum() > 0


class Wrapper:
    """An optimizer wrapper like accelerate's AcceleratedOptimizer."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_wrappers_are_unwrapped_and_the_learning_rate_read():
    model = network()
    inner = torch.optim.SGD(model.parameters(), lr=0.25)
    assert unwrap_optimizer(Wrapper(Wrapper(inner))) is inner
    assert learning_rate(Wrapper(inner)) == 0.25
    with pytest.raises(HessgapError, match="torch.optim.Optimizer"):
        unwrap_optimizer(object())


def simulated_growth(optimizer_of, product):
    """|x| after 3000 steps of the optimizer on f = ½λx² with η·λ = ``product`` (η = 0.1), from x = 1."""
    x = nn.Parameter(torch.ones((), dtype=torch.float64))
    optimizer = optimizer_of([x])
    curvature = product / 0.1
    for _ in range(3000):
        optimizer.zero_grad()
        (0.5 * curvature * x * x).backward()
        optimizer.step()
    return float(x.detach().abs())


@pytest.mark.parametrize("settings", [{}, {"momentum": 0.9}, {"momentum": 0.5, "dampening": 0.3},
                                      {"momentum": 0.9, "nesterov": True}])
def test_the_stability_factor_separates_convergence_from_divergence(settings):
    make = lambda p: torch.optim.SGD(p, lr=0.1, **settings)  # noqa: E731
    limit = gd_stability_factor(make([nn.Parameter(torch.zeros(1))]))
    assert simulated_growth(make, 0.97 * limit) < 1e-3
    assert not simulated_growth(make, 1.03 * limit) < 1e3  # grown past 1e3, or overflowed to inf/nan


def test_the_stability_factor_is_for_sgd_only():
    with pytest.raises(HessgapError, match="critical_sharpness"):
        gd_stability_factor(torch.optim.Adam([nn.Parameter(torch.zeros(1))]))
    assert gd_stability_factor(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)) == 2.0


@pytest.mark.parametrize("name", ["adamw-amsgrad", "two-groups", "nesterov"])
def test_the_update_per_unit_learning_rate_is_the_real_one_divided_by_it(name):
    model = network()
    params = list(model.parameters())
    optimizer = OPTIMIZERS[name](params)
    for p, g in zip(params, gradients(model, 0)):
        p.grad = g
    optimizer.step()
    grads = gradients(model, 1)
    lr = optimizer.param_groups[0]["lr"]
    real = next_update(optimizer, params, grads)
    unit = next_update(optimizer, params, grads, unit_lr=True)
    for r, u in zip(real, unit):
        torch.testing.assert_close(u, r / lr, rtol=1e-5, atol=1e-7)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    assert all(float(u.abs().sum()) == 0 for u in next_update(optimizer, params, grads))
    decayed = next_update(optimizer, params, grads, unit_lr=True)
    assert all(float(u.abs().sum()) > 0 for u in decayed)
