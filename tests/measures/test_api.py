"""hessgap.measures: names, settings, bad input, the model left as it was, JSON, and the invariance check
(invariant measures reported invariant, Keskar's Metric 2.1 not, unchecked when the model has no symmetry)."""

import importlib
import json

import pytest
import torch
from torch import nn

import hessgap
from hessgap.errors import HessgapError
from hessgap.measures import DEFAULT_NAMES, NAMES
from hessgap.names import MEASURE_NAMES

from measure_models import batchnorm_net, classification_data, fit, relu_net
from oracles import assert_unchanged, snapshot

INVARIANT = ["fisher_rao", "relative_flatness", "gaussian_adaptive", "adaptive_l2"]


@pytest.fixture(scope="module")
def trained():
    data = classification_data()
    return fit(relu_net(), data), data


def test_every_registered_measure_has_a_user_facing_name():
    assert NAMES == MEASURE_NAMES


def test_hessgap_measures_is_callable_however_it_was_imported(trained):
    model, data = trained
    importlib.import_module("hessgap.measures.api")  # the package imported first, then the lazy name
    result = hessgap.measures(model, data, ["fisher_rao"], check_invariance=False)
    assert isinstance(result, hessgap.MeasuresResult) and result.values["fisher_rao"] > 0
    assert hessgap.measures.api.measures is hessgap.measures.compute


def test_unknown_names_and_settings_are_refused(trained):
    model, data = trained
    with pytest.raises(HessgapError, match="unknown measure 'sharpest'"):
        hessgap.measures(model, data, ["sharpest"])
    with pytest.raises(HessgapError, match="has no setting 'eps'.*epsilon"):
        hessgap.measures(model, data, ["keskar"], options={"keskar": {"eps": 1e-3}})
    with pytest.raises(HessgapError, match="unknown measure in options"):
        hessgap.measures(model, data, ["keskar"], options={"sharpest": {}})
    with pytest.raises(HessgapError, match="no measure named"):
        hessgap.measures(model, data, [])
    with pytest.raises(HessgapError, match="torch.nn.Module"):
        hessgap.measures("model", data)


@pytest.mark.parametrize("names", [5, ["keskar", 5], {"keskar"}, b"keskar", 2.5])
def test_names_of_the_wrong_type_are_refused_listing_the_measures(trained, names):
    """names=5 raised a raw TypeError from deep inside."""
    model, data = trained
    with pytest.raises(HessgapError, match="names must be None.*the measures are keskar, keskar_subspace"):
        hessgap.measures(model, data, names)


def test_names_as_a_tuple_or_a_comma_separated_string(trained):
    model, data = trained
    for names in (("fisher_rao", "gaussian"), "fisher_rao, gaussian"):
        result = hessgap.measures(model, data, names, check_invariance=False)
        assert list(result.values) == ["fisher_rao", "gaussian"]


@pytest.mark.parametrize("kwargs, message", [
    ({"relu_factor": 1.0}, "relu_factor=1.0 is too close to 1"),
    ({"batchnorm_factor": 1.2}, "batchnorm_factor=1.2 is too close to 1"),
    ({"relu_factor": 0}, "relu_factor must be a finite number > 0"),
    ({"batchnorm_factor": float("nan")}, "batchnorm_factor must be a finite number > 0"),
    ({"invariance_rtol": 1.0}, "invariance_rtol=1.0 is too large"),
    ({"check_invariance": "yes"}, "check_invariance must be True or False"),
])
def test_settings_that_make_the_invariance_check_vacuous_are_refused(trained, kwargs, message):
    """relu_factor=1.0 made the rescaled copies the model itself: every measure, Keskar's included, came out
    invariant."""
    model, data = trained
    with pytest.raises(HessgapError, match=message):
        hessgap.measures(model, data, ["keskar"], **kwargs)


def test_a_rescaled_copy_equal_to_the_model_leaves_invariance_unchecked():
    model, data = relu_net(), classification_data()
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            layer.weight.zero_()
            layer.bias.zero_()
    result = hessgap.measures(model, data, ["hessian_trace", "gaussian"])
    assert result.invariant == {"hessian_trace": None, "gaussian": None}
    assert "measured against the model itself" in result.invariance["gaussian"]["reason"]


def test_all_measures_leave_the_model_as_it_was_and_give_json(trained):
    model, data = trained
    model = batchnorm_net()
    fit(model, data, steps=60)
    model.train()  # the caller's mode comes back too
    snap = snapshot(model)
    result = hessgap.measures(model, data, options={"m_sharpness": {"m": 16, "batches": 2},
                                                    "keskar_subspace": {"subspace_dim": 20},
                                                    "pacbayes_flatness": {"samples": 3},
                                                    "pacbayes_mag_flatness": {"samples": 3}})
    assert_unchanged(model, snap)
    assert list(result.values) == list(DEFAULT_NAMES)  # the measures run on request only are left out
    assert all(v is not None for v in result.values.values()), result.not_applicable
    assert set(result.seconds) == set(DEFAULT_NAMES) and result.total_seconds > 0
    assert result.settings["keskar"]["epsilon"] == 1e-3
    text = json.loads(result.to_json())
    assert text["values"]["keskar"] == pytest.approx(result.values["keskar"])
    assert "BatchNorm" in result.rescaling and "ReLU" in result.rescaling
    assert "not invariant" in str(result) and "MeasuresResult(" in repr(result)


def test_invariant_measures_are_reported_invariant_and_keskar_is_not(trained):
    model, data = trained
    result = hessgap.measures(model, data, INVARIANT + ["keskar", "hessian_lmax", "gaussian"])
    for name in INVARIANT:
        assert result.invariant[name] is True, (name, result.invariance[name])
    for name in ("keskar", "hessian_lmax", "gaussian"):
        assert result.invariant[name] is False, (name, result.invariance[name])
        assert result.invariance[name]["change"] > 0.05
    assert result.invariance["keskar"]["declared"] is False
    assert result.invariance["fisher_rao"]["change"] < 1e-8  # exact, up to rounding


def test_invariance_under_batchnorm_rescaling():
    data = classification_data()
    model = fit(batchnorm_net(), data, steps=60)
    result = hessgap.measures(model, data, ["fisher_rao", "relative_flatness", "keskar"])
    assert result.invariant == {"fisher_rao": True, "relative_flatness": True, "keskar": False}


def test_no_symmetry_means_unchecked_with_the_reason():
    data = classification_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).double()
    result = hessgap.measures(model, data, ["keskar", "fisher_rao"])
    assert result.invariant == {"keskar": None, "fisher_rao": None}
    assert "no function-preserving rescaling" in result.invariance["keskar"]["reason"]
    assert result.values["keskar"] is not None


def test_measures_that_need_what_the_model_lacks_are_not_applicable():
    class Quadratic(nn.Module):  # no linear layer, no class outputs: the forward pass is the loss
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))

        def forward(self, x):
            return (self.w ** 2).sum() * torch.ones(x.shape[0], dtype=torch.float64)

    data = [(torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))]
    result = hessgap.measures(Quadratic(), data, ["relative_flatness", "pacbayes_flatness", "gaussian"],
                              loss_fn=lambda out, y: out.mean())
    assert result.values["relative_flatness"] is None
    assert "no nn.Linear" in result.not_applicable["relative_flatness"]
    assert "class predictions" in result.not_applicable["pacbayes_flatness"]
    assert result.values["gaussian"] is not None


def test_a_subspace_as_large_as_the_model_is_not_applicable():
    model = nn.Sequential(nn.Linear(6, 3)).double()  # 21 parameters
    result = hessgap.measures(model, classification_data(), ["keskar_subspace"], check_invariance=False)
    assert result.values["keskar_subspace"] is None
    assert "not more than the subspace's 100 dimensions" in result.not_applicable["keskar_subspace"]
