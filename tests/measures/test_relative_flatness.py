"""Which layer relative flatness is taken over: the model's last nn.Linear only when the outputs are its
outputs, any nn.Linear named by ``layer=``, and the value against the explicit float64 Hessian of that layer."""

import pytest
import torch
from torch import nn

import hessgap
from hessgap.errors import HessgapError

from measure_models import classification_data, fit
from oracles import explicit_hessian


def _kappa(model, data, layer: str) -> float:
    """Petzka et al.'s κ_Tr of the nn.Linear ``layer`` from the explicit Hessian of its weight."""
    W = dict(model.named_modules())[layer].weight.detach()
    d, m = W.shape
    block = explicit_hessian(model, data, params=[f"{layer}.weight"]).reshape(d, m, d, m)
    return float(((W @ W.T) * torch.einsum("sjtj->st", block)).sum())


def _flatness(model, data, **settings):
    return hessgap.measures(model, data, ["relative_flatness"], check_invariance=False,
                            options={"relative_flatness": {"probes": 2000, **settings}})


class HeadFirst(nn.Module):
    """The output layer registered before the body: module order is not the data flow."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(5, 3)
        self.body = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x))


def tanh_output_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.Tanh()).double()


@pytest.mark.parametrize("make, linear", [(tanh_output_net, "'0', '2'"), (lambda: HeadFirst().double(),
                                                                           "'head', 'body.0', 'body.2'")])
def test_a_model_whose_outputs_are_not_its_last_linears_is_refused(make, linear):
    """Both were measured silently over an inner layer: Sequential's '2' under the final Tanh, HeadFirst's
    'body.2' (the last nn.Linear in module order, not the output layer)."""
    data = classification_data()
    result = _flatness(fit(make(), data), data)
    assert result.values["relative_flatness"] is None
    reason = result.not_applicable["relative_flatness"]
    assert "outputs are not those of its last nn.Linear" in reason and "'layer'" in reason
    assert f"its nn.Linear layers: {linear}" in reason


@pytest.mark.parametrize("make, layer", [(tanh_output_net, "2"), (lambda: HeadFirst().double(), "head"),
                                         (tanh_output_net, "0")])
def test_a_named_layer_is_measured_against_the_explicit_hessian(make, layer):
    data = classification_data()
    model = fit(make(), data)
    result = _flatness(model, data, layer=layer)
    expected = _kappa(model, data, layer)
    assert abs(result.values["relative_flatness"] - expected) < 4 * result.stderr["relative_flatness"]
    assert result.stderr["relative_flatness"] < 0.1 * expected
    assert result.details["relative_flatness"]["layer"] == layer


def test_the_output_layer_is_found_through_layers_that_return_their_input():
    data = classification_data()
    torch.manual_seed(0)
    model = fit(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.Identity()).double(), data)
    result = _flatness(model, data)
    assert result.details["relative_flatness"]["layer"] == "2"
    assert abs(result.values["relative_flatness"] - _kappa(model, data, "2")) < 4 * result.stderr["relative_flatness"]


@pytest.mark.parametrize("layer, message", [("1", "is a ReLU, not an nn.Linear"), ("fc", "not a module name"),
                                            (3, "not a module name")])
def test_a_layer_that_is_not_a_linear_of_the_model_is_refused(layer, message):
    data = classification_data()
    with pytest.raises(HessgapError, match=message):
        _flatness(tanh_output_net(), data, layer=layer)
