"""The spaces a sharpness solver searches: what the variable y is and how it moves the model to x + A y.

- :class:`FullSpace`: A = I, y has the parameters' shapes; the box is centred on x itself.
- :class:`ScaledSpace`: δ = c ⊙ u with c = |x|, for the ℓ2 ball of adaptive sharpness.
- :class:`SubspaceSpace`: A is a random n × p matrix (:mod:`hessgap.sharp.subspace`), y = z ∈ R^p;
  the box is centred on A⁺x.

Every loss evaluation goes through the space, which counts it, records its value and keeps the largest one.
The centre x is a snapshot of the weights, never the live weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..curvature.objective import LossOverData
from .subspace import FlatParameters, RandomSubspace


class Space:
    """Shared bookkeeping: the objective, the centre x (a snapshot, never the live weights), counts.

    Each space also sets ``box_centre`` (the tensors the box radius is computed from, in y's layout),
    ``op_params`` (what the fused step writes centre + y into) and ``fused`` (whether that write already
    moved the model, or :meth:`set_point` must follow).
    """

    def __init__(self, objective: LossOverData, x: Sequence[torch.Tensor]):
        self.objective = objective
        self.x = list(x)
        self.params = [p.detach() for p in objective.params]  # same storage as the model's weights
        self.evaluations = 0
        self.evaluation_seconds = 0.0  # time inside loss + gradient passes; the rest is the solver's
        self.history: list[float] = []
        self.best = -math.inf

    def _record(self, value: float) -> None:
        self.evaluations += 1
        self.history.append(value)
        self.best = max(self.best, value)

    def zeros(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def set_point(self, y: Sequence[torch.Tensor]) -> None:
        """Write x + A y into the model's weights."""
        raise NotImplementedError

    def pull_back(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """∇_y f from ∇_x f."""
        raise NotImplementedError

    def evaluate(self) -> tuple[float, list[torch.Tensor]]:
        """f and ∇_y f at the point currently written into the model (one pass over the data)."""
        started = time.perf_counter()
        value, grads = self.objective.value_and_grad()
        self.evaluation_seconds += time.perf_counter() - started
        self._record(value)
        return value, self.pull_back(grads)

    def to_numpy(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        return torch.cat([t.reshape(-1) for t in tensors]).to("cpu", torch.float64).numpy()

    def from_numpy(self, flat: np.ndarray) -> list[torch.Tensor]:
        like = self.box_centre  # the variable's shapes, device and dtype
        values = torch.from_numpy(np.ascontiguousarray(flat))
        out, offset = [], 0
        for t in like:
            n = t.numel()
            out.append(values[offset : offset + n].view(t.shape).to(t.device, t.dtype))
            offset += n
        return out


class FullSpace(Space):
    """A = I: y has the parameters' shapes; the box is centred on x itself."""

    fused = True  # the box-ascent op writes x + y into the weights in the same pass

    def __init__(self, objective: LossOverData, x: Sequence[torch.Tensor]):
        super().__init__(objective, x)
        self.box_centre = self.x
        self.op_params = self.params

    @property
    def dim(self) -> int:
        return sum(t.numel() for t in self.x)

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros_like(t) for t in self.x]

    @torch.no_grad()
    def set_point(self, y: Sequence[torch.Tensor]) -> None:
        for p, xi, yi in zip(self.params, self.x, y):
            torch.add(xi, yi, out=p) if p.is_contiguous() else p.copy_(xi + yi)

    def pull_back(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return grads


class ScaledSpace(FullSpace):
    """δ = c ⊙ u with c = |x|: the variable u lives in the unit-free coordinates of adaptive sharpness."""

    fused = False

    def __init__(self, objective: LossOverData, x: Sequence[torch.Tensor]):
        super().__init__(objective, x)
        self.scale = [t.abs() for t in self.x]

    @torch.no_grad()
    def set_point(self, u: Sequence[torch.Tensor]) -> None:
        for p, xi, ci, ui in zip(self.params, self.x, self.scale, u):
            p.copy_(torch.addcmul(xi, ci, ui))

    def pull_back(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return [g.mul_(c) for g, c in zip(grads, self.scale)]


class SubspaceSpace(Space):
    """y = z ∈ R^p moves the weights to x + A z; the box is centred on A⁺x (Metric 2.1)."""

    fused = False

    def __init__(self, objective: LossOverData, x: Sequence[torch.Tensor], subspace: RandomSubspace):
        super().__init__(objective, x)
        self.subspace = subspace
        self.flat_x = FlatParameters(self.x)
        self.flat_params = FlatParameters(self.params)
        self.pinv_x = subspace.pinv_apply(self.flat_x)
        # the box-ascent op runs on the p coordinates of z; it writes c + z into this scratch vector
        self.box_centre = [self.pinv_x.to(subspace.dtype)]
        self.op_params = [torch.empty_like(self.box_centre[0])]

    @property
    def dim(self) -> int:
        return self.subspace.p

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros(self.subspace.p, dtype=self.subspace.dtype, device=self.subspace.device)]

    def set_point(self, z: Sequence[torch.Tensor]) -> None:
        self.subspace.write_shifted(self.flat_x, z[0], self.flat_params)

    def pull_back(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.subspace.rmatvec(FlatParameters(grads)).to(self.subspace.dtype)]
