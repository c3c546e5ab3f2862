"""LossOverData: the mean loss over a loader, its gradient, and the checks on bad data."""

import pytest
import torch
from torch import nn

from hessgap import HessgapError, NonFiniteError
from hessgap.curvature.objective import LossOverData

from oracles import batchnorm_dropout_mlp, unequal_batches


def test_value_is_the_sample_mean_over_unequal_batches():
    model = batchnorm_dropout_mlp().eval()
    batches, x, y = unequal_batches()
    expected = nn.functional.cross_entropy(model(x), y).item()
    assert LossOverData(model, batches).value() == pytest.approx(expected, rel=1e-6)


def test_gradient_matches_autograd_on_all_data_in_float64():
    model = batchnorm_dropout_mlp().double().eval()
    batches, x, y = unequal_batches()
    value, grads = LossOverData(model, batches).value_and_grad()
    loss = nn.functional.cross_entropy(model(x.double()), y)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    assert value == pytest.approx(loss.item(), rel=1e-12)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_single_batch_and_max_batches():
    model = batchnorm_dropout_mlp().eval()
    batches, x, y = unequal_batches()
    single = LossOverData(model, (x, y)).value()
    first_two = LossOverData(model, batches, max_batches=2).value()
    assert single == pytest.approx(nn.functional.cross_entropy(model(x), y).item(), rel=1e-6)
    assert first_two == pytest.approx(nn.functional.cross_entropy(model(x[:16]), y[:16]).item(), rel=1e-6)


def test_cached_batches_give_the_same_value():
    model = batchnorm_dropout_mlp().eval()
    batches, _, _ = unequal_batches()
    objective = LossOverData(model, iter(batches)).cache_batches()
    assert objective.value() == objective.value()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: LossOverData(m, []).value(), "no batches"),
        (lambda m: LossOverData(m, [(torch.randn(3, 5), torch.zeros(2, dtype=torch.long))]).value(), "3 inputs but 2"),
        (lambda m: LossOverData(m, [torch.randn(3, 5)]).value(), r"\(inputs, targets\) pair"),
        (lambda m: LossOverData(m, [(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))],
                                loss_fn=nn.CrossEntropyLoss(reduction="none")).value(), "not a scalar"),
        (lambda m: LossOverData(m, [], max_batches=0), "max_batches"),
        (lambda m: LossOverData(m, 3), "iterable"),
    ],
)
def test_bad_data_is_named(make, message):
    with pytest.raises(HessgapError, match=message):
        make(batchnorm_dropout_mlp().eval())


def test_no_trainable_parameters_and_mixed_dtypes():
    frozen = batchnorm_dropout_mlp().requires_grad_(False)
    with pytest.raises(HessgapError, match="no trainable parameters"):
        LossOverData(frozen, [])
    mixed = batchnorm_dropout_mlp()
    mixed[0].double()
    with pytest.raises(HessgapError, match="several dtypes"):
        LossOverData(mixed, [])


def test_non_finite_loss_is_an_error():
    model = batchnorm_dropout_mlp().eval()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    batches, _, _ = unequal_batches()
    with pytest.raises(NonFiniteError, match="nan"):
        LossOverData(model, batches).value()


def test_non_finite_gradient_is_an_error():
    # sqrt at 0: a finite loss (0) whose gradient is not finite; the check must look at the gradient itself
    model = nn.Sequential(nn.Linear(2, 2)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    batch = (torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))
    objective = LossOverData(model, batch, loss_fn=lambda out, target: (out - target).abs().sqrt().mean())
    assert objective.value() == 0.0
    with pytest.raises(NonFiniteError, match="gradient"):
        objective.value_and_grad()


@pytest.mark.parametrize("max_batches", [0, -1, 1.5, True, "2"])
def test_max_batches_must_be_a_positive_integer(max_batches):
    with pytest.raises(HessgapError, match="max_batches must be a positive number of batches"):
        LossOverData(batchnorm_dropout_mlp(), [], max_batches=max_batches)
