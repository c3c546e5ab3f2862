"""The remedies Keskar et al. (2017, Appendix E) tried against the large-batch generalization gap.

- ``augment``: the paper's data augmentation: horizontal flips (where the data allow them), rotations up
  to 10° and translations up to 0.2 of the image, drawn per sample and applied to the whole batch at once
  with one ``affine_grid`` / ``grid_sample`` (no torchvision).
- ``conservative``: each step solves min_x mean_B f(x) + λ/2‖x − x_k‖² inexactly by a few steps of the
  run's optimizer (the paper: 3 ADAM steps, λ = 1e-3) on the same batch B.
- ``adversarial``: FGSM (Goodfellow et al. 2015): train on the clean batch and its sign-gradient
  perturbation x + ε·sign(∇_x f), half and half.
- ``dynamic``: dynamic sampling, which the paper proposed but did not test: the batch size grows
  geometrically from epoch to epoch up to a final size.

:func:`make_training_step` turns a remedy into the one function the training loop calls per batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import is_int
from ..errors import HessgapError
from ..names import REMEDY_NAMES

REMEDIES = REMEDY_NAMES  # the names of hessgap.names, under the name this module has always exported them

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor], torch.Tensor]


# --- data augmentation -------------------------------------------------------------------------------

def augment_batch(
    inputs: torch.Tensor,
    generator: torch.Generator | None = None,
    flip: bool = True,
    max_degrees: float = 10.0,
    max_translate: float = 0.2,
) -> torch.Tensor:
    """A randomly flipped, rotated and translated copy of a batch of images (N × C × H × W).

    Per sample: a horizontal flip with probability 1/2 (if ``flip``), a rotation by an angle uniform in
    ±``max_degrees`` and a shift uniform in ±``max_translate`` of the width and of the height. Pixels that
    come from outside the image repeat the border (Keras' "nearest" fill). Random draws come from
    ``generator`` (a CPU generator, so runs reproduce on any device).
    """
    if inputs.dim() != 4:
        raise HessgapError(
            f"augmentation needs a batch of images N × C × H × W, got shape {tuple(inputs.shape)}; "
            "flips, rotations and translations do not apply to flat feature vectors"
        )
    if max_degrees < 0 or not 0 <= max_translate <= 1:
        raise HessgapError(f"max_degrees must be ≥ 0 and max_translate in [0, 1], got {max_degrees}, {max_translate}")
    n = inputs.shape[0]
    draw = lambda: torch.rand(n, generator=generator, dtype=torch.float64)  # noqa: E731
    angle = (2 * draw() - 1) * math.radians(max_degrees)
    shift_x = (2 * draw() - 1) * max_translate
    shift_y = (2 * draw() - 1) * max_translate
    mirror = draw() < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return affine_images(inputs, angle, shift_x, shift_y, mirror)


def affine_images(inputs: torch.Tensor, angle: torch.Tensor, shift_x: torch.Tensor, shift_y: torch.Tensor,
                  mirror: torch.Tensor) -> torch.Tensor:
    """Each image i mirrored left-right if ``mirror[i]``, rotated by ``angle[i]`` radians about its centre and
    shifted by ``shift_x[i]`` of its width and ``shift_y[i]`` of its height (bilinear, border fill)."""
    if inputs.dim() != 4:
        raise HessgapError(f"expected a batch of images N × C × H × W, got shape {tuple(inputs.shape)}")
    n, _, height, width = inputs.shape
    as64 = lambda t: torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(n)  # noqa: E731
    angle, shift_x, shift_y = as64(angle), as64(shift_x), as64(shift_y)
    sign = torch.where(torch.as_tensor(mirror).reshape(-1).expand(n), -1.0, 1.0).to(torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    aspect = width / height  # rotate in pixel space, not in the stretched [-1, 1] square
    # affine_grid maps each output point (in [-1, 1] coordinates) to the input point it samples:
    # input = A (output − t), so content is rotated/mirrored about the centre, then moved by t exactly
    # (a shift by a fraction s of the image is t = 2s in these coordinates)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * sign
    theta[:, 0, 1] = -sin / aspect
    theta[:, 1, 0] = sin * aspect * sign
    theta[:, 1, 1] = cos
    shift = torch.stack([2 * shift_x, 2 * shift_y], dim=1)
    theta[:, :, 2] = -torch.einsum("nij,nj->ni", theta[:, :, :2], shift)
    theta = theta.to(device=inputs.device, dtype=inputs.dtype)
    grid = F.affine_grid(theta, list(inputs.shape), align_corners=False)
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --- adversarial training ----------------------------------------------------------------------------

def fgsm(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, epsilon: float,
         loss_fn: LossFn | None = None) -> torch.Tensor:
    """x + ε·sign(∇_x loss): the fast gradient sign perturbation of a batch.

    The gradient is taken in eval mode (BatchNorm running statistics, no dropout) so that building the
    attack does not move the running statistics; the model's mode is restored afterwards.
    """
    if not epsilon > 0:
        raise HessgapError(f"fgsm_epsilon must be > 0 (in units of the standardized inputs), got {epsilon}")
    loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
    was_training = model.training
    model.eval()
    try:
        x = inputs.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(model(x), targets), x)
    finally:
        model.train(was_training)
    return (inputs + epsilon * grad.sign()).detach()


# --- conservative training ---------------------------------------------------------------------------

def proximal_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
                  loss_fn: LossFn, lam: float, steps: int) -> torch.Tensor:
    """``steps`` optimizer steps on mean_B f(x) + λ/2‖x − x_k‖², x_k the parameters on entry.

    The proximal term's gradient λ(x − x_k) is added to the gradients directly (no autograd graph).
    Returns the batch loss at x_k (the first step's data term).
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    anchor = [p.detach().clone() for p in params]
    first = None
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        with torch.no_grad():
            for p, a in zip(params, anchor):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p - a, alpha=lam)
        optimizer.step()
        if first is None:
            first = loss.detach()
    return first


# --- dynamic sampling --------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchSchedule:
    """Batch size of epoch e (1-based): min(final, round(start · growth^(e−1)))."""

    start: int
    final: int
    growth: float

    def __post_init__(self):
        if not (is_int(self.start) and is_int(self.final)) or self.start < 1 or self.final < self.start:
            raise HessgapError(
                f"batch_schedule needs integers 1 ≤ start ≤ final, got start={self.start!r}, final={self.final!r}"
            )
        if not (isinstance(self.growth, numbers.Real) and math.isfinite(self.growth) and self.growth >= 1.0):
            raise HessgapError(f"batch_schedule growth must be a finite factor ≥ 1 per epoch, got {self.growth}")

    @classmethod
    def from_value(cls, value: Sequence | BatchSchedule) -> BatchSchedule:
        if isinstance(value, BatchSchedule):
            return value
        try:
            start, final, growth = value
        except (TypeError, ValueError):
            raise HessgapError(
                f"batch_schedule must be (start size, final size, growth per epoch), got {value!r}"
            ) from None
        growth = float(growth) if isinstance(growth, numbers.Real) and not isinstance(growth, bool) else growth
        return cls(_whole(start), _whole(final), growth)

    def batch_size(self, epoch: int) -> int:
        return min(self.final, int(round(self.start * self.growth ** (max(1, epoch) - 1))))

    def to_list(self) -> list:
        return [self.start, self.final, self.growth]


def _whole(size):
    """A batch size as an int when it is a whole number (16.0 from JSON or the command line); anything else as it
    is, for :class:`BatchSchedule` to refuse (int() would turn 16.5 into 16 and fail raw on NaN)."""
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        return int(size)
    if isinstance(size, float) and size.is_integer():
        return int(size)
    return size


# --- the per-batch step ------------------------------------------------------------------------------

def make_training_step(
    remedy: str | None,
    loss_fn: LossFn | None = None,
    *,
    flip_ok: bool = False,
    image: bool = True,
    prox_lambda: float = 1e-3,
    prox_steps: int = 3,
    fgsm_epsilon: float = 0.1,
    generator: torch.Generator | None = None,
) -> Step:
    """``step(model, optimizer, inputs, targets) -> batch loss`` (detached) for a remedy (None = plain)."""
    loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
    if remedy not in (None,) + REMEDIES:
        raise HessgapError(f"unknown remedy {remedy!r}; choose None or one of {', '.join(REMEDIES)}")

    def plain(model, optimizer, inputs, targets):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        return loss.detach()

    if remedy in (None, "dynamic"):  # dynamic sampling changes the loader, not the step
        return plain
    if remedy == "augment":
        if not image:
            raise HessgapError(
                "remedy 'augment' needs image data (flips, rotations and translations); this data set is a flat "
                "signal. Choose another remedy or an image data set (digits, mnist, cifar10, cifar100)"
            )

        def augmented(model, optimizer, inputs, targets):
            return plain(model, optimizer, augment_batch(inputs, generator, flip=flip_ok), targets)

        return augmented
    if remedy == "conservative":
        if not prox_lambda >= 0 or not isinstance(prox_steps, int) or prox_steps < 1:
            raise HessgapError(f"conservative training needs prox_lambda ≥ 0 and prox_steps ≥ 1, got {prox_lambda}, {prox_steps}")
        return lambda model, optimizer, inputs, targets: proximal_step(
            model, optimizer, inputs, targets, loss_fn, prox_lambda, prox_steps)

    def adversarial(model, optimizer, inputs, targets):
        perturbed = fgsm(model, inputs, targets, fgsm_epsilon, loss_fn)
        # one forward over clean + perturbed: the mean loss is ½ f(x) + ½ f(x_adv)
        return plain(model, optimizer, torch.cat([inputs, perturbed]), torch.cat([targets, targets]))

    return adversarial
