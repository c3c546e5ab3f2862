"""The one place where a model and its data become a loss: f(x) = mean loss over every sample.

Sharpness solvers, HVPs and the spectrum methods all walk the data through :class:`LossOverData`, so
the weighting of unequal batches, device moves and the checks on bad input live here only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .._checks import is_int
from ..errors import HessgapError, NonFiniteError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _is_single_batch(data) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
    )


def trainable_parameters(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Names and tensors of the parameters with ``requires_grad``, in ``model.parameters()`` order."""
    if not isinstance(model, nn.Module):
        raise HessgapError(f"expected a torch.nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise HessgapError(
            "the model has no trainable parameters (every parameter has requires_grad=False); "
            "unfreeze the parameters whose curvature you want"
        )
    first = named[0][1]
    for name, p in named:
        if p.device != first.device:
            raise HessgapError(
                f"parameters are on several devices ({named[0][0]} on {first.device}, {name} on {p.device}); "
                "move the model to one device with model.to(device)"
            )
        if p.dtype != first.dtype:
            raise HessgapError(
                f"parameters have several dtypes ({named[0][0]} is {first.dtype}, {name} is {p.dtype}); "
                "cast the model to one dtype with model.to(dtype)"
            )
        if not p.dtype.is_floating_point:
            raise HessgapError(f"parameter {name} has non-floating dtype {p.dtype}")
    return [n for n, _ in named], [p for _, p in named]


class LossOverData:
    """f(params) = (1/N) Σ_samples loss, evaluated batch by batch over a loader or over one batch.

    ``data`` is an iterable of ``(inputs, targets)`` batches (a DataLoader, a list) or a single
    ``(inputs, targets)`` pair. ``loss_fn(outputs, targets)`` must return the *mean* loss of a batch
    (default: cross-entropy); batches are weighted by their size so unequal last batches count right.
    ``max_batches`` limits f to the first batches, for speed.
    """

    def __init__(
        self,
        model: nn.Module,
        data,
        loss_fn: LossFn | None = None,
        max_batches: int | None = None,
    ):
        self.model = model
        self.names, self.params = trainable_parameters(model)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        if max_batches is not None and (not is_int(max_batches) or max_batches < 1):
            # the shared integer test (_checks.is_int); the message keeps its established wording
            raise HessgapError(f"max_batches must be a positive number of batches, got {max_batches!r}")
        self.max_batches = max_batches
        self._single = _is_single_batch(data)
        if data is None:
            raise HessgapError("no data given: pass a DataLoader (or any iterable of (inputs, targets)) or one batch")
        if not self._single and not isinstance(data, Iterable):
            raise HessgapError(
                f"data must be an iterable of (inputs, targets) batches or one (inputs, targets) pair, "
                f"got {type(data).__name__}"
            )
        self.data = data
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def cache_batches(self) -> LossOverData:
        """Keep the (device-moved) batches in memory so repeated passes skip the loader."""
        self._cache = list(self._iter_source())
        return self

    @property
    def batches_cached(self) -> bool:
        """True after :meth:`cache_batches`: every pass sees the very same batches."""
        return self._cache is not None

    def _iter_source(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        source: Iterable = [self.data] if self._single else self.data
        count = 0
        for index, batch in enumerate(source):
            if self.max_batches is not None and index >= self.max_batches:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise HessgapError(
                    f"batch {index} is a {type(batch).__name__}; each batch must be an (inputs, targets) pair"
                )
            inputs, targets = batch[0], batch[1]
            if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
                raise HessgapError(f"batch {index} does not hold tensors (inputs, targets)")
            if inputs.shape[0] == 0:
                raise HessgapError(f"batch {index} is empty (0 samples)")
            if inputs.shape[0] != targets.shape[0]:
                raise HessgapError(
                    f"batch {index} has {inputs.shape[0]} inputs but {targets.shape[0]} targets; "
                    "inputs and targets must have the same first dimension"
                )
            if inputs.is_floating_point() and inputs.dtype != self.dtype:
                inputs = inputs.to(self.dtype)
            if targets.is_floating_point() and targets.dtype != self.dtype:
                targets = targets.to(self.dtype)
            count += 1
            yield inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        if count == 0:
            raise HessgapError("the data loader yielded no batches; pass a loader with at least one batch")

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, targets)`` on the parameters' device and dtype, in loader order."""
        return iter(self._cache) if self._cache is not None else self._iter_source()

    def batch_loss(self, outputs: torch.Tensor, targets: torch.Tensor, index: int = 0) -> torch.Tensor:
        """The batch's mean loss, checked to be a finite scalar."""
        loss = self.loss_fn(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise HessgapError(
                f"loss_fn returned {shape}, not a scalar; it must return the mean loss of the batch "
                "(use reduction='mean')"
            )
        return loss

    def value(self) -> float:
        """f at the model's current parameters (no gradients)."""
        total, count = 0.0, 0
        with torch.no_grad():
            for index, (inputs, targets) in enumerate(self.batches()):
                loss = self.batch_loss(self.model(inputs), targets, index)
                total += float(loss) * inputs.shape[0]
                count += inputs.shape[0]
        return self._finite(total / count, "loss")

    def value_and_grad(self) -> tuple[float, list[torch.Tensor]]:
        """f and ∇f w.r.t. the trainable parameters, accumulated over all batches in one pass."""
        grads = [torch.zeros_like(p) for p in self.params]
        total, count = 0.0, 0
        for index, (inputs, targets) in enumerate(self.batches()):
            loss = self.batch_loss(self.model(inputs), targets, index)
            size = inputs.shape[0]
            batch_grads = torch.autograd.grad(loss * size, self.params, allow_unused=True)
            for acc, g in zip(grads, batch_grads):
                if g is not None:
                    acc.add_(g)
            del batch_grads  # one gradient's worth of memory, not two, while the next batch runs
            total += float(loss.detach()) * size
            count += size
        for g in grads:
            g.div_(count)
        value = self._finite(total / count, "loss")
        # a sum is non-finite when any element is: no full-size masks on multi-GB gradients
        if not bool(torch.isfinite(torch.stack([g.sum() for g in grads])).all()):
            raise NonFiniteError("the gradient of the loss is not finite at these parameters")
        return value, grads

    def num_samples(self) -> int:
        return sum(inputs.shape[0] for inputs, _ in self.batches())

    @staticmethod
    def _finite(value: float, what: str) -> float:
        if not math.isfinite(value):
            raise NonFiniteError(
                f"the {what} over the data is {value}; check the model's parameters and inputs for NaN/inf "
                "(a diverged training run gives this)"
            )
        return value


def check_finite_parameters(params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    for name, p in zip(names, params):
        if not torch.isfinite(p).all():
            raise NonFiniteError(f"parameter {name} holds NaN or inf; the model cannot be analysed at this point")
