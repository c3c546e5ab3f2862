"""hessgap.spectrum.density: quadrature exactness, normalization, its mean, and the PNG it writes."""

import json
import math

import numpy as np
import pytest
import torch

from hessgap.curvature.probes import generator_for, rademacher
from hessgap.errors import HessgapError, NonFiniteError
from hessgap.spectrum import density, trace


def random_symmetric(n, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return ((B + B.T) / math.sqrt(2 * n)).to(dtype)


def probes(num, n, seed):
    """The normalized Rademacher probes density() starts from with this seed."""
    generator = generator_for(torch.device("cpu"), seed)
    return rademacher(num, n, dtype=torch.float64, device=torch.device("cpu"), generator=generator) / math.sqrt(n)


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_nodes_and_weights_reproduce_the_moments(reorthogonalize):
    """Gauss quadrature from m Lanczos steps is exact for vᵀAᵖv, p ≤ 2m − 1."""
    n, steps, num = 60, 5, 3
    A = random_symmetric(n, seed=0)
    result = density(A, num_probes=num, lanczos_steps=steps, seed=4, reorthogonalize=reorthogonalize)
    V = probes(num, n, seed=4)
    for probe in range(num):
        nodes = np.array(result.nodes[probe])
        weights = np.array(result.weights[probe])
        assert len(nodes) == steps
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
        v = V[probe]
        power = v.clone()
        for p in range(2 * steps):
            exact = float(v @ power)
            quadrature = float(np.sum(weights * nodes**p))
            assert quadrature == pytest.approx(exact, rel=1e-9, abs=1e-12), f"probe {probe}, moment {p}"
            power = A @ power


def test_integrates_to_one_and_its_mean_is_the_hutchinson_trace_over_n():
    n = 80
    A = random_symmetric(n, seed=1) + torch.diag(torch.linspace(0, 4, n, dtype=torch.float64))
    result = density(A, num_probes=6, lanczos_steps=20, seed=9)
    grid, values = np.array(result.grid), np.array(result.density)
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-6)
    assert (values >= 0).all()
    # Same seed, same Rademacher probes: Σ w·θ over a probe is zᵀAz / n.
    hutchinson = trace(A, num_probes=6, seed=9)
    assert result.mean() == pytest.approx(hutchinson.value / n, rel=1e-10)
    # For a diagonal matrix every normalized Rademacher probe gives exactly tr(A)/n.
    D = torch.diag(torch.linspace(-2, 5, n, dtype=torch.float64))
    assert density(D, num_probes=3, lanczos_steps=10).mean() == pytest.approx(float(torch.trace(D)) / n, rel=1e-12)


def test_density_tracks_the_spectrum():
    """With enough steps the broadened density matches the histogram of the true eigenvalues."""
    n = 120
    spectrum = np.concatenate([np.linspace(-1, 1, 110), np.full(10, 6.0)])
    generator = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    A = (Q * torch.as_tensor(spectrum)) @ Q.T
    A = (A + A.T) / 2
    result = density(A, num_probes=20, lanczos_steps=40, sigma=0.1, grid=np.linspace(-2, 7, 901))
    grid, values = np.array(result.grid), np.array(result.density)
    outlier_mass = np.trapezoid(values[grid > 4], grid[grid > 4])
    assert outlier_mass == pytest.approx(10 / 120, abs=0.04)
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-6)


def test_early_stop_when_the_krylov_space_is_invariant():
    """Three distinct eigenvalues: every probe's Lanczos run ends after 3 steps with exact nodes."""
    n = 30
    spectrum = torch.tensor([2.0] * 10 + [-1.0] * 10 + [0.5] * 10, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    A = (Q * spectrum) @ Q.T
    A = (A + A.T) / 2
    result = density(A, num_probes=4, lanczos_steps=50)
    assert result.lanczos_steps == n
    assert result.hvps == 4 * 3
    V = probes(4, n, seed=0)
    for probe in range(4):
        np.testing.assert_allclose(result.nodes[probe], [-1.0, 0.5, 2.0], atol=1e-10)
        coefficients = (Q.T @ V[probe]) ** 2
        mass = [float(coefficients[10:20].sum()), float(coefficients[20:].sum()), float(coefficients[:10].sum())]
        np.testing.assert_allclose(result.weights[probe], mass, atol=1e-10)


def test_png_is_written_and_readable(tmp_path):
    import matplotlib.image

    A = random_symmetric(40, seed=5, dtype=torch.float32)
    path = tmp_path / "density.png"
    result = density(A, num_probes=2, lanczos_steps=10, save_png=str(path))
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # not a blank canvas
    linear = tmp_path / "linear.png"
    assert result.plot(str(linear), log=False) == str(linear) and linear.stat().st_size > 1000
    payload = json.loads(result.to_json())
    assert payload["hvps"] == 20 and len(payload["nodes"]) == 2 and payload["dtype"] == "float32"


class NaNOperator:
    n, dtype, device = 10, torch.float64, torch.device("cpu")

    def matmat(self, V):
        return V * math.nan


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_probes": 0}, "num_probes must be a positive integer"),
        ({"lanczos_steps": 0}, "lanczos_steps must be a positive integer"),
        ({"sigma": -1.0}, "sigma is the Gaussian broadening"),
        ({"grid": 1}, "at least 2 points"),
        ({"grid": [0.0, 2.0, 1.0]}, "strictly increasing"),
        ({"grid": "dense"}, "grid must be"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(HessgapError, match=message):
        density(torch.eye(4, dtype=torch.float64), **kwargs)


def test_non_finite_products():
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        density(NaNOperator(), num_probes=2, lanczos_steps=3)


def test_a_grid_too_coarse_for_the_broadening_warns_and_records_the_integral():
    """Was: density(grid=5) integrated to 0.69 without a word."""
    A = random_symmetric(40, seed=3)
    with pytest.warns(RuntimeWarning, match="integrates to .* too far apart for the broadening"):
        coarse = density(A, grid=5, lanczos_steps=20)
    assert abs(coarse.integral - 1) > 0.02
    fine = density(A, lanczos_steps=20)
    assert fine.integral == pytest.approx(1.0, abs=0.02)
    with pytest.warns(RuntimeWarning, match="does not cover the eigenvalues"):
        density(A, grid=np.linspace(10.0, 11.0, 200), lanczos_steps=20)
