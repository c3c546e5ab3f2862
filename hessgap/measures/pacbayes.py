"""PAC-Bayes flatness (Jiang et al. 2020, "Fantastic generalization measures and where to find them",
Appendix C.3, measures 53 "pacbayes.flatness" and 61 "pacbayes.mag.flatness"; the σ search of their §C and
Algorithm 1).

- ``pacbayes_flatness`` = 1/σ², σ the largest standard deviation of isotropic Gaussian noise u ~ N(0, σ² I)
  on the weights whose *expected* training accuracy falls by the target deviation d = 0.1:
  |E_u acc(x + u) − acc(x)| ≈ d.
- ``pacbayes_mag_flatness`` = 1/σ′², with magnitude-aware noise u_i ~ N(0, σ′² x_i² + ε²), ε = 1e-3 (their
  Eq. for the magnitude-aware bounds: the variance is σ′²|w_i|² + ε²).

The reported measure is the flatness term 1/σ² itself, not the bound forms (pacbayes.init/orig): within
one architecture and data set the bounds add terms that do not depend on the curvature.

The search is Jiang et al.'s bisection on [0, 2]: at most 15 halvings, stopping when the deviation is within
1e-2 of the target, the expectation a mean over ``samples`` Monte Carlo draws. Unlike their code the draws
z are fixed for the whole search (u = σ·z), so the deviation is a deterministic function of σ and a rescaled
copy of the model sees the same z. Their networks were stripped of BatchNorm (folded into the weights)
before the search; hessgap perturbs every trainable parameter of the model as it is, BatchNorm's affine
parameters included, in eval mode. ``deviation="loss"`` searches on the training loss's rise instead of the
accuracy's fall (for models without class predictions).
"""

from __future__ import annotations

import math

import torch

from .. import _checks
from .._state import preserved
from .average_case import noise, perturbations
from .context import Context, NotApplicable, Outcome, accuracy

TARGET = 0.1  # Jiang et al.'s accuracy deviation
TOLERANCE = 1e-2
SEARCH_DEPTH = 15
UPPER = 2.0
MAGNITUDE_EPS = 1e-3
DEFAULT_SAMPLES = 10  # Jiang et al.'s Monte Carlo samples
DEVIATIONS = ("accuracy", "loss")


def search_sigma(measure_at, target: float = TARGET, tolerance: float = TOLERANCE, depth: int = SEARCH_DEPTH,
                 upper: float = UPPER) -> tuple[float, list[tuple[float, float]]]:
    """Jiang et al.'s bisection: σ in [0, upper] such that ``measure_at(σ)`` (the deviation) is within
    ``tolerance`` of ``target``; returns σ and the (σ, deviation) pairs tried."""
    lower, high = 0.0, upper
    sigma, trail = upper / 2, []
    for _ in range(depth):
        sigma = (lower + high) / 2
        deviation = measure_at(sigma)
        trail.append((sigma, deviation))
        if abs(deviation - target) < tolerance:
            break
        if deviation > target or not math.isfinite(deviation):
            high = sigma  # too much noise (a loss that is no longer finite deviates without bound)
        else:
            lower = sigma
    return sigma, trail


def _flatness(ctx: Context, magnitude_aware: bool, samples: int, target: float, deviation: str) -> Outcome:
    if deviation not in DEVIATIONS:
        raise NotApplicable(f"unknown deviation {deviation!r}; choose one of {', '.join(DEVIATIONS)}")
    _checks.positive_int(samples, "samples", "the Monte Carlo draws per σ")
    _checks.positive_number(target, "target", "the deviation searched for (Jiang et al.: 0.1)")
    objective = ctx.objective()
    statistic = (lambda: accuracy(ctx, objective)) if deviation == "accuracy" else objective.value
    with preserved(ctx.model, train_mode=False, parameters=False):
        base = statistic()
    draws = noise(ctx, salt=4 if magnitude_aware else 3, samples=samples)

    def deviation_at(sigma: float) -> float:
        if magnitude_aware:
            def scale(x):
                return torch.sqrt(sigma**2 * x * x + MAGNITUDE_EPS**2)
        else:
            def scale(x):
                return torch.full_like(x, sigma)
        values = [statistic() for _ in perturbations(ctx, draws, scale)]
        return abs(sum(values) / len(values) - base)

    sigma, trail = search_sigma(deviation_at, target=target)
    notes = []
    final = trail[-1][1]
    if abs(final - target) >= TOLERANCE:
        notes.append(f"the search ended {len(trail)} halvings deep with deviation {final:.3g} (target {target:g} ± "
                     f"{TOLERANCE:g})" + ("; even σ near 2 does not reach it" if sigma > 1.9 else ""))
    return Outcome(1.0 / sigma**2, None, notes=notes, details={
        "sigma": sigma, "deviation": final, "base": base, "statistic": deviation, "halvings": len(trail),
        "trail": [[s, d] for s, d in trail]})


def flatness(ctx: Context, samples: int = DEFAULT_SAMPLES, target: float = TARGET,
             deviation: str = "accuracy") -> Outcome:
    """1/σ², isotropic noise (Jiang et al. measure 53)."""
    return _flatness(ctx, False, samples, target, deviation)


def magnitude_flatness(ctx: Context, samples: int = DEFAULT_SAMPLES, target: float = TARGET,
                       deviation: str = "accuracy") -> Outcome:
    """1/σ′², magnitude-aware noise of variance σ′²x_i² + ε² (Jiang et al. measure 61)."""
    return _flatness(ctx, True, samples, target, deviation)
