"""Function-preserving rescalings: found in layer stacks, exact on the outputs in eval and train mode, never
applied to the user's model, refused where module order is not the data flow."""

import pytest
import torch
from torch import nn

from hessgap.measures.rescale import NoSymmetry, find_symmetries, rescaled_copy

from measure_models import batchnorm_net, classification_data, relu_net
from oracles import assert_unchanged, snapshot


def test_symmetries_of_an_f1_like_stack():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    assert find_symmetries(model) == {"relu": [("2", "5"), ("6", "8")], "batchnorm": [("1", "2"), ("5", "6")],
                                      "attention": []}


@pytest.mark.parametrize("make", [relu_net, batchnorm_net])
def test_rescaled_copy_computes_the_same_function_in_both_modes(make):
    model, data = make(), classification_data()
    snap = snapshot(model)
    twin, description, change = rescaled_copy(model, data)
    assert_unchanged(model, snap)
    assert change < 1e-12
    x = torch.cat([b[0] for b in data])
    for mode in (False, True):
        model.train(mode)
        twin.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), model(x), rtol=1e-10, atol=1e-10)
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters())]
    assert sum(moved) >= 3 and description


def test_a_model_without_relu_or_batchnorm_has_no_symmetry():
    with pytest.raises(NoSymmetry, match="no ReLU between two layers"):
        rescaled_copy(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double(), classification_data())


def test_a_model_whose_module_order_is_not_its_data_flow_is_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.act(self.a(x)) + x)  # the skip adds the unscaled input

    with pytest.raises(NoSymmetry, match="not its data flow"):
        rescaled_copy(Residual().double(), classification_data())


@pytest.mark.parametrize("factor", [1.0, 1.5, 0.6, 0.0, -3.0, float("nan"), float("inf"), True, "3"])
def test_factors_that_make_the_check_vacuous_or_meaningless_are_refused(factor):
    """relu_factor=1.0 rescaled nothing, so every measure (Keskar's included) was reported invariant."""
    from hessgap.errors import HessgapError

    with pytest.raises(HessgapError, match="relu_factor"):
        rescaled_copy(relu_net(), classification_data(), relu_factor=factor)


@pytest.mark.parametrize("factor", [2.0, 0.5, 3.0, 0.25, 100.0])
def test_factors_at_least_two_from_one_are_taken(factor):
    twin, _, change = rescaled_copy(relu_net(), classification_data(), relu_factor=factor, batchnorm_factor=factor)
    assert change < 1e-12


def test_a_copy_that_equals_the_model_is_no_check():
    """A model whose rescaled layers are all zero: the copy is the model itself, against which every measure
    would look invariant."""
    model = relu_net()
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            layer.weight.zero_()
            layer.bias.zero_()
    with pytest.raises(NoSymmetry, match="differ from the model's by 0 of their size"):
        rescaled_copy(model, classification_data())


def test_the_rtol_must_be_below_what_the_factors_move():
    from hessgap.errors import HessgapError
    from hessgap.measures.rescale import check_rtol

    assert check_rtol(0.05, (3.0, 0.25)) == 0.05
    with pytest.raises(HessgapError, match="invariance_rtol=0.5 is too large"):
        check_rtol(0.5, (2.0, 0.25))  # a quantity ∝ the factor 2 moves by exactly 0.5
    with pytest.raises(HessgapError, match="invariance_rtol"):
        check_rtol(0.0, (3.0, 0.25))
