"""nn.LSTM and nn.GRU on the graph engine (hessgap/curvature/graph/rules/recurrent.py), against the explicit
Hessian in float64 (relative error ≤ 1e-10): layers, directions, batch-first or not, with and without biases,
learned initial states, the final states in the loss, frozen layers, and a sequence classifier."""

import pytest
import torch
from torch import nn

import hessgap
from hessgap import _extension

from graph_oracles import check_fused_against, explicit_hessian_of
from oracles import explicit_hessian

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")]
D64 = torch.float64


class Recurrent(nn.Module):
    """An LSTM or GRU whose outputs (mean over time) and last layer's final states make the logits."""

    def __init__(self, kind, layers=1, bidirectional=False, batch_first=True, bias=True, learned_state=False):
        super().__init__()
        cls = nn.LSTM if kind == "lstm" else nn.GRU
        self.lstm, self.batch_first = kind == "lstm", batch_first
        self.rnn = cls(3, 4, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional, bias=bias)
        directions = 2 if bidirectional else 1
        self.out = nn.Linear(4 * directions + 4 * (2 if self.lstm else 1), 3)
        self.h0 = nn.Parameter(0.5 * torch.randn(layers * directions, 1, 4)) if learned_state else None
        self.c0 = nn.Parameter(0.5 * torch.randn(layers * directions, 1, 4)) if learned_state and self.lstm else None

    def forward(self, x):  # x: (batch, time, features)
        state = None
        if self.h0 is not None:
            h0 = self.h0.expand(-1, x.shape[0], -1).contiguous()
            state = (h0, self.c0.expand(-1, x.shape[0], -1).contiguous()) if self.lstm else h0
        y, final = self.rnn(x if self.batch_first else x.transpose(0, 1), state)
        y = y if self.batch_first else y.transpose(0, 1)
        finals = [final[0][-1], final[1][-1]] if self.lstm else [final[-1]]
        return self.out(torch.cat([torch.tanh(y).mean(1), *finals], -1))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 5, 3, dtype=D64, generator=gen), torch.tensor([0, 2, 1])),
            (torch.randn(2, 4, 3, dtype=D64, generator=gen), torch.tensor([1, 1]))]


CONFIGS = {"one_layer": {}, "two_layers_bidirectional_time_major": dict(layers=2, bidirectional=True, batch_first=False),
           "no_bias": dict(layers=2, bias=False), "learned_initial_state": dict(layers=2, learned_state=True)}


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_recurrent_layers_match_the_explicit_hessian(kind, config):
    model = Recurrent(kind, **CONFIGS[config]).double().eval()
    data = batches()
    check_fused_against(model, data, explicit_hessian(model, data))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_frozen_first_layer(kind):
    """Directions with no tangent of their own still carry the input's through time."""
    model = Recurrent(kind, layers=2).double().eval()
    for name, p in model.rnn.named_parameters():
        p.requires_grad_(not name.endswith("_l0"))
    data = batches()
    check_fused_against(model, data, explicit_hessian(model, data))


class SequenceClassifier(nn.Module):
    """Embedding → LSTM/GRU → mean over the unpadded steps → Linear, as text classifiers are built."""

    def __init__(self, kind):
        super().__init__()
        self.embed = nn.Embedding(20, 4)
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(4, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, ids, mask):
        out, _ = self.rnn(self.embed(ids))
        mask = mask.unsqueeze(-1).to(out.dtype)
        return self.head((out * mask).sum(1) / mask.sum(1))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_sequence_classifier_takes_the_graph_engine(kind):
    model = SequenceClassifier(kind).double().eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 20, (3, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    data = [(ids, mask, torch.tensor([0, 2, 1])), (ids[:2, :4], mask[:2, :4], torch.tensor([1, 0]))]
    hess = explicit_hessian_of(model, data, lambda m, b: nn.functional.cross_entropy(m(b[0], b[1]), b[2]),
                               lambda b: b[0].shape[0])
    check_fused_against(model, data, hess)


def test_projections_fall_back_named():
    model = Recurrent("lstm").double()
    model.rnn = nn.LSTM(3, 4, batch_first=True, proj_size=2).double()
    model.out = nn.Linear(2 + 2 + 4, 3).double()
    n = sum(p.numel() for p in model.parameters())
    result = hessgap.hvp(model, batches(), torch.randn(1, n, dtype=D64), return_info=True)
    assert result.path == "generic"
    assert "aten.lstm.input (in rnn: LSTM) with projections" in result.fallback_reason
