"""Critical sharpness against its closed form on quadratics (float64), with the update each optimizer's own
formula gives; the optimizer and the model untouched."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from hessgap import HessgapError, critical_sharpness

pytestmark = pytest.mark.usefixtures("one_thread")

N = 12


class Quadratic(nn.Module):
    """f(θ) = ½ θᵀAθ − bᵀθ, with (A, b) given as the batch: different data, a different quadratic."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, A, b):
        return 0.5 * self.theta @ A @ self.theta - b @ self.theta


def quadratic_loss(model, batch):
    return model(*batch)


def spectrum_matrix(values, seed):
    generator = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=generator, dtype=torch.float64))
    return (Q * torch.tensor(values, dtype=torch.float64)) @ Q.T, Q


def problem(seed=0, values=None):
    values = values if values is not None else list(np.linspace(0.5, 10.0, N))
    A, Q = spectrum_matrix(values, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    b = torch.randn(N, generator=generator, dtype=torch.float64)
    theta = torch.randn(N, generator=generator, dtype=torch.float64)
    return A, Q, b, theta


def measure(model, A, b, optimizer=None, **kwargs):
    return critical_sharpness(model, [(A, b)], optimizer, compute_loss=quadratic_loss, tol=1e-7, **kwargs)


def test_gradient_descent_gives_the_rayleigh_quotient_along_the_gradient():
    A, _, b, theta = problem(seed=1)
    model = Quadratic(theta).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    result = measure(model, A, b, optimizer)
    g = A @ theta - b
    expected = float(g @ A @ g / (g @ g))
    assert result.value == pytest.approx(expected, rel=1e-6)
    assert result.critical_lr == pytest.approx(2 / expected, rel=1e-6)
    assert result.step_fraction == pytest.approx(0.05 * expected / 2, rel=1e-6)
    assert result.slope == pytest.approx(float(g @ g), rel=1e-12)
    assert result.value < 10.0  # below λmax: the gradient is not aligned with the top eigenvector
    assert result.loss == pytest.approx(float(0.5 * theta @ A @ theta - b @ theta), rel=1e-12)


def test_equals_lambda_max_when_the_gradient_lies_along_the_top_eigenvector():
    values = list(np.linspace(0.5, 10.0, N))
    A, Q, b, _ = problem(seed=2, values=values)
    top = Q[:, -1]  # eigenvalue 10
    theta = torch.linalg.solve(A, b) + 0.3 * top  # the gradient A·θ − b = 3·top
    model = Quadratic(theta).double()
    result = measure(model, A, b, torch.optim.SGD(model.parameters(), lr=0.1))
    assert result.value == pytest.approx(max(values), rel=1e-6)
    assert result.step_fraction == pytest.approx(0.1 * 10.0 / 2, rel=1e-6)


def test_adam_searches_along_its_own_preconditioned_update():
    A, _, b, theta = problem(seed=3)
    model = Quadratic(theta).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    for _ in range(4):  # non-trivial moments
        optimizer.zero_grad()
        model(A, b).backward()
        optimizer.step()
    state = optimizer.state[model.theta]
    t = float(state["step"]) + 1
    g = A @ model.theta.detach() - b
    m = 0.8 * state["exp_avg"] + 0.2 * g
    v = 0.95 * state["exp_avg_sq"] + 0.05 * g * g
    delta = (m / (1 - 0.8**t)) / ((v / (1 - 0.95**t)).sqrt() + 1e-6)  # Adam's step per unit learning rate
    expected = float(delta @ A @ delta / (g @ delta))
    result = measure(model, A, b, optimizer)
    assert result.value == pytest.approx(expected, rel=1e-6)


def test_momentum_sgd_uses_its_buffer():
    A, _, b, theta = problem(seed=4)
    model = Quadratic(theta).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(A, b).backward()
        optimizer.step()
    buffer = optimizer.state[model.theta]["momentum_buffer"]
    x = model.theta.detach()
    g = A @ x - b
    delta = 0.9 * buffer + (g + 0.01 * x)
    expected = float(delta @ A @ delta / (g @ delta))
    assert measure(model, A, b, optimizer).value == pytest.approx(expected, rel=1e-6)


def test_the_model_the_optimizer_its_state_and_its_scheduler_are_untouched():
    A, _, b, theta = problem(seed=5)
    model = Quadratic(theta).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(A, b).backward()
        optimizer.step()
        scheduler.step()
    grad = model.theta.grad.clone()
    weights = model.theta.detach().clone()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[model.theta].items()}
    groups = [dict(g, params=None) for g in optimizer.param_groups]
    step_wrapper = optimizer.step
    assert getattr(step_wrapper, "_wrapped_by_lr_sched", False)
    optimizer._opt_called = False  # the scheduler's wrapper sets it when the real step runs
    measure(model, A, b, optimizer)
    assert torch.equal(model.theta.detach(), weights) and torch.equal(model.theta.grad, grad)
    for key, value in optimizer.state[model.theta].items():
        assert torch.equal(value, state[key]) if isinstance(value, torch.Tensor) else value == state[key]
    assert [dict(g, params=None) for g in optimizer.param_groups] == groups
    assert optimizer.step is step_wrapper and optimizer._opt_called is False
    scheduler.step()  # still drives the optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)


def test_relative_critical_sharpness_searches_the_second_loss_along_the_first_update():
    A, _, b, theta = problem(seed=6)
    B, _, c, _ = problem(seed=7, values=list(np.linspace(1.0, 30.0, N)))
    model = Quadratic(theta).double()
    result = measure(model, A, b, torch.optim.SGD(model.parameters(), lr=0.01), line_data=[(B, c)])
    g1, g2 = A @ theta - b, B @ theta - c
    assert g2 @ g1 > 0  # the first loss's step also descends the second: a finite critical rate exists
    expected = float(g1 @ B @ g1 / (g2 @ g1))
    assert result.relative and result.slope is None
    assert result.value == pytest.approx(expected, rel=1e-6)
    assert result.loss == pytest.approx(float(0.5 * theta @ B @ theta - c @ theta), rel=1e-12)


def test_a_given_direction_and_the_cases_without_a_critical_rate():
    A, Q, b, theta = problem(seed=8)
    model = Quadratic(theta).double()
    g = A @ theta - b
    given = measure(model, A, b, direction=g, lr=0.03)
    assert given.value == pytest.approx(float(g @ A @ g / (g @ g)), rel=1e-6)
    assert given.step_fraction == pytest.approx(0.03 * given.value / 2, rel=1e-6)
    uphill = measure(model, A, b, direction=-g)
    assert uphill.value is None and uphill.critical_lr is None and "not a descent direction" in uphill.note
    # negative curvature along the direction: the loss never turns up
    concave = -A
    theta_c = Quadratic(theta).double()
    flat = measure(theta_c, concave, b, direction=concave @ theta - b)  # the gradient: descent, but concave
    assert flat.value is None and "does not rise" in flat.note


def test_the_bracket_grows_from_a_bad_first_guess_and_counts_its_passes():
    A, _, b, theta = problem(seed=9)
    model = Quadratic(theta).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    g = A @ theta - b
    expected = float(g @ A @ g / (g @ g))
    for initial in (1e-6, 1e3, 2 / expected * 1.01):
        result = critical_sharpness(model, [(A, b)], optimizer, compute_loss=quadratic_loss, initial=initial,
                                    expand=1.25, tol=0.02)
        assert result.value == pytest.approx(expected, rel=0.02)
        assert result.bracket[1] <= result.bracket[0] * 1.02
    near = critical_sharpness(model, [(A, b)], optimizer, compute_loss=quadratic_loss, initial=2 / expected * 1.01,
                              expand=1.25, tol=0.02)
    assert near.forward_passes <= 7  # a warm guess: 2 probes bracket, 4 or 5 bisect


def test_a_real_network_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    result = critical_sharpness(model, [(x, y)], optimizer, tol=1e-3)
    assert result.value is not None and math.isfinite(result.value) and result.value > 0
    eta = result.critical_lr
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        base = loss(model(x), y)
    grads = torch.autograd.grad(loss(model(x), y), list(model.parameters()))

    def along(scale):
        moved = [p.detach() - scale * g for p, g in zip(model.parameters(), grads)]
        return loss(torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], moved)),
                                               (x,)), y)

    assert along(eta * 0.99) <= base < along(eta * 1.01)  # the loss turns up at ηc, to the tolerance


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of them"),
        ({"optimizer": "sgd", "direction": torch.zeros(N)}, "exactly one of them"),
        ({"direction": torch.zeros(N + 1)}, r"direction has shape \(13,\)"),
        ({"direction": [torch.zeros(N), torch.zeros(N)]}, "a list of 1 tensors"),
        ({"direction": torch.zeros(N), "expand": 1.0}, "expand must be > 1"),
        ({"direction": torch.zeros(N), "tol": 0}, "tol must be a finite number > 0"),
        ({"optimizer": object()}, "must be a torch.optim.Optimizer"),
        ({"direction": torch.full((N,), math.nan)}, "NaN or inf"),
    ],
)
def test_bad_arguments(kwargs, message):
    A, _, b, theta = problem()
    model = Quadratic(theta).double()
    if kwargs.get("optimizer") == "sgd":
        kwargs["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(HessgapError, match=message):
        critical_sharpness(model, [(A, b)], compute_loss=quadratic_loss, **kwargs)


def test_lr_goes_with_a_direction_only():
    A, _, b, theta = problem()
    model = Quadratic(theta).double()
    with pytest.raises(HessgapError, match="lr= goes with direction="):
        critical_sharpness(model, [(A, b)], torch.optim.SGD(model.parameters(), lr=0.1), lr=0.2,
                           compute_loss=quadratic_loss)


def test_a_learning_rate_decayed_to_zero_still_has_a_critical_one():
    A, _, b, theta = problem(seed=10)
    model = Quadratic(theta).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    result = measure(model, A, b, optimizer)
    g = A @ theta - b
    assert result.value == pytest.approx(float(g @ A @ g / (g @ g)), rel=1e-6)
    assert result.lr == 0.0 and result.step_fraction == 0.0
