"""Bad input raises a HessgapError that names the argument and the fix."""

import pytest
import torch
from torch import nn

from hessgap.errors import HessgapError
from hessgap.landscape import landscape

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(ref):
    return ref.mlp(), ref.batches((3, 4))


@pytest.mark.parametrize("steps, message", [
    (1, "steps must be an integer ≥ 2"),
    (0, "steps must be an integer ≥ 2"),
    (2.5, "steps must be an integer ≥ 2"),
    ((5, 1), r"steps \(axis y\) must be an integer ≥ 2"),
    ((3, 3, 3), "steps must be one integer ≥ 2 or a pair"),
])
def test_steps(setup, steps, message):
    with pytest.raises(HessgapError, match=message):
        landscape(*setup, steps=steps)


@pytest.mark.parametrize("span, message", [
    ((1, 1), r"span must be \(low, high\) with low < high, got \(1, 1\)"),
    ((2, -1), "low < high"),
    (0, r"span as one number r means \(-r, r\)"),
    ((0, float("inf")), "pair of finite numbers"),
    (((-1, 1), (1, 0)), r"span \(axis y\) must be \(low, high\) with low < high"),
    ("wide", "pair of finite numbers"),
])
def test_span(setup, span, message):
    with pytest.raises(HessgapError, match=message):
        landscape(*setup, span=span)


def test_direction_tensors_of_the_wrong_shape(setup):
    model, data = setup
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(HessgapError, match=rf"direction 0 has shape \({n + 1},\), expected \({n},\)"):
        landscape(model, data, directions=torch.zeros(2, n + 1, dtype=torch.float64))
    with pytest.raises(HessgapError, match="holds 3 directions; a landscape has 1 or 2"):
        landscape(model, data, directions=torch.zeros(3, n, dtype=torch.float64))
    with pytest.raises(HessgapError, match="shape"):
        landscape(model, data, directions=torch.zeros(2, 2, n, dtype=torch.float64))
    wrong = [torch.zeros_like(p) for p in model.parameters()]
    wrong[1] = torch.zeros(3)
    with pytest.raises(HessgapError, match=r"direction 0 for parameter 1.bias has shape \(3,\), expected \(8,\)"):
        landscape(model, data, directions=[wrong])
    with pytest.raises(HessgapError, match="NaN or inf"):
        landscape(model, data, directions=torch.full((1, n), float("nan"), dtype=torch.float64))
    with pytest.raises(HessgapError, match="dims=1 does not match the 2 given"):
        landscape(model, data, directions=torch.zeros(2, n, dtype=torch.float64), dims=1)


def test_second_model_of_another_architecture(setup, ref):
    model, data = setup
    wider = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 6),
                          nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)).double()
    with pytest.raises(HessgapError, match=r"differs from the model in 1.weight: \(9, 12\).*same architecture"):
        landscape(model, data, directions=wider)
    with pytest.raises(HessgapError, match="another architecture than the model"):
        landscape(model, data, directions=ref.cnn())
    with pytest.raises(HessgapError, match="curved' is a 1-D path"):
        landscape(model, data, directions=[ref.mlp(1), ref.mlp(2)], path="curved")
    with pytest.raises(HessgapError, match="dims=2 does not match 1 other model"):
        landscape(model, data, directions=ref.mlp(1), dims=2)
    with pytest.raises(HessgapError, match="one other model .* or two"):
        landscape(model, data, directions=[ref.mlp(1), torch.zeros(3)])


@pytest.mark.parametrize("option, message", [
    ({"directions": "sharpest"}, "unknown directions 'sharpest'; choose one of random, hessian, hessian-min"),
    ({"normalization": "weight"}, "unknown normalization 'weight'"),
    ({"ignore": "bias"}, "ignore must be 'biasbn' or None"),
    ({"path": "spline"}, "unknown path 'spline'"),
    ({"batchnorm": "frozen"}, "unknown batchnorm 'frozen'"),
    ({"engine": "fast"}, "unknown engine 'fast'"),
    ({"dims": 3}, "dims must be 1 .* or 2"),
    ({"seed": -1}, "seed must be an integer ≥ 0"),
    ({"memory_budget": 0}, "memory_budget must be a positive integer"),
    ({"rows_per_pass": 0}, "rows_per_pass must be a positive integer"),
    ({"max_batches": 0}, "max_batches must be a positive number"),
])
def test_options(setup, option, message):
    with pytest.raises(HessgapError, match=message):
        landscape(*setup, **option)


def test_data_and_engine(setup):
    model, data = setup
    with pytest.raises(HessgapError, match="no data given"):
        landscape(model, None)
    with pytest.raises(HessgapError, match="same first dimension"):
        landscape(model, (torch.zeros(4, 3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long)))
    custom = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Softmax(dim=1)).double()
    with pytest.raises(HessgapError, match="engine='stack' cannot run this model: layer 2 is a Softmax"):
        landscape(custom, data, engine="stack")


@pytest.mark.parametrize("engine", ["stack", "functional"])
def test_batches_that_do_not_fit_the_model_are_named(setup, engine):
    model, _ = setup
    wrong = [(torch.randn(4, 3, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.long))]  # 15 features, not 12
    with pytest.raises(HessgapError, match=r"failed on batch 0 \(input \(4, 3, 5\) float64"):
        landscape(model, wrong, steps=3, engine="functional" if engine == "functional" else "auto")
    labels = [(torch.randn(4, 3, 4, dtype=torch.float64), torch.full((4,), 7))]  # 3 classes
    with pytest.raises(HessgapError, match="batch 0"):
        landscape(model, labels, steps=3, engine=engine)
