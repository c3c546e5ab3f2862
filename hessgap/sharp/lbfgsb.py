"""L-BFGS-B on torch tensors: minimize f(x) over a box l ≤ x ≤ u, taking the same iterates as scipy's.

:func:`minimize_box` is the algorithm of ``scipy.optimize.minimize(method="L-BFGS-B")`` (Byrd, Lu,
Nocedal & Zhu 1995, with Morales & Nocedal's 2011 subspace step) rewritten for tensors on the caller's
device: every O(n) operation stays there in the variables' dtype; only 2m × 2m matrices go to the CPU
in float64. Each iteration

1. finds the generalized Cauchy point along the projected gradient path (:mod:`._cauchy`),
2. minimizes the quasi-Newton model over the variables still free there (:mod:`._subspace`),
3. searches along the way there with the Moré–Thuente line search (:mod:`._more_thuente`), the steps
   kept inside the box, and
4. adds the step and gradient change to the limited-memory matrix (:mod:`._compact_bfgs`), unless its
   curvature sᵀy ≤ ε·(−gᵀs) is too small.

The stopping rules and counts are scipy's: ``gtol`` on the projected gradient's ∞-norm, ``ftol`` on the
relative reduction (f_k − f_{k+1}) / max(|f_k|, |f_{k+1}|, 1), ``max_iter`` counting accepted steps and
``max_fun`` evaluations (checked after each iteration). A line search that fails resets the memory and
tries again from the same point, and ends the run when the memory was already empty. With ``gtol=0`` and
``ftol=0`` the run takes ``max_iter`` iterations unless no step can lower f at all (an exactly zero
projected gradient, a step without decrease, or a failed search from an empty memory).

Only finite boxes are accepted (every variable bounded on both sides), which is what a box around a
minimizer is; scipy's first step of 1/‖d‖ for unbounded variables therefore never arises.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import _checks
from .._results import JsonResult
from ..errors import HessgapError, NonFiniteError
from ._cauchy import distance_to_box, generalized_cauchy_point
from ._compact_bfgs import CompactLbfgs
from ._more_thuente import EVALUATE, MoreThuente
from ._subspace import subspace_minimum

FTOL_DEFAULT = 1e7 * 2.220446049250313e-16  # scipy's ftol, factr = 1e7 times float64's ε
_EPS = 2.220446049250313e-16
_NO_STEP_LIMIT = 1e10  # scipy's largest line-search step when no bound is in the way

CONVERGED_GRADIENT = "CONVERGENCE: NORM OF PROJECTED GRADIENT <= PGTOL"
CONVERGED_REDUCTION = "CONVERGENCE: RELATIVE REDUCTION OF F <= FACTR*EPSMCH"
STOPPED_ITERATIONS = "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT"
STOPPED_EVALUATIONS = "STOP: TOTAL NO. OF F,G EVALUATIONS EXCEEDS LIMIT"
STOPPED_CALLBACK = "STOP: CALLBACK REQUESTED HALT"
ABNORMAL = "ABNORMAL: THE LINE SEARCH FOUND NO ACCEPTABLE STEP"

FunAndGrad = Callable[[torch.Tensor], "tuple[float, torch.Tensor]"]


@dataclass(frozen=True)
class LbfgsbIterate:
    """What a callback sees after each iteration: the iterate, its value and the evaluations so far."""

    nit: int
    x: torch.Tensor
    fun: float
    nfev: int


@dataclass(repr=False)
class LbfgsbResult(JsonResult):
    """The last iterate ``x`` with f(x) and ∇f(x), the counts, why the run ended, f at every iterate
    (``history[0]`` is f(x0)), and the lowest f of all evaluated points (line-search trials included,
    every one inside the box) with its point."""

    x: torch.Tensor
    fun: float
    grad: torch.Tensor
    nit: int
    nfev: int
    message: str
    success: bool
    history: list[float] = field(default_factory=list)
    best_x: torch.Tensor | None = None
    best_fun: float = math.inf

    _left_out = ("x", "grad", "best_x")


def minimize_box(
    fun_and_grad: FunAndGrad,
    x0: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    *,
    max_iter: int = 10,
    memory: int = 10,
    gtol: float = 1e-5,
    ftol: float = FTOL_DEFAULT,
    max_fun: int = 15000,
    max_line_search: int = 20,
    callback: Callable[[LbfgsbIterate], bool | None] | None = None,
) -> LbfgsbResult:
    """Minimize ``fun_and_grad`` over lower ≤ x ≤ upper by L-BFGS-B from ``x0`` (projected into the box).

    ``fun_and_grad(x)`` returns f(x) (a number) and ∇f(x) (a tensor shaped like x); it must not modify x.
    x0, lower and upper are flat tensors of one shape on one device; the iterates keep x0's dtype and
    device. ``memory`` is scipy's ``maxcor``; ``max_line_search`` its ``maxls``. ``callback`` is called
    after each iteration with an :class:`LbfgsbIterate` and stops the run by returning True.

    Raises :class:`~hessgap.errors.HessgapError` for mismatched or infeasible input and
    :class:`~hessgap.errors.NonFiniteError` for a non-finite start, bound, value or gradient.
    """
    x0, lower, upper = _checked_box(x0, lower, upper)
    _checks.positive_int(max_iter, "max_iter")
    _checks.positive_int(memory, "memory", "scipy's maxcor; 10 is its default")
    _checks.nonnegative_number(gtol, "gtol", "0 turns the projected-gradient test off")
    _checks.nonnegative_number(ftol, "ftol", "0 turns the relative-reduction test off")
    _checks.positive_int(max_fun, "max_fun")
    _checks.positive_int(max_line_search, "max_line_search", "scipy's maxls; 20 is its default")

    objective = _CountingObjective(fun_and_grad, x0)
    fixed = lower == upper  # variables with no room at all never move
    x = torch.clamp(x0, lower, upper)
    f, g = objective(x)
    history = [f]

    def result(message: str) -> LbfgsbResult:
        return LbfgsbResult(
            x=x,
            fun=f,
            grad=g,
            nit=len(history) - 1,
            nfev=objective.count,
            message=message,
            success=message.startswith("CONVERGENCE"),
            history=history,
            best_x=objective.best_x,
            best_fun=objective.best_fun,
        )

    if _projected_gradient_norm(x, g, lower, upper) <= gtol:
        return result(CONVERGED_GRADIENT)
    bfgs = CompactLbfgs(x.numel(), memory, x.dtype, x.device)
    while True:
        cauchy = generalized_cauchy_point(x, g, lower, upper, fixed, bfgs)
        target = cauchy.x
        if bfgs.size and bool(cauchy.free.any()):
            target = subspace_minimum(x, g, lower, upper, cauchy, bfgs)
            if target is None:
                bfgs.reset()
                continue
        step = _search_box(
            objective, x, f, g, target, lower, upper, first=len(history) == 1, max_evaluations=max_line_search
        )
        if step is None:
            if bfgs.size == 0:
                return result(ABNORMAL)
            bfgs.reset()  # a stale memory can give a poor direction: start afresh from the same point
            continue

        f_before, g_before = f, g
        x, f, g = step.x, step.fun, step.grad
        history.append(f)
        nit = len(history) - 1
        halt = bool(callback(LbfgsbIterate(nit, x, f, objective.count))) if callback is not None else False
        if nit >= max_iter:
            return result(STOPPED_ITERATIONS)
        if objective.count > max_fun:
            return result(STOPPED_EVALUATIONS)
        if halt:
            return result(STOPPED_CALLBACK)
        if _projected_gradient_norm(x, g, lower, upper) <= gtol:
            return result(CONVERGED_GRADIENT)
        if f_before - f <= ftol * max(abs(f_before), abs(f), 1.0):
            return result(CONVERGED_REDUCTION)

        # the new pair s = stp·d, y = Δg, with sᵀy from the slopes along d (scipy's route)
        ys = (step.slope - step.slope0) * step.step
        if ys <= _EPS * (-step.slope0 * step.step):
            continue  # too little curvature: BFGS would lose positive definiteness
        s = step.direction if step.step == 1.0 else step.step * step.direction
        y = g - g_before
        if not bfgs.push(s, y, ys=ys, yy=float(torch.dot(y, y)), ss=step.step**2 * step.direction_norm2):
            bfgs.reset()


# ---------------------------------------------------------------------------------------- the line search


@dataclass
class _Step:
    x: torch.Tensor
    fun: float
    grad: torch.Tensor
    step: float
    slope: float  # φ'(step) = ∇f(x)ᵀd
    slope0: float  # φ'(0)
    direction: torch.Tensor
    direction_norm2: float


def _search_box(objective, x, f, g, target, lower, upper, *, first: bool, max_evaluations: int) -> _Step | None:
    """Moré–Thuente along d = target − x from step 1 (scipy's ``lnsrlb`` for a finite box), trial points
    clipped into the box. The first iteration caps the step at 1, later ones at the distance to the
    box along d. None when d does not descend or ``max_evaluations`` trials found no step."""
    d = target - x
    slope0 = float(torch.dot(g, d))
    if not slope0 < 0:
        return None
    step_max = 1.0 if first else _box_step_limit(x, d, lower, upper)
    search = MoreThuente(f, slope0, 1.0, step_max)
    evaluations = 0
    while True:
        if evaluations == max_evaluations:
            return None
        stp = search.step
        trial = target if stp == 1.0 else torch.clamp(x + stp * d, lower, upper)
        value, grad = objective(trial)
        evaluations += 1
        slope = float(torch.dot(grad, d))
        if search.update(value, slope) != EVALUATE:
            return _Step(trial, value, grad, stp, slope, slope0, d, float(torch.dot(d, d)))


def _box_step_limit(x, d, lower, upper) -> float:
    """The largest step along d that stays in the box (0 when d points out of a bound x is on)."""
    limits = distance_to_box(x - lower, upper - x, d, (d != 0).to(d.dtype))
    return min(_NO_STEP_LIMIT, float(limits.min()))


def _projected_gradient_norm(x, g, lower, upper) -> float:
    """‖P(x − g) − x‖∞ as scipy computes it: g with the parts that push out of the box at a bound removed,
    i.e. max(x − u, g) where g < 0 and min(x − l, g) where g ≥ 0, which is g clamped to [x − u, x − l]."""
    return float(torch.clamp(g, x - upper, x - lower).abs().max())


# ------------------------------------------------------------------------------------------ input checks


class _CountingObjective:
    """f and ∇f with checks, counts, and the lowest value seen. Asking again for the point evaluated last
    returns the stored answer without a new evaluation, as scipy's ``ScalarFunction`` does (so both count
    the same evaluations)."""

    def __init__(self, fun_and_grad: FunAndGrad, like: torch.Tensor):
        self._fun_and_grad = fun_and_grad
        self._like = like
        self.count = 0
        self.best_x: torch.Tensor | None = None
        self.best_fun = math.inf
        self._last: tuple[torch.Tensor, float, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        if self._last is not None and torch.equal(x, self._last[0]):
            return self._last[1], self._last[2]
        value, grad = self._fun_and_grad(x)
        self.count += 1
        value = _finite_value(value)
        grad = _checked_gradient(grad, self._like)
        self._last = (x, value, grad)
        if value < self.best_fun:
            self.best_fun, self.best_x = value, x
        return value, grad


def _finite_value(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise HessgapError(
            f"fun_and_grad must return (value, gradient) with a real number as value, got {type(value).__name__}"
        ) from None
    if not math.isfinite(number):
        raise NonFiniteError(
            f"fun_and_grad returned a non-finite value ({number}) at a point inside the box; check the model "
            "and the data for overflow, or shrink the box"
        )
    return number


def _checked_gradient(grad, like: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(grad):
        raise HessgapError(f"fun_and_grad must return the gradient as a tensor, got {type(grad).__name__}")
    if grad.shape != like.shape:
        raise HessgapError(
            f"fun_and_grad returned a gradient of shape {tuple(grad.shape)} for x of shape {tuple(like.shape)}; "
            "return ∇f flattened like x"
        )
    grad = grad.to(like.device, like.dtype)
    if not bool(torch.isfinite(grad).all()):
        raise NonFiniteError(
            "fun_and_grad returned a gradient with NaN or infinite entries; check the model and the data for "
            "overflow, or shrink the box"
        )
    return grad


def _checked_box(x0, lower, upper) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 and the bounds as 1-D tensors of x0's dtype on x0's device, with a finite, non-empty box."""
    for name, value in (("x0", x0), ("lower", lower), ("upper", upper)):
        if not torch.is_tensor(value):
            raise HessgapError(f"{name} must be a torch tensor, got {type(value).__name__}")
    if not x0.is_floating_point():
        raise HessgapError(f"x0 must be a floating-point tensor, got dtype {x0.dtype}; convert it with x0.double()")
    if x0.dim() != 1 or x0.numel() == 0:
        raise HessgapError(f"x0 must be a non-empty 1-D tensor, got shape {tuple(x0.shape)}; flatten it first")
    for name, bound in (("lower", lower), ("upper", upper)):
        if bound.shape != x0.shape:
            raise HessgapError(
                f"{name} has shape {tuple(bound.shape)} but x0 has shape {tuple(x0.shape)}; give one bound per variable"
            )
        if bound.device != x0.device:
            raise HessgapError(f"{name} is on {bound.device} but x0 is on {x0.device}; move them to one device")
    lower, upper = lower.to(x0.dtype), upper.to(x0.dtype)
    for name, value in (("x0", x0), ("lower", lower), ("upper", upper)):
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0])
            raise NonFiniteError(
                f"{name} has {int(bad.sum())} non-finite entries (the first at index {first}: {value[first].item()}); "
                "the box must be finite on both sides, so give every variable finite bounds"
            )
    crossed = lower > upper
    if bool(crossed.any()):
        first = int(torch.nonzero(crossed)[0])
        raise HessgapError(
            f"lower > upper for {int(crossed.sum())} variables (the first at index {first}: "
            f"{lower[first].item()} > {upper[first].item()}); swap or fix the bounds"
        )
    return x0, lower, upper
