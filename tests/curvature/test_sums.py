"""ChunkSums: the one place where a pass's first batch writes its products into the unfilled sums and later
batches add (the graph engine, the layer-stack engine and the generic path all go through it)."""

import torch

from hessgap.curvature.graph.rules.base import IndexAdded
from hessgap.curvature.sums import ChunkSums


def unfilled(k=4):
    """Per-parameter sums of two parameters (shapes (3,) and (2, 2)) holding garbage, as torch.empty may."""
    return [torch.full((k, 3), float("nan")), torch.full((k, 2, 2), float("nan"))]


def test_a_fresh_chunk_writes_adds_a_second_use_and_zeroes_what_no_product_reached():
    parts = unfilled()
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    sums = ChunkSums(parts, 1, 2, fresh=True)
    sums.add(0, a)
    sums.add(0, b)  # a tied weight's second product adds to the first
    sums.close()
    torch.testing.assert_close(parts[0][1:3], a + b)
    assert torch.equal(parts[1][1:3], torch.zeros(2, 2, 2))  # no product: zeros, not the garbage
    assert parts[0][0].isnan().all() and parts[0][3].isnan().all()  # other chunks' rows untouched


def test_later_batches_add_scaled_and_leave_unreached_rows_alone():
    parts = unfilled(2)
    first, second = torch.randn(2, 3), torch.randn(2, 3)
    sums = ChunkSums(parts, 0, 2, fresh=True, scale=0.5)
    sums.add(0, first)
    sums.close()
    sums = ChunkSums(parts, 0, 2, fresh=False, scale=2.0)
    sums.add(0, second)
    sums.close()
    torch.testing.assert_close(parts[0], 0.5 * first + 2.0 * second)
    assert torch.equal(parts[1], torch.zeros(2, 2, 2))


def test_a_slice_only_product_is_written_into_zeros_then_added():
    parts = unfilled(1)
    rows = torch.tensor([1, 1])
    values = torch.ones(1, 2, 2)
    for fresh in (True, False):
        sums = ChunkSums(parts, 0, 1, fresh=fresh)
        sums.add(1, IndexAdded(1, rows, values))
        sums.close()
    torch.testing.assert_close(parts[1], torch.tensor([[[0.0, 0.0], [4.0, 4.0]]]))
    assert torch.equal(parts[0], torch.zeros(1, 3))
