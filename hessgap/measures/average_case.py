"""Average-case (Gaussian) sharpness, plain and adaptive (Andriushchenko et al. 2023, "A modern look at the
relationship between sharpness and generalization", §3; Keskar et al. 2017 §2.1 mention it as the expected
counterpart of Metric 2.1):

    S_avg(ρ)      = E_{δ ~ N(0, ρ² I)}        f(x + δ) − f(x)        (plain)
    S_avg^ada(ρ)  = E_{δ ~ N(0, ρ² diag(x²))} f(x + δ) − f(x)        (adaptive: δ_i = ρ |x_i| z_i)

f is the mean training loss over the data, x every trainable parameter (weights, biases, BatchNorm's affine
parameters), the model in eval mode. The expectation is a Monte Carlo mean over a fixed number of draws z
(seeded: a rescaled copy of the model is perturbed by the very same z), reported with its standard error.

Half-precision models (float16, bfloat16) are measured on a float32 copy of the model, the very same weights:
the rises near a minimum (1e-6 to 1e-3, at losses of 1e-5 to 1e-2) are below the rounding of the loss by a
half-precision forward pass. Evaluated in the model's dtype they came out as 0 or 0.3 to 3.1 times the
float32 value (bfloat16; float16 0.5 to 2 times); with the loss alone computed in float32, still up to 26 %
off in bfloat16 and 10 % in float16 for smaller noises (ρ = 0.01). The copy holds the parameters in float32
while the measure runs (twice the half-precision model's parameter memory); the result's notes say so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from .. import _checks
from .._state import preserved
from ..curvature.objective import accumulation_dtype
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
        """Draw ``index``: float32 for a half-precision model (the same numbers as for its float32 copy)."""
        generator = self.ctx.generator(self.salt * SALT_STRIDE + index)
        return [torch.randn(p.shape, generator=generator, device=p.device, dtype=accumulation_dtype(p.dtype))
                for p in self.ctx.model.parameters() if p.requires_grad]


SALT_STRIDE = 100_003


def noise(ctx: Context, salt: int, samples: int) -> Draws:
    return Draws(ctx, salt, samples)


def perturbations(ctx: Context, draws: Draws, scale: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[int]:
    """Move the model to x + scale(x) ⊙ z for each draw z in turn (yielding its index), in eval mode; the
    model comes back exactly as it was, also on error. ``scale(x)`` is the per-coordinate standard deviation.
    The sum is formed in the draws' dtype (float32 for a half-precision model) and rounded once."""
    with preserved(ctx.model, train_mode=False) as centre:
        names = list(centre)
        params = dict(ctx.model.named_parameters())
        centre = {name: x.to(accumulation_dtype(x.dtype)) for name, x in centre.items()}
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
    notes = []
    if ctx.half_precision:
        notes.append(f"measured on a float32 copy of the {str(ctx.dtype).replace('torch.', '')} model (the same "
                     "weights): a half-precision forward pass rounds the loss by more than these rises")
        ctx = ctx.in_float32()
    objective = ctx.objective()
    with preserved(ctx.model, train_mode=False, parameters=False):
        loss0 = objective.value()
    draws = noise(ctx, salt=2 if adaptive else 1, samples=samples)
    scale = (lambda x: rho * x.abs()) if adaptive else (lambda x: torch.full_like(x, rho))
    rises = []
    for _ in perturbations(ctx, draws, scale):
        rises.append(objective.value() - loss0)
    value, stderr = mean_and_stderr(rises)
    return Outcome(value, stderr, details={"loss": loss0, "samples": samples}, notes=notes)


def plain(ctx: Context, rho: float = DEFAULT_RHO["plain"], samples: int = DEFAULT_SAMPLES) -> Outcome:
    return gaussian(ctx, rho, samples, adaptive=False)


def adaptive(ctx: Context, rho: float = DEFAULT_RHO["adaptive"], samples: int = DEFAULT_SAMPLES) -> Outcome:
    return gaussian(ctx, rho, samples, adaptive=True)
