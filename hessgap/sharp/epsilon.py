"""The sizes ε a sharpness box can take at given weights in a given dtype, and the error that says which.

Two things bound ε. Below, the box must hold more than x: x + ε(|x| + 1) must not round back to x
(:func:`check_box`; ε ≥ the dtype's resolution moves every weight). Above, the box's corners must be
finite numbers (also :func:`check_box`, from the weights alone), and the loss must stay finite at every
point the solvers reach: a network's outputs grow like a power of its weights, so a box far narrower than
the float range can still overflow the loss. That only shows once a solver steps there;
:func:`too_large` then measures along the solver's step how large ε may be and says so, instead of
blaming the parameters (they are finite: the check at x passed).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import HessgapError, NonFiniteError
from ..ops.box_ascent import box_radius

_RADIUS = {"keskar": "ε(|x| + 1)", "adaptive": "ε|x|"}
# the bisection for the largest usable ε stops once it is known within this factor
_FACTOR = 2.0


def largest_epsilon(centre, box: str, dtype: torch.dtype) -> float:
    """The largest ε whose box around ``centre`` has finite corners in ``dtype``: |x| + r(ε) ≤ the largest
    finite number for every weight (computed in float64)."""
    largest = math.inf
    top = torch.finfo(dtype).max
    for c in centre:
        size = c.detach().abs().double()
        scale = box_radius(size, 1.0, box)  # r(ε) = ε · scale
        moving = scale > 0
        if bool(moving.any()):
            largest = min(largest, float(((top - size[moving]) / scale[moving]).min()))
    return largest


def check_box(centre, epsilon: float, box: str, dtype: torch.dtype, name: str = "epsilon") -> None:
    """The box around ``centre`` (the weights, or a subspace's A⁺x) must be a box in ``dtype``: finite, and
    wider than the rounding of the weights at its centre."""
    radii = [box_radius(c, epsilon, box) for c in centre]
    if not all(bool(torch.isfinite(r).all()) for r in radii) or not all(
            bool(torch.isfinite(c + r).all()) for c, r in zip(centre, radii)):
        raise HessgapError(
            f"{name}={epsilon:g} makes the box overflow {dtype}: the moved weights x ± {_RADIUS[box]} are not "
            f"finite; at these weights they are for ε ≤ {largest_epsilon(centre, box, dtype):.3g}, and the loss "
            "may overflow well below that: Metric 2.1 uses small boxes (the paper: 1e-3 and 5e-4)"
        )
    if not any(bool((c + r != c).any()) for c, r in zip(centre, radii)):
        raise HessgapError(
            f"{name}={epsilon:g} is below what {dtype} resolves at these weights: x + {_RADIUS[box]} rounds to x "
            f"for every weight, so the box holds only x; use ε ≥ {torch.finfo(dtype).eps:g} (the paper: 1e-3 and "
            "5e-4)"
        )


def _finite_after(objective, move) -> Callable[[float], bool]:
    """``finite(t)``: whether the loss and its gradient are finite once ``move(t)`` wrote a point into the
    model's weights (one pass over the data)."""

    def finite(t: float) -> bool:
        with torch.no_grad():
            move(t)
        try:
            objective.value_and_grad()
        except NonFiniteError:
            return False
        return True

    return finite


def _first_failure(finite: Callable[[float], bool], low: float, fails_at_one: bool = False) -> float | None:
    """The smallest t in (e^low, 1], within a factor :data:`_FACTOR`, where ``finite(t)`` is False (bisection
    in log t; finite at e^low), or None when it is finite at t = 1."""
    if not fails_at_one and finite(1.0):
        return None
    high = 0.0
    while high - low > math.log(_FACTOR):
        middle = (low + high) / 2
        if finite(math.exp(middle)):
            low = middle
        else:
            high = middle
    return math.exp(high)


def too_large(space, epsilon: float, box: str, loss: float, grad, dtype: torch.dtype, name: str = "epsilon",
              corner: bool = True) -> NonFiniteError:
    """The error for a loss (or gradient) that is finite at x (``loss``, gradient ``grad`` in the solver's
    variable) but not at the point a solver wrote into the model's weights, a point of the box of ``epsilon``.

    The box of t·ε holds x + t·s for every point x + s of the box of ε, so bisecting t (in log scale, a pass
    of loss and gradient per step) along the failing point, and along the corner sign(∇f) · r that the sign
    ascent starts from (``corner``: a box, not a ball), finds an ε above which every box holds a point where
    the loss is not finite. The usable range it reports is an upper bound: a solver may find another such
    point below it.
    """
    failing = [p.detach() - x for p, x in zip(space.params, space.x)]

    def along_failure(t: float) -> None:
        for p, x, s in zip(space.params, space.x, failing):
            p.copy_(torch.add(x, s, alpha=t))

    radii = [box_radius(c, epsilon, box) for c in space.box_centre]
    towards_corner = [torch.where(g >= 0, r, -r) for g, r in zip(grad, radii)]
    resolution = torch.finfo(dtype).eps
    low = math.log(resolution) - math.log(epsilon)  # log t with t·ε at the dtype's resolution
    where = (f"the loss is finite at x ({loss:.4g}) but not at a point of the box x ± {_RADIUS[box]} that the "
             "solver reached (the network's outputs overflow there)")
    finite_on_failure = _finite_after(space.objective, along_failure)
    if low >= 0 or not finite_on_failure(math.exp(low)):
        tiny = "in so small a box" if low >= 0 else f"at the matching point of the box of ε = {resolution:g}"
        return NonFiniteError(
            f"{name}={epsilon:g}: {where}; it is not finite even {tiny}, so the model is at the edge of overflow "
            "at x: check its weights and inputs"
        )
    scales = [_first_failure(finite_on_failure, low, fails_at_one=True)]
    if corner:
        move = lambda t: space.set_point([t * c for c in towards_corner])  # noqa: E731
        scales.append(_first_failure(_finite_after(space.objective, move), low))
    bound = epsilon * min(t for t in scales if t is not None)
    return NonFiniteError(
        f"{name}={epsilon:g} is too large for this model in {dtype}: {where}; every box with ε ≥ {bound:.2g} holds "
        f"such a point. Usable here, at most: {resolution:g} ≤ ε < {bound:.2g} (Metric 2.1 uses small boxes: "
        "the paper 1e-3 and 5e-4)"
    )


def check_epsilons(model, data, epsilons, *, train_mode: bool = False, max_batches: int | None = None) -> None:
    """Refuse, before any is measured, each ε of Metric 2.1 (full space) whose box overflows the dtype
    (:func:`check_box`) or whose corner x + sign(∇f(x)) · ε(|x| + 1), where the sign ascent starts, has a
    loss or gradient that is not finite (:func:`too_large`, with the usable range): a command taking several ε
    then fails before it keeps the results of the first. One pass of loss and gradient at x and one per ε;
    a solver may still reach a non-finite point inside a box that passes, and is then refused as before."""
    from .._state import preserved
    from ..curvature.objective import LossOverData
    from .spaces import FullSpace

    objective = LossOverData(model, data, max_batches=max_batches)
    with preserved(model, train_mode=train_mode) as snapshot:
        space = FullSpace(objective, [snapshot[name] for name in objective.names])
        for epsilon in epsilons:
            check_box(space.box_centre, epsilon, "keskar", objective.dtype)
        loss, grad = space.evaluate()
        for epsilon in epsilons:
            radii = [box_radius(c, epsilon, "keskar") for c in space.box_centre]
            with torch.no_grad():
                space.set_point([torch.where(g >= 0, r, -r) for g, r in zip(grad, radii)])
            try:
                objective.value_and_grad()
            except NonFiniteError as exc:
                raise too_large(space, epsilon, "keskar", loss, grad, objective.dtype) from exc
