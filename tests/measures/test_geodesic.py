"""Geodesic sharpness and the attention symmetry: each head's blocks found in the models people use, the
GL(h) transform leaving outputs unchanged, the metric's horizontal projection and second-order geodesic
against independent computations, and the measure invariant where plain sharpness moves."""

import pytest
import torch
from torch import nn

import hessgap
from hessgap.measures.attention import HeadPair, Piece, block, find_heads
from hessgap.measures.geodesic import _Pair
from hessgap.measures.rescale import rescaled_copy

from measure_models import batchnorm_net, classification_data, fit, relu_net
from oracles import assert_unchanged, snapshot


class AttentionClassifier(nn.Module):
    """Self-attention over 5 tokens, mean-pooled, then a linear readout: the heads carry the function."""

    def __init__(self, d=8, heads=2, classes=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.out(a.mean(1))


@pytest.fixture(scope="module")
def attention_problem():
    torch.manual_seed(0)
    model = AttentionClassifier().double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, 8, generator=generator, dtype=torch.float64)
    y = (x[:, 0, :2].sum(1) > 0).long() + (x[:, 1, 0] > 0.5).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), [(x[i:i + 32], y[i:i + 32]) for i in range(0, 64, 32)]


def test_heads_are_found_in_multihead_attention_and_hugging_face_models():
    pytest.importorskip("transformers")
    from oracles import tiny_hf

    pairs, notes = find_heads(nn.MultiheadAttention(8, 2))
    assert [(p.kind, p.head) for p in pairs] == [("qk", 0), ("vo", 0), ("qk", 1), ("vo", 1)] and not notes
    params = dict(nn.MultiheadAttention(8, 2).named_parameters())
    assert block(params, pairs[0].g).shape == (9, 4) and block(params, pairs[1].h).shape == (8, 4)
    for kind, heads in (("gpt2", 8), ("bert", 4), ("vit", 4)):
        found, _ = find_heads(tiny_hf(kind))
        assert len(found) == heads, kind


@pytest.mark.parametrize("kind", ["gpt2", "bert", "vit"])
def test_the_gl_h_transform_of_every_head_leaves_hugging_face_outputs_unchanged(kind):
    pytest.importorskip("transformers")
    from oracles import image_batches, tiny_hf, token_batches

    model = tiny_hf(kind)
    data = image_batches() if kind == "vit" else token_batches(causal=kind == "gpt2")
    snap = snapshot(model)
    twin, text, change = rescaled_copy(model, data)
    assert_unchanged(model, snap)
    assert change < 1e-12 and "attention:" in text
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), twin.parameters()))
    assert moved > 0.1  # the weights really moved


def test_a_rotary_model_keeps_only_its_value_output_pairs():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    model.config = type("Config", (), {"rope_theta": 10000.0})()
    pairs, notes = find_heads(model)
    assert {p.kind for p in pairs} == {"vo"} and "rotary" in notes[0]


def _random_pair(seed=0, rows=(6, 5), width=3):
    """A head pair (G, H) of random (6 × 3) and (5 × 3) blocks, and the generator for more draws."""
    generator = torch.Generator().manual_seed(seed)
    params = {"g": torch.randn(rows[0], width, generator=generator, dtype=torch.float64),
              "h": torch.randn(rows[1], width, generator=generator, dtype=torch.float64)}
    pair = HeadPair("qk", "m", 0, (Piece("g", 0, 0, rows[0]),), (Piece("h", 0, 0, rows[1]),))
    return _Pair(pair, params), generator


def _metric(p, xg, xh, yg, yh):
    return float(((p.h.T @ p.h) @ xg.T @ yg).trace() + ((p.g.T @ p.g) @ xh.T @ yh).trace()) / p.c


def test_the_horizontal_projection_is_orthogonal_to_the_orbit_and_idempotent():
    p, generator = _random_pair()
    ug = torch.randn(p.g.shape, generator=generator, dtype=torch.float64)
    uh = torch.randn(p.h.shape, generator=generator, dtype=torch.float64)
    hg, hh = p.horizontal(ug, uh)
    xg, xh = p.xi(hg, hh)
    for _ in range(3):  # every vertical direction (GΩ, −HΩᵀ) is orthogonal in the metric
        omega = torch.randn(3, 3, generator=generator, dtype=torch.float64)
        assert abs(_metric(p, xg, xh, p.g @ omega, -p.h @ omega.T)) < 1e-8  # the ridge of 1e-10 (Gram inverses)
    again = p.horizontal(hg, hh)
    torch.testing.assert_close(again[0], hg)
    torch.testing.assert_close(again[1], hh)
    # u coordinates are Euclidean: ‖u‖² is the metric's norm of ξ(u)
    assert float(hg.square().sum() + hh.square().sum()) == pytest.approx(_metric(p, xg, xh, xg, xh), rel=1e-8)


def _geodesic_ode(g, h, vg, vh, t, steps=2000):
    """The geodesic equation of the metric, integrated by RK4 (an independent check of the closed form)."""
    def acc(g, h, vg, vh):
        ag = (g @ (vh.T @ vh) - vg @ (vh.T @ h + h.T @ vh)) @ torch.linalg.inv(h.T @ h)
        ah = (h @ (vg.T @ vg) - vh @ (vg.T @ g + g.T @ vg)) @ torch.linalg.inv(g.T @ g)
        return ag, ah

    dt = t / steps
    state = [g, h, vg, vh]
    for _ in range(steps):
        def f(s):
            ag, ah = acc(*s)
            return [s[2], s[3], ag, ah]
        k1 = f(state)
        k2 = f([a + dt / 2 * b for a, b in zip(state, k1)])
        k3 = f([a + dt / 2 * b for a, b in zip(state, k2)])
        k4 = f([a + dt * b for a, b in zip(state, k3)])
        state = [a + dt / 6 * (b1 + 2 * b2 + 2 * b3 + b4) for a, b1, b2, b3, b4 in zip(state, k1, k2, k3, k4)]
    return state[0], state[1]


def test_the_second_order_geodesic_agrees_with_the_integrated_geodesic_to_third_order():
    p, generator = _random_pair(seed=3)
    ug, uh = p.horizontal(torch.randn(p.g.shape, generator=generator, dtype=torch.float64),
                          torch.randn(p.h.shape, generator=generator, dtype=torch.float64))
    errors, first = [], []
    for t in (0.01, 0.005):
        g2, h2 = p.geodesic(t * ug, t * uh)
        xg, xh = p.xi(t * ug, t * uh)
        g_ode, h_ode = _geodesic_ode(p.g, p.h, xg, xh, 1.0, steps=200)
        errors.append(float((g2 - g_ode).norm() + (h2 - h_ode).norm()))
        first.append(float((p.g + xg - g_ode).norm() + (p.h + xh - h_ode).norm()))
    assert errors[0] / errors[1] == pytest.approx(8, rel=0.15)  # the error is O(t³)
    assert first[0] / first[1] == pytest.approx(4, rel=0.15)  # the straight line's is O(t²)


def test_geodesic_sharpness_is_invariant_under_attention_symmetries_where_plain_sharpness_moves(attention_problem):
    model, data = attention_problem
    snap = snapshot(model)
    names = ["geodesic", "adaptive_l2", "hessian_lmax", "gaussian", "keskar"]
    result = hessgap.measures(model, data, names, options={"adaptive_l2": {"max_iter": 3}, "keskar": {"max_iter": 3}})
    assert_unchanged(model, snap)
    assert "attention: 4 head block pair(s)" in result.rescaling
    assert result.invariant["geodesic"] is True and result.invariance["geodesic"]["change"] < 1e-8
    for name in names[1:]:
        assert result.invariant[name] is False and result.invariance[name]["change"] > 0.3, name
    assert result.values["geodesic"] > 0 and result.details["geodesic"]["head_pairs"] == 4


@pytest.mark.parametrize("make", [relu_net, batchnorm_net])
def test_geodesic_sharpness_is_invariant_under_relu_and_batchnorm_rescalings(make):
    data = classification_data()
    model = fit(make(), data, steps=60)
    result = hessgap.measures(model, data, ["geodesic"])
    assert result.invariant["geodesic"] is True, result.invariance["geodesic"]
    assert result.details["geodesic"]["head_pairs"] == 0


def test_geodesic_settings_are_checked(attention_problem):
    model, data = attention_problem
    with pytest.raises(hessgap.HessgapError, match="rho must be a finite number > 0"):
        hessgap.measures(model, data, ["geodesic"], options={"geodesic": {"rho": 0}})
    more = hessgap.measures(model, data, ["geodesic"], options={"geodesic": {"steps": 0}}, check_invariance=False)
    assert len(more.details["geodesic"]["rises"]) == 1  # the random start alone
