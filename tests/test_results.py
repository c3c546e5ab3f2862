"""Every result reads in one short line; the full data stays in to_dict()."""

import torch
from torch import nn

import hessgap


def test_results_print_briefly_and_keep_everything_in_to_dict():
    """Was: DensityResult's repr ran to 49,578 characters; EigenResult printed its whole eigenvector tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 3))
    batch = (torch.randn(64, 10), torch.randint(0, 3, (64,)))
    n = sum(p.numel() for p in model.parameters())
    results = [
        hessgap.density(model, batch, lanczos_steps=60),
        hessgap.eigenvalues(model, batch, k=3),
        hessgap.trace(model, batch, num_probes=40),
        hessgap.hvp(model, batch, torch.randn(4, n), return_info=True),
        hessgap.sharpness(model, batch, max_iter=3),
    ]
    for result in results:
        text = repr(result)
        assert len(text) < 1200, (type(result).__name__, len(text))
        assert text.startswith(type(result).__name__ + "(")
    assert "<tensor (3, 563) float32>" in repr(results[1])
    assert len(results[0].to_dict()["grid"]) == 1000
