"""How the graph engine joins the HVP engine: which models take it, the reasons reported when one cannot,
errors that name the user's mistake, and captures and primal passes reused between products."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessgap
from hessgap import HessgapError, _extension
from hessgap.curvature.graph import plan as graph_plan

from graph_oracles import rel_err
from oracles import explicit_hessian

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")]
D64 = torch.float64


class Residual(nn.Module):
    def __init__(self, activation=torch.tanh):
        super().__init__()
        self.a, self.b, self.activation = nn.Linear(4, 4), nn.Linear(4, 3), activation

    def forward(self, x):
        return self.b(self.activation(self.a(x)) + x)


def data(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=D64, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def vectors(model, k=2):
    return torch.randn(k, sum(p.numel() for p in model.parameters()), dtype=D64)


def test_residual_network_and_label_smoothing_take_the_fused_path():
    model = Residual().double()
    batch = data()
    for loss_fn in (None, nn.CrossEntropyLoss(label_smoothing=0.1)):
        hess = explicit_hessian(model, [batch], loss_fn)
        V = vectors(model)
        result = hessgap.hvp(model, batch, V, loss_fn=loss_fn, return_info=True)
        assert result.path == "fused" and result.fallback_reason is None
        assert rel_err(result.value, V @ hess) <= 1e-10


class WithUnused(Residual):
    """A residual network with a layer its forward never uses: that layer's Hessian rows are zero."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(4, 2)


@pytest.mark.parametrize("batches", [1, 3])
def test_products_written_into_unfilled_sums_over_one_or_several_batches(batches):
    """The first batch writes its products into the (not zero-filled) sums, later ones add; parameters no
    product reaches come out as zeros, whatever the sums held before."""
    model = WithUnused().double()
    parts = [data(n, seed) for n, seed in zip((5, 3, 7), range(batches))]
    H = explicit_hessian(model, parts)
    V = vectors(model, k=3)
    result = hessgap.hvp(model, parts, V, return_info=True)
    assert result.path == "fused" and rel_err(result.value, V @ H) < 1e-10
    assert result.value[:, -10:].abs().max() == 0  # the unused layer's 2×4 weight and 2 biases


def test_sequential_with_a_layer_the_layer_engine_lacks_takes_the_graph_engine():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.SiLU(), nn.Linear(5, 3)).double()
    batch = data()
    hess = explicit_hessian(model, [batch])
    V = vectors(model)
    result = hessgap.hvp(model, batch, V, return_info=True)
    assert result.path == "fused"
    assert rel_err(result.value, V @ hess) <= 1e-10


@pytest.mark.parametrize("activation,reason", [(F.elu, "aten.elu"), (lambda h: torch.cumsum(h, -1), "aten.cumsum")])
def test_an_op_without_a_rule_falls_back_with_its_name(activation, reason):
    model = Residual(activation).double()
    batch = data()
    V = vectors(model)
    result = hessgap.hvp(model, batch, V, return_info=True)
    assert result.path == "generic"
    assert reason in result.fallback_reason and "no R-operator rule" in result.fallback_reason
    with pytest.raises(HessgapError, match=f"fused HVP path cannot run: {reason}"):
        hessgap.hvp(model, batch, V, path="fused")


def test_an_op_without_a_rule_is_named_with_its_module_path_in_the_model_and_what_to_do():
    class Wrapper(nn.Module):  # a Hugging Face task model holds its base model as .model
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Linear(4, 5), nn.ELU(), nn.Linear(5, 3))

        def forward(self, x):
            return self.model(x)

    model = Wrapper().double()
    result = hessgap.hvp(model, data(), vectors(model), return_info=True)
    assert result.path == "generic"
    assert result.fallback_reason.startswith("aten.elu (in model.1: ELU) has no R-operator rule")
    assert "the generic path (double backward) computes the same product" in result.fallback_reason
    assert "write that module with the ops the README lists as supported" in result.fallback_reason


class DataDependent(Residual):
    def forward(self, x):
        if x.sum() > 0:  # control flow on the values of the data: no graph serves every batch
            return self.b(self.a(x))
        return self.b(-self.a(x))


def test_a_model_export_cannot_capture_falls_back_with_the_reason():
    model = DataDependent().double()
    batch = data()
    hess = explicit_hessian(model, [batch])
    V = vectors(model)
    result = hessgap.hvp(model, batch, V, return_info=True)
    assert result.path == "generic"
    assert "torch.export could not capture the model" in result.fallback_reason
    assert rel_err(result.value, V @ hess) <= 1e-10


def test_dropout_in_train_mode_and_compute_loss_closures_stay_generic():
    model = Residual().double()
    batch = data()
    V = vectors(model)
    result = hessgap.hvp(model, batch, V, train_mode=True, return_info=True)
    assert result.path == "generic" and "train mode" in result.fallback_reason
    closure = hessgap.hvp(model, batch, V, compute_loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]), return_info=True)
    assert closure.path == "generic" and "compute_loss" in closure.fallback_reason


def test_out_of_range_targets_are_named_as_on_the_generic_path():
    model = Residual().double()
    x, y = data()
    y[0] = 7
    with pytest.raises(HessgapError, match="targets range over"):
        hessgap.hvp(model, (x, y), vectors(model))


def test_captures_are_reused_across_calls_and_shapes_are_keys(monkeypatch):
    model = Residual().double()
    calls = []
    real = graph_plan.capture

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(graph_plan, "capture", counting)
    batches = [data(6), data(6, seed=1), data(3, seed=2)]  # two shapes
    V = vectors(model)
    first = hessgap.hvp(model, batches, V)
    assert len(calls) == 2
    second = hessgap.hvp(model, batches, V)
    assert len(calls) == 2  # the same model, unchanged: nothing captured again
    torch.testing.assert_close(first, second)
    model.a = nn.Linear(4, 4).double()  # a new module: a new capture
    hessgap.hvp(model, batches, V)
    assert len(calls) == 4


def test_operator_keeps_primal_passes_and_follows_parameter_edits():
    model = Residual().double()
    batches = [data(6), data(5, seed=1)]
    operator = hessgap.HessianOperator(model, batches, cache_batches=True)
    assert operator.path == "fused"
    V = vectors(model, 3)
    assert rel_err(operator.matmat(V), V @ explicit_hessian(model, batches)) <= 1e-10
    assert rel_err(operator.matmat(V), V @ explicit_hessian(model, batches)) <= 1e-10  # from the kept passes
    with torch.no_grad():
        model.a.weight.mul_(1.3)
    assert rel_err(operator.matmat(V), V @ explicit_hessian(model, batches)) <= 1e-10
