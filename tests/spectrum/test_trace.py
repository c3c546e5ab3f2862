"""hessgap.spectrum.trace against the exact trace of explicit matrices."""

import json
import math

import numpy as np
import pytest
import torch

from hessgap.curvature.probes import generator_for, rademacher
from hessgap.errors import HessgapError, NonFiniteError
from hessgap.spectrum import MatrixOperator, trace


def random_symmetric(n, seed, off_diagonal=1.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=generator, dtype=torch.float64) * off_diagonal
    diagonal = torch.randn(n, generator=generator, dtype=torch.float64) * 3 + 2
    return ((B + B.T) / 2 + torch.diag(diagonal)).to(dtype)


def test_confidence_interval_covers_the_exact_trace():
    """Over many seeds the 90% interval covers tr(A) about 90% of the time (and not always)."""
    A = random_symmetric(40, seed=0)
    exact = float(torch.trace(A))
    covered = 0
    for seed in range(200):
        result = trace(A, num_probes=20, confidence=0.9, seed=seed)
        low, high = result.ci
        covered += low <= exact <= high
        assert low < result.value < high
    assert 0.82 <= covered / 200 <= 0.97


def test_many_probes_on_a_diagonally_dominant_matrix():
    A = random_symmetric(200, seed=1, off_diagonal=0.01)
    exact = float(torch.trace(A))
    result = trace(A, num_probes=500, seed=2)
    # Variance per probe is 2·Σ_{i≠j} A_ij²; the mean of 500 probes lies well within 5 standard errors.
    off = A - torch.diag(torch.diag(A))
    predicted_stderr = math.sqrt(2 * float((off**2).sum()) / 500)
    assert abs(result.value - exact) <= 5 * predicted_stderr
    assert result.stderr == pytest.approx(predicted_stderr, rel=0.2)
    assert result.hvps == 500 and len(result.estimates) == 500


def test_exact_for_a_diagonal_matrix():
    A = torch.diag(torch.linspace(-3, 7, 64, dtype=torch.float64))
    result = trace(A, num_probes=8)
    assert result.value == pytest.approx(float(torch.trace(A)), rel=1e-13)
    assert result.stderr == pytest.approx(0.0, abs=1e-12)


def test_estimates_are_the_probe_quadratic_forms_and_chunking_changes_nothing():
    A = random_symmetric(30, seed=4)
    whole = trace(A, num_probes=12, seed=5)
    chunked = trace(A, num_probes=12, seed=5, batch=5)
    np.testing.assert_allclose(chunked.estimates, whole.estimates, rtol=1e-13)
    assert whole.value == pytest.approx(float(np.mean(whole.estimates)), rel=1e-14)
    # Each estimate is zᵀAz for the probe z drawn from the seeded generator.
    Z = rademacher(12, 30, dtype=torch.float64, device=torch.device("cpu"), generator=generator_for(torch.device("cpu"), 5))
    assert set(Z.unique().tolist()) == {-1.0, 1.0}
    np.testing.assert_allclose(whole.estimates, ((Z @ A) * Z).sum(dim=1).numpy(), rtol=1e-12)
    operator = MatrixOperator(A)
    trace(operator, num_probes=12, batch=5)
    assert operator.hvps == 12


def test_float32_and_a_single_probe():
    A = random_symmetric(50, seed=6, dtype=torch.float32)
    result = trace(A, num_probes=1)
    assert result.stderr is None and result.ci is None and result.dtype == "float32"
    payload = json.loads(result.to_json())
    assert payload["ci"] is None and payload["num_probes"] == 1


def test_result_serializes():
    result = trace(random_symmetric(20, seed=7), num_probes=4)
    payload = json.loads(result.to_json())
    assert payload["value"] == result.value and payload["ci"] == list(result.ci)
    assert payload["hvps"] == 4 and payload["path"] == "matrix"


class NaNOperator:
    n, dtype, device = 10, torch.float64, torch.device("cpu")

    def matmat(self, V):
        out = V.clone()
        out[-1, 0] = math.inf
        return out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_probes": 0}, "num_probes must be a positive integer"),
        ({"num_probes": -3}, "num_probes must be a positive integer"),
        ({"batch": 0}, "batch must be a positive integer"),
        ({"confidence": 1.0}, "confidence must lie in"),
        ({"confidence": 95}, "confidence must lie in"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(HessgapError, match=message):
        trace(torch.eye(4, dtype=torch.float64), **kwargs)


def test_non_finite_products():
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        trace(NaNOperator(), num_probes=3)
