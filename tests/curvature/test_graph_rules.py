"""The graph engine's op rules on tiny float64 graphs against the explicit Hessian (relative error ≤ 1e-10)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessgap import _extension

from graph_oracles import check_fused_against, explicit_hessian_of
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



def test_convolution_backward_copies_no_shape_placeholder():
    """The input or weight that convolution_backward takes for its shape only must not be copied into a full
    tensor by the backward (a stride-0 expand was: the input's size per R-backward term)."""
    from torch.profiler import profile

    from hessgap.curvature.graph.rules.conv import _shape_only

    x, w, g = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(2, 4, 8, 8)
    conv_args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    with profile() as prof:
        gx = torch.ops.aten.convolution_backward(g, _shape_only(x.shape, g), w, None, *conv_args,
                                                 [True, False, False])[0]
        gw = torch.ops.aten.convolution_backward(g, x, _shape_only(w.shape, x), None, *conv_args,
                                                 [False, True, False])[1]
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert copies == []
    want_x, want_w, _ = torch.ops.aten.convolution_backward(g, x, w, None, *conv_args, [True, True, False])
    torch.testing.assert_close(gx, want_x)
    torch.testing.assert_close(gw, want_w)

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

