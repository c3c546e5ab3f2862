"""The public API (hessgap/__init__.py): every name resolves, and the arguments are spelled one way."""

import inspect

import pytest
import torch
from torch import nn

import hessgap

DATA_FIRST = ["sharpness", "adaptive_sharpness", "hvp", "HessianOperator", "eigenvalues", "trace", "density",
              "Tracker", "critical_sharpness"]


def test_every_public_name_resolves():
    for name in hessgap.__all__:
        assert getattr(hessgap, name) is not None, name


@pytest.mark.parametrize("name", DATA_FIRST)
def test_model_then_data_then_keywords(name):
    function = getattr(hessgap, name)
    parameters = inspect.signature(function).parameters
    names = [p for p in parameters if p != "self"]
    assert names[:2] == ["model", "data"]
    positional = [p for p in names if parameters[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    allowed = {"sharpness": ["model", "data", "epsilon"], "adaptive_sharpness": ["model", "data", "rho", "norm"],
               "hvp": ["model", "data", "vectors"], "critical_sharpness": ["model", "data", "optimizer"]}
    assert positional == allowed.get(name, ["model", "data"])
    assert "train" not in parameters and "loader" not in parameters and "target" not in parameters


@pytest.mark.parametrize("name", ["sharpness", "hvp", "HessianOperator"])
def test_the_eval_train_flag_is_train_mode(name):
    assert "train_mode" in inspect.signature(getattr(hessgap, name)).parameters
    assert "train_mode" in inspect.signature(hessgap.preserved).parameters


def test_tuning_knobs_cannot_be_passed_by_position():
    model = nn.Sequential(nn.Linear(3, 2))
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(TypeError):
        hessgap.sharpness(model, batch, 1e-3, 2)
    with pytest.raises(TypeError):
        hessgap.hvp(model, batch, torch.randn(1, 8), nn.CrossEntropyLoss())
    with pytest.raises(TypeError):
        hessgap.HessianOperator(model, batch, nn.CrossEntropyLoss())
    with pytest.raises(TypeError):
        hessgap.eigenvalues(model, batch, 2)
