"""What every measure gets and gives: the model with its data (:class:`Context`), the outcome of one measure
(:class:`Outcome`), and :class:`NotApplicable`, raised when a measure needs what the model or data lack
(recorded as "n/a" with the reason, never as a number).

The data are read once (batches moved to the model's device and kept), so every measure of one call sees
the very same batches; passes that several measures need (the Hessian operator, the loss at x) are shared
through :meth:`Context.shared`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..curvature.objective import LossOverData, output_tensor


class NotApplicable(Exception):
    """A measure that cannot be taken on this model or data; ``str(exc)`` is the reason."""


@dataclass
class Outcome:
    """One measure's number, its standard error when it is a Monte Carlo or Hutchinson estimate, what else it
    found (``details``: σ of PAC-Bayes, the loss at x, ...) and notes on how it was taken."""

    value: float
    stderr: float | None = None
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Context:
    """The model measured, its kept batches, the loss function and the seed; plus a cache of shared passes.

    ``batches`` is a list of batches in the loader's own structure (already on the model's device), so any
    hessgap call takes it as data and every pass sees the same data.
    """

    def __init__(self, model: nn.Module, batches: list, loss_fn=None, seed: int = 0, progress: bool = False):
        self.model = model
        self.batches = batches
        self.loss_fn = loss_fn
        self.seed = seed
        self.progress = progress
        self._cache: dict[str, Any] = {}

    def objective(self, **options) -> LossOverData:
        """f over the kept batches (see :class:`hessgap.curvature.objective.LossOverData`)."""
        return LossOverData(self.model, self.batches, loss_fn=self.loss_fn, **options)

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per context: passes several measures use (an operator, a pair of traces)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def generator(self, salt: int = 0) -> torch.Generator:
        """A generator on the model's device seeded from the call's seed (each measure its own ``salt``),
        so a rescaled copy of the model is perturbed by the very same random numbers."""
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed * 1_000_003 + salt) % 2**63)
        return generator


def trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The trainable parameters by name, in ``named_parameters()`` order: the θ every measure perturbs."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def accuracy(objective: LossOverData) -> float:
    """The fraction of correct class predictions over the data (eval mode is the caller's).

    Raises :class:`NotApplicable` when the batches do not hold class-index targets for a (samples, classes)
    output: accuracy, and so Jiang et al.'s accuracy deviation, needs a classifier."""
    correct, counted = 0, 0
    for batch in objective.batches():
        logits = output_tensor(objective.model(*batch.args, **batch.kwargs))
        targets = batch.targets
        if targets is None or targets.is_floating_point() or targets.dim() != 1 or logits.dim() != 2:
            raise NotApplicable(
                "it needs class predictions: (samples, classes) outputs and integer class targets; use "
                "deviation='loss' for other models"
            )
        keep = targets >= 0  # cross-entropy's ignore_index is negative (-100)
        correct += int((logits.argmax(1)[keep] == targets[keep]).sum())
        counted += int(keep.sum())
    if counted == 0:
        raise NotApplicable("every target is ignored: there is nothing to count")
    return correct / counted
