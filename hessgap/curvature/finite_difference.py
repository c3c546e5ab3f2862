"""H·v by central differences of exact gradients, for setups without a double backward and as a cross-check.

    H·v ≈ (∇f(θ + h·v) − ∇f(θ − h·v)) / (2h),    h = ε^(1/3) · (1 + ‖θ‖) / ‖v‖

with ε the unit roundoff of the model's dtype and ‖θ‖ the norm of the parameters the Hessian is taken
over. Each direction costs two gradient passes over the data, first-order autograd only: any model whose
gradient PyTorch computes works, FSDP2-sharded ones included (their gradients through hessgap's
differentiable gathers, :mod:`hessgap.curvature.sharded`, on every rank's shard of θ ± h·v).

Why this h: the central difference's truncation error is (h²/6)·∇³f[v, v, v] (relative to H·v, of order
(h‖v‖)² over the square of the scale on which the curvature changes), its rounding error about
ε·‖∇f‖/h. Balancing the two gives h ∝ ε^(1/3); the factor (1 + ‖θ‖)/‖v‖ moves θ by a step of relative size
ε^(1/3), as for each coordinate of a finite-difference Hessian (h_i = ε^(1/3)·max(1, |θ_i|)). ``step=``
overrides it. The bias this leaves against the exact product is measured in ``benchmarks/ggn_ratio.py
--tables fd`` against the exact float64 product (float32: 2.5e-5 relative on a small MLP, 8.5e-4 on a tiny
GPT-2; bfloat16: the gradients' own rounding dominates, 3e-2 and 0.58; see benchmarks/RESULTS.md): a
cross-check, not a replacement for the exact products.
"""

from __future__ import annotations

import math

import torch

from .._checks import positive_number
from .._state import preserved
from ..errors import NonFiniteError
from ._flat import Directions, check_finite_products, unflatten
from .engine import PassStats
from .second_order import SecondOrderRules
from .sharded import rank_batches, without_forward_hooks

#: How hessgap.hvp and HessianOperator multiply: exact R-operator / autograd products, or central differences.
METHODS = ("exact", "finite-difference")


def default_step(dtype: torch.dtype, theta_norm: float, v_norm: float) -> float:
    """h = ε^(1/3)·(1 + ‖θ‖)/‖v‖ for the model's ``dtype`` (see the module docstring)."""
    return torch.finfo(dtype).eps ** (1 / 3) * (1.0 + theta_norm) / v_norm


class FiniteDifferenceEngine:
    """The HVP engine's interface (``run``, ``path``, ``notes``) over central differences of gradients."""

    path = "finite-difference"
    fallback_reason = None
    capture_seconds = 0.0  # no graph is captured

    def token_chunks(self) -> dict:
        return {}

    def __init__(self, objective, *, step: float | None = None, train_mode: bool = False):
        if step is not None:
            positive_number(step, "step", "the finite-difference step h")
        self.objective = objective
        self.model = objective.model
        self.step = step
        self.train_mode = bool(train_mode)
        self.rules = SecondOrderRules()  # holds the notes, as the exact engine's does
        self.steps: list[float] = []  # the h of each direction of the last run

    @property
    def notes(self) -> list[str]:
        return self.rules.notes

    def run(self, directions: Directions):
        objective = self.objective
        dtype = objective.accumulation_dtype
        flat = torch.empty(directions.k, objective.num_parameters, dtype=dtype, device=objective.device)
        total = unflatten(flat, objective.vector_params)
        # a copy: the gradient passes write θ ± h·v into the parameters themselves
        centre = [p.detach().to(dtype, copy=True) for p in objective.vector_params]
        theta_norm = math.sqrt(self._sum_squares(centre))
        self.steps = []
        stats, losses = PassStats(chunk_size=1), []
        with preserved(self.model, train_mode=self.train_mode, parameters=objective.sharded is None):
            for j in range(directions.k):
                v = [part[j].to(dtype) for part in directions.parts]
                v_norm = math.sqrt(self._sum_squares(v))
                if v_norm == 0:
                    for acc in total:
                        acc[j].zero_()
                    self.steps.append(0.0)
                    continue
                h = self.step if self.step is not None else default_step(objective.dtype, theta_norm, v_norm)
                self.steps.append(h)
                plus, pass_stats = self._gradient([c + h * d for c, d in zip(centre, v)])
                minus, _ = self._gradient([c - h * d for c, d in zip(centre, v)])
                stats, losses = pass_stats, losses + [pass_stats.loss]
                for acc, a, b in zip(total, plus, minus):
                    torch.sub(a, b, out=acc[j]).div_(2 * h)
        if losses:  # the loss reported is the mean of f(θ + h·v) over the directions
            stats.loss_sum = sum(losses) / len(losses) * stats.weight
        stats.written = True
        check_finite_products(flat)
        return total, flat, stats

    def _sum_squares(self, tensors) -> float:
        local = sum(float(t.double().pow(2).sum()) for t in tensors)
        if self.objective.sharded is not None:
            return self.objective.ranks.sum_numbers([local])[0]
        return local

    def _gradient(self, values: list[torch.Tensor]) -> tuple[list[torch.Tensor], PassStats]:
        """∇f at the parameters ``values`` (this rank's shards for a sharded model), accumulated in float32 or
        wider, and what the pass saw (over every rank)."""
        objective = self.objective
        if objective.sharded is not None:
            return self._sharded_gradient(values)
        stats = PassStats(chunk_size=1)
        with torch.no_grad():
            for p, value in zip(objective.params, values):
                p.data.copy_(value.to(p.dtype))
        grads = [torch.zeros_like(p, dtype=objective.accumulation_dtype) for p in objective.params]
        error = None
        try:
            for batch in objective.batches():
                loss = objective.batch_loss(batch)
                for acc, g in zip(grads, torch.autograd.grad(loss, objective.params, allow_unused=True)):
                    if g is not None:
                        acc.add_(g, alpha=batch.weight)
                stats.batches += 1
                stats.samples += batch.samples
                stats.weight += batch.weight
                stats.loss_sum += float(loss.detach()) * batch.weight
        except Exception as exc:  # every rank must reach the collective below, also the one that failed
            error = exc
        return self._summed(grads, stats, error)

    def _summed(self, grads, stats: PassStats, error) -> tuple[list[torch.Tensor], PassStats]:
        """The ranks' sums of a gradient pass, divided by the total weight."""
        ranks = self.objective.ranks
        ranks.settle(error)
        ranks.sum_bucket_(grads)
        numbers = ranks.sum_numbers([stats.batches, stats.samples, stats.weight, stats.loss_sum])
        stats.batches, stats.samples, stats.weight, stats.loss_sum = int(numbers[0]), int(numbers[1]), *numbers[2:]
        if not math.isfinite(stats.loss):
            raise NonFiniteError(f"the loss at θ ± h·v is {stats.loss}; check the model's parameters and the step")
        for g in grads:
            g.div_(stats.weight)
        return grads, stats

    def _sharded_gradient(self, values: list[torch.Tensor]) -> tuple[list[torch.Tensor], PassStats]:
        """The gradient of an FSDP2 model at θ = the ranks' shards ``values``: every rank walks as many batches
        as the rank with the most (each forward gathers the parameters in collectives), first-order only; the
        gathers' backward reduce-scatters, so each rank's gradient shard already sums every rank's data."""
        objective, sharded = self.objective, self.objective.sharded
        grads = [torch.zeros_like(v) for v in values]
        stats = PassStats(chunk_size=1)
        for batch, weight in rank_batches(objective):
            leaves = [v.to(p.dtype).detach().requires_grad_() for v, p in zip(values, objective.vector_params)]
            with torch.enable_grad(), without_forward_hooks(objective.model):
                loss = objective.batch_loss(batch, parameters=sharded.gathered(leaves))
                batch_grads = torch.autograd.grad(loss * weight, leaves, allow_unused=True)
            for acc, g in zip(grads, batch_grads):
                if g is not None:
                    acc.add_(g)
            if weight:
                stats.batches += 1
                stats.samples += batch.samples
                stats.weight += weight
                stats.loss_sum += float(loss.detach()) * weight
        _, stats = self._summed([], stats, None)
        for g in grads:  # already summed over the ranks by the reduce-scatter
            g.div_(stats.weight)
        return grads, stats
