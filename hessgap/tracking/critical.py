"""Critical sharpness (Kalra et al. 2026, arXiv:2601.16979): λc = 2/ηc, where ηc is the smallest learning rate at
which the optimizer's next step raises the loss.

With the update written θ_next = θ − η·Δθ (η the learning rate, Δθ the optimizer's step per unit of it: the
gradient for SGD, the bias-corrected m̂/(√v̂ + ε) plus decoupled weight decay for AdamW), ηc is the smallest η
with L(θ − η·Δθ) > L(θ), found by a line search that needs forward passes only: a bracket grown by factors
from a first guess (the previous measurement's ηc along training), then bisection (in log scale) until the
bracket is within ``tol``.

On a quadratic L = ½θᵀAθ − bᵀθ with gradient g, L(θ − ηΔθ) − L(θ) = −η·gᵀΔθ + ½η²·ΔθᵀAΔθ, so

    λc = ΔθᵀAΔθ / gᵀΔθ,

which for gradient descent (Δθ = g) is the Rayleigh quotient gᵀAg / gᵀg: at most λmax, and equal to it
exactly when the gradient lies in the top eigenspace. So on a quadratic λc = λmax holds for gradient descent
whose gradient is an eigenvector of λmax, and λc < λmax for any other gradient. Along training (Kalra et
al.), the gradient turns towards the top eigenvectors once the run reaches the edge of stability, where λc
follows λmax and η·λc/2 ≈ 1; before that λc can be far below λmax (benchmarks/RESULTS.md shows both). With
momentum or an adaptive optimizer Δθ is not the gradient (heavy ball: β·b + g; Adam: P⁻¹·m̂) and
ΔθᵀAΔθ / gᵀΔθ is bounded by no eigenvalue of A: λc is then the curvature the optimizer's real step meets,
not a bound on λmax.

*Relative* critical sharpness λc^{1→2} takes Δθ from one loss (``data``) and searches along it on another
(``line_data``): the curvature of the second landscape along the steps that optimize the first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import _checks
from .._results import JsonResult
from .._state import preserved
from ..curvature.objective import LossOverData
from ..errors import HessgapError, NonFiniteError
from .update import learning_rate, next_update

#: Bracket growth per probe of a cold search; a warm one starts with a smaller factor (see ``expand``).
COLD_EXPAND = 2.0
#: Probes after which a bracket that keeps rising or falling is given up (a factor 2 each: 2^±40).
MAX_PROBES = 40


@dataclass(repr=False)
class CriticalResult(JsonResult):
    """The outcome of :func:`critical_sharpness`.

    ``value`` is λc = 2/``critical_lr``; ``step_fraction`` = ``lr``/``critical_lr`` = η·λc/2, how far the real
    step is towards the critical one (≥ 1: the step raises the loss: the edge of stability). Both are None when
    no finite ηc exists: the update is not a descent direction of the loss (``slope`` ≤ 0), or the loss does not
    rise however long the step (``note`` says which). ``slope`` is gᵀΔθ (> 0 for a descent direction; None for
    a relative measurement, whose line's gradient is not computed). ``forward_passes`` counts the line search's
    passes over the data, ``gradients`` the gradient passes (one, for Δθ).
    """

    value: float | None
    critical_lr: float | None
    step_fraction: float | None
    lr: float
    loss: float
    slope: float | None
    forward_passes: int
    gradients: int
    bracket: tuple[float, float] | None
    relative: bool
    seconds: float
    note: str = ""


def critical_sharpness(
    model: nn.Module,
    data,
    optimizer=None,
    *,
    direction=None,
    lr: float | None = None,
    line_data=None,
    initial: float | None = None,
    expand: float = COLD_EXPAND,
    tol: float = 0.02,
    loss_fn=None,
    compute_loss=None,
    weight_fn=None,
    max_batches: int | None = None,
    params=None,
    train_mode: bool = False,
    group=None,
) -> CriticalResult:
    """λc = 2/ηc of ``model`` over ``data`` along the next update of ``optimizer`` (see the module docstring).

    Args:
        model, data: the network and the data whose mean loss L is measured (the options ``loss_fn``,
            ``compute_loss``, ``weight_fn``, ``max_batches``, ``params``, ``train_mode`` and ``group`` as in
            :class:`hessgap.HessianOperator`). The model, the optimizer and its state are left exactly as
            they were.
        optimizer: the training's optimizer; Δθ is its next step for the gradient of L over ``data``, per
            unit of the first parameter group's learning rate (other groups scale with it).
        direction: instead of an optimizer, Δθ itself (one tensor per selected parameter, or a flat (n,)
            tensor): the step is θ − η·Δθ.
        lr: with ``direction``, the learning rate η of the real step (default 1); with an optimizer, its own.
        line_data: search along Δθ on the loss over this data instead (relative critical sharpness).
        initial: the first η tried (default: ``lr``); along training, the previous ηc.
        expand: the bracket's first growth factor (> 1); it squares after every probe that does not bracket.
        tol: stop when the bracket's upper end is within a factor 1 + tol of its lower end.
    """
    started = time.perf_counter()
    tol = _checks.positive_number(tol, "tol", "the relative width at which the bisection stops")
    expand = _checks.positive_number(expand, "expand", "the bracket's growth factor")
    if expand <= 1.0:
        raise HessgapError(f"expand must be > 1 (the factor the bracket grows by), got {expand}")
    if (optimizer is None) == (direction is None):
        raise HessgapError("pass the optimizer (its next update is searched along) or direction=, exactly one of them")
    options = dict(loss_fn=loss_fn, compute_loss=compute_loss, weight_fn=weight_fn, max_batches=max_batches,
                   params=params, group=group)
    objective = LossOverData(model, data, **options)
    objective.refuse_sharded("critical sharpness")
    objective.check_finite_parameters()
    line = LossOverData(model, line_data, **options) if line_data is not None else objective
    if optimizer is not None and lr is not None:
        raise HessgapError("lr= goes with direction=; with an optimizer the learning rate is the optimizer's own")
    lr = learning_rate(optimizer) if optimizer is not None else (1.0 if lr is None else lr)
    lr = _checks.nonnegative_number(lr, "lr", "the learning rate of the real step")
    if initial is None:
        initial = lr if lr > 0 else 1.0  # a learning rate decayed to 0 still has a critical one
    initial = _checks.positive_number(initial, "initial", "the first learning rate tried")

    with preserved(model, train_mode=train_mode) as snapshot:
        x = [snapshot[name] for name in objective.names]
        loss, grads = objective.value_and_grad()
        if optimizer is not None:
            delta = [-u for u in next_update(optimizer, objective.params, grads, unit_lr=True)]
        else:
            delta = _given_direction(direction, objective)
        base = line.value() if line is not objective else loss
        passes = 1 if line is not objective else 0
        slope = None if line is not objective else float(sum((g.double() * d.double()).sum() for g, d in zip(grads, delta)))
        search = _LineSearch(objective.params, x, delta, line, base)
        note = ""
        if slope is not None and not slope > 0:
            note = (f"the update is not a descent direction of the loss over this data (gᵀΔθ = {slope:.3g} ≤ 0): "
                    "the loss rises for every learning rate, so there is no critical one")
            bracket = None
        else:
            bracket, note = search.bracket(initial, expand)
            if bracket is not None:
                bracket = search.bisect(*bracket, tol)
        passes += search.passes
    critical = math.sqrt(bracket[0] * bracket[1]) if bracket is not None else None
    return CriticalResult(
        value=2.0 / critical if critical else None, critical_lr=critical,
        step_fraction=lr / critical if critical else None, lr=lr, loss=base, slope=slope, forward_passes=passes,
        gradients=1, bracket=bracket, relative=line is not objective, seconds=time.perf_counter() - started,
        note=note,
    )


def _given_direction(direction, objective: LossOverData) -> list[torch.Tensor]:
    """``direction`` as one tensor per selected parameter, checked."""
    params = objective.params
    if isinstance(direction, torch.Tensor):
        n = objective.num_parameters
        if direction.dim() != 1 or direction.numel() != n:
            raise HessgapError(f"direction has shape {tuple(direction.shape)}; pass ({n},) or one tensor per parameter")
        pieces = list(direction.split([p.numel() for p in params]))
    elif isinstance(direction, (list, tuple)) and len(direction) == len(params):
        pieces = list(direction)
    else:
        raise HessgapError(f"direction must be a flat tensor or a list of {len(params)} tensors (one per parameter)")
    out = []
    for name, p, d in zip(objective.names, params, pieces):
        if not isinstance(d, torch.Tensor) or d.numel() != p.numel():
            raise HessgapError(f"direction's part for {name} must be a tensor of {p.numel()} numbers ({tuple(p.shape)})")
        d = d.detach().to(device=p.device, dtype=p.dtype).reshape(p.shape)
        if not bool(torch.isfinite(d).all()):
            raise HessgapError(f"direction's part for {name} holds NaN or inf")
        out.append(d)
    return out


class _LineSearch:
    """L(x − η·Δθ) > L(x)? for the η it is asked about; counts its passes over the data."""

    def __init__(self, params, x, delta, objective: LossOverData, base: float):
        self.params, self.x, self.delta, self.objective, self.base = params, x, delta, objective, base
        self.passes = 0

    def rises(self, eta: float) -> bool:
        with torch.no_grad():
            for p, x, d in zip(self.params, self.x, self.delta):
                p.data.copy_(x - eta * d)  # through .data, as preserved() writes back: no version bump
        self.passes += 1
        try:
            return self.objective.value() > self.base
        except NonFiniteError:  # a step so long that the loss overflows has certainly raised it
            return True

    def bracket(self, eta: float, expand: float) -> tuple[tuple[float, float] | None, str]:
        """(lo, hi) with no rise at lo and a rise at hi, grown from ``eta``; or None and the reason."""
        rising = self.rises(eta)
        for _ in range(MAX_PROBES):
            other = eta / expand if rising else eta * expand
            if self.rises(other) != rising:
                return ((other, eta) if rising else (eta, other)), ""
            eta, expand = other, min(expand * expand, 2.0 ** 8)
        if rising:
            return None, (f"the loss rises along the update even at η = {eta:.3g}: the update is not a descent "
                          "direction of this loss, so there is no critical learning rate")
        return None, (f"the loss does not rise along the update up to η = {eta:.3g}: the line's curvature is not "
                      "positive, so there is no finite critical learning rate")

    def bisect(self, lo: float, hi: float, tol: float) -> tuple[float, float]:
        while hi > lo * (1.0 + tol):
            mid = math.sqrt(lo * hi)
            if self.rises(mid):
                hi = mid
            else:
                lo = mid
        return lo, hi
