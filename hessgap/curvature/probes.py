"""Random vectors in parameter space: seeded generators on the operator's device, Rademacher matrices (the
probes of the spectrum methods)."""

from __future__ import annotations

import torch

from .. import _checks


def generator_for(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``, so probes are reproducible and made where they are used."""
    _checks.seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def rademacher(rows: int, n: int, *, dtype, device, generator) -> torch.Tensor:
    """A (rows, n) matrix of independent ±1 entries."""
    signs = torch.randint(0, 2, (rows, n), generator=generator, device=device, dtype=torch.int8)
    return signs.to(dtype).mul_(2).sub_(1)
