"""GGNOperator and FisherOperator against their explicit matrices on tiny float64 models.

The references are built here from torch.autograd.functional alone: J = ∂z/∂θ of the model's output z over all
samples, H_L = ∂²f/∂z² of the mean loss as a function of z, G = Jᵀ·H_L·J; the empirical Fisher from the
per-sample gradients g_u = J_uᵀ·∇_z ℓ_u, F = Σ g_u g_uᵀ / N.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hessgap
from hessgap.curvature.gauss_newton import FisherOperator, GGNOperator, curvature_operator
from hessgap.errors import HessgapError

N, D, C = 12, 4, 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()


def _data(regression=False):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    Y = torch.randn(N, C, generator=g, dtype=torch.float64) if regression else torch.randint(0, C, (N,), generator=g)
    return X, Y, [(X[:7], Y[:7]), (X[7:], Y[7:])]  # unequal batches: the weights matter


def _jacobian(model, X):
    names = [n for n, _ in model.named_parameters()]
    ps = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in ps]
    theta = torch.cat([p.reshape(-1) for p in ps])

    def output(flat):
        return functional_call(model, dict(zip(names, (a.view_as(p) for a, p in zip(flat.split(sizes), ps)))), (X,))

    z = output(theta).detach()
    return z, torch.autograd.functional.jacobian(output, theta).reshape(z.numel(), -1)


def _references(model, X, Y, regression=False):
    z, J = _jacobian(model, X)

    def mean_loss(flat_z):
        zz = flat_z.view_as(z)
        return F.mse_loss(zz, Y) if regression else F.cross_entropy(zz, Y)

    H_L = torch.autograd.functional.hessian(mean_loss, z.reshape(-1))
    G = J.T @ H_L @ J
    per_unit_grad_z = (2.0 / C) * (z - Y) if regression else torch.softmax(z, -1) - F.one_hot(Y, C)
    g = torch.einsum("uc,ucn->un", per_unit_grad_z, J.reshape(N, C, -1))
    return G, g.T @ g / N


def _matrix(operator):
    return operator.matmat(torch.eye(operator.n, dtype=torch.float64))


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("regression", [False, True], ids=["cross-entropy", "mse"])
def test_ggn_and_empirical_fisher_equal_explicit_matrices(path, regression):
    model = _model()
    X, Y, data = _data(regression)
    loss_fn = F.mse_loss if regression else None
    G, Fe = _references(model, X, Y, regression)
    ggn = GGNOperator(model, data, loss_fn=loss_fn, path=path)
    assert ggn.path == path
    assert (_matrix(ggn) - G).abs().max() <= 1e-10
    fisher = FisherOperator(model, data, loss_fn=loss_fn, kind="empirical", path=path)
    assert (_matrix(fisher) - Fe).abs().max() <= 1e-10


@pytest.mark.parametrize("regression", [False, True], ids=["cross-entropy", "mse"])
def test_true_fisher_is_a_seeded_monte_carlo_estimate_of_the_ggn(regression):
    model = _model()
    X, Y, data = _data(regression)
    loss_fn = F.mse_loss if regression else None
    G, _ = _references(model, X, Y, regression)
    few = FisherOperator(model, data, loss_fn=loss_fn, kind="true", samples=20, seed=3)
    many = FisherOperator(model, data, loss_fn=loss_fn, kind="true", samples=2000, seed=3)
    error_few = float((_matrix(few) - G).norm() / G.norm())
    error_many = float((_matrix(many) - G).norm() / G.norm())
    assert error_many < 0.05 and error_many < error_few / 3  # the MC error falls as 1/√samples
    # fixed draws: the same matrix on every product, and the same with the generic path
    assert torch.equal(_matrix(few), _matrix(few))
    generic = FisherOperator(model, data, loss_fn=loss_fn, kind="true", samples=20, seed=3, path="generic")
    assert (_matrix(generic) - _matrix(few)).abs().max() <= 1e-10
    other_seed = FisherOperator(model, data, loss_fn=loss_fn, kind="true", samples=20, seed=4)
    assert not torch.allclose(_matrix(other_seed), _matrix(few))


def test_ggn_eigenvalues_are_nonnegative_and_match_the_explicit_spectrum():
    model = _model()
    X, Y, data = _data()
    G, _ = _references(model, X, Y)
    exact = torch.linalg.eigvalsh(G)
    result = hessgap.eigenvalues(model, data, k=3, curvature="ggn", tol=1e-10)
    assert torch.allclose(torch.as_tensor(result.eigenvalues, dtype=torch.float64), exact.flip(0)[:3], atol=1e-8)
    smallest = hessgap.eigenvalues(GGNOperator(model, data), k=2, which="SA")
    assert min(smallest.eigenvalues) >= -1e-10 * float(exact.max())


@pytest.mark.parametrize("curvature", ["ggn", "empirical-fisher"])
def test_spectrum_functions_take_the_curvature(curvature):
    model = _model()
    X, Y, data = _data()
    G, Fe = _references(model, X, Y)
    M = G if curvature == "ggn" else Fe
    trace = hessgap.trace(model, data, curvature=curvature, num_probes=400, seed=0)
    assert abs(trace.value - float(M.trace())) <= 4 * trace.stderr + 1e-9
    density = hessgap.density(model, data, curvature=curvature, num_probes=2, lanczos_steps=20, seed=0)
    assert density.grid is not None
    operator = curvature_operator(curvature, model, data)
    assert type(operator) is (GGNOperator if curvature == "ggn" else FisherOperator)


def test_bad_choices_are_refused():
    model = _model()
    _, _, data = _data()
    with pytest.raises(HessgapError, match="curvature"):
        hessgap.trace(model, data, curvature="laplacian")
    with pytest.raises(HessgapError, match="kind"):
        FisherOperator(model, data, kind="sampled")
    with pytest.raises(HessgapError, match="compute_loss"):
        GGNOperator(model, data, compute_loss=lambda m, b: m(b[0]).sum())
    with pytest.raises(HessgapError, match="curvature"):
        hessgap.trace(torch.eye(3, dtype=torch.float64), curvature="ggn")


def test_block_spectrum_landscape_and_measures_take_the_curvature():
    model = _model()
    X, Y, data = _data()
    G, _ = _references(model, X, Y)
    blocks = hessgap.block_spectrum(model, data, blocks="parameter", curvature="ggn", num_probes=0, tol=1e-8)
    exact_first = float(torch.linalg.eigvalsh(G[:20, :20])[-1])  # the first Linear's weight: 5 × 4
    assert blocks.sizes[0] == 20
    assert blocks.eigenvalues[0][0] == pytest.approx(exact_first, rel=1e-6)
    result = hessgap.measures(model, data, ["hessian_lmax"], curvature="ggn", check_invariance=False)
    top = float(torch.linalg.eigvalsh(G)[-1])
    assert result.values["hessian_lmax"] == pytest.approx(top, rel=5e-3)  # the measure's Lanczos tolerance
    assert result.settings["hessian_lmax"]["curvature"] == "ggn"
    hessian = hessgap.measures(model, data, ["hessian_lmax"], check_invariance=False).values["hessian_lmax"]
    assert abs(hessian - top) > 0.05 * top  # the GGN's is another number: the test tells the two apart
    surface = hessgap.landscape(model, data, directions="hessian", dims=1, steps=3, curvature="ggn")
    assert surface.eigenvalues[0] == pytest.approx(top, rel=5e-3)



def test_hugging_face_own_token_loss_ggn_product():
    """GPT-2's own shifted token loss with padding (-100): G·v against Jᵀ·H_L·J·v by torch.func on the logits.
    The fused path differentiates the captured own loss, which transformers computes in float32 (it casts the
    logits), hence its looser bound; the generic path's loss of the logits stays in float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from oracles import tiny_hf, token_batches

    model, batches = tiny_hf("gpt2"), token_batches(causal=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ps = [p.detach() for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in ps]
    theta = torch.cat([p.reshape(-1) for p in ps])
    count = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)

    def logits(flat):
        state = dict(zip(names, (a.view_as(p) for a, p in zip(flat.split(sizes), ps))))
        return [functional_call(model, state, (), {k: v for k, v in b.items() if k != "labels"}).logits
                for b in batches]

    def mean_loss(zs):
        return sum(F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") for z, b in zip(zs, batches)) / count

    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with sdpa_kernel([SDPBackend.MATH]):  # forward-mode AD through attention
        zs, jv = torch.func.jvp(logits, (theta,), (v,))
        _, hjv = torch.func.jvp(torch.func.grad(mean_loss), (zs,), (jv,))
        reference = torch.func.vjp(logits, theta)[1](hjv)[0]
    for path, bound in (("generic", 1e-10), ("fused", 1e-6)):
        operator = GGNOperator(model, batches, path=path)
        got = operator.matmat(v[None])[0]
        assert operator.path == path
        assert float((got - reference).norm() / reference.norm()) <= bound


def test_two_gloo_ranks_equal_one_process():
    """Each rank holds a shard; the true Fisher numbers its samples across the ranks, so its draws are the same."""
    import numpy as np

    from rank_workers import batches_of, gauss_newton_matrices, gauss_newton_on_shards, tiny_problem
    from ranks import run_ranks

    results = run_ranks(gauss_newton_on_shards, 2)
    model, x, y = tiny_problem()
    single = gauss_newton_matrices(batches_of(x, y), model)
    assert results[0] == results[1]
    for name, expected in single.items():
        np.testing.assert_allclose(np.asarray(results[0][name]), np.asarray(expected), rtol=0, atol=1e-10,
                                   err_msg=name)
