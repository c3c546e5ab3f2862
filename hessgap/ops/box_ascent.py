"""The fused projected box-ascent step ``torch.ops.hessgap.box_ascent_step`` and its plain-PyTorch twin.

One call performs one step of projected ascent on the perturbation y over every parameter tensor of a
model, in one pass and without flattening copies:

    r      = box radius:  keskar ε(|x| + 1)  |  adaptive ε|x|  |  absolute ε
    s      = sign(g)  (direction="sign")  or  g  (direction="gradient")
    z      = clamp(y + step·s, −r, r)
    y_new  = clamp(y + (1 − μ)(z − y) + μ·m, −r, r)      (μ = momentum; μ = 0 gives y_new = z)
    m      ← y_new − y        (only when μ > 0: the previous step, Auto-PGD's momentum term)
    y      ← y_new
    params ← x + y_new        (the model's weights, written in the same pass)

and returns a float64 tensor of three reductions over all coordinates:
``[Σ (y_new − y)², #{i : |y_new_i| ≥ r_i}, Σ g·(y_new − y)]``: the squared step length, the number of
coordinates on the box's faces, and the first-order predicted increase of f.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _extension
from ..errors import HessgapError

BOX_KINDS = ("keskar", "adaptive", "absolute")
DIRECTIONS = ("sign", "gradient")


def _check_choices(box: str, direction: str) -> None:
    if box not in BOX_KINDS:
        raise HessgapError(f"box must be one of {BOX_KINDS}, got {box!r}")
    if direction not in DIRECTIONS:
        raise HessgapError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def box_radius(x: torch.Tensor, epsilon: float, box: str) -> torch.Tensor:
    """The half-width r of the box around x, element by element."""
    if box == "keskar":
        return epsilon * (x.abs() + 1)
    if box == "adaptive":
        return epsilon * x.abs()
    if box == "absolute":
        return torch.full_like(x, epsilon)
    raise HessgapError(f"box must be one of {BOX_KINDS}, got {box!r}")


@torch.no_grad()
def box_ascent_step_reference(
    x: Sequence[torch.Tensor],
    y: Sequence[torch.Tensor],
    grad: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    step: float,
    epsilon: float,
    box: str = "keskar",
    direction: str = "sign",
    momentum: float = 0.0,
    prev_step: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The same step as :func:`box_ascent_step`, written with unfused PyTorch ops, in float64 sums."""
    _check_choices(box, direction)
    if momentum > 0 and prev_step is None:
        raise HessgapError("momentum > 0 needs prev_step, one buffer per parameter holding the previous step")
    step_sq = torch.zeros((), dtype=torch.float64, device=x[0].device if len(x) else "cpu")
    on_faces = torch.zeros_like(step_sq)
    predicted = torch.zeros_like(step_sq)
    for i, (xi, yi, gi, pi) in enumerate(zip(x, y, grad, params)):
        r = box_radius(xi, epsilon, box)
        s = torch.sign(gi) if direction == "sign" else gi
        z = torch.maximum(torch.minimum(yi + step * s, r), -r)
        if momentum > 0:
            mi = prev_step[i]
            y_new = yi + (1 - momentum) * (z - yi) + momentum * mi
            y_new = torch.maximum(torch.minimum(y_new, r), -r)
        else:
            y_new = z
        delta = y_new - yi
        step_sq += (delta.double() ** 2).sum()
        on_faces += (y_new.abs() >= r).sum().double()
        predicted += (gi.double() * delta.double()).sum()
        if momentum > 0:
            prev_step[i].copy_(delta)
        yi.copy_(y_new)
        pi.copy_(xi + y_new)
    return torch.stack([step_sq, on_faces, predicted])


def box_ascent_step(
    x: Sequence[torch.Tensor],
    y: Sequence[torch.Tensor],
    grad: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    step: float,
    epsilon: float,
    box: str = "keskar",
    direction: str = "sign",
    momentum: float = 0.0,
    prev_step: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One fused projected ascent step; updates ``y``, ``params`` (and ``prev_step``) in place.

    Args:
        x: the box's centre, one tensor per parameter (a copy of the weights, not the parameters).
        y: the perturbation, updated in place.
        grad: the gradient of f at x + y.
        params: the model's parameters; receive x + y_new (written under ``torch.no_grad()``).
        step: the step size η.
        epsilon: the box's size ε (> 0).
        box: ``"keskar"`` ε(|x| + 1), ``"adaptive"`` ε|x| or ``"absolute"`` ε.
        direction: ``"sign"`` (sign of g) or ``"gradient"`` (g itself).
        momentum: μ in [0, 1); μ > 0 needs ``prev_step`` (the previous step, updated in place).

    Returns:
        float64 tensor ``[Σ Δy², #coordinates on the box's faces, Σ g·Δy]`` on the tensors' device.

    All tensors share one device and one dtype (float32 or float64) and have pairwise equal shapes; the
    written tensors (y, params, prev_step) must not share memory with each other or with x and grad.
    The step is bit-identical to :func:`box_ascent_step_reference` (same operations, same rounding; the
    sums differ only by summation order) and does not depend on the number of threads.
    Runs the compiled kernel (CPU or CUDA, by the tensors' device) in one pass over all tensors; tensors
    that do not share a dense layout go through contiguous temporaries (correct, slower). Raises a
    RuntimeError saying how to build the extension when it is missing. See the module docstring for
    the exact update.
    """
    _check_choices(box, direction)
    x, y, grad, params = (list(t) for t in (x, y, grad, params))
    if not x:
        raise HessgapError("box_ascent_step got no tensors; pass one tensor per parameter in x, y, grad and params")
    if momentum > 0 and prev_step is None:
        raise HessgapError("momentum > 0 needs prev_step, one buffer per parameter holding the previous step")
    _extension.require()
    with torch.no_grad():
        return torch.ops.hessgap.box_ascent_step.default(
            x,
            y,
            grad,
            params,
            None if prev_step is None else list(prev_step),
            float(step),
            float(epsilon),
            BOX_KINDS.index(box),
            DIRECTIONS.index(direction),
            float(momentum),
        )


def cpu_kernel_variant() -> str:
    """The instruction set the CPU kernel was picked for on this machine: ``"avx2"`` or ``"baseline"``.

    AVX2 when the CPU has it, unless torch's ``ATEN_CPU_CAPABILITY=default`` asks for the baseline.
    """
    _extension.require()
    return torch.ops.hessgap.box_ascent_cpu_kernel()


def _register_fake() -> None:
    """Shape-only kernel for torch.compile; registered only when the compiled op exists."""

    @torch.library.register_fake("hessgap::box_ascent_step")
    def _box_ascent_step_fake(x, y, grad, params, prev_step, step, epsilon, box, direction, momentum):
        return x[0].new_empty((3,), dtype=torch.float64)


if _extension.available():
    _register_fake()
