"""trace(method="hutch++" | "adaptive-hutch++"): error against Hutchinson's at equal products, the CI's coverage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hessgap
from hessgap.errors import HessgapError


def _decaying(n=200, top=10, seed=0):
    """A symmetric matrix whose top ``top`` eigenvalues dominate (10..100 against a tail of ≈ 0.05 each)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    values = torch.cat([torch.linspace(100, 10, top, dtype=torch.float64),
                        0.1 * torch.rand(n - top, generator=g, dtype=torch.float64)])
    return (q * values) @ q.T


def _mean_error(matrix, method, probes=30, seeds=range(40)):
    exact = float(matrix.trace())
    return sum(abs(hessgap.trace(matrix, num_probes=probes, seed=s, method=method).value - exact)
               for s in seeds) / len(seeds)


@pytest.mark.parametrize("method", ["hutch++", "adaptive-hutch++"])
def test_hutchpp_error_is_below_half_of_hutchinsons_on_a_decaying_spectrum(method):
    matrix = _decaying()
    hutchinson = _mean_error(matrix, "hutchinson")
    assert _mean_error(matrix, method) <= 0.5 * hutchinson


def test_hutchpp_is_exact_on_a_low_rank_matrix_and_counts_its_products():
    values, vectors = torch.linalg.eigh(_decaying(n=60, top=5))  # its top 5 eigenpairs only: rank 5
    low = (vectors[:, -5:] * values[-5:]) @ vectors[:, -5:].T
    result = hessgap.trace(low, num_probes=30, method="hutch++")
    assert result.value == pytest.approx(float(low.trace()), rel=1e-10)
    assert result.hvps == 30 and result.sketch == 10 and len(result.estimates) == 10


@pytest.mark.parametrize("method", ["hutch++", "adaptive-hutch++"])
def test_hutchpp_confidence_interval_covers_at_its_nominal_rate(method):
    matrix = _decaying(n=120, top=10)
    exact = float(matrix.trace())
    seeds = range(200)
    covered = sum(r.ci[0] <= exact <= r.ci[1] for r in
                  (hessgap.trace(matrix, num_probes=30, seed=s, method=method, confidence=0.9) for s in seeds))
    assert 0.82 <= covered / len(seeds) <= 0.97


def test_hutchpp_on_a_small_model_beats_hutchinson():
    """The GGN of 3 samples × 4 classes has rank ≤ 9: its top eigenvalues hold the whole trace."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (3,), generator=g))]
    operator = hessgap.GGNOperator(model, data, cache_batches=True)
    exact = float(operator.matmat(torch.eye(operator.n, dtype=torch.float64)).trace())

    def error(method):
        return sum(abs(hessgap.trace(operator, num_probes=30, seed=s, method=method).value - exact)
                   for s in range(20)) / 20

    assert error("hutch++") <= 0.5 * error("hutchinson")


def test_bad_method_and_too_few_probes_are_refused():
    with pytest.raises(HessgapError, match="method"):
        hessgap.trace(torch.eye(4), method="hutch+")
    with pytest.raises(HessgapError, match="num_probes"):
        hessgap.trace(torch.eye(4), num_probes=3, method="hutch++")
