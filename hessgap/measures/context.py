"""What every measure gets and gives: the model with its data (:class:`Context`), the outcome of one measure
(:class:`Outcome`), and :class:`NotApplicable`, raised when a measure needs what the model or data lack
(recorded as "n/a" with the reason, never as a number).

The data are read once (batches moved to the model's device and kept), so every measure of one call sees
the very same batches; passes that several measures need (the Hessian operator, the loss at x) are shared
through :meth:`Context.shared`.

On several ranks each rank's context holds its own shard: every sum over the data runs through
:class:`~hessgap.curvature.objective.LossOverData` (or :attr:`Context.ranks`), and a decision taken on the
data (:meth:`Context.agreed`) is taken the same way on every rank, so no rank waits in a collective that
another rank skipped.

Half-precision models (float16, bfloat16) run their forward passes in their own dtype, but the loss is
computed from the outputs in float32 (:class:`Float32Loss`): near a minimum the softmax's 1 − p and the loss
rises the measures average (1e-5 of a loss of 1e-3) are below what a bfloat16 loss resolves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..curvature.batches import structure
from ..curvature.objective import REDUCED_PRECISION, LossOverData, output_tensor
from ..distributed import Ranks


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


class Float32Loss:
    """``loss_fn(outputs, targets)`` computed from half-precision outputs (and floating targets) cast to
    float32: the model multiplies in its own dtype, the loss and its derivatives with respect to the outputs
    are exact to float32. ``__wrapped__`` is the loss itself (what hessgap reads its ignore index from)."""

    def __init__(self, loss_fn=None):
        self.__wrapped__ = loss_fn if loss_fn is not None else F.cross_entropy

    def __call__(self, outputs, targets):
        outputs = output_tensor(outputs)
        if outputs.dtype in REDUCED_PRECISION:
            outputs = outputs.float()
        if isinstance(targets, torch.Tensor) and targets.dtype in REDUCED_PRECISION:
            targets = targets.float()
        return self.__wrapped__(outputs, targets)


class Context:
    """The model measured, its kept batches, the loss function and the seed; plus a cache of shared passes.

    ``batches`` is a list of batches in the loader's own structure (already on the model's device), so any
    hessgap call takes it as data and every pass sees the same data; on several ranks, this rank's shard.
    ``loss_fn`` is the loss the measures use: the caller's, computed in float32 for a half-precision model
    (unless the model computes its own loss, as Hugging Face models do, in float32).
    """

    def __init__(self, model: nn.Module, batches: list, loss_fn=None, seed: int = 0, progress: bool = False,
                 curvature: str = "hessian"):
        self.model = model
        self.curvature = curvature  # the matrix of the Hessian measures (hessgap.names.CURVATURES)
        self.batches = batches
        self.dtype = next(p for p in model.parameters() if p.requires_grad).dtype
        own_loss = loss_fn is None and bool(batches) and bool(structure(0, batches[0], closure=False).kwargs)
        self.loss_fn = Float32Loss(loss_fn) if self.half_precision and not own_loss else loss_fn
        self.seed = seed
        self.progress = progress
        self.ranks = Ranks.resolve()
        self._cache: dict[str, Any] = {}

    @property
    def half_precision(self) -> bool:
        """Whether the model's parameters are float16 or bfloat16."""
        return self.dtype in REDUCED_PRECISION

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

    def in_float32(self) -> Context:
        """The same measure's context on a float32 copy of the model (the same weights, the same batches and
        seed): for measures whose loss differences are below a half-precision forward pass's rounding."""
        return Context(copy.deepcopy(self.model).float(), self.batches, loss_fn=self.loss_fn, seed=self.seed,
                       progress=self.progress, curvature=self.curvature)

    def agreed(self, step: Callable[[], Any]) -> Any:
        """Run ``step`` (one that reads this rank's shard and may raise :class:`NotApplicable`) so that every
        rank ends the same way: with its value, with :class:`NotApplicable` (the first failing rank's reason)
        on every rank, or with an error on every rank (see :meth:`hessgap.distributed.Ranks.settle`)."""
        reason, error, value = None, None, None
        try:
            value = step()
        except NotApplicable as exc:
            reason = str(exc)
        except Exception as exc:  # every rank must reach the collectives below, also the one that failed
            error = exc
        self.ranks.settle(error)
        reasons = [r for r in self.ranks.gather_object(reason) if r is not None]
        if reasons:
            raise NotApplicable(reasons[0])
        return value

    def refuse_half_precision(self, why: str) -> None:
        """Raise :class:`NotApplicable` for a float16/bfloat16 model, saying ``why`` and what to do instead."""
        if self.half_precision:
            name = str(self.dtype).replace("torch.", "")
            raise NotApplicable(f"the model is {name}: {why}; measure a float32 copy instead: "
                                "hessgap.measures(copy.deepcopy(model).float(), ...)")


def trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The trainable parameters by name, in ``named_parameters()`` order: the θ every measure perturbs."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def accuracy(ctx: Context, objective: LossOverData) -> float:
    """The fraction of correct class predictions over the data, every rank's shard included (eval mode is the
    caller's); a sample whose outputs are not all finite counts as wrongly classified.

    Raises :class:`NotApplicable` (on every rank) when the batches do not hold class-index targets for a
    (samples, classes) output: accuracy, and so Jiang et al.'s accuracy deviation, needs a classifier."""

    @torch.no_grad()
    def count() -> tuple[int, int]:
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
            # a sample whose outputs are not finite is not classified (the argmax of NaN logits is class 0)
            right = (logits.argmax(1) == targets) & torch.isfinite(logits).all(1)
            correct += int(right[keep].sum())
            counted += int(keep.sum())
        return correct, counted

    correct, counted = ctx.ranks.sum_numbers(ctx.agreed(count))
    if counted == 0:
        raise NotApplicable("every target is ignored: there is nothing to count")
    return correct / counted
