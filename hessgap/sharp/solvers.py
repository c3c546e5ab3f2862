"""Maximizers of f(x + A y) over a box (or a ball): projected sign ascent and L-BFGS-B.

A *space* (:mod:`hessgap.sharp.spaces`) says what the variable y is and how it moves the model; the
solvers and their step rules only talk to it.

Solvers:

- :func:`box_ascent`: Auto-PGD-style projected ascent (Croce & Hein 2020). The first step goes to the
  box corner sign(∇f)·r; later steps y ← Proj(y + α(z − y) + (1 − α)(y − y_prev)) with
  z = Proj(y + η·sign(∇f)), η = 2·mean(r) at first, α = 1 − momentum (momentum 0: plain projected sign
  ascent); at Auto-PGD's checkpoints η is halved and the ascent restarts from the best point when too
  few steps improved f or nothing improved since the last checkpoint. The ℓ∞ step is the fused op
  ``box_ascent_step``: one pass updates y and writes x + y into the model.
- :func:`lbfgsb`: Keskar et al.'s method, L-BFGS-B on −f from y = 0 with the box as bounds for
  ``max_iter`` iterations (tolerances off): hessgap's torch implementation
  (:func:`hessgap.sharp.lbfgsb.minimize_box`, scipy's iterates, on the model's device, no float64
  numpy copies), or scipy's own (``engine="scipy"``, the reference).

Which run is decided in one place, :func:`resolve`. Both solvers are local and end at different local
maxima; neither is always higher (sign ascent reached 2697 where L-BFGS-B from y = 0 barely moved, at
0.0037, on an F1-sized network; L-BFGS-B reached 80.4 where sign ascent stopped at a box vertex at 70.6 in
a 100-dim subspace). So ``"auto"`` runs both, L-BFGS-B's path first, and keeps the larger value: never
less than the paper's method, usually much more.
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
from .lbfgsb import minimize_box
from .spaces import Space

#: What users may ask for: "auto" (see :func:`resolve`), "box-ascent", "lbfgsb" or "lbfgsb-scipy".
SOLVERS = SHARPNESS_SOLVERS


def resolve(solver: str, subspace_dim: int | bool | None, norm: str = "linf") -> tuple[str, ...]:
    """The solvers that run when ``solver`` is asked for, in order: ``"auto"`` runs ``"lbfgsb"`` then
    ``"box-ascent"`` and keeps the larger value (for the ℓ2 ball of adaptive sharpness, which L-BFGS-B
    cannot take, the box ascent alone); any other name runs as asked. ``subspace_dim`` does not change the
    choice: both solvers run in either space."""
    _checks.choice(solver, SOLVERS, "solver")
    if norm == "l2" and solver.startswith("lbfgsb"):
        raise HessgapError("L-BFGS-B handles box bounds only; use solver='box-ascent' for the l2 ball")
    if solver != "auto":
        return (solver,)
    return ("box-ascent",) if norm == "l2" else ("lbfgsb", "box-ascent")


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
    engine: str = "torch",
) -> SolverOutcome:
    """Keskar et al.'s solver: L-BFGS-B on −f from y = 0 for ``max_iter`` iterations.

    The tolerances ``gtol`` and ``ftol`` are 0 so that only ``max_iter`` (or a search that cannot lower −f)
    ends the search; ``options`` overrides them (scipy's names: ``{"gtol": 1e-5, "ftol": 2.2e-9}`` for its
    defaults; ``maxcor`` the memory). ``engine="torch"`` runs :func:`hessgap.sharp.lbfgsb.minimize_box` on the
    model's device; ``engine="scipy"`` runs ``scipy.optimize.minimize`` through float64 numpy copies.

    ``lower``/``upper`` are the box bounds in y's layout. The evaluation at y = 0 reuses ``loss0`` and
    ``grad0``. The returned max is the largest f over every point L-BFGS-B evaluated (all feasible).
    """
    opts = {"maxiter": max_iter, "gtol": 0.0, "ftol": 0.0}
    opts.update(options or {})
    if engine == "scipy":
        return _lbfgsb_scipy(space, lower, upper, loss0, grad0, opts, tick)
    flat_lower, flat_upper = _flat(lower), _flat(upper)
    start = torch.zeros_like(flat_lower)
    first = {"pending": True}

    def negative_f(y: torch.Tensor) -> tuple[float, torch.Tensor]:
        if first["pending"] and not bool(y.any()):  # y = 0 was evaluated already
            first["pending"] = False
            return -loss0, -_flat(grad0)
        first["pending"] = False
        space.set_point(_unflat(y, lower))
        value, grad = space.evaluate()
        return -value, -_flat(grad)

    known = {"maxiter", "gtol", "ftol", "maxcor", "maxfun", "maxls"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise HessgapError(f"unknown L-BFGS-B option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    result = minimize_box(
        negative_f, start, flat_lower, flat_upper, max_iter=opts["maxiter"], memory=opts.get("maxcor", 10),
        gtol=opts["gtol"], ftol=opts["ftol"], max_fun=opts.get("maxfun", 15000),
        max_line_search=opts.get("maxls", 20), callback=_ticking(tick),
    )
    return SolverOutcome(max_loss=max(loss0, space.best), iterations=result.nit, kernel="torch",
                         message=result.message)


def _ticking(tick: Callable[[], None] | None):
    """An iteration callback that only ticks the progress bar: minimize_box stops on a true return value,
    and tqdm's update() returns one whenever it redraws."""
    if tick is None:
        return None

    def on_iterate(_iterate) -> bool:
        tick()
        return False

    return on_iterate


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in like]), like)]


def _lbfgsb_scipy(space, lower, upper, loss0, grad0, opts: dict, tick) -> SolverOutcome:
    """The same method through ``scipy.optimize.minimize(method="L-BFGS-B")`` (float64 numpy copies)."""
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

    result = minimize(negative_f, start, jac=True, method="L-BFGS-B", bounds=bounds, options=opts,
                      callback=(lambda *_: tick()) if tick is not None else None)
    return SolverOutcome(
        max_loss=max(loss0, space.best),
        iterations=int(getattr(result, "nit", 0)),
        kernel="scipy",
        message=str(result.message),
    )
