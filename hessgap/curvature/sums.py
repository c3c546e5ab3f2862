"""The sums of a pass over the data, Σ_b w_b·H_b·V: the first batch writes its products, later batches add.

The (k, n) sums are not zero-filled before a pass: on a result of 10M parameters the fill, and the read of
the zeros by the first batch's add, took 10–20 % of a ResNet-18's product. Instead, while a pass is on its
first batch, the first product that reaches a parameter writes that parameter's rows and every later one
(a second use of a tied weight, the next batch) adds; at the end of the first batch the rows of parameters
that no product reached (layers the forward never uses) are zeroed. Every path (the graph engine's
R-backward, the generic path's double backward) adds its products through :class:`ChunkSums`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ChunkSums:
    """Rows ``start .. start + k`` of the per-parameter sums ``parts`` (``(K, *p.shape)`` each), for one chunk
    of directions of one batch.

    ``fresh``: the pass's first batch, whose products write (the rows hold no sums yet); ``scale``
    multiplies every product (the batch's weight relative to the unit of the sums). A product is a tensor
    ``(k, *p.shape)``, or a gradient nonzero in a slice only with ``add_to(out)`` that adds it in place
    (an embedding's rows, see :class:`hessgap.curvature.graph.rules.base.Embedded`).
    """

    def __init__(self, parts: Sequence[torch.Tensor], start: int, k: int, fresh: bool, scale: float = 1.0):
        self.rows = [p[start : start + k] for p in parts]
        self.fresh, self.scale = fresh, scale
        self._written: set[int] = set()

    def add(self, slot: int, product) -> None:
        """Add (or, first in a fresh chunk, write) ``product`` into the rows of parameter ``slot``."""
        out = self.rows[slot]
        first = self.fresh and slot not in self._written
        self._written.add(slot)
        if isinstance(product, torch.Tensor):
            if not first:
                out.add_(product, alpha=self.scale)
            elif self.scale == 1.0:
                out.copy_(product)
            else:
                torch.mul(product, self.scale, out=out)
            return
        if self.scale != 1.0:  # pragma: no cover - the graph engine weights its products in the loss's seed
            raise ValueError("a slice-only product is added unscaled")
        if first:
            out.zero_()
        product.add_to(out)

    def close(self) -> None:
        """The chunk is done: in a fresh chunk, the rows of parameters no product reached become zeros."""
        if self.fresh:
            for slot, out in enumerate(self.rows):
                if slot not in self._written:
                    out.zero_()
            self._written = set(range(len(self.rows)))
