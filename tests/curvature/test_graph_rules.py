"""The graph engine's op rules on tiny float64 graphs against the explicit Hessian (relative error ≤ 1e-10)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessgap import _extension

from graph_oracles import check_fused_against, check_fused_against_generic, explicit_hessian_of
from oracles import explicit_hessian, randomize_batchnorm

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")]
D64 = torch.float64


def pair(n=6, features=5, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, dtype=D64, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def check(model, batches, loss_fn=None, **kwargs):
    model = model.double().eval()
    hess = explicit_hessian(model, batches, loss_fn)
    return check_fused_against(model, batches, hess, loss_fn=loss_fn, **kwargs)


class Pointwise(nn.Module):
    """LayerNorm, RMSNorm, both GELUs, SiLU, ReLU, Tanh, sigmoid, products, quotients, powers, exp/log/sqrt."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.ln, self.rms = nn.LayerNorm(8), nn.RMSNorm(8, eps=1e-6)

    def forward(self, x):
        h = self.a(x)
        h = F.gelu(self.ln(h)) + F.gelu(h, approximate="tanh")
        h = F.silu(self.rms(h)) * torch.tanh(h) + F.relu(h) - torch.sigmoid(h) / 2
        g = self.b(h)
        h = h / (1.5 + g * g) + torch.exp(-g.pow(2)) + torch.log(1 + g * g) + torch.sqrt(2 + torch.sin(g))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1) - h.sum(-1, keepdim=True) / 8
        return self.out(h)


def test_pointwise_norms_and_activations():
    check(Pointwise(), [pair(), pair(4, seed=1)])


class HandAttention(nn.Module):
    """Attention written out: matmul, masked_fill, softmax, einsum, views, permutes, splits, cat, slices."""

    def __init__(self, causal=True):
        super().__init__()
        self.qkv, self.out, self.causal = nn.Linear(5, 12), nn.Linear(8, 3), causal

    def forward(self, x):
        b = x.shape[0] // 3
        h = self.qkv(x).view(b, 3, 12)
        q, k, v = h.split(4, dim=-1)
        s = q @ k.transpose(-1, -2) / 2.0
        if self.causal:
            s = s.masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), float("-inf"))
        p = F.dropout(torch.softmax(s, -1), 0.1, training=self.training)
        o = torch.einsum("bij,bjd->bid", p, v) + torch.bmm(p, v) * 0.5
        o = torch.cat([o, q[:, :, :2] * k[:, :, 2:]], dim=-1)  # (b, 3, 6)
        o = torch.stack([o[:, 0], o[:, 1:].sum(1)], dim=1).permute(0, 2, 1).reshape(b, 12)
        o = F.pad(o, (0, 2)).unsqueeze(1).expand(b, 3, 14)[:, 1, 2:10]
        return self.out(o).unsqueeze(1).expand(b, 3, 3).reshape(-1, 3)


def test_hand_written_attention():
    check(HandAttention(), [pair(6), pair(9, seed=1)])


class Sdpa(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.q, self.k, self.v, self.out = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        b, t = x.shape[0] // 4, 4
        x = x.view(b, t, 5)
        q = self.q(x).view(b, t, 2, 4).transpose(1, 2)
        k = self.k(x).view(b, t, 2, 4).transpose(1, 2)
        v = self.v(x).view(b, t, 2, 3).transpose(1, 2)
        kwargs = {}
        if self.mode == "causal":
            kwargs["is_causal"] = True
        elif self.mode == "bool":
            mask = torch.ones(t, t, dtype=torch.bool).tril()
            mask[0, 1] = True
            kwargs["attn_mask"] = mask
        elif self.mode == "float":
            kwargs["attn_mask"] = torch.linspace(-1, 1, t * t, dtype=x.dtype).view(t, t)
        elif self.mode == "scale":
            kwargs["scale"] = 0.3
        elif self.mode == "cross":
            k, v = k[:, :, :3], v[:, :, :3]
        elif self.mode == "three_d":
            q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        o = F.scaled_dot_product_attention(q, k, v, **kwargs)
        if self.mode == "three_d":
            o = o.view(b, 2, t, 3)
        return self.out(o.transpose(1, 2).reshape(b * t, 6))


@pytest.mark.parametrize("mode", ["plain", "causal", "bool", "float", "scale", "cross", "three_d"])
def test_scaled_dot_product_attention(mode):
    check(Sdpa(mode), [pair(8), pair(4, seed=1)])


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(4, 4, 3, padding="same", groups=2, dilation=1)
        self.c4 = nn.Conv2d(4, 3, 3, padding=1)  # on a 1×1 map: only the kernel's centre meets it
        self.bn, self.gn = nn.BatchNorm2d(4), nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 + 4 + 4 + 2 + 3, 3)

    def forward(self, x):
        n = x.shape[0]
        a = F.max_pool1d(torch.tanh(self.c1(x.view(n, 2, 8))), 2)  # (n, 4, 4)
        img = x.view(n, 1, 4, 4)
        h = F.relu(self.bn(self.c2(img)))  # (n, 4, 2, 2)
        h = self.gn(self.c3(h)) + h
        m = F.max_pool2d(h, 2).flatten(1)
        s = F.adaptive_avg_pool2d(h, 1).flatten(1) + F.avg_pool2d(h, 2).flatten(1)
        t = F.adaptive_max_pool2d(img, (1, 2)).flatten(1)
        c = torch.tanh(self.c4(F.adaptive_avg_pool2d(h, 1))).flatten(1)
        return self.fc(torch.cat([m, s, a.mean(-1), t, c], 1))


def test_convolutions_norms_pooling():
    model = randomize_batchnorm(ConvNet()).double().eval()
    batches = [pair(5, features=16), pair(3, features=16, seed=1)]
    # autograd's vectorized Hessian has no batching rule for max-pooling's double backward: row by row
    hess = explicit_hessian_of(model, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), lambda b: b[0].shape[0],
                               vectorize=False)
    check_fused_against(model, batches, hess)


class Tokens(nn.Module):
    """Embedding (tied with the output layer, padding_idx), per-token logits (N, C, T)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6, padding_idx=0)
        self.mix = nn.Linear(6, 6)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        return (h @ self.emb.weight.t()).transpose(1, 2)  # (N, 7, T)


@pytest.mark.parametrize("loss", ["ignore_index", "smoothing"])
def test_embedding_tied_weights_and_token_cross_entropy(loss):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (4, 5), generator=gen)
    targets = torch.randint(0, 7, (4, 5), generator=gen)
    targets[0, :2] = -100
    loss_fn = nn.CrossEntropyLoss() if loss == "ignore_index" else nn.CrossEntropyLoss(label_smoothing=0.2)
    check(Tokens(), [(ids, targets), (ids[:2], targets[:2])], loss_fn)


def test_probability_targets_mse_nll_and_sums_of_losses():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    x, _ = pair()
    probs = torch.softmax(torch.randn(6, 3, dtype=D64), -1)
    check(Two(), [(x, probs)], nn.CrossEntropyLoss())
    check(Two(), [(x, torch.randn(6, 3, dtype=D64))], nn.MSELoss())
    y = torch.randint(0, 3, (6,))

    def nll_plus_aux(out, target):
        return F.nll_loss(F.log_softmax(out, -1), target) + 0.1 * out.pow(2).mean()

    model = Two().double()
    hess = explicit_hessian_of(model, [(x, y)], lambda m, b: nll_plus_aux(m(b[0]), b[1]), lambda b: b[0].shape[0])
    check_fused_against(model, [(x, y)], hess, loss_fn=nll_plus_aux)


def test_frozen_and_selected_parameters():
    model = Pointwise().double().eval()
    model.ln.weight.requires_grad_(False)
    batches = [pair()]
    check(model, batches)
    full = explicit_hessian(model, batches)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    keep = [i for i, n in enumerate(names) if n.startswith("b.") or n.startswith("rms.")]
    index = torch.cat([torch.arange(sum(sizes[:i]), sum(sizes[: i + 1])) for i in keep])
    check_fused_against(model, batches, full[index][:, index], params=["b", "rms"])


def test_tuple_and_mapping_batches():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 3), nn.Linear(2, 3)

        def forward(self, x, z=None, labels=None):
            return self.a(x) * torch.tanh(self.b(z))

    model = TwoInputs().double().eval()
    x, y = pair()
    z = torch.randn(6, 2, dtype=D64)
    def loss(m, b):
        return F.cross_entropy(m(b["x"], z=b["z"]), b["labels"])

    hess = explicit_hessian_of(model, [{"x": x, "z": z, "labels": y}], loss, lambda b: 6)
    check_fused_against(model, [(x, z, y)], hess)
    check_fused_against(model, [{"x": x, "z": z, "labels": y}], hess, loss_fn=nn.CrossEntropyLoss())



class MaskedAndCast(nn.Module):
    """where with a number on either side (T5's masks), type_as an activation (Gemma's RMSNorm casts back to its
    input's dtype), a softmax."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        keep = torch.arange(6) % 3 != 0
        scores = torch.where(keep, h, -4.0) + torch.where(keep, 0.5, h * h)
        normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(scores)
        return self.out(torch.softmax(scores, -1) * normed)


def test_where_with_a_number_and_type_as_an_activation():
    check(MaskedAndCast(), [pair(), pair(4, seed=1)])


class GroupedHeads(nn.Module):
    """scaled_dot_product_attention with 4 query heads sharing 2 key/value heads (enable_gqa)."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.q, self.k, self.v, self.out = nn.Linear(5, 12), nn.Linear(5, 6), nn.Linear(5, 4), nn.Linear(8, 3)
        if mode == "learned_bias":  # a learned additive bias, shared by the batch (a relative position bias)
            self.bias = nn.Parameter(0.3 * torch.randn(4, 4, 4))

    def forward(self, x):
        b, t = x.shape[0] // 4, 4
        x = x.view(b, t, 5)
        q = self.q(x).view(b, t, 4, 3).transpose(1, 2)
        k = self.k(x).view(b, t, 2, 3).transpose(1, 2)
        v = self.v(x).view(b, t, 2, 2).transpose(1, 2)
        kwargs = {"enable_gqa": True}
        if self.mode == "causal":
            kwargs["is_causal"] = True
        elif self.mode == "bool":
            kwargs["attn_mask"] = torch.ones(t, t, dtype=torch.bool).tril()
        elif self.mode == "learned_bias":
            kwargs["attn_mask"] = self.bias.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, **kwargs)
        return self.out(o.transpose(1, 2).reshape(b * t, 8))


@pytest.mark.parametrize("mode", ["plain", "causal", "bool", "learned_bias"])
def test_grouped_query_attention(mode):
    check(GroupedHeads(mode), [pair(8), pair(4, seed=1)])


@pytest.mark.parametrize("shape", [(2, 4, 4), (4, 4)])
def test_attention_whose_mask_is_a_learned_bias(shape):
    """A learned bias per head or shared by the heads (T5's relative position bias enters as the mask), added to a
    constant mask."""
    class LearnedBias(Sdpa):
        def __init__(self):
            super().__init__("plain")
            self.bias = nn.Parameter(0.3 * torch.randn(shape))

        def forward(self, x):
            b, t = x.shape[0] // 4, 4
            x = x.view(b, t, 5)
            q, k = (m(x).view(b, t, 2, 4).transpose(1, 2) for m in (self.q, self.k))
            v = self.v(x).view(b, t, 2, 3).transpose(1, 2)
            bias = self.bias.repeat(1, 1) if len(shape) == 2 else self.bias
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias + torch.linspace(-1, 1, t * t, dtype=x.dtype).view(t, t))
            return self.out(o.transpose(1, 2).reshape(b * t, 6))

    check(LearnedBias(), [pair(8), pair(4, seed=1)])


def test_softmax_computed_in_another_dtype():
    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.out(F.softmax(self.a(x), dim=-1, dtype=torch.float64).to(x.dtype) * self.a(x))

    torch.manual_seed(0)
    check_fused_against_generic(Router().eval(), [(pair()[0].float(), pair()[1])])


def weight_norm_twin(v, g, dim):
    """w = g·v/‖v‖ written out (PyTorch's own double backward of aten._weight_norm is wrong for dim 0 or −1 of v's
    dimensions on CPU; see test_weight_norm_parametrizations)."""
    if dim is None:
        return g * v / v.norm()
    dims = [d for d in range(v.dim()) if d != dim]
    return g * v / v.norm(dim=dims, keepdim=True)


class WeightNormed(nn.Module):
    """weight_norm parametrizations of a Linear (dim 0), a Conv1d (over the whole weight) and a Linear over its
    input dimension (dim 1); ``twin=True`` computes the same weights with plain ops."""

    def __init__(self, twin=False):
        super().__init__()
        self.twin = twin
        self.a = nn.utils.parametrizations.weight_norm(nn.Linear(5, 6))
        self.c = nn.utils.parametrizations.weight_norm(nn.Conv1d(1, 2, 3, padding=1), dim=None)
        self.d = nn.utils.parametrizations.weight_norm(nn.Linear(6, 3), dim=1)

    def _weight(self, layer, dim):
        if not self.twin:
            return layer.weight
        g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
        return weight_norm_twin(v, g, dim)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self._weight(self.a, 0), self.a.bias))
        h = h + F.conv1d(h.unsqueeze(1), self._weight(self.c, None), self.c.bias, padding=1).sum(1)
        return F.linear(torch.tanh(h), self._weight(self.d, 1), self.d.bias)


def test_weight_norm_parametrizations():
    torch.manual_seed(0)
    model = WeightNormed().double().eval()
    with torch.no_grad():  # g away from ‖v‖: the initialization would hide terms in g/‖v‖
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    twin = WeightNormed(twin=True).double().eval()
    twin.load_state_dict(model.state_dict())
    batches = [pair(), pair(4, seed=1)]
    check_fused_against(model, batches, explicit_hessian(twin, batches))


def test_a_view_of_an_input_laid_out_otherwise_than_at_capture():
    """A rule may lay its output out otherwise than the op it replaces (the fused attention's O is (B, H, T, D)
    where PyTorch's CPU kernel gives (B, T, H, D) transposed); a view the capture recorded then copies."""
    from hessgap.curvature.graph.capture import capture
    from hessgap.curvature.graph.rules.views import Reshape

    class Viewed(nn.Module):
        def forward(self, x):
            return x.transpose(0, 1).contiguous().view(-1, 3)

    captured = capture(Viewed(), lambda out, y: out.sum(), False, ((torch.randn(2, 3, 3),), {}, None))
    node = next(n for n in captured.graph.nodes if n.target is torch.ops.aten.view.default)
    transposed = torch.randn(3, 2, 3).transpose(0, 1).transpose(0, 1)  # the values, with other strides
    laid_out = transposed.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    value, _ = Reshape(node).forward([laid_out, node.args[1]], {})
    assert torch.equal(value, laid_out.reshape(-1, 3))
