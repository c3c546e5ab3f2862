"""pytest-benchmark timings of hessgap.landscape's two engines on small versions of the paper's networks.

    pytest benchmarks/bench_landscape.py --benchmark-only --benchmark-group-by=group

Quarter-width F1 and C1 on 1024 samples, a 5×5 random plane, one torch thread: the suite runs in well under a
minute on a 2-core CPU. The side-by-side ratios to the per-point methods come from
benchmarks/landscape_ratio.py.
"""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import hessgap.landscape
from hessgap.train import build_model

import _timing

CASES = {"F1": (784,), "C1": (3, 16, 16)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with _timing.threads(1):
        yield


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    shape = CASES[request.param]
    model = build_model(request.param, shape, 10, width=0.25).eval()
    data = TensorDataset(torch.randn(1024, *shape), torch.randint(0, 10, (1024,)))
    return request.param, model, DataLoader(data, batch_size=256)


@pytest.mark.parametrize("engine", ["stack", "functional"])
def test_random_plane(benchmark, case, engine):
    name, model, loader = case
    benchmark.group = f"{name} (width 0.25), 1024 samples, 5x5 plane"
    benchmark.pedantic(hessgap.landscape, args=(model, loader), kwargs={"steps": 5, "engine": engine}, rounds=3,
                       warmup_rounds=1)
