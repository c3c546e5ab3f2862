"""The spectrum methods on models: against the explicit Hessian from torch.autograd.functional.hessian."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from hessgap.curvature.probes import generator_for, rademacher
from hessgap.errors import HessgapError
from hessgap.spectrum import density, eigenvalues, trace

from oracles import explicit_hessian


def tiny_model(batch_norm=False, dtype=torch.float64):
    torch.manual_seed(1)
    layers = [nn.Linear(5, 6)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh(), nn.Linear(6, 3)]
    model = nn.Sequential(*layers).to(dtype)
    if batch_norm:
        # Non-trivial running statistics, then eval mode (the Hessian is taken with them).
        with torch.no_grad():
            model.train()
            model(torch.randn(64, 5, dtype=dtype) * 2 + 0.5)
    return model.eval()


def tiny_loader(dtype=torch.float64, sizes=(8, 8, 5)):
    generator = torch.Generator().manual_seed(2)
    return [
        (torch.randn(size, 5, generator=generator, dtype=torch.float64).to(dtype), torch.randint(0, 3, (size,), generator=generator))
        for size in sizes
    ]


@pytest.mark.parametrize("batch_norm, which", [(False, "LA"), (True, "SA"), (True, "LM")])
def test_eigenvalues_match_the_explicit_hessian(batch_norm, which):
    model, batches = tiny_model(batch_norm), tiny_loader()
    w = np.linalg.eigvalsh(explicit_hessian(model, batches).numpy())
    k = 3
    reference = {"LA": w[::-1][:k], "SA": w[:k], "LM": w[np.argsort(-np.abs(w))][:k]}[which]
    result = eigenvalues(model, batches, k=k, which=which, tol=1e-8, criterion="residual", block_size=4, max_basis=80)
    assert result.converged and result.n == w.size
    np.testing.assert_allclose(result.eigenvalues, reference, rtol=1e-7, atol=1e-10)


def test_trace_and_density_match_the_explicit_hessian():
    model, batches = tiny_model(), tiny_loader()
    H = explicit_hessian(model, batches)
    n = H.shape[0]
    result = trace(model, batches, num_probes=10, seed=4)
    Z = rademacher(10, n, dtype=torch.float64, device=torch.device("cpu"), generator=generator_for(torch.device("cpu"), 4))
    np.testing.assert_allclose(result.estimates, ((Z @ H) * Z).sum(dim=1).numpy(), rtol=1e-9, atol=1e-12)
    assert result.hvps == 10

    spectrum = density(model, batches, num_probes=2, lanczos_steps=4, seed=4)
    V = Z[:2] / math.sqrt(n)
    for probe in range(2):
        nodes, weights = np.array(spectrum.nodes[probe]), np.array(spectrum.weights[probe])
        power = V[probe].clone()
        for p in range(8):
            assert np.sum(weights * nodes**p) == pytest.approx(float(V[probe] @ power), rel=1e-8, abs=1e-12)
            power = H @ power


def test_max_batches_loss_fn_and_float32():
    model, batches = tiny_model(), tiny_loader()
    first = np.linalg.eigvalsh(explicit_hessian(model, batches[:1]).numpy())[::-1]
    result = eigenvalues(model, batches, k=2, max_batches=1, tol=1e-9, criterion="residual")
    np.testing.assert_allclose(result.eigenvalues, first[:2], rtol=1e-7)

    mse = nn.MSELoss()
    regression = [(x, torch.randn(x.shape[0], 3, dtype=x.dtype)) for x, _ in batches]
    w = np.linalg.eigvalsh(explicit_hessian(model, regression, mse).numpy())
    result = eigenvalues(model, regression, k=1, loss_fn=mse, tol=1e-9, criterion="residual")
    np.testing.assert_allclose(result.eigenvalues, w[-1:], rtol=1e-7)

    model32, batches32 = tiny_model(dtype=torch.float32), tiny_loader(torch.float32)
    top = np.linalg.eigvalsh(explicit_hessian(tiny_model(), tiny_loader()).numpy())[-1]
    result = eigenvalues(model32, batches32, k=1, tol=1e-5)
    assert result.dtype == "float32"
    assert result.eigenvalues[0] == pytest.approx(top, rel=1e-4)


def test_model_is_left_unchanged():
    model, batches = tiny_model(batch_norm=True), tiny_loader()
    model.train()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    eigenvalues(model, batches, k=2)
    trace(model, batches, num_probes=3)
    density(model, batches, num_probes=2, lanczos_steps=5)
    assert model.training
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_bad_model_input():
    model = tiny_model()
    with pytest.raises(HessgapError, match="needs the data"):
        trace(model)
    with pytest.raises(HessgapError, match="no batches"):
        eigenvalues(model, [])


def test_float32_residuals_bound_the_true_error_where_the_estimates_need_not():
    """Against the explicit float64 Hessian, every float32 eigenvalue lies within its residual of a true one
    (up to float32 rounding of the products); the Kato–Temple numbers are estimates only (the field used to
    be called error_bounds, and fell below the true error for 45 of 280 pairs)."""
    model32, loader32 = tiny_model(batch_norm=True).float(), tiny_loader(torch.float32)
    true = torch.linalg.eigvalsh(explicit_hessian(model32, loader32))  # at the float32 point, in float64
    found = eigenvalues(model32, loader32, k=6, tol=1e-6, max_iter=200)
    floor = 1e-5 * float(true.abs().max())  # float32 products: a few ulps of ‖H‖
    for theta, residual, estimate in zip(found.eigenvalues, found.residuals, found.error_estimates):
        error = float((true - theta).abs().min())
        assert error <= residual + floor
        assert estimate <= residual + 1e-12
