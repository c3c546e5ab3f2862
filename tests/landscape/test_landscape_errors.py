"""Bad input raises a HessgapError that names the argument and the fix."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from hessgap.errors import HessgapError, NonFiniteError
from hessgap.landscape import grid, landscape, surface

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


@pytest.mark.parametrize("settings", [{"steps": 1}, {"steps": (5, 1)}, {"span": (2, -1)}, {"span": float("nan")},
                                      {"dims": 3}, {"steps": 10**5}])
def test_a_bad_call_with_a_folder_leaves_nothing_behind(setup, tmp_path, settings):
    """Steps, span and dims are checked before the folder, its config.json or the directions are written:
    a rerun with the corrected arguments is not refused as other settings."""
    with pytest.raises(HessgapError):
        landscape(*setup, out=tmp_path / "run", **settings)
    assert not (tmp_path / "run").exists()


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


def test_parameters_that_are_not_finite_are_refused(setup, ref):
    model, data = setup
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="parameter 4.weight holds NaN or inf"):
        landscape(model, data, steps=3)
    other = ref.mlp(1)
    with torch.no_grad():
        other[1].bias[2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"parameter 1.bias of the other model \(directions\) holds NaN or inf"):
        landscape(ref.mlp(), data, directions=other, steps=3)
    with pytest.raises(NonFiniteError, match=r"parameter 1.bias of the other model \(directions\[1\]\)"):
        landscape(ref.mlp(), data, directions=[ref.mlp(2), other], steps=3)


def test_a_grid_too_large_for_the_memory_is_refused_before_any_work(setup, monkeypatch):
    model, data = setup
    with pytest.raises(HessgapError, match=r"a grid of 10000000 × 10000000 = 1e\+14 points needs about 182 PiB for "
                                           r"its values alone \(2048 bytes a point\), more than 50% of this machine's"):
        landscape(model, data, steps=10**7)
    monkeypatch.setattr(grid, "physical_memory", lambda: 2**30)
    with pytest.raises(HessgapError, match="= 3e\\+05 points needs about 586 MiB .* of this machine's 1 GiB.* fewer "
                                           "steps"):
        landscape(model, data, steps=300_000, dims=1)
    grid.check_size([200_000])  # 391 MiB: allowed
    with pytest.raises(HessgapError, match="× 400 = 4e\\+05 points"):
        landscape(model, data, steps=(1000, 400))


def test_a_large_grid_warns_with_its_size_and_a_rough_time(setup, monkeypatch):
    model, data = setup
    assert surface.WARN_POINTS == 10_000
    monkeypatch.setattr(surface, "WARN_POINTS", 11)
    with pytest.warns(UserWarning, match=r"a landscape grid of 4 × 3 = 12 points, each one evaluation of the loss "
                                         r"over the data: about .* at .* s a point .* fewer steps"):
        landscape(model, data, steps=(4, 3))
    with pytest.warns(UserWarning, match="= 12 points, .* its time could not be estimated"):
        landscape(model, iter(data), steps=(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        landscape(model, data, steps=11, dims=1)  # 11 points: no warning


def test_ranks_that_disagree_or_fail_raise_together_and_a_folder_resumes_on_them(tmp_path):
    """Two gloo ranks: arguments that differ are named on every rank before any collective (a larger grid on
    one rank would abort gloo, other directions would run other collectives), a rank without data fails on every
    rank, and a run folder's fingerprint covers both shards."""
    from rank_workers import batches_of, landscape_on_ranks, tiny_problem
    from ranks import run_ranks

    results = run_ranks(landscape_on_ranks, 2, str(tmp_path / "run"))
    for outcome in results:
        assert outcome["steps"].startswith("HessgapError: the ranks disagree on the arguments of hessgap.landscape "
                                           "(steps: rank 0: 3, rank 1: 4); every rank must call hessgap")
        assert "(directions: rank 0: 'random', rank 1: 'hessian')" in outcome["directions"]
        assert outcome["written"]["resumed"] == 0 and outcome["resumed"]["resumed"] == 3
        assert outcome["resumed"]["loss"] == outcome["written"]["loss"]
        assert "changed: the data (the batches'" in outcome["other shard"]
    assert "no data given" in results[1]["no data"]
    assert results[0]["no data"].startswith("HessgapError: rank 1 of 2 failed")
    model, x, y = tiny_problem()
    single = landscape(model, batches_of(x, y), steps=3)
    np.testing.assert_allclose(results[0]["written"]["loss"], single.loss, rtol=1e-10)
