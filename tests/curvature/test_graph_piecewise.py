"""The piecewise activations of mobile networks on the graph engine (hessgap/curvature/graph/rules/piecewise.py).

PyTorch has no double backward for hardsigmoid and hardswish, so the reference is the same network with each
activation written in plain ops (hardswish(x) = x·clamp(x + 3, 0, 6)/6, ...), which autograd differentiates
twice: the second derivative is defined almost everywhere, and the float64 Hessians agree to 1e-10."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessgap
from hessgap import _extension
from hessgap.errors import HessgapError

from graph_oracles import check_fused_against
from oracles import explicit_hessian, randomize_batchnorm

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")]
D64 = torch.float64


def plain_hardswish(x):
    return x * torch.clamp(x + 3, 0, 6) / 6


def plain_hardsigmoid(x):
    return torch.clamp(x / 6 + 0.5, 0, 1)


class Activations(nn.Module):
    def __init__(self, plain=False):
        super().__init__()
        self.plain = plain
        self.a, self.out = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = 3 * self.a(x)  # most entries on the curved pieces, some past ±3
        if self.plain:
            mixed = plain_hardswish(h) * plain_hardsigmoid(h) + torch.clamp(h, 0, 6) + torch.clamp(h, -2, 1)
        else:
            mixed = F.hardswish(h) * F.hardsigmoid(h) + F.relu6(h) + F.hardtanh(h, -2, 1)
        return self.out(mixed)


def test_hardswish_hardsigmoid_hardtanh_relu6():
    model = Activations().double().eval()
    twin = Activations(plain=True).double().eval()
    twin.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 5, dtype=D64, generator=gen), torch.tensor([0, 2, 1, 1, 0, 2]))]
    check_fused_against(model, batches, explicit_hessian(twin, batches))


class MobileBlock(nn.Module):
    """A MobileNetV3 inverted residual: expand 1×1, BatchNorm, hardswish, depthwise 3×3, squeeze-excite with a
    hardsigmoid gate, project 1×1, residual; then pooling and a classifier."""

    def __init__(self, plain=False):
        super().__init__()
        self.plain = plain
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.expand, self.bn1 = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)
        self.depthwise, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.squeeze, self.excite = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.project = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 3)
        self.hswish = plain_hardswish if plain else nn.Hardswish()
        self.hsigmoid = plain_hardsigmoid if plain else nn.Hardsigmoid()

    def forward(self, x):
        x = self.hswish(self.stem(x))
        h = self.hswish(self.bn1(self.expand(x)))
        h = self.hswish(self.bn2(self.depthwise(h)))
        gate = self.hsigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(h, 1)))))
        h = x + self.project(h * gate)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_mobilenet_v3_block_takes_the_graph_engine():
    torch.manual_seed(0)
    model = randomize_batchnorm(MobileBlock()).double().eval()
    twin = MobileBlock(plain=True).double().eval()
    twin.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(2)
    batches = [(2 * torch.randn(3, 3, 6, 6, dtype=D64, generator=gen), torch.tensor([0, 2, 1])),
               (2 * torch.randn(2, 3, 6, 6, dtype=D64, generator=gen), torch.tensor([1, 1]))]
    check_fused_against(model, batches, explicit_hessian(twin, batches))
    with pytest.raises(HessgapError, match="hardswish|hardsigmoid"):  # the only way to its Hessian
        hessgap.hvp(model, batches, torch.randn(1, sum(p.numel() for p in model.parameters()), dtype=D64),
                    path="generic")
