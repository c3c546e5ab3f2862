"""The Fisher–Rao norm against Liang et al.'s identity on bias-free ReLU nets and per-sample gradients."""

import pytest
import torch
from torch import nn

import hessgap

from measure_models import classification_data, fit, relu_net


def _fr(model, data):
    return hessgap.measures(model, data, ["fisher_rao"], check_invariance=False)


def test_bias_free_relu_net_matches_lemma_2_1():
    data = classification_data()
    model = fit(relu_net(bias=False), data)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        f = model(x)
    grad_f = torch.softmax(f, 1) - nn.functional.one_hot(y, 3).double()  # ∂ℓ/∂f of cross-entropy
    L = 2  # hidden layers
    expected = float(((L + 1) ** 2 * (grad_f * f).sum(1) ** 2).mean())
    assert _fr(model, data).values["fisher_rao"] == pytest.approx(expected, rel=1e-9)


def test_with_biases_it_is_the_definition_over_every_parameter():
    data = classification_data()
    model = fit(relu_net(), data)
    total, count = 0.0, 0
    for xb, yb in data:
        for xi, yi in zip(xb, yb):
            model.zero_grad()
            nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
            total += float(sum((p.detach() * p.grad).sum() for p in model.parameters())) ** 2
            count += 1
    assert _fr(model, data).values["fisher_rao"] == pytest.approx(total / count, rel=1e-9)
