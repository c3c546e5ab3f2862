"""Average-case (Gaussian) sharpness, plain and adaptive (Andriushchenko et al. 2023, "A modern look at the
relationship between sharpness and generalization", §3; Keskar et al. 2017 §2.1 mention it as the expected
counterpart of Metric 2.1):

    S_avg(ρ)      = E_{δ ~ N(0, ρ² I)}        f(x + δ) − f(x)        (plain)
    S_avg^ada(ρ)  = E_{δ ~ N(0, ρ² diag(x²))} f(x + δ) − f(x)        (adaptive: δ_i = ρ |x_i| z_i)

f is the mean training loss over the data, x every trainable parameter (weights, biases, BatchNorm's affine
parameters), the model in eval mode. The expectation is a Monte Carlo mean over a fixed number of draws z
(seeded: a rescaled copy of the model is perturbed by the very same z), reported with its standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from .. import _checks
from .._state import preserved
from .context import Context, Outcome

#: The default ρ: plain (absolute, in units of the weights) and adaptive (relative to |x_i|).
DEFAULT_RHO = {"plain": 5e-3, "adaptive": 5e-2}
DEFAULT_SAMPLES = 16


class Draws:
    """``samples`` draws z ~ N(0, I) over the trainable parameters, made on demand: draw i comes from its own
    generator (the call's seed, ``salt`` and i), one tensor per parameter in ``named_parameters()`` order, so
    only one draw is in memory at a time and the same draw can be made again (every σ of a search, a rescaled
    copy of the model)."""

    def __init__(self, ctx: Context, salt: int, samples: int):
        self.ctx, self.salt, self.samples = ctx, salt, samples

    def __len__(self) -> int:
        return self.samples

    def draw(self, index: int) -> list[torch.Tensor]:
        generator = self.ctx.generator(self.salt * SALT_STRIDE + index)
        return [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
                for p in self.ctx.model.parameters() if p.requires_grad]


SALT_STRIDE = 100_003


def noise(ctx: Context, salt: int, samples: int) -> Draws:
    return Draws(ctx, salt, samples)


def perturbations(ctx: Context, draws: Draws, scale: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[int]:
    """Move the model to x + scale(x) ⊙ z for each draw z in turn (yielding its index), in eval mode; the
    model comes back exactly as it was, also on error. ``scale(x)`` is the per-coordinate standard deviation."""
    with preserved(ctx.model, train_mode=False) as centre:
        names = list(centre)
        params = dict(ctx.model.named_parameters())
        sigmas = [scale(centre[name]) for name in names]
        for index in range(len(draws)):
            z = draws.draw(index)
            with torch.no_grad():
                for name, s, zi in zip(names, sigmas, z):
                    params[name].copy_(torch.addcmul(centre[name], s, zi))
            del z
            yield index


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def gaussian(ctx: Context, rho: float, samples: int, adaptive: bool) -> Outcome:
    """E_δ f(x + δ) − f(x) with δ ~ N(0, ρ²) (plain) or N(0, ρ² x²) (adaptive), as a mean over ``samples``
    seeded draws, with its standard error."""
    rho = _checks.positive_number(rho, "rho", "the noise's standard deviation")
    samples = _checks.positive_int(samples, "samples", "the Monte Carlo draws")
    objective = ctx.objective()
    with preserved(ctx.model, train_mode=False, parameters=False):
        loss0 = objective.value()
    draws = noise(ctx, salt=2 if adaptive else 1, samples=samples)
    scale = (lambda x: rho * x.abs()) if adaptive else (lambda x: torch.full_like(x, rho))
    rises = []
    for _ in perturbations(ctx, draws, scale):
        rises.append(objective.value() - loss0)
    value, stderr = mean_and_stderr(rises)
    return Outcome(value, stderr, details={"loss": loss0, "samples": samples})


def plain(ctx: Context, rho: float = DEFAULT_RHO["plain"], samples: int = DEFAULT_SAMPLES) -> Outcome:
    return gaussian(ctx, rho, samples, adaptive=False)


def adaptive(ctx: Context, rho: float = DEFAULT_RHO["adaptive"], samples: int = DEFAULT_SAMPLES) -> Outcome:
    return gaussian(ctx, rho, samples, adaptive=True)
