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
  On several ranks the samples are numbered across the ranks in rank order (rank 0's first, each rank's in
  its loader's order) and the same permutation of all of them forms the batches, each rank holding its part
  of every batch; each batch's maximum is one distributed sharpness call over those parts. With the data
  split in rank order (rank 0 the first shard) the batches, and so the value, are those of one process on all
  the data; any other split gives the same measure over another random partition.

Half-precision models are refused (each measure is then n/a): a move of 1e-3 of a weight rounds back in
bfloat16, as :func:`hessgap.sharpness` says.

Every maximum is a lower bound found by the solver (``"auto"``: the paper's L-BFGS-B path and projected sign
ascent, the larger kept). The solvers are not scale-equivariant (their steps have one size for all
coordinates), so even the adaptive measures can move under a rescaling of the weights; the invariance
check reports what the numbers do.
"""

from __future__ import annotations

import torch

from .. import _checks
from ..curvature.batches import structure
from ..distributed import Ranks
from ..sharp.metric import adaptive_sharpness, sharpness
from .average_case import mean_and_stderr
from .context import Context, NotApplicable, Outcome

DEFAULT_EPSILON = 1e-3
DEFAULT_SUBSPACE_DIM = 100
DEFAULT_RHO = {"linf": 2e-3, "l2": 0.1}
DEFAULT_M = 128  # Andriushchenko et al. 2023: m = 128 from 1024 training points
DEFAULT_M_BATCHES = 8


#: Why the worst-case measures refuse float16 and bfloat16 models.
HALF_PRECISION = ("its worst case moves the weights by about 1e-3 of their size, which rounds back to the same "
                  "weights in half precision (hessgap.sharpness refuses such models)")


def _outcome(result) -> Outcome:
    return Outcome(result.value, None, details={
        "loss": result.loss, "max_loss": result.max_loss, "solver": result.solver, "best_solver": result.best_solver,
        "evaluations": result.evaluations})


def keskar(ctx: Context, epsilon: float = DEFAULT_EPSILON, solver: str = "auto", max_iter: int = 10) -> Outcome:
    """Metric 2.1 in the full space, in percent."""
    ctx.refuse_half_precision(HALF_PRECISION)
    return _outcome(sharpness(ctx.model, ctx.batches, epsilon=epsilon, loss_fn=ctx.loss_fn, solver=solver,
                              max_iter=max_iter, seed=ctx.seed))


def keskar_subspace(ctx: Context, epsilon: float = DEFAULT_EPSILON, subspace_dim: int = DEFAULT_SUBSPACE_DIM,
                    solver: str = "auto", max_iter: int = 10) -> Outcome:
    """Metric 2.1 in a random ``subspace_dim``-dimensional subspace (A seeded from the call's seed), in percent."""
    ctx.refuse_half_precision(HALF_PRECISION)
    n = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
    if subspace_dim >= n:
        raise NotApplicable(f"the model has {n} parameters, not more than the subspace's {subspace_dim} dimensions; "
                            "set a smaller subspace_dim (options={'keskar_subspace': {'subspace_dim': ...}})")
    return _outcome(sharpness(ctx.model, ctx.batches, epsilon=epsilon, subspace_dim=subspace_dim,
                              loss_fn=ctx.loss_fn, solver=solver, max_iter=max_iter, seed=ctx.seed))


def adaptive_linf(ctx: Context, rho: float = DEFAULT_RHO["linf"], solver: str = "auto", max_iter: int = 10) -> Outcome:
    ctx.refuse_half_precision(HALF_PRECISION)
    return _outcome(adaptive_sharpness(ctx.model, ctx.batches, rho=rho, norm="linf", loss_fn=ctx.loss_fn,
                                       solver=solver, max_iter=max_iter, seed=ctx.seed))


def adaptive_l2(ctx: Context, rho: float = DEFAULT_RHO["l2"], solver: str = "auto", max_iter: int = 10) -> Outcome:
    ctx.refuse_half_precision(HALF_PRECISION)
    return _outcome(adaptive_sharpness(ctx.model, ctx.batches, rho=rho, norm="l2", loss_fn=ctx.loss_fn,
                                       solver=solver, max_iter=max_iter, seed=ctx.seed))


def pair_samples(batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of ``batches`` ((inputs, targets) pairs only): their inputs and targets concatenated in
    loader order."""
    inputs, targets = [], []
    for index, raw in enumerate(batches):
        batch = structure(index, raw, closure=False)
        if not batch.is_pair:
            raise NotApplicable("it re-batches the samples, which needs (inputs, targets) pair batches")
        inputs.append(batch.inputs)
        targets.append(batch.targets)
    return torch.cat(inputs), torch.cat(targets)


def split_samples(samples: tuple[torch.Tensor, torch.Tensor], m: int, count: int, seed: int,
                  ranks: Ranks | None = None) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """``count`` disjoint batches of ``m`` of the ``samples`` (inputs, targets), drawn from a seeded
    permutation; fewer when there are fewer than ``count · m`` samples.

    On several ranks (``ranks``, each passing its own samples) the permutation runs over all ranks' samples,
    numbered in rank order, and each rank gets its part of every batch: None where it holds none of that
    batch's samples. Raises :class:`NotApplicable` on every rank alike (it decides on the totals)."""
    ranks = Ranks() if ranks is None else ranks
    x, y = samples
    counts = ranks.sum_numbers([x.shape[0] if r == ranks.rank else 0 for r in range(ranks.world_size)])
    total, offset = int(sum(counts)), int(sum(counts[:ranks.rank]))
    if total < m:
        raise NotApplicable(f"the data hold {total} samples, fewer than m = {m}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    parts = []
    for j in range(min(count, total // m)):
        mine = order[j * m:(j + 1) * m] - offset
        mine = mine[(mine >= 0) & (mine < x.shape[0])].to(x.device)
        parts.append((x[mine], y[mine]) if len(mine) else None)
    return parts


def m_sharpness(ctx: Context, m: int = DEFAULT_M, batches: int = DEFAULT_M_BATCHES, rho: float = DEFAULT_RHO["linf"],
                norm: str = "linf", solver: str = "auto", max_iter: int = 10) -> Outcome:
    """The mean of the adaptive worst-case rise over ``batches`` disjoint batches of ``m`` samples, with the
    standard error of that mean over the batches."""
    _checks.positive_int(m, "m", "samples per batch")
    _checks.positive_int(batches, "batches", "the number of batches of m samples")
    ctx.refuse_half_precision(HALF_PRECISION)
    x, y = ctx.agreed(lambda: pair_samples(ctx.batches))
    values = []
    for pair in split_samples((x, y), m, batches, ctx.seed, ctx.ranks):
        weight_fn = None
        if pair is None:
            # every rank joins each batch's sums; one without a part of this batch adds a sample of weight 0
            pair, weight_fn = (x[:1], y[:1]), _no_weight
        result = adaptive_sharpness(ctx.model, pair, rho=rho, norm=norm, loss_fn=ctx.loss_fn, solver=solver,
                                    max_iter=max_iter, seed=ctx.seed, weight_fn=weight_fn)
        values.append(result.value)
    value, stderr = mean_and_stderr(values)
    return Outcome(value, stderr, details={"per_batch": values, "batches": len(values)})


def _no_weight(batch) -> float:
    return 0.0
