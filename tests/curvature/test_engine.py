"""HvpEngine: kept primal passes never go stale, and every curvature call refuses what has no Hessian."""

import math

import pytest
import torch
from torch import nn

import hessgap
from hessgap import HessgapError, NonFiniteError

from oracles import batchnorm_dropout_mlp, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup():
    torch.manual_seed(5)
    model = randomize_batchnorm(batchnorm_dropout_mlp()).eval()
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    return model, [(x[:32], y[:32]), (x[32:], y[32:])]


@pytest.mark.parametrize("edit", ["weight", "running_var", "load_state_dict"])
def test_cached_operator_follows_edits_through_data(edit):
    """Was: up to 1.1 off a fresh operator after .data edits (version counters do not see them)."""
    model, batches = _setup()
    operator = hessgap.HessianOperator(model, batches, cache_batches=True)
    V = torch.randn(3, operator.n)
    operator.matmat(V)  # fills the kept primal passes
    with torch.no_grad():
        if edit == "weight":
            model[0].weight.data.mul_(1.5)
        elif edit == "running_var":
            next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d)).running_var.data.mul_(2.0)
        else:
            state = {k: v * 0.9 if v.is_floating_point() else v for k, v in model.state_dict().items()}
            model.load_state_dict(state)
    fresh = hessgap.HessianOperator(model, batches).matmat(V)
    torch.testing.assert_close(operator.matmat(V), fresh)


def _with_inf_weight():
    model, batches = _setup()
    with torch.no_grad():
        model[0].weight[0, 0] = math.inf
    return model, batches


@pytest.mark.parametrize("call", ["hvp", "operator", "eigenvalues", "trace", "density", "sharpness"])
def test_non_finite_weight_is_refused_by_every_call(call):
    """Was: eigenvalues, hvp, trace and density returned numbers marked converged; only sharpness refused."""
    model, batches = _with_inf_weight()
    n = sum(p.numel() for p in model.parameters())
    calls = {
        "hvp": lambda: hessgap.hvp(model, batches, torch.ones(1, n)),
        "operator": lambda: hessgap.HessianOperator(model, batches),
        "eigenvalues": lambda: hessgap.eigenvalues(model, batches),
        "trace": lambda: hessgap.trace(model, batches, num_probes=2),
        "density": lambda: hessgap.density(model, batches, lanczos_steps=3),
        "sharpness": lambda: hessgap.sharpness(model, batches, max_iter=1),
    }
    with pytest.raises(NonFiniteError, match="parameter 0.weight holds NaN or inf"):
        calls[call]()


def _constant_loss(outputs, targets):
    return torch.tensor(1.0)


@pytest.mark.parametrize("call", ["hvp", "eigenvalues", "trace", "sharpness"])
def test_a_loss_that_does_not_depend_on_the_parameters_is_the_same_error_everywhere(call):
    """Was: zeros from hvp / eigenvalues / trace, a raw autograd error from sharpness."""
    model, batches = _setup()
    n = sum(p.numel() for p in model.parameters())
    calls = {
        "hvp": lambda: hessgap.hvp(model, batches, torch.ones(1, n), loss_fn=_constant_loss),
        "eigenvalues": lambda: hessgap.eigenvalues(model, batches, loss_fn=_constant_loss),
        "trace": lambda: hessgap.trace(model, batches, num_probes=2, loss_fn=_constant_loss),
        "sharpness": lambda: hessgap.sharpness(model, batches, loss_fn=_constant_loss, max_iter=1),
    }
    with pytest.raises(HessgapError, match="does not depend on the parameters"):
        calls[call]()


@pytest.mark.parametrize("call", ["hvp", "trace", "sharpness"])
def test_reduction_sum_is_refused(call):
    """Was: accepted silently, every result scaled by the batch size (trace 495 instead of 7.7)."""
    model, batches = _setup()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    n = sum(p.numel() for p in model.parameters())
    calls = {
        "hvp": lambda: hessgap.hvp(model, batches, torch.ones(1, n), loss_fn=loss_fn),
        "trace": lambda: hessgap.trace(model, batches, num_probes=2, loss_fn=loss_fn),
        "sharpness": lambda: hessgap.sharpness(model, batches, loss_fn=loss_fn, max_iter=1),
    }
    with pytest.raises(HessgapError, match="reduction='sum'.*reduction='mean'"):
        calls[call]()
