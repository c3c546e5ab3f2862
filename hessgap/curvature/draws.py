"""Random draws that are a function of what they are drawn for: (seed, sample number, index within the sample).

The true Fisher samples targets from the model's own predictive distribution. Its draws must be the same on
every product of one operator (or Lanczos would see a changing matrix), the same whatever the batches'
order or caching, and the same on one process and on several ranks (each rank holding a shard of the
samples, numbered across the ranks in rank order, as m-sharpness numbers them). A generator's stream
cannot give that without storing every draw; a counter-based hash can: each uniform is a hash of its
coordinates. :func:`uniforms` hashes (seed, global sample number, index) with Wellons' ``lowbias32``
integer hash, chained over the 32-bit words, in int64 tensor arithmetic that never overflows (products
are formed from 16-bit halves).
"""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x·m) mod 2³² for 0 ≤ x < 2³², without an int64 overflow."""
    low, high = x & 0xFFFF, x >> 16
    return (low * m + (((high * m) & 0xFFFF) << 16)) & _MASK


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 of int64 tensors holding values in [0, 2³²)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seed: int, samples: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), float64, one per element of ``samples`` and ``inner`` broadcast together:
    a function of (seed, the global sample number, the index within the sample) only."""
    h = hash32(torch.full((), (seed & _MASK) ^ 0x5BD1E995, dtype=torch.int64, device=samples.device))
    h = hash32(h ^ ((seed >> 32) & _MASK))
    samples, inner = samples.to(torch.int64), inner.to(torch.int64)
    h = hash32(h ^ (samples & _MASK))
    h = hash32(h ^ ((samples >> 32) & _MASK))
    h = hash32(h ^ (inner & _MASK))
    return (h.to(torch.float64) + 0.5) / 2.0**32


def categorical(probabilities: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Class indices drawn from the rows of ``probabilities`` (rows, C) by inverse transform of ``u`` (rows, S)."""
    cdf = probabilities.double().cumsum(-1)
    cdf = cdf / cdf[..., -1:]  # rows that sum to 1 − 1e-7 must not leave the top draws unassigned
    return torch.searchsorted(cdf.contiguous(), u.contiguous()).clamp_(max=probabilities.shape[-1] - 1)


def normal(u: torch.Tensor) -> torch.Tensor:
    """Standard normal numbers from uniforms in (0, 1) (inverse of the normal CDF)."""
    return torch.special.ndtri(u)
