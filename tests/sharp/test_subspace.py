"""The random subspace (hessgap.sharp.subspace) and sharpness in it (A ∈ R^{n×p}) against an explicit A held in memory."""

import itertools

import pytest
import torch
from torch import nn

import hessgap
from hessgap.sharp import subspace as subspace_module
from hessgap.sharp.subspace import FlatParameters, RandomSubspace

from oracles import ONE_BATCH, identity_loss

pytestmark = pytest.mark.usefixtures("one_thread")


class Quadratic(nn.Module):
    """loss = Σ_i a_i w_i² + b·w over several parameter tensors of odd shapes (flattened in order)."""

    def __init__(self, shapes, a, b, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64)) for s in shapes]
        )
        self.register_buffer("a", a)
        self.register_buffer("b", b)

    def flat(self):
        return torch.cat([w.reshape(-1) for w in self.weights])

    def forward(self, inputs):
        w = self.flat()
        return (self.a * w * w).sum() + (self.b * w).sum()


SHAPES = [(3, 4), (5,), (2, 3, 2)]  # n = 29


@pytest.fixture
def small_blocks(monkeypatch):
    # blocks of 7 rows cross the parameter boundaries (12, 17, 29), exercising the chunked path
    monkeypatch.setattr(subspace_module, "BLOCK_ROWS", 7)


def test_same_seed_same_matrix_held_or_regenerated(small_blocks):
    held = RandomSubspace(29, 4, seed=5, dtype=torch.float64)
    streamed = RandomSubspace(29, 4, seed=5, dtype=torch.float64, memory_bytes=0)
    assert held.held and not streamed.held and streamed.num_blocks == 5
    assert torch.equal(held.matrix(), streamed.matrix())
    assert not torch.equal(held.matrix(), RandomSubspace(29, 4, seed=6, dtype=torch.float64).matrix())
    scaled = RandomSubspace(29, 4, seed=5, dtype=torch.float64, scale="sqrt_n")
    assert torch.allclose(scaled.matrix(), held.matrix() / 29**0.5)


def test_default_budget_holds_a_when_a_quarter_of_free_memory_fits(small_blocks, monkeypatch):
    # 29 × 4 float64 entries = 928 bytes: held with 4 KB free (budget 1 KB), streamed with 2 KB (budget 512 B)
    monkeypatch.setattr(subspace_module, "available_bytes", lambda device: 4096)
    held = RandomSubspace(29, 4, seed=5, dtype=torch.float64)
    monkeypatch.setattr(subspace_module, "available_bytes", lambda device: 2048)
    streamed = RandomSubspace(29, 4, seed=5, dtype=torch.float64)
    monkeypatch.setattr(subspace_module, "available_bytes", lambda device: None)  # unknown: the fixed 256 MiB
    fallback = RandomSubspace(29, 4, seed=5, dtype=torch.float64)
    assert held.held and not streamed.held and fallback.held
    assert torch.equal(held.matrix(), streamed.matrix())


def test_products_match_the_explicit_matrix(small_blocks):
    model = Quadratic(SHAPES, torch.ones(29, dtype=torch.float64), torch.zeros(29, dtype=torch.float64))
    x = [w.detach().clone() for w in model.weights]
    flat_x = torch.cat([t.reshape(-1) for t in x])
    sub = RandomSubspace(29, 4, seed=1, dtype=torch.float64, memory_bytes=0)
    A = sub.matrix()
    assert A.shape == (29, 4)
    torch.testing.assert_close(sub.pinv_apply(FlatParameters(x)), torch.linalg.pinv(A) @ flat_x)
    g = torch.randn(29, dtype=torch.float64)
    parts = list(torch.split(g, [12, 5, 12]))
    torch.testing.assert_close(sub.rmatvec(FlatParameters(parts)), A.T @ g)
    z = torch.randn(4, dtype=torch.float64)
    out = [torch.empty_like(t) for t in x]
    sub.write_shifted(FlatParameters(x), z, FlatParameters(out))
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in out]), flat_x + A @ z)


def _explicit_setup(seed, p, a, b):
    model = Quadratic(SHAPES, a, b)
    x = model.flat().detach().clone()
    A = RandomSubspace(29, p, seed=seed, dtype=torch.float64).matrix()
    radius = 1e-2 * ((torch.linalg.pinv(A) @ x).abs() + 1)
    return model, x, A, radius


@pytest.mark.parametrize("solver", ["box-ascent", "lbfgsb"])
def test_linear_function_in_the_subspace(small_blocks, solver):
    # f(x + A z) = b·x + (Aᵀb)·z: the maximum over the box is at z = sign(Aᵀb)·r with r from A⁺x
    torch.manual_seed(4)
    b = torch.randn(29, dtype=torch.float64)
    model, x, A, r = _explicit_setup(3, 6, torch.zeros(29, dtype=torch.float64), b)
    result = hessgap.sharpness(
        model, ONE_BATCH, epsilon=1e-2, subspace_dim=6, seed=3, loss_fn=identity_loss, solver=solver,
        subspace_memory_bytes=0,
    )
    increase = float(((A.T @ b).abs() * r).sum())
    assert result.loss == pytest.approx(float(b @ x), rel=1e-12)
    assert result.max_loss - result.loss == pytest.approx(increase, rel=1e-9)
    assert result.subspace_dim == 6


def test_convex_quadratic_in_the_subspace_reaches_the_best_vertex(small_blocks):
    # f(x + A z) is convex in z, so its box maximum is at one of the 2^p vertices: enumerate them
    torch.manual_seed(5)
    a = torch.rand(29, dtype=torch.float64) + 0.1
    p = 4
    model, x, A, r = _explicit_setup(8, p, a, torch.zeros(29, dtype=torch.float64))
    best = max(
        float((a * (x + A @ (torch.tensor(signs, dtype=torch.float64) * r)) ** 2).sum())
        for signs in itertools.product((-1.0, 1.0), repeat=p)
    )
    ours = hessgap.sharpness(model, ONE_BATCH, epsilon=1e-2, subspace_dim=p, seed=8, loss_fn=identity_loss)
    paper = hessgap.sharpness(
        model, ONE_BATCH, epsilon=1e-2, subspace_dim=p, seed=8, loss_fn=identity_loss, solver="lbfgsb"
    )
    assert ours.max_loss == pytest.approx(best, rel=1e-10)
    assert paper.max_loss <= best * (1 + 1e-12)
    assert ours.value >= paper.value - 1e-9


def test_streamed_and_held_subspace_give_the_same_sharpness(small_blocks):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    data = [(torch.randn(32, 6), torch.randint(0, 3, (32,)))]
    held = hessgap.sharpness(model, data, subspace_dim=7, seed=2, max_iter=4)
    streamed = hessgap.sharpness(model, data, subspace_dim=7, seed=2, max_iter=4, subspace_memory_bytes=0)
    assert held.max_loss == pytest.approx(streamed.max_loss, rel=1e-6)
    other = hessgap.sharpness(model, data, subspace_dim=7, seed=3, max_iter=4)
    assert other.max_loss != held.max_loss


def test_full_rank_subspace_is_a_change_of_basis():
    # p = n is allowed (the largest subspace); the box then lives on A⁺x = A⁻¹x
    model = nn.Linear(2, 2)
    data = [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]
    result = hessgap.sharpness(model, data, subspace_dim=6, max_iter=3)
    assert result.value >= 0 and result.subspace_dim == 6


def test_subspace_true_means_the_papers_100_directions():
    model = nn.Linear(20, 6)
    data = [(torch.randn(8, 20), torch.randint(0, 6, (8,)))]
    assert hessgap.sharpness(model, data, subspace_dim=True, max_iter=1).subspace_dim == 100


def test_sign_ascent_in_the_subspace_still_reaches_the_linear_maximum(small_blocks):
    # the previous subspace default, now asked for explicitly (benchmarks/sharpness_ratio.py --sign-ascent)
    torch.manual_seed(4)
    b = torch.randn(29, dtype=torch.float64)
    model, x, A, r = _explicit_setup(3, 6, torch.zeros(29, dtype=torch.float64), b)
    result = hessgap.sharpness(
        model, ONE_BATCH, epsilon=1e-2, subspace_dim=6, seed=3, loss_fn=identity_loss, subspace_memory_bytes=0,
        solver="box-ascent",
    )
    assert result.kernel != "scipy"  # the sign-ascent path ran
    assert result.max_loss - result.loss == pytest.approx(float(((A.T @ b).abs() * r).sum()), rel=1e-9)


def test_pinv_apply_gives_the_same_bits_every_call():
    # the box of Metric 2.1 is centred on A⁺x: two equal sharpness calls must see the very same box
    generator = torch.Generator().manual_seed(7)
    x = [torch.randn(40, 30, generator=generator, dtype=torch.float64), torch.randn(30, generator=generator, dtype=torch.float64)]
    sub = RandomSubspace(1230, 100, seed=0, dtype=torch.float64)
    first = sub.pinv_apply(FlatParameters(x))
    shifts = []
    for size in range(1, 12):
        shifts.append(torch.empty(7 * size, dtype=torch.float64))  # other allocations in between
        assert torch.equal(sub.pinv_apply(FlatParameters(x)), first)
