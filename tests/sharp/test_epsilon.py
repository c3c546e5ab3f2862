"""The sizes ε a sharpness box can take (hessgap.sharp.epsilon): every ε from far below the dtype's resolution
to far beyond the float range gets a value or an error that names ε as the cause and the usable range, in
float32 and float64; the range's upper end against a scan of the loss at the box's corner."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessgap
from hessgap.errors import HessgapError, NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")

TOO_SMALL, BOX_OVERFLOWS, TOO_LARGE = "is below what", "makes the box overflow", "is too large for this model"
BLAMES_THE_WEIGHTS = "check the model's parameters"


def _mlp(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)
    return model, [(torch.randn(16, 3), torch.randint(0, 2, (16,)))]


def _bound(message: str) -> float:
    return float(re.search(r"every box with ε ≥ (\S+) holds", message).group(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epsilon", [1e-50, 1e-30, 1e-10, 1e-3, 1e10, 1e20, 1e30, 1e38, 1e40, 1e100, 1e101, 1e110,
                                     1e200, 1e300])
def test_every_epsilon_gets_a_value_or_names_itself_as_the_cause(dtype, epsilon):
    """Was: 'the loss over the data is nan; check the model's parameters and inputs' for ε = 1e12 ... 1e38 in
    float32 and ε ≥ 1e102 in float64, between the checks of ε = 1e-50 and 1e300."""
    model, data = _mlp(dtype)
    try:
        result = hessgap.sharpness(model, data, epsilon=epsilon, solver="box-ascent")
    except HessgapError as exc:
        message = str(exc)
        assert BLAMES_THE_WEIGHTS not in message
        assert any(words in message for words in (TOO_SMALL, BOX_OVERFLOWS, TOO_LARGE)), message
        assert f"epsilon={epsilon:g}" in message
        if TOO_LARGE in message:
            assert isinstance(exc, NonFiniteError) and str(dtype) in message
            assert f"Usable here, at most: {torch.finfo(dtype).eps:g} ≤ ε < " in message
            assert _bound(message) <= epsilon
        return
    assert math.isfinite(result.value) and result.value >= 0


def _corner_overflow(model, data, scales) -> float:
    """The first ε of ``scales`` whose box corner sign(∇f) · ε(|x| + 1) gives a non-finite loss, from the model's
    own forward and cross_entropy (not hessgap's objective)."""
    (x, y), = data
    x = x.to(next(model.parameters()).dtype)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    centre = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for epsilon in scales:
            for p, c, g in zip(model.parameters(), centre, grads):
                p.copy_(c + torch.where(g >= 0, 1.0, -1.0).to(c.dtype) * epsilon * (c.abs() + 1))
            if not math.isfinite(float(F.cross_entropy(model(x), y))):
                break
        for p, c in zip(model.parameters(), centre):
            p.copy_(c)
    return epsilon


@pytest.mark.parametrize("dtype,epsilon,decades", [(torch.float32, 1e30, range(0, 400)),
                                                   (torch.float64, 1e300, range(0, 3080))])
def test_the_usable_range_ends_where_the_loss_at_the_box_corner_overflows(dtype, epsilon, decades):
    model, data = _mlp(dtype)
    with pytest.raises(NonFiniteError, match=TOO_LARGE) as error:
        hessgap.sharpness(model, data, epsilon=epsilon, solver="box-ascent")
    bound = _bound(str(error.value))
    reference = _corner_overflow(model, data, [10 ** (k / 10) for k in decades])  # every 0.1 decade
    assert reference / 2.5 <= bound <= reference * 2.5  # the bisection stops within a factor 2
    with pytest.raises(NonFiniteError, match=TOO_LARGE):  # the range holds: a box beyond it overflows
        hessgap.sharpness(model, data, epsilon=2 * bound, solver="box-ascent")
    assert math.isfinite(hessgap.sharpness(model, data, epsilon=bound / 100, solver="box-ascent").value)


@pytest.mark.parametrize("call", [
    lambda model, data: hessgap.sharpness(model, data, epsilon=1e30, solver="lbfgsb"),
    lambda model, data: hessgap.sharpness(model, data, epsilon=1e30, subspace_dim=4),
    lambda model, data: hessgap.adaptive_sharpness(model, data, rho=1e30),
    lambda model, data: hessgap.adaptive_sharpness(model, data, rho=1e30, norm="l2"),
])
def test_every_solver_and_space_names_a_box_too_large(call):
    model, data = _mlp(torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError, match=f"(epsilon|rho)=1e\\+30 {TOO_LARGE} in torch.float32: the loss is finite "
                                             "at x .* Usable here, at most"):
        call(model, data)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the bisection's moves undone


def test_a_loss_that_is_not_finite_at_x_still_blames_the_inputs():
    model, data = _mlp(torch.float32)
    (x, y), = data
    x = x.clone()
    x[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="the loss over the data is nan; check the model's parameters and inputs"):
        hessgap.sharpness(model, [(x, y)], epsilon=1e-3)


def test_the_box_overflow_names_the_largest_finite_box():
    model, data = _mlp(torch.float32)
    largest = max(float(p.detach().abs().max()) for p in model.parameters())
    expected = f"are for ε ≤ {torch.finfo(torch.float32).max / (largest + 1):.3g}, and the loss may overflow well below"
    with pytest.raises(HessgapError, match=re.escape(expected)):
        hessgap.sharpness(model, data, epsilon=1e300)


class _AtTheEdge(nn.Module):
    """Finite at its weights, overflowing after any move of ``a`` away from 0, however small."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.a = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.linear(x) * torch.exp((self.a * 1e30) ** 2)


def test_a_model_at_the_edge_of_overflow_is_named_as_such():
    """A loss that overflows in every box around x, however small, is the model's problem, not ε's."""
    model, (batch,) = _AtTheEdge(), _mlp(torch.float32)[1]
    with pytest.raises(NonFiniteError, match="epsilon=0.001: the loss is finite at x .* it is not finite even at the "
                                             "matching point of the box of ε = 1.19209e-07, so the model is at the "
                                             "edge of overflow at x: check its weights and inputs"):
        hessgap.sharpness(model, [batch], epsilon=1e-3, solver="box-ascent")
