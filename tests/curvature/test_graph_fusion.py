"""Rewrites of the captured graph (hessgap.curvature.graph.fusion): written-out GELU (GPT-2's gelu_new) becomes
aten.gelu(approximate="tanh"), the same function, and the HVP stays exact."""

import math

import pytest
import torch
from torch import nn

from hessgap import _extension
from hessgap.curvature.graph.fusion import fuse

from graph_oracles import check_fused_against
from oracles import explicit_hessian

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")]
D64 = torch.float64
aten = torch.ops.aten


def gelu_new(x):
    """Hugging Face's NewGELUActivation, as GPT-2 calls it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_new_reordered(x):
    return (torch.tanh((0.044715 * x.pow(3) + x) * math.sqrt(2.0 / math.pi)) + 1.0) * (x * 0.5)


def gelu_new_reused(x):
    """The same function, with an inner value also used elsewhere: that node must stay."""
    t = torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))
    return 0.5 * x * (1.0 + t) + 0.1 * t


def not_gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.04 * torch.pow(x, 3.0))))


class Mlp(nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.a, self.b, self.activation = nn.Linear(5, 8), nn.Linear(8, 3), activation

    def forward(self, x):
        return self.b(self.activation(self.a(x)))


def captured_ops(activation):
    model = Mlp(activation).double()
    graph = torch.export.export(model, (torch.randn(4, 5, dtype=D64),)).run_decompositions({}).graph
    replaced = fuse(graph)
    assert fuse(graph) == 0  # idempotent
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    return replaced, targets, graph


@pytest.mark.parametrize("activation", [gelu_new, gelu_new_reordered])
def test_written_out_tanh_gelu_becomes_one_op(activation):
    replaced, targets, graph = captured_ops(activation)
    assert replaced == 1
    assert aten.gelu.default in targets and aten.tanh.default not in targets and aten.pow.Tensor_Scalar not in targets
    gelu = next(n for n in graph.nodes if n.target is aten.gelu.default)
    assert gelu.kwargs == {"approximate": "tanh"} and tuple(gelu.meta["val"].shape) == (4, 8)
    x = torch.linspace(-5, 5, 101, dtype=D64)
    torch.testing.assert_close(activation(x), torch.nn.functional.gelu(x, approximate="tanh"), rtol=1e-15, atol=1e-15)


def test_shared_inner_nodes_stay_and_other_constants_are_left_alone():
    replaced, targets, _ = captured_ops(gelu_new_reused)
    assert replaced == 1 and aten.gelu.default in targets and aten.tanh.default in targets
    replaced, targets, _ = captured_ops(not_gelu)
    assert replaced == 0 and aten.gelu.default not in targets


@pytest.mark.parametrize("activation", [gelu_new, gelu_new_reused, not_gelu])
def test_hvp_through_fused_and_unfused_forms_is_exact(activation):
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 5, dtype=D64, generator=gen), torch.randint(0, 3, (6,), generator=gen))]
    model = Mlp(activation).double().eval()
    check_fused_against(model, batches, explicit_hessian(model, batches))
