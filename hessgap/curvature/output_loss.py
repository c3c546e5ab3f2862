"""The loss as a function of the model's output z: which loss it is, its units at z, and the matrices the
Gauss-Newton and Fisher products multiply by there.

z is the tensor the loss compares: the model's output (its ``.logits`` for Hugging Face outputs), before
any cast, shift or reshape the loss makes. With f = Σ_units ℓ_u / N (:mod:`hessgap.curvature.objective`),
a batch of weight w_b and mean loss L_b has the per-unit gradients g_u = w_b·∂L_b/∂z restricted to unit u's
part of z, which is what the engine's first-order pass gives when seeded with w_b.

Units at z (:func:`unit_dims`), the objective's own:

- cross-entropy over class indices (the default loss, ``nn.CrossEntropyLoss``, a Hugging Face model's own
  token loss): one unit per counted prediction, a slice of z along its class dimension (dimension 1 for
  ``loss_fn``, the last one for Hugging Face logits, whose labels are shifted by one for causal LMs);
- any other loss: one unit per sample, a slice of z along its first dimension.

The batch's weight must count those units (it does unless a ``weight_fn`` says otherwise); the empirical
Fisher is refused when it does not, since its per-unit gradients would then be other quantities.

The true Fisher's targets are drawn from the model's predictive distribution at z: a class from softmax(z)
per counted prediction (cross-entropy), or y = z + √(D/2)·ε per sample of D outputs (mean squared error,
whose per-sample loss ‖z − y‖²/D is that Gaussian's negative log-likelihood). Each draw is a function of
(seed, global sample number, position, draw) only (:mod:`hessgap.curvature.draws`). The exact expectation
over the draws is the loss's Hessian at z in both cases, so the true Fisher is an unbiased Monte Carlo
estimate of the GGN of those losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HessgapError
from . import draws
from .batches import IGNORE_INDEX, Batch, ignore_index_of, is_causal_lm

CROSS_ENTROPY, SQUARED_ERROR, OTHER = "cross-entropy", "mean squared error", "other"


@dataclass(frozen=True)
class OutputLoss:
    """Which loss compares z with the targets: ``kind``, and for cross-entropy its ignored target and whether it
    is a Hugging Face model's own loss (``own``; ``causal``: labels shifted by one)."""

    kind: str
    own: bool = False
    causal: bool = False
    ignore: int | None = None


def _unwrapped(fn):
    while getattr(fn, "__wrapped__", None) is not None:
        fn = fn.__wrapped__
    return fn


def refuse_closure(objective) -> None:
    """Raise for a ``compute_loss`` closure: it hides where the model's output ends and the loss begins."""
    if objective.compute_loss is not None:
        raise HessgapError(
            "the Gauss-Newton and Fisher matrices split the loss into the model's output and a loss of that output, "
            "which a compute_loss closure hides: pass loss_fn=lambda outputs, targets: ... (and weight_fn=) instead")


def output_loss(objective, batch: Batch) -> OutputLoss:
    """The loss at the model's output for ``batch`` (see the module docstring)."""
    refuse_closure(objective)
    if objective.loss_fn is None and batch.kwargs:
        labels = batch.targets
        if labels is None or labels.is_floating_point() or labels.dim() == 0:
            raise HessgapError(
                f"batch {batch.index}: the model computes its own loss from labels that are not class indices; the "
                "Gauss-Newton and Fisher matrices need the loss as a function of the output: pass loss_fn=")
        return OutputLoss(CROSS_ENTROPY, own=True, causal=labels.dim() >= 2 and is_causal_lm(objective.model),
                          ignore=IGNORE_INDEX)
    fn = objective.loss_fn if objective.loss_fn is not None else F.cross_entropy
    ignore = ignore_index_of(fn)
    if ignore is not None:
        return OutputLoss(CROSS_ENTROPY, ignore=ignore)
    base = _unwrapped(fn)
    if base is F.mse_loss or (isinstance(base, nn.MSELoss) and base.reduction == "mean"):
        return OutputLoss(SQUARED_ERROR)
    return OutputLoss(OTHER)


def _class_indices(loss: OutputLoss, batch: Batch) -> bool:
    return loss.kind == CROSS_ENTROPY and batch.targets is not None and not batch.targets.is_floating_point()


def loss_of_output(objective, loss: OutputLoss, batch: Batch, z: torch.Tensor) -> torch.Tensor:
    """The batch's mean loss as a function of z alone (the generic path differentiates it on the output space)."""
    if not loss.own:
        return objective.loss_of_outputs(z, batch)
    targets, _ = aligned_targets(loss, z, batch)
    logits = z if z.dtype in (torch.float32, torch.float64) else z.float()  # as Hugging Face's float32 loss, or wider
    return F.cross_entropy(logits.reshape(-1, z.shape[-1]), targets.reshape(-1).long(), ignore_index=loss.ignore)


def aligned_targets(loss: OutputLoss, z: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy's class indices aligned with z's predictions (shifted for a causal LM's own loss) and the
    mask of those that count."""
    targets = batch.targets
    if loss.causal:
        targets = torch.cat([targets[:, 1:], targets.new_full((targets.shape[0], 1), loss.ignore)], 1)
    expected = z.shape[:-1] if loss.own else z.shape[:1] + z.shape[2:]
    if z.dim() < 2 or targets.shape != expected:
        raise HessgapError(
            f"batch {batch.index}: class targets of shape {tuple(batch.targets.shape)} for outputs of shape "
            f"{tuple(z.shape)}; the Gauss-Newton and Fisher products need one class index per prediction of z")
    return targets, targets != loss.ignore


def unit_dims(loss: OutputLoss, z: torch.Tensor, batch: Batch) -> tuple[int, ...]:
    """The dimensions of z that one unit spans (summed within a unit); checks that the batch's weight counts
    those units."""
    if z.dim() < 1 or z.shape[0] != batch.samples:
        raise HessgapError(f"batch {batch.index}: the model's output has shape {tuple(z.shape)}, not one row per "
                           f"sample ({batch.samples}); the per-unit gradients need samples along its first dimension")
    if _class_indices(loss, batch):
        _, mask = aligned_targets(loss, z, batch)
        counted = int(mask.sum())
        if counted == batch.weight:
            return (z.dim() - 1,) if loss.own else (1,)
        units = f"the {counted} counted targets"
    else:
        if batch.weight == z.shape[0]:
            return tuple(range(1, z.dim()))
        units = f"its {z.shape[0]} samples"
    raise HessgapError(
        f"batch {batch.index} weighs {batch.weight:g} units, but its loss averages over {units}: the empirical "
        "Fisher needs each unit's own gradient, which a weight_fn counting other units does not give. Leave "
        "weight_fn out, or use the GGN")


class OuterProduct:
    """M·u = scale·Σ_s r_s ⟨r_s, u⟩_unit: the Fishers' matrix at z, from per-unit gradient samples r_s (S, *z.shape);
    ⟨·,·⟩_unit sums within each unit (over ``dims`` of z), so M is block diagonal over the units."""

    def __init__(self, residuals: torch.Tensor, dims: tuple[int, ...], scale: float):
        self.residuals, self.dims, self.scale = residuals, dims, scale

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        dims = [d + 1 for d in self.dims]
        out = None
        for r in self.residuals:
            r = r.to(u.dtype)
            term = r * (u * r).sum(dims, keepdim=True)
            out = term if out is None else out.add_(term)
        return out.mul_(self.scale)


class FisherAtOutput:
    """Builds a batch's :class:`OuterProduct`: the empirical Fisher's (r = the per-unit gradients) or the true
    Fisher's (r = the gradients at ``samples`` targets drawn from the model, see the module docstring)."""

    def __init__(self, objective, kind: str, samples: int, seed: int):
        self.objective, self.kind, self.samples, self.seed = objective, kind, samples, seed

    def __call__(self, batch: Batch, z: torch.Tensor, grad_z: torch.Tensor, first_sample: int,
                 scale: float) -> OuterProduct:
        """``grad_z`` = w_b·∂L_b/∂z; ``first_sample``: the global number of the batch's first sample; ``scale``
        multiplies M (1 for sums over units, 1/w_b for the batch's mean)."""
        loss = output_loss(self.objective, batch)
        dims = unit_dims(loss, z, batch)
        grad_z = grad_z.detach()
        if self.kind == "empirical":
            return OuterProduct(grad_z.unsqueeze(0), dims, scale)
        if _class_indices(loss, batch):
            residuals = self._classes(loss, batch, z.detach(), grad_z, first_sample)
        elif loss.kind == SQUARED_ERROR:
            residuals = self._gaussian(batch, z.detach(), grad_z, first_sample)
        else:
            raise HessgapError(
                "the true Fisher draws targets from the model's predictive distribution, which hessgap knows for a "
                f"softmax cross-entropy over class indices and for the mean squared error; this loss ({loss.kind}, "
                f"targets {batch.describe()}) is neither: use the empirical Fisher or the GGN")
        return OuterProduct(residuals, dims, scale / self.samples)

    def _check(self, grad_z: torch.Tensor, expected: torch.Tensor, batch: Batch, what: str, own: bool) -> None:
        """The loss's gradient at the true targets must be the one the draws assume (no smoothing, no class weights);
        a model's own loss may round in float32 (Hugging Face computes it there)."""
        scale = max(1.0, float(expected.abs().max()))
        error = float((grad_z.to(expected.dtype) - expected).abs().max())
        eps = max(torch.finfo(grad_z.dtype).eps, torch.finfo(torch.float32).eps if own else 0.0)
        if error > 64 * eps * scale:
            raise HessgapError(
                f"batch {batch.index}: the loss's gradient at the model's output is not {what} (off by {error:.3g}): "
                "the true Fisher's draws assume the plain mean of that loss over the units (no label smoothing, class "
                "weights or other scaling); use the empirical Fisher or the GGN for this loss")

    def _classes(self, loss, batch, z, grad_z, first_sample):
        targets, mask = aligned_targets(loss, z, batch)
        class_dim = z.dim() - 1 if loss.own else 1
        logits = z.movedim(class_dim, -1).double()
        p = torch.softmax(logits, -1)
        keep = mask.unsqueeze(-1).to(p.dtype)
        onehot = F.one_hot(targets.clamp(min=0).long(), p.shape[-1]).to(p.dtype)
        self._check(grad_z.movedim(class_dim, -1), (p - onehot) * keep, batch, "softmax(z) − onehot(target)",
                    loss.own)
        rows, classes = p.shape[0], p.shape[-1]
        positions = p[0, ..., 0].numel()
        numbers = (torch.arange(rows, device=z.device) + first_sample).reshape(rows, 1, 1)
        inner = (torch.arange(positions, device=z.device).reshape(1, positions, 1) * self.samples
                 + torch.arange(self.samples, device=z.device).reshape(1, 1, self.samples))
        u = draws.uniforms(self.seed, numbers, inner).reshape(-1, self.samples)
        drawn = draws.categorical(p.reshape(-1, classes), u)  # (rows·positions, S)
        flat_p, flat_keep = p.reshape(-1, classes), keep.reshape(-1, 1)
        residuals = []
        for s in range(self.samples):
            r = (flat_p - F.one_hot(drawn[:, s], classes).to(p.dtype)) * flat_keep
            residuals.append(r.reshape(p.shape).movedim(-1, class_dim).to(z.dtype))
        return torch.stack(residuals)

    def _gaussian(self, batch, z, grad_z, first_sample):
        rows = z.shape[0]
        size = z[0].numel()
        targets = batch.targets.to(z.dtype)
        if targets.shape != z.shape:
            raise HessgapError(f"batch {batch.index}: the mean squared error compares outputs {tuple(z.shape)} with "
                               f"targets {tuple(targets.shape)}; the true Fisher needs them of one shape")
        self._check(grad_z, (2.0 / size) * (z - targets), batch, "2(z − y)/D", False)
        numbers = (torch.arange(rows, device=z.device) + first_sample).reshape(rows, 1, 1)
        inner = (torch.arange(size, device=z.device).reshape(1, size, 1) * self.samples
                 + torch.arange(self.samples, device=z.device).reshape(1, 1, self.samples))
        noise = draws.normal(draws.uniforms(self.seed, numbers, inner))  # (rows, D, S)
        return (math.sqrt(2.0 / size) * noise).permute(2, 0, 1).reshape((self.samples,) + tuple(z.shape)).to(z.dtype)
