"""The Hessian measures and relative flatness against explicit float64 Hessians."""

import pytest
import torch

import hessgap
from hessgap.curvature.operator import MatrixOperator
from hessgap.errors import HessgapError
from hessgap.measures import ScaledOperator

from measure_models import batchnorm_net, classification_data, fit, relu_net
from oracles import explicit_hessian


def test_scaled_operator_applies_d_a_d():
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64)
    A = A + A.T
    d = torch.rand(6, dtype=torch.float64) + 0.5
    V = torch.randn(3, 6, dtype=torch.float64)
    op = ScaledOperator(MatrixOperator(A), d)
    torch.testing.assert_close(op.matmat(V), V @ (torch.diag(d) @ A @ torch.diag(d)))
    assert hessgap.eigenvalues(op, k=1, tol=1e-8).eigenvalues[0] == pytest.approx(
        float(torch.linalg.eigvalsh(torch.diag(d) @ A @ torch.diag(d))[-1]), rel=1e-6)
    with pytest.raises(HessgapError, match="vector of the operator's size 6"):
        ScaledOperator(MatrixOperator(A), d[:3])


def test_hessian_measures_against_the_explicit_hessian():
    data = classification_data()
    model = fit(batchnorm_net(), data, steps=60)
    H = explicit_hessian(model, data)
    x = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    D = torch.diag(x.abs() + 1)
    S = D @ H @ D
    names = ["hessian_lmax", "hessian_trace", "scaled_lmax", "scaled_trace", "scaled_lmax_over_trace"]
    result = hessgap.measures(model, data, names, check_invariance=False,
                              options={"hessian_trace": {"probes": 400}, "scaled_trace": {"probes": 400},
                                       "hessian_lmax": {"tol": 1e-6}, "scaled_lmax": {"tol": 1e-6},
                                       "scaled_lmax_over_trace": {"probes": 400, "tol": 1e-6}})
    v = result.values
    assert v["hessian_lmax"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-4)
    assert v["scaled_lmax"] == pytest.approx(float(torch.linalg.eigvalsh(S)[-1]), rel=1e-4)
    assert abs(v["hessian_trace"] - float(H.trace())) < 4 * result.stderr["hessian_trace"]
    assert abs(v["scaled_trace"] - float(S.trace())) < 4 * result.stderr["scaled_trace"]
    assert v["scaled_lmax_over_trace"] == pytest.approx(v["scaled_lmax"] / v["scaled_trace"])


@pytest.mark.parametrize("form", ["petzka", "simple"])
def test_relative_flatness_against_the_explicit_hessian(form):
    data = classification_data()
    model = fit(relu_net(), data)
    H = explicit_hessian(model, data)
    W = model[-1].weight.detach()
    d, m = W.shape
    offset = sum(p.numel() for p in list(model.parameters())[:-2])  # the last layer's weight, then its bias
    block = H[offset:offset + d * m, offset:offset + d * m].reshape(d, m, d, m)
    if form == "petzka":
        traces = torch.einsum("sjtj->st", block)  # Tr(H_{s,s'})
        expected = float(((W @ W.T) * traces).sum())
    else:
        expected = float(W.pow(2).sum()) * float(torch.einsum("sjsj->", block))
    result = hessgap.measures(model, data, ["relative_flatness"], check_invariance=False,
                              options={"relative_flatness": {"probes": 2000, "form": form}})
    assert abs(result.values["relative_flatness"] - expected) < 4 * result.stderr["relative_flatness"]
    assert result.stderr["relative_flatness"] < 0.1 * expected
