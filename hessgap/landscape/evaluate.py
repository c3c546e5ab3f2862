"""One pass over the data for many grid points: each batch is read and moved once and serves every point.

The data is walked through :class:`~hessgap.curvature.objective.LossOverData` (its ``batches()`` and
``batch_loss()``), so how a batch becomes a loss is decided there. Points are evaluated in chunks of G,
G sized so that a chunk's activations fit the memory budget.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn
from torch.func import functional_call

from .._checks import choice
from ..curvature.batches import Batch
from ..curvature.objective import LossOverData
from ..errors import HessgapError
from ..names import LANDSCAPE_ENGINES
from .functional import FunctionalEngine
from .layers import unsupported_reason
from .plane import Plane
from .stack import StackEngine

ENGINES = LANDSCAPE_ENGINES
DEFAULT_MEMORY_BUDGET = 2 * 1024**3


def set_batchnorm_mode(model: nn.Module, batchnorm: str) -> None:
    """Eval mode everywhere (no dropout); BatchNorm normalizes with batch statistics when ``batchnorm="train"``.

    Callers hold :func:`hessgap._state.preserved`, which restores every module's mode afterwards.
    """
    model.eval()
    if batchnorm == "train":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()


@dataclasses.dataclass
class PassResult:
    """Mean loss and accuracy (percent; None when the targets are not class labels) at each point; both NaN
    where the loss is not finite."""

    loss: torch.Tensor
    accuracy: torch.Tensor | None
    samples: int


class Evaluator:
    """Evaluates one model on one data set at many points of a plane, a pass over the data at a time."""

    def __init__(self, model: nn.Module, objective: LossOverData, plane: Plane, *, batchnorm: str, engine: str,
                 memory_budget: int, cache_batches: bool):
        self.model = model
        self.cache_batches = cache_batches
        self.objective = objective
        self.plane = plane
        self.batch_statistics = batchnorm == "train"
        self.requested = choice(engine, ENGINES, "engine")
        self.memory_budget = memory_budget
        self.engine = None
        self.fallback_reason: str | None = None

    def _engine_for(self, batch: Batch):
        """The engine, chosen at the first batch (the layer-stack engine needs the samples' shape)."""
        if self.engine is None:
            reason = (unsupported_reason(self.model, tuple(batch.inputs.shape[1:])) if batch.is_pair else
                      "the batches are not (inputs, targets) pairs")
            if self.requested == "stack" and reason is not None:
                raise HessgapError(f"engine='stack' cannot run this model: {reason}; use engine='auto'")
            if self.requested == "functional" or reason is not None:
                self.fallback_reason = reason if self.requested == "auto" else None
                self.engine = FunctionalEngine(self.model, self.plane, self.batch_statistics)
            else:
                # the engine runs its own algebra on the layers' weights: a batch that does not fit the model
                # fails first in the model's own layers, whose errors name the shapes (buffers copied: untouched)
                buffers = {name: b.clone() for name, b in self.model.named_buffers()}
                functional_call(self.model, buffers, (batch.inputs[:2],))
                self.engine = StackEngine(self.model, self.plane, self.batch_statistics, batch.inputs.device)
        return self.engine

    def run(self, coefficients: torch.Tensor, on_batch=None) -> PassResult:
        """Loss and accuracy at the (P, K) ``coefficients``' points, over every batch of the data.

        Each point's weights are formed once and kept between the batches while a group of points' weights fits
        in half the memory budget. A larger set of points is split into such groups, each a walk over the
        batches held in memory (``cache_batches``); without them the weights are formed again for each batch
        instead, so that the data is read once. ``on_batch(points)`` follows the progress.
        """
        points = coefficients.shape[0]
        group = max(1, (self.memory_budget // 2) // max(per_point_bytes(self.plane, coefficients), 1))
        if group < points and self.cache_batches and not self.objective.batches_cached:
            self.objective.cache_batches()
        if group >= points or not self.objective.batches_cached:
            return self._pass(coefficients, group >= points, on_batch)
        parts = [self._pass(coefficients[start : start + group], True, on_batch) for start in range(0, points, group)]
        accuracy = None if parts[0].accuracy is None else torch.cat([part.accuracy for part in parts])
        return PassResult(torch.cat([part.loss for part in parts]), accuracy, parts[0].samples)

    def _pass(self, coefficients: torch.Tensor, keep_weights: bool, on_batch) -> PassResult:
        points = coefficients.shape[0]
        loss_sums = torch.zeros(points, dtype=torch.float64, device=coefficients.device)
        correct = torch.zeros(points, dtype=torch.float64, device=coefficients.device)
        classification, samples, weight, error = 1.0, 0.0, 0.0, None
        try:
            with torch.no_grad():
                chunk = None
                for batch in self.objective.batches():
                    with self.objective.naming_failures(batch):  # a batch that does not fit is named
                        engine = self._engine_for(batch)
                        prepared = engine.prepare(batch)
                        if chunk is None:  # sized on the first batch: the weights kept for a chunk need it fixed
                            engine.start_pass(keep_weights)
                            kept = points * per_point_bytes(self.plane, coefficients) if keep_weights else 0
                            chunk = engine.chunk_size(prepared, coefficients, self.memory_budget - kept)
                        targets = batch.targets
                        labels = targets is not None and targets.dim() == 1 and not targets.is_floating_point()
                        for start in range(0, points, chunk):
                            outputs = engine.outputs(prepared, coefficients[start : start + chunk], start // chunk)
                            losses = torch.stack([self.objective.loss_of_outputs(out, batch) for out in outputs])
                            # weighted as LossOverData.value weights its batches (samples, or counted targets)
                            loss_sums[start : start + chunk] += losses.double() * batch.weight
                            if labels and isinstance(outputs, torch.Tensor) and outputs.dim() == 3:
                                correct[start : start + chunk] += (outputs.argmax(-1) == targets).sum(1).double()
                            else:
                                classification = 0.0
                    samples += batch.samples
                    weight += batch.weight
                    if on_batch is not None:
                        on_batch(points)
        except Exception as exc:  # every rank must reach the sums below, also the one that failed
            error = exc
        ranks = self.objective.ranks
        ranks.settle(error)
        ranks.sum_bucket_([loss_sums, correct])
        samples, weight, labelled = ranks.sum_numbers([samples, weight, classification])
        if weight <= 0:
            raise HessgapError("the data holds no batch to evaluate the landscape on (an empty loader, or every "
                               "target ignored)")
        loss = loss_sums / weight
        accuracy = 100.0 * correct / samples if labelled == ranks.world_size else None
        # a point whose loss is not finite has no meaningful outputs either (argmax of NaN logits picks class 0,
        # which would report the share of class-0 targets as its accuracy): both are NaN there
        diverged = ~torch.isfinite(loss)
        loss[diverged] = float("nan")
        if accuracy is not None:
            accuracy[diverged] = float("nan")
        return PassResult(loss, accuracy, int(samples))


def per_point_bytes(plane: Plane, like: torch.Tensor) -> int:
    """Memory of one point's moving weights and statistics."""
    return sum(basis[0].numel() for basis in plane.moving.values()) * like.element_size()


def seconds_per_point(objective: LossOverData) -> float | None:
    """A rough time of one grid point: the model's forward pass and loss on the first batch, timed (the
    faster of two), times the number of batches. The engines share work between the points of a chunk, so a
    point usually costs less. None when the data cannot be read ahead without using it up (a one-shot
    iterator), when its batches cannot be counted, or when the first batch fails (the pass will say why)."""
    if objective.source.one_shot and not objective.batches_cached:
        return None
    try:
        if objective.batches_cached or objective.source.single:
            count = sum(1 for _ in objective.source)
        else:
            count = min(len(objective.data), objective.max_batches or len(objective.data))
        batch = next(iter(objective.batches()))
        seconds = []
        with torch.no_grad():
            for _ in range(2):  # the first call may include one-off set-up (kernels, caches)
                start = time.perf_counter()
                objective.batch_loss(batch)
                if objective.device.type == "cuda":
                    torch.cuda.synchronize(objective.device)
                seconds.append(time.perf_counter() - start)
        return min(seconds) * count
    except Exception:  # only an estimate: the pass over the data itself reports what is wrong
        return None
