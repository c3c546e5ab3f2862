"""pytest-benchmark timings of the spectrum methods.

    pytest benchmarks/bench_spectrum.py --benchmark-only --benchmark-columns=min,median,rounds

* on an explicit 2000 × 2000 matrix (the solver's own cost: orthogonalization, Rayleigh–Ritz,
  restarts, tridiagonal eigenproblems; the products are one BLAS call);
* on a small MLP over 512 samples through HessianOperator (fused path), with block sizes 1 and 4,
  and trace / density with every probe in one batch against one probe per product.
"""

import pytest
import torch
from torch import nn

import hessgap
from hessgap.curvature.operator import HessianOperator
from hessgap.spectrum import MatrixOperator


@pytest.fixture(scope="module")
def matrix():
    generator = torch.Generator().manual_seed(0)
    n = 2000
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([50.0, 30.0, 29.0, 20.0, 10.0, 9.0, 8.5, 8.0, 7.0, 6.0]),
                          torch.linspace(-0.5, 1.0, n - 10, dtype=torch.float64)])
    return MatrixOperator((Q * spectrum) @ Q.T, check_symmetric=False)


@pytest.fixture(scope="module")
def mlp_operator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10)).eval()
    x, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
    return HessianOperator(model, (x, y))


@pytest.mark.parametrize("k, block_size", [(1, 1), (10, 1), (10, 4), (10, 10)])
def test_lanczos_matrix(benchmark, matrix, k, block_size):
    result = benchmark(hessgap.eigenvalues, matrix, k=k, block_size=block_size, tol=1e-6)
    assert result.converged


@pytest.mark.parametrize("k, block_size", [(1, 1), (1, 4), (5, 1), (5, 4)])
def test_lanczos_mlp(benchmark, mlp_operator, k, block_size):
    result = benchmark.pedantic(hessgap.eigenvalues, args=(mlp_operator,),
                                kwargs={"k": k, "block_size": block_size, "tol": 1e-3}, rounds=3)
    assert result.converged


@pytest.mark.parametrize("batch", [1, 32])
def test_trace_mlp(benchmark, mlp_operator, batch):
    benchmark.pedantic(hessgap.trace, args=(mlp_operator,), kwargs={"num_probes": 32, "batch": batch}, rounds=3)


def test_density_mlp(benchmark, mlp_operator):
    benchmark.pedantic(hessgap.density, args=(mlp_operator,), kwargs={"num_probes": 4, "lanczos_steps": 30}, rounds=3)
