"""Maximizers of f(x + A y) over a box (or a ball): projected sign ascent and scipy's L-BFGS-B.

A *space* (:mod:`hessgap.sharp.spaces`) says what the variable y is and how it moves the model; the
solvers and their step rules only talk to it.

Solvers:

- :func:`box_ascent`: Auto-PGD-style projected ascent (Croce & Hein 2020). The first step goes to the
  box corner sign(∇f)·r; later steps y ← Proj(y + α(z − y) + (1 − α)(y − y_prev)) with
  z = Proj(y + η·sign(∇f)), η = 2·mean(r) at first, α = 1 − momentum (momentum 0: plain projected sign
  ascent); at Auto-PGD's checkpoints η is halved and the ascent restarts from the best point when too
  few steps improved f or nothing improved since the last checkpoint. The ℓ∞ step is the fused op ``box_ascent_step``: one pass updates y and writes x + y into
  the model.
- :func:`lbfgsb`: ``scipy.optimize.minimize(method="L-BFGS-B")`` on −f from y = 0 with the box as
  bounds and ``maxiter`` iterations (tolerances off), Keskar et al.'s method, through a float64 numpy
  interface.

Which one runs is decided in one place, :func:`resolve`: ``solver="auto"`` (the default of
:func:`hessgap.sharpness`) takes the sign ascent in the full space and L-BFGS-B's path in a random
subspace (its docstring says why); ``"box-ascent"`` and ``"lbfgsb"`` run as asked, in either space.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import _checks, _extension
from ..errors import HessgapError
from ..names import SHARPNESS_SOLVERS
from ..ops import box_ascent as box_ops
from .spaces import Space

#: What users may ask for: "auto" (see :func:`resolve`), "box-ascent" or "lbfgsb".
SOLVERS = SHARPNESS_SOLVERS


def resolve(solver: str, subspace_dim: int | bool | None, norm: str = "linf") -> str:
    """The solver that runs when ``solver`` is asked for: ``"box-ascent"`` or ``"lbfgsb"``.

    ``"box-ascent"`` and ``"lbfgsb"`` run as asked (L-BFGS-B takes box bounds only, so it refuses
    ``norm="l2"``). ``"auto"`` takes the projected sign ascent (box-ascent) in the full space, for either
    norm, and L-BFGS-B's path from y = 0 in a random subspace (``subspace_dim`` not None), for three
    reasons.

    1. Both solvers are local: they end at different local maxima, and in a 100-dim subspace of the
       F1-sized LB model the sign ascent ended on a box vertex whose gradient signs all point outwards
       (a local maximum: 70.6) while L-BFGS-B's path reached 80.4; no step from that vertex (sign,
       projected gradient, L-BFGS-B started there) can leave it, and L-BFGS-B started at the first sign
       step's corner climbed to the same 70.6. The only way to find at least L-BFGS-B's value on every
       model is to follow its path.
    2. Following it costs exactly its passes: a second path (say, the better of a start at 0 and at the
       corner) would double the time.
    3. What makes the sign ascent win in the full space is gone at p = 100: scipy's per-call work is
       O(p) instead of seconds at a million coordinates, and the passes, not the solver, are the time.
    """
    _checks.choice(solver, SOLVERS, "solver")
    if norm == "l2" and solver == "lbfgsb":
        raise HessgapError("L-BFGS-B handles box bounds only; use solver='box-ascent' for the l2 ball")
    if solver != "auto":
        return solver
    return "lbfgsb" if subspace_dim is not None else "box-ascent"


def step_function(device: torch.device) -> tuple[Callable[..., torch.Tensor], str]:
    """The box-ascent step to use on ``device``: the compiled kernel when built for it, else its twin."""
    if _extension.available() and hasattr(torch.ops.hessgap, "box_ascent_step"):
        if device.type == "cpu" or (device.type == "cuda" and _extension.cuda_kernels_built()):
            return box_ops.box_ascent_step, "compiled"
    return box_ops.box_ascent_step_reference, "reference"


# ----------------------------------------------------------------------------------------------- steps


class LinfStep:
    """Projected sign step in the box |y_i| ≤ r_i, by the fused op (which also writes x + y when it can)."""

    def __init__(self, space: Space, epsilon: float, box: str):
        self.space, self.epsilon, self.box = space, epsilon, box
        self.op, self.kernel = step_function(space.box_centre[0].device)
        radii = [box_ops.box_radius(c, epsilon, box) for c in space.box_centre]
        count = sum(r.numel() for r in radii)
        self.max_radius = max(float(r.max()) for r in radii)
        self.mean_radius = sum(float(r.double().sum()) for r in radii) / count

    def initial_step(self) -> float:
        return 2.0 * self.mean_radius  # Auto-PGD's η = 2ε, ε the box's (mean) half-width

    def corner_step(self) -> float:
        return self.max_radius  # from y = 0, any step ≥ max r lands every moving coordinate on a face

    def __call__(self, y, g, step: float, momentum: float, prev) -> float:
        stats = self.op(
            self.space.box_centre,
            y,
            g,
            self.space.op_params,
            step=step,
            epsilon=self.epsilon,
            box=self.box,
            direction="sign",
            momentum=momentum,
            prev_step=prev if momentum > 0 else None,
        )
        if not self.space.fused:
            self.space.set_point(y)
        return float(stats[0])


class L2Step:
    """Normalized gradient step in the ball ‖u‖₂ ≤ ρ, then projection onto the ball (Auto-PGD ℓ2)."""

    kernel = "torch"

    def __init__(self, space: Space, rho: float):
        self.space, self.rho = space, rho

    def initial_step(self) -> float:
        return 2.0 * self.rho

    def corner_step(self) -> float:
        return self.rho  # from u = 0 a step of ρ along g/‖g‖ reaches the sphere: the linear maximizer

    @torch.no_grad()
    def __call__(self, u, g, step: float, momentum: float, prev) -> float:
        # ‖g‖ through g / max|g|, so that tiny gradients do not underflow when squared
        g_max = max(float(gi.abs().max()) for gi in g)
        if g_max == 0.0:
            return 0.0
        g_norm = math.sqrt(sum(float((gi.double() / g_max).pow(2).sum()) for gi in g))
        z = [ui + (step / (g_norm * g_max)) * gi for ui, gi in zip(u, g)]
        self._project(z)
        if momentum > 0:
            new = [ui + (1 - momentum) * (zi - ui) + momentum * mi for ui, zi, mi in zip(u, z, prev)]
            self._project(new)
        else:
            new = z
        step_sq = 0.0
        for i, (ui, ni) in enumerate(zip(u, new)):
            delta = ni - ui
            step_sq += float(delta.double().pow(2).sum())
            if momentum > 0:
                prev[i].copy_(delta)
            ui.copy_(ni)
        self.space.set_point(u)
        return step_sq

    def _project(self, u: list[torch.Tensor]) -> None:
        norm = math.sqrt(sum(float(ui.double().pow(2).sum()) for ui in u))
        if norm > self.rho:
            for ui in u:
                ui.mul_(self.rho / norm)


# ----------------------------------------------------------------------------------------------- solvers


@dataclass
class SolverOutcome:
    """What a solver found: the largest f over every evaluated point, and how it got there."""

    max_loss: float
    iterations: int
    kernel: str
    restarts: int = 0
    message: str = ""
    steps: list[float] = field(default_factory=list)


def apgd_checkpoints(max_iter: int) -> list[int]:
    """Auto-PGD's checkpoints w_j = ⌈p_j·N⌉ with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    points = sorted({min(max_iter, math.ceil(q * max_iter)) for q in p})
    return [w for w in points if w > 0]


def box_ascent(
    space: Space,
    step_rule: LinfStep | L2Step,
    loss0: float,
    grad0: list[torch.Tensor],
    *,
    max_iter: int,
    momentum: float = 0.0,
    stall_fraction: float = 0.75,
    tol: float = 0.0,
    seed: int = 0,
    tick: Callable[[], None] | None = None,
) -> SolverOutcome:
    """Auto-PGD-style ascent from y = 0 for ``max_iter`` steps (each step costs one loss+gradient pass).

    ``loss0``/``grad0`` are f and ∇_y f at y = 0 (already evaluated). Stops early when a step raises f
    by less than ``tol`` times the gain so far, f(y_best) − f(0) (converged; a step that lowers f is an
    overshoot and goes on to the step halving). Returns the best f seen; the model's weights are left at
    some point of the search (the caller restores them).
    """
    y = space.zeros()
    prev = space.zeros() if momentum > 0 else None
    best_y = [t.clone() for t in y]
    best_g = grad0
    best_value, value, g = loss0, loss0, grad0
    step = step_rule.initial_step()
    checkpoints = apgd_checkpoints(max_iter)
    last_checkpoint, improved_since, best_at_checkpoint, halved_last = 0, 0, loss0, False
    restarts, steps = 0, []
    iterations = 0
    for k in range(max_iter):
        if k == 0:
            # the linear model's maximizer in the box: every coordinate to the face sign(g)·r
            moved = step_rule(y, _break_ties(g, seed), step_rule.corner_step(), 0.0, None)
            if prev is not None:
                for m, yi in zip(prev, y):
                    m.copy_(yi)
        else:
            moved = step_rule(y, g, step, momentum, prev)
        if moved == 0.0:
            break  # y did not move: the same gradient would give the same empty step again
        iterations += 1
        steps.append(step)
        previous_value = value
        value, g = space.evaluate()
        if value > previous_value:
            improved_since += 1
        if value > best_value:
            best_value = value
            for b, yi in zip(best_y, y):
                b.copy_(yi)
            best_g = g
        if tick is not None:
            tick()
        if k > 0 and 0.0 <= value - previous_value < tol * (best_value - loss0):
            break
        if k + 1 in checkpoints and k + 1 < max_iter:
            interval = k + 1 - last_checkpoint
            stalled = improved_since < stall_fraction * interval
            no_progress = (not halved_last) and best_value <= best_at_checkpoint
            if stalled or no_progress:
                step /= 2.0
                halved_last = True
                restarts += 1
                # restart from the best point: its weights, its gradient, no momentum
                for yi, b in zip(y, best_y):
                    yi.copy_(b)
                space.set_point(y)
                g = best_g
                value = best_value
                if prev is not None:
                    for m in prev:
                        m.zero_()
            else:
                halved_last = False
            last_checkpoint, improved_since, best_at_checkpoint = k + 1, 0, best_value
    return SolverOutcome(
        max_loss=max(best_value, space.best),
        iterations=iterations,
        kernel=step_rule.kernel,
        restarts=restarts,
        steps=steps,
    )


def _break_ties(g: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """g with its exact zeros replaced, in place, by tiny values of random sign, so that the first (sign)
    step moves every coordinate to a face: at a stationary point (∇f = 0) sign ascent could not move."""
    generator = None
    for gi in g:
        zeros = gi == 0
        count = int(zeros.sum())
        if count:
            if generator is None:
                generator = torch.Generator(device=gi.device).manual_seed(seed)
            signs = torch.randint(0, 2, (count,), generator=generator, device=gi.device).to(gi.dtype)
            gi[zeros] = (2 * signs - 1) * torch.finfo(gi.dtype).tiny
    return g


def lbfgsb(
    space: Space,
    lower: list[torch.Tensor],
    upper: list[torch.Tensor],
    loss0: float,
    grad0: list[torch.Tensor],
    *,
    max_iter: int = 10,
    options: dict | None = None,
    tick: Callable[[], None] | None = None,
) -> SolverOutcome:
    """Keskar et al.'s solver: scipy's L-BFGS-B on −f from y = 0 for ``max_iter`` iterations.

    The tolerances ``gtol`` and ``ftol`` are 0 so that only ``maxiter`` (or a failed line search) ends
    the search; pass ``options={"gtol": 1e-5, "ftol": 2.2e-9}`` for scipy's defaults.

    ``lower``/``upper`` are the box bounds in y's layout. The evaluation at y = 0 reuses ``loss0`` and
    ``grad0``. The returned max is the largest f over every point L-BFGS-B evaluated (all feasible).
    """
    from scipy.optimize import Bounds, minimize

    # a Bounds object, not (low, high) pairs: scipy converts pairs one by one in Python (seconds per call
    # at a million parameters, more than the passes over the data)
    bounds = Bounds(space.to_numpy(lower), space.to_numpy(upper))
    start = np.zeros(bounds.lb.shape[0])
    first = {"pending": True}

    def negative_f(flat: np.ndarray) -> tuple[float, np.ndarray]:
        if first["pending"] and not flat.any():
            first["pending"] = False
            return -loss0, -space.to_numpy(grad0)
        first["pending"] = False
        space.set_point(space.from_numpy(flat))
        value, grad = space.evaluate()
        return -value, -space.to_numpy(grad)

    # exactly max_iter iterations, as the paper: scipy's default stopping tests are absolute (pgtol 1e-5)
    # and end the search at y = 0 whenever the training loss, hence its gradient, is small
    opts = {"maxiter": max_iter, "gtol": 0.0, "ftol": 0.0}
    opts.update(options or {})
    result = minimize(
        negative_f,
        start,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options=opts,
        callback=(lambda *_: tick()) if tick is not None else None,
    )
    return SolverOutcome(
        max_loss=max(loss0, space.best),
        iterations=int(result.nit),
        kernel="scipy",
        message=str(result.message),
    )
