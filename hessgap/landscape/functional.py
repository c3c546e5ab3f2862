"""The generic engine: any model, one ``torch.func.functional_call`` per grid point on a batch already loaded.

The batch is read and moved once and serves every point of the pass; each point's weights are formed on
the fly from the plane's basis, so the model itself is never written to. (``vmap`` over stacked weights
was measured slower on CPU: batched GEMMs and grouped convolutions run below the plain kernels there.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..curvature.batches import Batch
from ..curvature.objective import output_tensor
from .plane import Plane


class FunctionalEngine:
    """Evaluates ``model`` at grid points through ``functional_call``; BatchNorm modes are set by the caller."""

    name = "functional"

    def __init__(self, model: nn.Module, plane: Plane, batch_statistics: bool):
        self.model = model
        self.plane = plane
        # In train mode BatchNorm updates its running statistics in place: every point gets fresh copies, so
        # no point sees another's update and the model's own buffers stay untouched.
        self.copied_buffers = (
            {name: b for name, b in model.named_buffers() if name not in plane.moving} if batch_statistics else {}
        )
        self._numel_per_sample: int | None = None
        self._cache: dict | None = None

    def start_pass(self, keep_weights: bool) -> None:
        """A new set of points: keep each point's weights between the batches of this pass when asked."""
        self._cache = {} if keep_weights else None

    def prepare(self, batch: Batch) -> Batch:
        return batch

    def chunk_size(self, batch: Batch, coefficients: torch.Tensor, budget: int) -> int:
        """Points per chunk: as many as their outputs fit in ``budget`` bytes (points run one after another)."""
        if self._numel_per_sample is None:
            kept, self._cache = self._cache, None
            self._numel_per_sample = output_tensor(self.outputs(batch, coefficients[:1])[0]).numel() // batch.samples
            self._cache = kept
        per_point = batch.samples * self._numel_per_sample * coefficients.element_size()
        return max(1, min(coefficients.shape[0], budget // per_point))

    def _state(self, coefficients: torch.Tensor, key) -> dict[str, torch.Tensor]:
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        state = {name: self.plane.values(name, coefficients)[0] for name in self.plane.moving}
        if self._cache is not None:
            self._cache[key] = state
        return state

    def outputs(self, batch: Batch, coefficients: torch.Tensor, chunk: int = 0):
        """(G, *output shape) for the G points whose coefficients are given (chunk ``chunk`` of the pass); a
        list of the G outputs when the model returns structures (a Hugging Face model's output)."""
        results = []
        for point in range(coefficients.shape[0]):
            state = self._state(coefficients[point : point + 1], (chunk, point))
            if self.copied_buffers:
                state = state | {name: b.clone() for name, b in self.copied_buffers.items()}
            results.append(functional_call(self.model, state, batch.args, batch.kwargs))
        return torch.stack(results) if all(isinstance(r, torch.Tensor) for r in results) else results
