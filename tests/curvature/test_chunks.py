"""The generic path's chunks of directions: one plain backward per direction for real models on CPU,
vmapped chunks for tiny ones, and the same products whatever the chunk."""

import pytest
import torch
from torch import nn

import hessgap

from oracles import explicit_hessian, tiny_hf, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_chunk_size_gives_the_explicit_products():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = [(torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,)))]
    H = explicit_hessian(model, data)
    V = torch.randn(5, H.shape[0], dtype=torch.float64)
    for chunk in (1, 2, 5, None):
        result = hessgap.hvp(model, data, V, path="generic", chunk_size=chunk, return_info=True)
        assert result.chunk_size == (chunk or 5)
        torch.testing.assert_close(result.value, V @ H, rtol=1e-10, atol=1e-12)


def test_a_transformer_gives_the_same_products_in_plain_and_vmapped_chunks():
    pytest.importorskip("transformers")
    model, data = tiny_hf("gpt2"), token_batches(causal=True)
    V = torch.randn(4, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    plain = hessgap.hvp(model, data, V, chunk_size=1)
    for chunk in (2, 4):
        torch.testing.assert_close(hessgap.hvp(model, data, V, chunk_size=chunk), plain, rtol=1e-12, atol=1e-14)


def test_on_cpu_a_model_with_large_activations_takes_one_direction_per_backward():
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(4, 4096), nn.Tanh(), nn.Linear(4096, 3))  # 64 × 4096 = 262144 outputs
    data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
    n = sum(p.numel() for p in wide.parameters())
    assert hessgap.hvp(wide, data, torch.randn(8, n), path="generic", return_info=True).chunk_size == 1
    small = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    n = sum(p.numel() for p in small.parameters())
    assert hessgap.hvp(small, data, torch.randn(8, n), path="generic", return_info=True).chunk_size == 8


class Branches(nn.Module):
    """Batches of 3 features go through ``a``, of 5 through ``b``: each batch leaves the other's products out."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(5, 3)

    def forward(self, x):
        return torch.tanh(self.a(x) if x.shape[1] == 3 else self.b(x))


@pytest.mark.parametrize("chunk", [1, 3])
def test_sums_over_batches_that_leave_parameters_out(chunk):
    """The first batch writes the sums (they are not zero-filled): what it leaves out must read as zero."""
    torch.manual_seed(0)
    model = Branches().double()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(7, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (7,), generator=gen)),
            (torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen)),
            (torch.randn(2, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (2,), generator=gen))]
    H = explicit_hessian(model, data)
    V = torch.randn(3, H.shape[0], dtype=torch.float64)
    for order in (data, data[::-1], data[1:2]):
        expected = V @ explicit_hessian(model, order)
        result = hessgap.hvp(model, order, V, path="generic", chunk_size=chunk)
        torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hessgap.hvp(model, data, V, path="generic"), V @ H, rtol=1e-10, atol=1e-12)
