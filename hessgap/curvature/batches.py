"""What one batch is: how the model is called on it, what the loss compares against, and how much it weighs.

A loader may yield batches of three shapes:

- a tensor pair ``(inputs, targets)``: ``model(inputs)``, then ``loss_fn(outputs, targets)``;
- a tuple or list of several tensors ``(x1, ..., xm, targets)``: ``model(x1, ..., xm)``, the last one is
  the targets;
- a mapping (Hugging Face style ``{"input_ids", "attention_mask", "labels", ...}``): ``model(**batch)``;
  the loss is the output's ``.loss`` when no ``loss_fn`` is given, else ``loss_fn(outputs, batch["labels"])``.

A ``compute_loss(model, batch) -> mean loss of the batch`` closure replaces both conventions for anything
else (the batch then reaches it as the loader gave it, moved to the model's device).

f is the mean over every *unit* of the loader (:func:`units`): samples by default; the counted targets
for cross-entropy with ignored entries; the label tokens that count for token-level Hugging Face losses
(``labels != -100``, shifted by one for causal language models, whose loss predicts the next token: decided
from the model's config and class, :func:`is_causal_lm`). The model's own loss of the first batch is checked
to be the mean over those units (:func:`check_own_loss`). A ``weight_fn(batch) -> number`` overrides the count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HessgapError

#: Hugging Face's ignore index for labels that do not count (padding, prompt tokens).
IGNORE_INDEX = -100

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
ComputeLoss = Callable[[nn.Module, Any], torch.Tensor]
WeightFn = Callable[[Any], float]


@dataclass
class Batch:
    """One batch on the model's device: how to call the model, the targets, and its weight in f.

    ``raw`` is the batch in the loader's own structure (moved to the device), what a ``compute_loss``
    closure and a ``weight_fn`` receive.
    """

    index: int
    raw: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    targets: torch.Tensor | None = None
    samples: int = 0
    weight: float = 0.0

    @property
    def inputs(self) -> torch.Tensor:
        """The single positional input of a pair batch (what the fused engine takes)."""
        return self.args[0]

    @property
    def is_pair(self) -> bool:
        return len(self.args) == 1 and not self.kwargs and self.targets is not None

    def describe(self) -> str:
        """The batch's tensors with their shapes and dtypes, for messages about a batch that does not fit."""
        def shape(t):
            return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"

        if self.kwargs:
            return "keys " + ", ".join(f"{k}: {shape(v)}" for k, v in self.kwargs.items() if isinstance(v, torch.Tensor))
        parts = [f"input {shape(a)}" for a in self.args]
        if self.targets is not None:
            parts.append(f"targets {shape(self.targets)}")
        return ", ".join(parts) or type(self.raw).__name__



def tensors_in(value) -> list[torch.Tensor]:
    """Every tensor in a batch of any structure (nested tuples, lists and mappings)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    return []


def is_single_batch(data) -> bool:
    """Whether ``data`` is one batch rather than an iterable of batches: a tuple/list of tensors, or a
    mapping whose values are tensors."""
    if isinstance(data, Mapping):
        return bool(data) and all(isinstance(v, torch.Tensor) for v in data.values())
    return isinstance(data, (tuple, list)) and len(data) >= 2 and all(isinstance(t, torch.Tensor) for t in data)


def to_device(value, device: torch.device, dtype: torch.dtype):
    """``value`` with every tensor on ``device``; floating tensors cast to the model's ``dtype``."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):  # a plain dict: what model(**batch) needs, whatever mapping type came in
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(to_device(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [to_device(v, device, dtype) for v in value]
    return value


def _first_dim(tensors: list[torch.Tensor]) -> int:
    for t in tensors:
        if t.dim() > 0:
            return int(t.shape[0])
    return 1


def structure(index: int, raw, *, closure: bool) -> Batch:
    """The :class:`Batch` for a loader item already on the device (weights filled in by :func:`units`)."""
    if closure:
        tensors = tensors_in(raw)
        return Batch(index, raw, samples=_first_dim(tensors))
    if isinstance(raw, Mapping):
        if not raw:
            raise HessgapError(f"batch {index} is an empty mapping; it must hold the model's keyword inputs")
        samples = _first_dim(tensors_in(raw))
        return Batch(index, raw, kwargs=dict(raw), targets=raw.get("labels"), samples=samples)
    if isinstance(raw, (tuple, list)):
        if len(raw) < 2:
            raise HessgapError(
                f"batch {index} is a {type(raw).__name__} of {len(raw)} item(s); a batch is an (inputs, targets) "
                "pair, a tuple (input1, ..., inputM, targets), or a mapping passed as model(**batch)"
            )
        *args, targets = raw
        for position, t in enumerate(raw):
            if not isinstance(t, torch.Tensor):
                raise HessgapError(
                    f"batch {index} holds a {type(t).__name__} at position {position}; tuple batches hold tensors "
                    "(pass compute_loss=lambda model, batch: ... for other structures)"
                )
        samples = _first_dim(args)
        if any(t.dim() > 0 and t.shape[0] == 0 for t in args):
            raise HessgapError(f"batch {index} is empty (0 samples)")
        if targets.dim() > 0 and targets.shape[0] != samples:
            raise HessgapError(
                f"batch {index} has {samples} inputs but {targets.shape[0]} targets; inputs and targets must have "
                "the same first dimension"
            )
        return Batch(index, raw, args=tuple(args), targets=targets, samples=samples)
    raise HessgapError(
        f"batch {index} is a {type(raw).__name__}; a batch is an (inputs, targets) pair, a tuple "
        "(input1, ..., inputM, targets), a mapping passed as model(**batch), or anything with compute_loss="
    )


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal language model: its own loss predicts token t+1 from tokens ≤ t, so it shifts the
    labels by one and averages over the label tokens from the second on.

    Decided from the model itself: a decoder-only config (``config.is_encoder_decoder`` false) and a class that
    transformers' ``AutoModelForCausalLM`` maps to (or a ``*ForCausalLM`` of remote code). Encoder-decoders (T5,
    BART: ``*ForConditionalGeneration``) shift the decoder's inputs instead and average over every label token;
    their ``loss_function`` is nonetheless transformers' causal-LM fallback, so its name decides nothing.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name in _causal_lm_classes()


@functools.cache
def _causal_lm_classes() -> frozenset[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # no transformers: no Hugging Face model either
        return frozenset()
    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def ignore_index_of(loss_fn) -> int | None:
    """The ignored target value of a cross-entropy loss (None for other losses): ``nn.CrossEntropyLoss``,
    ``F.cross_entropy``, or a ``functools.partial`` of it that may set ``ignore_index``; a wrapper that names
    the loss it wraps as ``__wrapped__`` (``functools.wraps`` does) has that loss's."""
    wrapped = getattr(loss_fn, "__wrapped__", None)
    if wrapped is not None:
        return ignore_index_of(wrapped)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return loss_fn.ignore_index
    if loss_fn is F.cross_entropy:
        return IGNORE_INDEX
    if isinstance(loss_fn, functools.partial) and loss_fn.func is F.cross_entropy and not loss_fn.args:
        return loss_fn.keywords.get("ignore_index", IGNORE_INDEX)
    return None


def widen_class_targets(batch: Batch, loss_fn) -> None:
    """Integer class indices for hessgap's cross-entropy (``loss_fn`` one, or None: the default) as int64, in
    place: torch's cross_entropy takes int64 (and uint8) only, while labels often come as int32 (numpy's
    default on Windows, label encoders) or smaller. A Hugging Face batch whose model computes its own loss
    keeps its labels as they are."""
    targets = batch.targets
    if (targets is None or targets.is_floating_point() or targets.is_complex()
            or targets.dtype in (torch.int64, torch.bool)):
        return
    if (batch.kwargs and loss_fn is None) or ignore_index_of(loss_fn if loss_fn is not None else F.cross_entropy) is None:
        return
    batch.targets = targets.long()


def units(batch: Batch, model: nn.Module, loss_fn, weight_fn: WeightFn | None) -> float:
    """How many units the batch's mean loss averages over (its weight in f)."""
    if weight_fn is not None:
        value = weight_fn(batch.raw)
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        if not value >= 0 or value == float("inf"):
            raise HessgapError(f"weight_fn returned {value} for batch {batch.index}; it must return a count ≥ 0")
        return value
    targets = batch.targets
    if batch.kwargs and targets is not None and loss_fn is None:  # Hugging Face labels with the model's own loss
        labels = targets[:, 1:] if targets.dim() >= 2 and is_causal_lm(model) else targets
        return float((labels != IGNORE_INDEX).sum())
    ignore = ignore_index_of(loss_fn if loss_fn is not None else F.cross_entropy)
    if ignore is not None and targets is not None and not targets.is_floating_point():
        return float((targets != ignore).sum())
    return float(batch.samples)


def check_class_targets(logits: torch.Tensor, targets: torch.Tensor, ignore: int, index: int) -> None:
    """Cross-entropy's targets: class indices of the output's shape without the class dimension, in range
    (or the ignore index), or class probabilities of the output's own shape."""
    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise HessgapError(
                f"batch {index}: cross-entropy got floating targets of shape {tuple(targets.shape)} for outputs of "
                f"shape {tuple(logits.shape)}; class indices must be integers (targets.long()), class probabilities "
                "must have the outputs' shape"
            )
        return
    if targets.dtype == torch.bool or targets.is_complex():
        raise HessgapError(f"batch {index}: cross-entropy targets of dtype {targets.dtype}; use class indices (torch.long)")
    expected = logits.shape[:1] + logits.shape[2:] if logits.dim() >= 2 else logits.shape[:0]
    if targets.shape != expected:
        raise HessgapError(
            f"batch {index}: cross-entropy targets of shape {tuple(targets.shape)} for outputs of shape "
            f"{tuple(logits.shape)}; expected class indices of shape {tuple(expected)}"
        )
    classes = logits.shape[1] if logits.dim() >= 2 else logits.shape[0]
    counted = targets[targets != ignore]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= classes):
        raise HessgapError(
            f"batch {index}: cross-entropy targets range over [{int(counted.min())}, {int(counted.max())}] but the "
            f"model has {classes} classes (0..{classes - 1}; {ignore} is ignored); check the labels and the model's "
            "number of outputs"
        )


def own_loss_tolerance(dtype: torch.dtype, own: float, log_sum: float) -> float:
    """How far a model's own loss in ``dtype`` may lie from the exact mean cross-entropy of its logits.

    A loss computed in the model's dtype rounds each token's log-sum-exp (mean magnitude ``log_sum``) and the
    mean, about eps·max(|loss|, |log-sum-exp|) in all (at most 1.5 eps measured for bfloat16 and float16 on
    CPU): 4 eps of that scale still refuses a mean over units a few per cent off in half precision, where a
    bound relative to the loss alone (64 eps: 50 % in bfloat16) let a wrong unit count pass. Wider in float32
    and float64 (64 eps), where that is still far below any unit miscount."""
    eps = torch.finfo(dtype).eps
    factor = 4 if eps > 1e-4 else 64  # half precision: the loss's own rounding is the only slack it needs
    return factor * eps * max(1.0, abs(own), abs(log_sum))


def check_own_loss(model: nn.Module, outputs, loss: torch.Tensor, batch: Batch) -> None:
    """Raise unless the model's own ``.loss`` of ``batch`` is the mean cross-entropy over the units the batch
    is weighted with (:func:`units`): otherwise the batches of the loader would be weighted wrongly (by label
    tokens the loss does not average over) and f, its gradient and Hessian would be silently off.

    Recomputed from the output's ``.logits`` and the labels (shifted as :func:`units` shifts them); a loss that
    is no per-label cross-entropy of the logits (other shapes, floating labels) is taken as it is.
    """
    logits, labels = getattr(outputs, "logits", None), batch.targets
    if (not isinstance(logits, torch.Tensor) or batch.weight <= 0 or labels is None or labels.dim() == 0
            or labels.is_floating_point()):
        return
    causal = labels.dim() >= 2 and is_causal_lm(model)
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    counted = labels[labels != IGNORE_INDEX]
    in_range = not counted.numel() or 0 <= int(counted.min()) <= int(counted.max()) < logits.shape[-1]
    if logits.shape[:-1] != labels.shape or not in_range:
        return
    with torch.no_grad():
        flat = logits.detach().reshape(-1, logits.shape[-1]).double()
        total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        log_sums = torch.logsumexp(flat[labels.reshape(-1) != IGNORE_INDEX], -1)
    mean, own = float(total) / batch.weight, float(loss.detach())
    if abs(mean - own) <= own_loss_tolerance(loss.dtype, own, float(log_sums.abs().mean()) if counted.numel() else 0.0):
        return
    shift = "shifted by one, as for a causal language model" if causal else "not shifted"
    raise HessgapError(
        f"batch {batch.index}: the model's own loss is {own:.8g}, but the mean cross-entropy of its logits over the "
        f"{batch.weight:g} label tokens hessgap weights the batch with (labels != {IGNORE_INDEX}, {shift}) is "
        f"{mean:.8g}: these per-batch units do not reproduce the model's loss, so the batches would be weighted "
        "wrongly. Pass weight_fn=lambda batch: <the number of units the model's loss averages over>, or "
        "compute_loss=lambda model, batch: ... (with weight_fn=) that computes the loss yourself"
    )
