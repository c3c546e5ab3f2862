"""pytest-benchmark timings of the batched HVP paths and of the fused element-wise kernels vs their twins.

    pytest benchmarks/bench_hvp.py --benchmark-only --benchmark-group-by=group

Small shapes, so the suite runs in about a minute on a 2-core CPU; the ratio figures of the issue come
from benchmarks/hvp_ratio.py (big models, side by side, ratios to a gradient).
"""

import pytest
import torch
from torch import nn

from hessgap import _extension
from hessgap.curvature.hvp import hvp
from hessgap.ops import hvp_pointwise as ops

pytestmark = pytest.mark.skipif(not _extension.available(), reason="hessgap._C is not built")


@pytest.fixture(scope="module")
def mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.Tanh(),
        nn.Linear(256, 10),
    ).eval()
    batch = (torch.randn(256, 256), torch.randint(0, 10, (256,)))
    n = sum(p.numel() for p in model.parameters())
    return model, batch, torch.randn(16, n)


@pytest.mark.benchmark(group="hvp k=16, MLP 256-256-256-10, batch 256")
@pytest.mark.parametrize("path", ["fused", "generic"])
def test_hvp_paths(benchmark, mlp_case, path):
    model, batch, V = mlp_case
    benchmark.pedantic(hvp, args=(model, batch, V), kwargs={"path": path}, rounds=5, warmup_rounds=1)


@pytest.fixture(scope="module")
def pointwise_case():
    gen = torch.Generator().manual_seed(0)
    z, g = torch.randn(256, 512, generator=gen), torch.randn(256, 512, generator=gen)
    rz, rg = torch.randn(16, 256, 512, generator=gen), torch.randn(16, 256, 512, generator=gen)
    return z, g, rz, rg


def act_rbackward_unfused(z, g, rz, rg, kind):
    """The best unfused form: closed-form σ', σ'' with PyTorch element-wise ops (no autograd)."""
    if kind == "relu":
        return (z > 0).to(z.dtype) * rg
    cdf = 0.5 * (1 + torch.erf(z * 0.7071067811865476))
    pdf = 0.3989422804014327 * torch.exp(-0.5 * z * z)
    return (cdf + z * pdf) * rg + (pdf * (2 - z * z) * g) * rz


@pytest.mark.benchmark(group="activation R-backward, k=16 × 256×512")
@pytest.mark.parametrize("impl", ["kernel", "unfused"])
@pytest.mark.parametrize("kind", ["relu", "gelu"])
def test_act_rbackward(benchmark, pointwise_case, impl, kind):
    fn = ops.act_rbackward if impl == "kernel" else act_rbackward_unfused
    benchmark(fn, *pointwise_case, kind)


@pytest.mark.benchmark(group="softmax-CE Hessian, k=16 × 1024×10")
@pytest.mark.parametrize("impl", ["kernel", "unfused"])
def test_softmax_ce_rgrad(benchmark, impl):
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(1024, 10, generator=gen), -1)
    rz = torch.randn(16, 1024, 10, generator=gen)
    fn = ops.softmax_ce_rgrad if impl == "kernel" else ops.softmax_ce_rgrad_reference
    benchmark(fn, p, rz, 1 / 1024)
