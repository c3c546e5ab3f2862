"""The graph engine's indexing rules (hessgap/curvature/graph/rules/indexing.py) on tiny float64 graphs against
the explicit Hessian (relative error ≤ 1e-10): advanced indexing, gathers, scatters, repeats, embedding_bag."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessgap
from hessgap import _extension
from hessgap.errors import HessgapError

from graph_oracles import check_fused_against, explicit_hessian_of
from oracles import explicit_hessian

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")]
D64 = torch.float64


def pair(n=6, features=5, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, dtype=D64, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def check(model, batches, reference=None):
    model = model.double().eval()
    hess = explicit_hessian((reference or model).double().eval(), batches)
    return check_fused_against(model, batches, hess)


class RelativeBias(nn.Module):
    """A Swin-style relative position bias: a learned table read at constant indices (table[idx]), then index
    ops on activations: adjacent and separated advanced indices, index_select, gather."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, 2))
        self.a, self.out = nn.Linear(5, 8), nn.Linear(8, 3)
        position = torch.arange(4)
        self.register_buffer("index", (position[:, None] - position[None, :] + 3).view(-1), persistent=False)

    def forward(self, x):
        h = torch.tanh(self.a(x))  # (n, 8)
        bias = self.table[self.index].view(4, 4, 2).permute(2, 0, 1)  # (2, 4, 4)
        cube = h.view(-1, 2, 4)  # (n, 2, 4)
        scores = torch.softmax(cube.unsqueeze(-1) * cube.unsqueeze(-2) + bias, -1)  # (n, 2, 4, 4)
        rows = torch.tensor([0, 3, 1])
        picked = scores[:, :, rows][:, 1, :, torch.tensor([2, 0, 0])]  # adjacent, then separated indices
        picked = picked.reshape(x.shape[0], -1)[:, :8]
        chosen = h.index_select(1, torch.tensor([7, 0, 0, 3, 5, 1, 2, 6]))
        gathered = h.gather(1, torch.tensor([[1, 1, 0, 7, 6, 5, 4, 2]]).expand(x.shape[0], 8))
        return self.out(picked * chosen + gathered)


def test_advanced_indexing_index_select_gather():
    check(RelativeBias(), [pair(), pair(4, seed=1)])


class Scatters(nn.Module):
    """scatter (src and value), scatter_add, index_add, index_put (written and added), repeat, repeat_interleave,
    roll (along dimensions and flat)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(5, 6), nn.Linear(5, 3), nn.Linear(6, 3)

    def forward(self, x):
        n = x.shape[0]
        h, s = torch.tanh(self.a(x)), self.b(x)
        index = torch.tensor([[4, 0, 2]]).expand(n, 3)
        h = h.scatter(1, index, s * s) + h.scatter(1, index, 0.5) + h.scatter_add(1, torch.tensor([[1, 1, 5]]).expand(n, 3), s)
        h = h.index_add(1, torch.tensor([0, 0, 3]), torch.sin(s), alpha=0.5)
        h = h.index_put((torch.tensor([0, 1]), torch.tensor([2, 2])), s[:2, 0] * s[2:4, 1])
        h = h.index_put((torch.tensor([1, 1]),), s[0, :1] * h[:1, :6], accumulate=True)
        tiled = s.repeat(1, 2) * h + s.repeat_interleave(2, dim=1) + h.repeat(2, 1)[n:] + h.roll(2, 1)
        tiled = tiled + torch.roll(h.view(n, 2, 3), (1, -1), (1, 2)).reshape(n, 6) + h.roll(5)
        return self.out(tiled * h + s.repeat_interleave(2).view(n, 6))


def test_scatter_index_add_index_put_repeat_roll():
    check(Scatters(), [pair(), pair(4, seed=1)])


class Bags(nn.Module):
    """nn.EmbeddingBag over fixed ragged bags (one of them empty); ``twin=True`` computes the same bags with
    nn.functional.embedding and sums: PyTorch has no double backward for embedding_bag."""

    OFFSETS = torch.tensor([0, 3, 3, 7])

    def __init__(self, mode, padding_idx=None, weights=None, twin=False):
        super().__init__()
        self.bag = nn.EmbeddingBag(9, 4, mode=mode, padding_idx=padding_idx)
        self.out = nn.Linear(4, 3)
        self.mode, self.padding_idx, self.twin = mode, padding_idx, twin
        self.register_buffer("weights", weights)

    def forward(self, ids):
        ids = ids.reshape(-1)
        if not self.twin:
            h = self.bag(ids, self.OFFSETS, per_sample_weights=self.weights)
        else:
            rows = F.embedding(ids, self.bag.weight)
            bag = torch.searchsorted(self.OFFSETS, torch.arange(ids.shape[0]), right=True) - 1
            keep = ids != self.padding_idx if self.padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
            if self.mode == "max":
                h = torch.stack([rows[(bag == b) & keep].max(0).values if ((bag == b) & keep).any() else rows.new_zeros(4)
                                 for b in range(len(self.OFFSETS))])
            else:
                w = keep.to(rows.dtype) * (self.weights if self.weights is not None else 1)
                h = rows.new_zeros(len(self.OFFSETS), 4).index_add(0, bag, rows * w[:, None])
                if self.mode == "mean":
                    h = h / rows.new_zeros(len(self.OFFSETS)).index_add(0, bag, keep.to(rows.dtype)).clamp_min(1)[:, None]
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("mode,padding_idx,weighted", [("sum", None, False), ("mean", None, False), ("max", None, False),
                                                       ("sum", 0, True), ("mean", 0, False), ("max", 0, False)])
def test_embedding_bag(mode, padding_idx, weighted):
    weights = torch.rand(12, dtype=D64, generator=torch.Generator().manual_seed(2)) if weighted else None
    model = Bags(mode, padding_idx, weights).double()
    with torch.no_grad():
        model.bag.weight.normal_()
    twin = Bags(mode, padding_idx, weights, twin=True).double()
    twin.load_state_dict(model.state_dict())
    ids = torch.tensor([1, 2, 0, 4, 4, 8, 3, 0, 5, 6, 7, 1]).view(4, 3)  # 4 rows: the loader's samples
    batches = [(ids, torch.tensor([0, 2, 1, 1]))]
    hess = explicit_hessian_of(twin, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), lambda b: 4)
    check_fused_against(model, batches, hess)


def test_embedding_bag_with_weights_that_depend_on_the_parameters_is_named():
    class Weighted(Bags):
        def forward(self, ids):
            ids = ids.reshape(-1)
            weights = torch.sigmoid(self.bag.weight[ids, 0])
            return self.out(torch.tanh(self.bag(ids, self.OFFSETS, per_sample_weights=weights)))

    model = Weighted("sum").double()
    ids = torch.tensor([1, 2, 0, 4, 4, 8, 3, 0, 5, 6, 7, 1]).view(4, 3)
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(HessgapError, match=r"aten\.embedding_bag.* \(in bag: EmbeddingBag\) with per_sample_weights"):
        hessgap.hvp(model, [(ids, torch.tensor([0, 2, 1, 1]))], torch.randn(1, n, dtype=D64), path="fused")
