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
    assert find_symmetries(model) == {"relu": [("2", "5"), ("6", "8")], "batchnorm": [("1", "2"), ("5", "6")]}


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
