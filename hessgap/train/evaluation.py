"""Loss and accuracy of a model over a loader, in eval mode: what the training loop records every epoch."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._state import preserved
from ..curvature.objective import LossOverData, output_tensor


def evaluate(model: nn.Module, loader, loss_fn=None) -> tuple[float, float]:
    """(mean loss, accuracy in [0, 1]) of ``model`` in eval mode over every batch of ``loader`` (see
    :func:`evaluation_sums`); both NaN when the loss is not finite (see :func:`loss_and_accuracy`)."""
    return loss_and_accuracy(*evaluation_sums(model, loader, loss_fn))


def loss_and_accuracy(loss_sum: float, weight: float, correct: int, samples: int) -> tuple[float, float]:
    """(mean loss, accuracy) from the sums of :func:`evaluation_sums` (one rank's, or every rank's added up).

    Where the loss is not finite the outputs are not either, and the argmax of NaN logits is class 0: the
    count of correct predictions would be the share of class-0 targets, so the accuracy is NaN there too, as
    the loss is (an infinite loss becomes NaN as well: the run folders' JSON keeps neither)."""
    loss = loss_sum / weight
    if not math.isfinite(loss):
        return math.nan, math.nan
    return loss, correct / samples


def evaluation_sums(model: nn.Module, loader, loss_fn=None) -> tuple[float, float, int, int]:
    """(Σ weighted loss, Σ weights, correct predictions, samples) of ``model`` in eval mode over ``loader``:
    sums, so that shards of a split (distributed training) add up; :func:`loss_and_accuracy` turns them into
    the mean loss and the accuracy.

    The loss is the mean over every unit of the loader, as :class:`~hessgap.curvature.objective.LossOverData`
    weighs batches; the accuracy counts class predictions of (inputs, class index) batches. A non-finite loss
    is returned as it is (NaN or inf), not raised: the training loop decides what a diverged run does. The
    model's train/eval modes (every module's own) and buffers are restored, also on error (a caller may
    keep one submodule in eval mode inside a model in train mode).
    """
    objective = LossOverData(model, loader, loss_fn=loss_fn)
    total = torch.zeros((), dtype=torch.float64, device=objective.device)
    correct = torch.zeros((), dtype=torch.int64, device=objective.device)
    weight, samples = 0.0, 0
    with preserved(model, train_mode=False, parameters=False), torch.no_grad():
        for batch in objective.batches():
            outputs = model(*batch.args, **batch.kwargs)
            loss = objective.loss_of_outputs(outputs, batch)
            total += loss.double() * batch.weight
            weight += batch.weight
            logits, targets = output_tensor(outputs), batch.targets
            if targets is not None and targets.dim() == 1 and logits.dim() == 2 and not targets.is_floating_point():
                correct += (logits.argmax(1) == targets).sum()
            samples += batch.samples
    return float(total), weight, int(correct), samples
