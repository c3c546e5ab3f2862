"""Worst-case sharpness: Keskar et al.'s Metric 2.1 (full space and random subspace), adaptive sharpness
(ℓ∞ and ℓ2) and m-sharpness, all through :func:`hessgap.sharpness`.

- ``keskar``: φ_{x,f}(ε) = (max_{|y_i| ≤ ε(|x_i|+1)} f(x + y) − f(x)) / (1 + f(x)) × 100 (Keskar et al. 2017,
  Metric 2.1, ε = 1e-3); ``keskar_subspace``: the same over y = A z with a random n × 100 matrix A.
- ``adaptive_linf`` / ``adaptive_l2``: max_{‖δ ⊙ |x|⁻¹‖_p ≤ ρ} f(x + δ) − f(x) (Andriushchenko et al. 2023,
  Eq. 2 with c = |x|; Kwon et al. 2021), ρ = 2e-3 (ℓ∞) and 0.1 (ℓ2).
- ``m_sharpness``: the mean over disjoint batches S_j of m samples of the adaptive ℓ∞ worst-case rise of
  each batch's own loss, (1/J) Σ_j max_{‖δ/|x|‖∞ ≤ ρ} f_{S_j}(x + δ) − f_{S_j}(x) (Foret et al. 2021 §4.1;
  Andriushchenko & Flammarion 2022; Andriushchenko et al. 2023 §3 average the adaptive measure over
  batches of m = 128 from 1024 training points, the defaults here: 8 batches of 128).
  The batches are drawn from a seeded permutation of the samples; the model stays in eval mode (BatchNorm
  on its running statistics), so m changes the data a maximum sees, not BatchNorm's statistics.

Every maximum is a lower bound found by the solver (``"auto"``: the paper's L-BFGS-B path and projected sign
ascent, the larger kept). The solvers are not scale-equivariant (their steps have one size for all
coordinates), so even the adaptive measures can move under a rescaling of the weights; the invariance
check reports what the numbers do.
"""

from __future__ import annotations

import torch

from .. import _checks
from ..curvature.batches import structure
from ..sharp.metric import adaptive_sharpness, sharpness
from .average_case import mean_and_stderr
from .context import Context, NotApplicable, Outcome

DEFAULT_EPSILON = 1e-3
DEFAULT_SUBSPACE_DIM = 100
DEFAULT_RHO = {"linf": 2e-3, "l2": 0.1}
DEFAULT_M = 128  # Andriushchenko et al. 2023: m = 128 from 1024 training points
DEFAULT_M_BATCHES = 8


def _outcome(result) -> Outcome:
    return Outcome(result.value, None, details={
        "loss": result.loss, "max_loss": result.max_loss, "solver": result.solver, "best_solver": result.best_solver,
        "evaluations": result.evaluations})


def keskar(ctx: Context, epsilon: float = DEFAULT_EPSILON, solver: str = "auto", max_iter: int = 10) -> Outcome:
    """Metric 2.1 in the full space, in percent."""
    return _outcome(sharpness(ctx.model, ctx.batches, epsilon=epsilon, loss_fn=ctx.loss_fn, solver=solver,
                              max_iter=max_iter, seed=ctx.seed))


def keskar_subspace(ctx: Context, epsilon: float = DEFAULT_EPSILON, subspace_dim: int = DEFAULT_SUBSPACE_DIM,
                    solver: str = "auto", max_iter: int = 10) -> Outcome:
    """Metric 2.1 in a random ``subspace_dim``-dimensional subspace (A seeded from the call's seed), in percent."""
    n = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
    if subspace_dim >= n:
        raise NotApplicable(f"the model has {n} parameters, not more than the subspace's {subspace_dim} dimensions; "
                            "set a smaller subspace_dim (options={'keskar_subspace': {'subspace_dim': ...}})")
    return _outcome(sharpness(ctx.model, ctx.batches, epsilon=epsilon, subspace_dim=subspace_dim,
                              loss_fn=ctx.loss_fn, solver=solver, max_iter=max_iter, seed=ctx.seed))


def adaptive_linf(ctx: Context, rho: float = DEFAULT_RHO["linf"], solver: str = "auto", max_iter: int = 10) -> Outcome:
    return _outcome(adaptive_sharpness(ctx.model, ctx.batches, rho=rho, norm="linf", loss_fn=ctx.loss_fn,
                                       solver=solver, max_iter=max_iter, seed=ctx.seed))


def adaptive_l2(ctx: Context, rho: float = DEFAULT_RHO["l2"], solver: str = "auto", max_iter: int = 10) -> Outcome:
    return _outcome(adaptive_sharpness(ctx.model, ctx.batches, rho=rho, norm="l2", loss_fn=ctx.loss_fn,
                                       solver=solver, max_iter=max_iter, seed=ctx.seed))


def split_samples(batches: list, m: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` disjoint batches of ``m`` samples drawn from a seeded permutation of every sample in
    ``batches`` ((inputs, targets) pairs only); fewer when the data hold fewer than ``count · m`` samples."""
    inputs, targets = [], []
    for index, raw in enumerate(batches):
        batch = structure(index, raw, closure=False)
        if not batch.is_pair:
            raise NotApplicable("it re-batches the samples, which needs (inputs, targets) pair batches")
        inputs.append(batch.inputs)
        targets.append(batch.targets)
    x, y = torch.cat(inputs), torch.cat(targets)
    if x.shape[0] < m:
        raise NotApplicable(f"the data hold {x.shape[0]} samples, fewer than m = {m}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    chunks = min(count, x.shape[0] // m)
    return [(x[order[j * m:(j + 1) * m]], y[order[j * m:(j + 1) * m]]) for j in range(chunks)]


def m_sharpness(ctx: Context, m: int = DEFAULT_M, batches: int = DEFAULT_M_BATCHES, rho: float = DEFAULT_RHO["linf"],
                norm: str = "linf", solver: str = "auto", max_iter: int = 10) -> Outcome:
    """The mean of the adaptive worst-case rise over ``batches`` disjoint batches of ``m`` samples, with the
    standard error of that mean over the batches."""
    _checks.positive_int(m, "m", "samples per batch")
    _checks.positive_int(batches, "batches", "the number of batches of m samples")
    values = []
    for pair in split_samples(ctx.batches, m, batches, ctx.seed):
        result = adaptive_sharpness(ctx.model, pair, rho=rho, norm=norm, loss_fn=ctx.loss_fn, solver=solver,
                                    max_iter=max_iter, seed=ctx.seed)
        values.append(result.value)
    value, stderr = mean_and_stderr(values)
    return Outcome(value, stderr, details={"per_batch": values, "batches": len(values)})
