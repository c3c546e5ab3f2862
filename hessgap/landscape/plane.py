"""Where a landscape lives in weight space: every grid point is a linear combination of K basis states.

Around one model, θ(a, b) = 1·x0 + a·d1 + b·d2: the basis is (x0, d1, d2) and the coefficients (1, a, b).
Between models (the paper's Figures 3 and 7) the basis is the models' states and the coefficients those of
the path: (1 − α, α) on the line, (cos απ/2, sin απ/2) on the curve. Writing both the same way lets one
evaluator serve every kind, and lets it use that a layer is linear in its weights (see :mod:`.stack`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch


@dataclasses.dataclass
class Plane:
    """The basis of the entries that move over the grid, and the coefficients of each grid point.

    ``moving`` maps a state name (as in ``model.state_dict()``) to its basis, a (K, *shape) tensor; entries
    not in it stay at the model's own value at every point. ``clamped`` names running variances that are
    clamped at 0 after combining (extrapolated statistics can come out negative). ``directions`` holds the
    direction of each axis as one flat (n,) row over the trainable parameters, in parameter order.
    """

    kind: str
    dims: int
    moving: dict[str, torch.Tensor]
    coefficient_fn: Callable[[np.ndarray], np.ndarray]
    directions: torch.Tensor
    clamped: frozenset[str] = frozenset()
    eigenvalues: list[float] | None = None
    #: weights u with Σ_k u_k·c_k = 1 at every point, when the plane has them: (1, 0, 0) around x0, all ones on
    #: lines and planes between models (their coefficients sum to one); None on the curve
    unit_weights: tuple[float, ...] | None = None

    @property
    def size(self) -> int:
        """K, the number of basis states."""
        return next(iter(self.moving.values())).shape[0] if self.moving else 1

    def coefficients(self, points: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """(P, K) coefficients of the (P, dims) grid coordinates, in ``like``'s dtype and device."""
        values = np.asarray(self.coefficient_fn(np.asarray(points, dtype=np.float64)), dtype=np.float64)
        return torch.as_tensor(values, dtype=like.dtype, device=like.device)

    def values(self, name: str, coefficients: torch.Tensor) -> torch.Tensor:
        """(G, *shape): the entry ``name`` at each of the G points whose coefficients are given."""
        basis = self.moving[name]
        combined = (coefficients @ basis.reshape(basis.shape[0], -1)).reshape(coefficients.shape[0], *basis.shape[1:])
        return combined.clamp_min_(0.0) if name in self.clamped else combined

    def clamped_counts(self, coefficients: torch.Tensor) -> torch.Tensor:
        """(G,) number of running-variance entries clamped at 0 at each point."""
        counts = torch.zeros(coefficients.shape[0], dtype=torch.int64, device=coefficients.device)
        for name in self.clamped:
            basis = self.moving[name]
            combined = coefficients @ basis.reshape(basis.shape[0], -1)
            counts += (combined < 0).sum(dim=1)
        return counts


def offset_plane(kind: str, names: list[str], params: list[torch.Tensor], directions: list[list[torch.Tensor]],
                 eigenvalues: list[float] | None = None) -> Plane:
    """x0 + a·d1 (+ b·d2): ``directions`` holds, per axis, one tensor per trainable parameter.

    Parameters whose direction is zero on every axis (biases and BatchNorm with ``ignore="biasbn"``) stay
    exactly at x0 rather than being recomputed as x0 + 0.
    """
    dims = len(directions)
    moving = {}
    for index, (name, x0) in enumerate(zip(names, params)):
        rows = [axis[index] for axis in directions]
        if any(bool(row.ne(0).any()) for row in rows):
            moving[name] = torch.stack([x0.detach(), *(row.to(x0) for row in rows)])
    flat = torch.stack([torch.cat([d.reshape(-1).to(params[0]) for d in axis]) for axis in directions])

    def coefficient_fn(points: np.ndarray) -> np.ndarray:
        return np.concatenate([np.ones((points.shape[0], 1)), points[:, :dims]], axis=1)

    return Plane(kind, dims, moving, coefficient_fn, flat, eigenvalues=eigenvalues,
                 unit_weights=(1.0,) + (0.0,) * dims)
