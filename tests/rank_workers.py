"""Worker functions for the distributed tests, run on every rank by :func:`ranks.run_ranks`."""

from __future__ import annotations

import torch


def collectives(rank, world_size):
    """Sums, buckets, agreement and failure propagation of hessgap.distributed.Ranks."""
    from hessgap.distributed import Ranks
    from hessgap.errors import HessgapError

    ranks = Ranks.resolve()
    out = {"describe": ranks.describe()}
    t = torch.full((3,), float(rank + 1))
    ranks.sum_(t)
    out["sum"] = t.tolist()
    a, b, c = torch.ones(2, 2) * rank, torch.arange(3.0) + rank, torch.tensor([rank], dtype=torch.float64)
    ranks.sum_bucket_([a, b, c])
    out["bucket"] = [a.tolist(), b.tolist(), c.tolist()]
    out["numbers"] = ranks.sum_numbers([1.0, rank])
    ranks.agree("the answer", 42)
    try:
        ranks.agree("the model's shapes", {"weight": (3, rank)})
        out["disagree"] = None
    except HessgapError as exc:
        out["disagree"] = str(exc)
    try:
        ranks.settle(ValueError("bad batch on the last rank") if rank == world_size - 1 else None)
        out["settle"] = None
    except Exception as exc:  # noqa: BLE001
        out["settle"] = f"{type(exc).__name__}: {exc}"
    ranks.settle(None)  # every rank is still in step afterwards
    return out
