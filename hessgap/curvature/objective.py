"""The one place where a model and its data become a loss: f(θ) = Σ_b w_b·L_b(θ) / Σ_b w_b over the loader.

L_b is batch b's mean loss and w_b the number of units it averages over (samples, or counted tokens: see
:mod:`hessgap.curvature.batches`), so f is the mean over every unit of the loader, however unequal the
batches. On several ranks (``torch.distributed``), the sums run over every rank's shard.

Sharpness solvers, HVPs, the spectrum and the measures all walk the data through :class:`LossOverData`:
batch structures, weights, device moves, passes that must see the same data (:mod:`.source`), the
parameters differentiated (:mod:`.params`), sums across ranks and the checks on bad input live here only.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import Ranks
from ..errors import HessgapError, NonFiniteError
from .batches import (
    Batch,
    ComputeLoss,
    LossFn,
    WeightFn,
    check_class_targets,
    check_own_loss,
    ignore_index_of,
    structure,
    units,
    widen_class_targets,
)
from .params import reselect, select_parameters
from .sharded import ShardedParameters, is_sharded
from .source import data_source

#: Parameter dtypes whose sums (f, ∇f, H·V over the loader) accumulate in float32.
REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums over the loader are kept in: float32 for half-precision models, else the model's own."""
    return torch.float32 if dtype in REDUCED_PRECISION else dtype


def output_tensor(outputs):
    """The tensor a ``loss_fn`` compares: the model's output, or its ``.logits`` (Hugging Face outputs)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise HessgapError(
        f"the model returned a {type(outputs).__name__}, not a tensor; pass loss_fn=... that takes it, or "
        "compute_loss=lambda model, batch: ... that returns the batch's mean loss"
    )


class LossOverData:
    """f over ``data`` for ``model``, evaluated batch by batch; also its gradient (see the module docstring).

    Args:
        model: any ``nn.Module``.
        data: a DataLoader or any iterable of batches, or one batch (see :mod:`hessgap.curvature.batches`).
        loss_fn: ``loss_fn(outputs, targets)`` → the batch's *mean* loss; default cross-entropy, or the
            output's ``.loss`` for mapping batches (Hugging Face).
        compute_loss: ``compute_loss(model, batch)`` → the batch's mean loss, for any other structure.
        weight_fn: ``weight_fn(batch)`` → the number of units the batch's mean averages over.
        max_batches: use only the first batches of the loader (the same ones on every pass).
        params: restrict to these parameters (names, tensors, modules); the others are held fixed.
        cache_batches: keep the batches on the device after the first pass.
        group: a torch.distributed process group; default: the default group when one is initialized.
        resample: the stochastic mode: a pass is one batch, the one :meth:`next_batch` drew last from the loader
            (see :class:`~hessgap.curvature.source.ResampledSource`).
    """

    def __init__(self, model: nn.Module, data, loss_fn: LossFn | None = None, *, compute_loss: ComputeLoss | None = None,
                 weight_fn: WeightFn | None = None, max_batches: int | None = None, params=None,
                 cache_batches: bool = False, group=None, resample: bool = False):
        self.model = model
        self.names, self.params = select_parameters(model, params)
        # FSDP2: the parameters are DTensor shards; vectors are then this rank's shards (see .sharded)
        self.sharded = ShardedParameters(self.names, self.params) if is_sharded(self.params) else None
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.accumulation_dtype = accumulation_dtype(self.dtype)
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 1):
            raise HessgapError(f"max_batches must be a positive number of batches, got {max_batches!r}")
        if loss_fn is not None and compute_loss is not None:
            raise HessgapError("pass either loss_fn(outputs, targets) or compute_loss(model, batch), not both")
        for name, fn in (("loss_fn", loss_fn), ("compute_loss", compute_loss), ("weight_fn", weight_fn)):
            if fn is not None and not callable(fn):
                raise HessgapError(f"{name} must be callable, got {type(fn).__name__}")
        _check_reduction(loss_fn)
        self.loss_fn, self.compute_loss, self.weight_fn = loss_fn, compute_loss, weight_fn
        # a model's own loss is checked against the units of its first batch (see check_own_loss), once
        self.own_loss_checked = loss_fn is not None or compute_loss is not None or weight_fn is not None
        self.max_batches = max_batches
        self.ranks = Ranks.resolve(group)
        self.resample = resample
        self.source = data_source(data, device=self.device, dtype=self.dtype, max_batches=max_batches,
                                  cache=cache_batches, resample=resample)
        self.data = data

    # -- the data ---------------------------------------------------------------------------------

    @property
    def num_parameters(self) -> int:
        """The length of a direction vector: every selected parameter, or this rank's shards of them."""
        return sum(p.numel() for p in self.vector_params)

    @property
    def total_parameters(self) -> int:
        """Every selected parameter, over all ranks' shards."""
        return sum(p.numel() for p in self.params)

    @property
    def vector_params(self) -> list[torch.Tensor]:
        """Tensors with the shapes of a direction's pieces: the parameters, or this rank's shards of them."""
        return [p.to_local() for p in self.params] if self.sharded is not None else list(self.params)

    def parameter_digest(self) -> str:
        """A short fingerprint of the parameters' names, shapes and dtypes: ranks compare it before working."""
        text = ";".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in zip(self.names, self.params))
        return f"{len(self.params)} tensors, n = {self.total_parameters}, {hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def agree_across_ranks(self, what: str, *arguments) -> None:
        """Raise on every rank unless all ranks pass the same ``arguments`` (``what`` names them) for the same
        parameters of the same model, holding the same values (see :meth:`Ranks.agree_on_model`)."""
        self.ranks.agree_on_model(what, self.model, (self.parameter_digest(), *arguments))

    def reselect_parameters(self) -> bool:
        """Select the parameters again when the model now holds other Parameter objects under their names
        (see :func:`~hessgap.curvature.params.reselect`); True when it does: whatever was built on the old
        objects (an HVP engine's plan, captured graphs) must then be rebuilt."""
        params = reselect(self.model, self.names, self.params)
        if params is None:
            return False
        self.params = params
        self.sharded = ShardedParameters(self.names, self.params) if is_sharded(self.params) else None
        return True

    @property
    def batches_cached(self) -> bool:
        """Whether every pass sees the very same batch tensors (kept after the first pass)."""
        return self.source.cached

    def next_batch(self) -> None:
        """The stochastic mode: draw the batch the next passes see (every rank draws from its own shard)."""
        self.ranks.together(self.source.advance)

    def cache_batches(self) -> LossOverData:
        """Read and keep the (device-moved) batches now, so repeated passes skip the loader."""
        self.ranks.together(self.source.fill)
        return self

    def batches(self) -> Iterator[Batch]:
        """One pass: each batch structured, on the parameters' device, with its weight (batches of weight 0,
        whose every target is ignored, are skipped: they hold nothing to average)."""
        for index, raw in enumerate(self.source):
            batch = structure(index, raw, closure=self.compute_loss is not None)
            widen_class_targets(batch, self.loss_fn)
            batch.weight = units(batch, self.model, self.loss_fn, self.weight_fn)
            if batch.weight > 0:
                yield batch

    # -- one batch --------------------------------------------------------------------------------

    def batch_loss(self, batch: Batch, parameters: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The batch's mean loss (a scalar tensor, differentiable when grad mode is on); with ``parameters``
        (name → tensor) the model runs on those instead of its own (``torch.func.functional_call``)."""
        model = self.model if parameters is None else _WithParameters(self.model, parameters)
        with self.naming_failures(batch):
            if self.compute_loss is not None and parameters is not None:
                loss = model.call(self.compute_loss, batch.raw)
            elif self.compute_loss is not None:
                loss = self.compute_loss(model, batch.raw)
            else:
                outputs = model(*batch.args, **batch.kwargs)
                loss = self.loss_of_outputs(outputs, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise HessgapError(
                f"the loss of batch {batch.index} is {shape}, not a scalar; loss_fn / compute_loss must return the "
                "batch's mean loss (reduction='mean')"
            )
        if torch.is_grad_enabled() and not loss.requires_grad:
            raise HessgapError(
                f"the loss of batch {batch.index} does not depend on the parameters (it carries no gradient); "
                "loss_fn / compute_loss must compute it from the model's outputs, without .detach() or torch.no_grad()"
            )
        return loss

    @contextlib.contextmanager
    def naming_failures(self, batch: Batch) -> Iterator[None]:
        """Turn an error torch raised on this batch (a shape or dtype the batch gave a layer) into a
        HessgapError that describes the batch; errors of the user's own code keep their type."""
        try:
            yield
        except HessgapError:
            raise
        except (RuntimeError, IndexError, TypeError, ValueError) as exc:
            if _missing_rule(exc) or not _raised_inside_torch(exc):
                raise  # an error of the user's own code keeps its type; the engine names missing rules
            raise HessgapError(
                f"the model or its loss failed on batch {batch.index} ({batch.describe()}): {type(exc).__name__}: "
                f"{exc}. Check that the batches fit the model (shapes, dtypes) and the loss (targets)"
            ) from exc

    def check_own_loss(self, batch: Batch) -> None:
        """Check the model's own loss against the batch's units (see :func:`loss_of_outputs`) with a forward
        without gradients, unless done already: for passes that never see the model's outputs (the graph engine)."""
        if not self.own_loss_checked and batch.kwargs:
            with torch.no_grad():
                self.batch_loss(batch)

    def loss_of_outputs(self, outputs, batch: Batch) -> torch.Tensor:
        """The batch's mean loss from the model's outputs on it (``loss_fn``, or the output's ``.loss``: on the
        first batch, checked to be the mean over the units the batch is weighted with, see
        :func:`~hessgap.curvature.batches.check_own_loss`)."""
        if self.loss_fn is None and batch.kwargs:
            loss = getattr(outputs, "loss", None)
            if isinstance(loss, torch.Tensor):
                if not self.own_loss_checked:
                    check_own_loss(self.model, outputs, loss, batch)
                    self.own_loss_checked = True
                return loss
            if batch.targets is None:
                raise HessgapError(
                    f"batch {batch.index} is a mapping without 'labels' and the model's output has no .loss; pass "
                    "labels in the batch, or compute_loss=lambda model, batch: ..."
                )
        if batch.targets is None:
            raise HessgapError(f"batch {batch.index} holds no targets for loss_fn")
        logits = output_tensor(outputs)
        loss_fn = self.loss_fn if self.loss_fn is not None else F.cross_entropy
        ignore = ignore_index_of(loss_fn)
        if ignore is not None:
            check_class_targets(logits, batch.targets, ignore, batch.index)
        if logits.dtype in REDUCED_PRECISION and (loss_fn is F.cross_entropy or isinstance(loss_fn, nn.CrossEntropyLoss)):
            # cross-entropy from float32 logits: in bfloat16 a softmax of 0.999 rounds to 1 and p(1 − p), the
            # curvature near a minimum, came out at 0.5–0.9× the float32 value
            logits = logits.float()
        return loss_fn(logits, batch.targets)

    # -- over the whole data ----------------------------------------------------------------------

    def value(self) -> float:
        """f at the model's current parameters (no gradients)."""
        self.refuse_sharded("the loss over the data (value)")
        error, total, weight = None, 0.0, 0.0
        try:
            with torch.no_grad():
                for batch in self.batches():
                    total += float(self.batch_loss(batch)) * batch.weight
                    weight += batch.weight
        except Exception as exc:  # every rank must reach the collective below, also the one that failed
            error = exc
        self.ranks.settle(error)
        total, weight = self.ranks.sum_numbers([total, weight])
        return self._finite(total / _nonzero(weight), "loss")

    def value_and_grad(self) -> tuple[float, list[torch.Tensor]]:
        """f and ∇f with respect to the selected parameters, accumulated over all batches in one pass."""
        self.refuse_sharded("the loss and its gradient (value_and_grad)")
        grads = [torch.zeros_like(p, dtype=self.accumulation_dtype) for p in self.params]
        error, total, weight = None, 0.0, 0.0
        try:
            for batch in self.batches():
                loss = self.batch_loss(batch)
                # weighted in the accumulation dtype: a float16 loss times a token count would overflow
                batch_grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                for acc, g in zip(grads, batch_grads):
                    if g is not None:
                        acc.add_(g, alpha=batch.weight)
                del batch_grads  # one gradient's worth of memory, not two, while the next batch runs
                total += float(loss.detach()) * batch.weight
                weight += batch.weight
        except Exception as exc:
            error = exc
        self.ranks.settle(error)
        self.ranks.sum_bucket_(grads)
        total, weight = self.ranks.sum_numbers([total, weight])
        for g in grads:
            g.div_(_nonzero(weight))
        value = self._finite(total / _nonzero(weight), "loss")
        # a sum is non-finite when any element is: no full-size masks on multi-GB gradients
        if not bool(torch.isfinite(torch.stack([g.sum() for g in grads])).all()):
            raise NonFiniteError("the gradient of the loss is not finite at these parameters")
        return value, grads

    def totals(self) -> tuple[int, float]:
        """(samples, units) over the whole data, every rank's shard included."""
        samples, weight = 0, 0.0
        for batch in self.batches():
            samples += batch.samples
            weight += batch.weight
        samples, weight = self.ranks.sum_numbers([samples, weight])
        return int(samples), weight

    def num_samples(self) -> int:
        return self.totals()[0]

    def check_finite_parameters(self) -> None:
        """Raise (on every rank) when a selected parameter holds NaN or inf: nothing measured there would mean
        anything."""
        self.ranks.together(check_finite_parameters, self.vector_params, self.names)

    def refuse_sharded(self, what: str) -> None:
        """Raise when the model is FSDP2-sharded: ``what`` needs the full parameters on every rank."""
        if self.sharded is not None:
            raise HessgapError(
                f"{what} does not take FSDP2-sharded models yet (the parameters are DTensor shards); hvp, "
                "HessianOperator, eigenvalues, trace, density and block_spectrum do. Measure an unsharded copy on each rank "
                "instead"
            )

    @staticmethod
    def _finite(value: float, what: str) -> float:
        if not math.isfinite(value):
            raise NonFiniteError(
                f"the {what} over the data is {value}; check the model's parameters and inputs for NaN/inf "
                "(a diverged training run gives this)"
            )
        return value


class _WithParameters:
    """``model`` called with other parameters (name → tensor) through ``torch.func.functional_call``; also for a
    ``compute_loss(model, batch)`` closure, which calls the model itself."""

    def __init__(self, model: nn.Module, parameters: dict[str, torch.Tensor]):
        self.model, self.parameters = model, parameters

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.parameters, args, kwargs)

    def call(self, closure, batch):
        return torch.func.functional_call(_Closure(self.model, closure), {f"model.{k}": v for k, v in
                                                                         self.parameters.items()}, (batch,))


class _Closure(nn.Module):
    def __init__(self, model: nn.Module, closure):
        super().__init__()
        self.model, self.closure = model, closure

    def forward(self, batch):
        return self.closure(self.model, batch)


def check_finite_parameters(params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    for name, p in zip(names, params):
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"parameter {name} holds NaN or inf; the model cannot be analysed at this point")


def _nonzero(weight: float) -> float:
    if weight <= 0:
        raise HessgapError("every target of every batch is ignored (weight 0): there is no loss to measure")
    return weight


def _check_reduction(loss_fn) -> None:
    reduction = getattr(loss_fn, "reduction", None)
    # reduction='none' is caught as a loss that is not a scalar; 'sum' would silently scale every result
    if isinstance(loss_fn, nn.Module) and reduction == "sum":
        raise HessgapError(
            "loss_fn has reduction='sum'; hessgap averages batch losses over the whole data itself and needs each "
            "batch's mean: use reduction='mean' (with 'sum' every result would scale with the batch size)"
        )


def _raised_inside_torch(exc: BaseException) -> bool:
    """Whether the innermost Python frame of the error is torch's own code (a shape or dtype the batch gave
    a layer), rather than the user's model or loss raising on purpose.

    hessgap's own frames in between do not count as the user's: the torch-function mode that watches
    attention calls (every op of the forward passes through it) is skipped, and the fused engine's layer
    rules run torch's ops on the model's behalf, so an error there is torch's.
    """
    tb, frames = exc.__traceback__, []
    while tb is not None:
        frames.append(os.path.abspath(tb.tb_frame.f_code.co_filename))
        tb = tb.tb_next
    for filename in reversed(frames):
        if filename in _PASS_THROUGH:
            continue
        return filename.startswith(_TORCH_DIR) or filename.startswith(_FUSED_DIR)
    return False


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_HERE = os.path.dirname(os.path.abspath(__file__))
_FUSED_DIR = os.path.join(_HERE, "fused") + os.sep
_PASS_THROUGH = {os.path.join(_HERE, "second_order.py")}


def _missing_rule(exc: Exception) -> bool:
    """An autograd error about an op without a (higher-order) derivative: the HVP engine names it itself."""
    text = str(exc)
    return "forward AD" in text or "derivative for" in text
