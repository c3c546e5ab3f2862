"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ), all probes at once.

For a unit probe v, m Lanczos steps give a tridiagonal T whose eigenvalues θ_j (nodes) and squared
first eigenvector components w_j (weights) form the Gauss quadrature of the measure vᵀδ(H − t)v:
Σ_j w_j θ_j^p = vᵀH^p v exactly for p ≤ 2m − 1. Averaging over random probes and broadening each
node by a Gaussian gives the density. The independent Lanczos runs of all probes advance together,
so each step is one batched ``matmat`` of every probe.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch

from .._checks import positive_int
from ..curvature.operator import CheckedOperator, resolve_operator
from ..curvature.probes import rademacher
from ..errors import HessgapError
from ._results import DensityResult

#: How far from 1 the density's integral over the grid may be before the call warns.
INTEGRAL_TOLERANCE = 0.02
# Reorthogonalize a second time when one pass shrank the vector below this fraction of its norm.
_DGKS = 1 / math.sqrt(2)


def density(
    model,
    data=None,
    *,
    num_probes: int = 2,
    lanczos_steps: int = 80,
    grid=1000,
    sigma: float | None = None,
    reorthogonalize: bool = True,
    seed: int = 0,
    progress: bool = False,
    save_png: str | None = None,
    **operator_options,
) -> DensityResult:
    """Spectral density of the Hessian from ``num_probes`` normalized Rademacher probes.

    ``model`` is a model, or an operator / square symmetric tensor: a model comes with its ``data`` (and
    ``operator_options``, the keywords of :class:`~hessgap.curvature.operator.HessianOperator`: ``loss_fn``,
    ``compute_loss``, ``weight_fn``, ``max_batches``, ``params``, ``train_mode``, ``group``, ...); an
    operator is any object with ``n``, ``dtype``, ``device`` and ``matmat``. Half-precision models
    multiply in their dtype; the probes and sums are float32. For an FSDP2-sharded model the probes are
    sharded like the parameters (each rank draws its own shards) and every inner product is summed over the ranks.
    ``lanczos_steps`` (at most n) Lanczos steps are run per probe, all probes in one ``matmat`` per
    step; a probe whose Krylov space becomes invariant stops early. With ``reorthogonalize`` (default)
    each probe's Lanczos vectors are kept and every new one is made orthogonal to them (memory:
    num_probes · lanczos_steps · n numbers); without it only three vectors per probe are kept, and
    lost orthogonality shows up as repeated copies of converged nodes (their total weight stays right).
    A model's batches are held in memory for the repeated passes.

    ``grid`` is a number of points spanning the nodes plus 5·sigma on each side, or the points
    themselves (increasing). ``sigma`` is the Gaussian broadening (default: 1/200 of the span of the
    nodes). ``save_png`` writes the plot there (also :meth:`DensityResult.plot`).
    """
    started = time.perf_counter()
    positive_int(num_probes, "num_probes", "the number of random probe vectors")
    positive_int(lanczos_steps, "lanczos_steps")
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (sigma > 0 and math.isfinite(sigma))):
        raise HessgapError(f"sigma is the Gaussian broadening and must be a positive number, got {sigma!r}")
    explicit_grid = _explicit_grid(grid)
    operator = CheckedOperator(resolve_operator(model, data, caller="density", **operator_options))
    steps = min(lanczos_steps, operator.total_n)
    operator.ranks.agree("the arguments of hessgap.density", (num_probes, steps, bool(reorthogonalize), seed))
    alphas, betas, lengths = _batched_lanczos(operator, num_probes, steps, bool(reorthogonalize), seed, progress)

    from scipy.integrate import trapezoid
    from scipy.linalg import eigh_tridiagonal

    nodes, weights = [], []
    for probe in range(num_probes):
        length = int(lengths[probe])
        theta, vectors = eigh_tridiagonal(alphas[probe, :length], betas[probe, : length - 1])
        nodes.append(theta)
        weights.append(vectors[0] ** 2)

    all_nodes = np.concatenate(nodes)
    low, high = float(all_nodes.min()), float(all_nodes.max())
    if sigma is None:
        spread = high - low
        sigma = spread / 200 if spread > 0 else (abs(high) / 200 if high != 0 else 1.0)
    if explicit_grid is None:
        points = np.linspace(low - 5 * sigma, high + 5 * sigma, grid)
    else:
        points = explicit_grid
    values = _broadened(points, nodes, weights, float(sigma))
    integral = float(trapezoid(values, points))
    if abs(integral - 1.0) > INTEGRAL_TOLERANCE:
        spacing = float(np.diff(points).max())
        warnings.warn(
            f"the spectral density integrates to {integral:.3g} over this grid, not 1: "
            + ("its points are too far apart for the broadening (spacing "
               f"{spacing:.3g} against sigma {sigma:.3g}); use more grid points or a larger sigma"
               if spacing > sigma else
               "the grid does not cover the eigenvalues found; widen it or leave grid as a number of points"),
            RuntimeWarning,
            stacklevel=2,
        )

    result = DensityResult(
        grid=points.tolist(),
        density=values.tolist(),
        nodes=[theta.tolist() for theta in nodes],
        weights=[w.tolist() for w in weights],
        sigma=float(sigma),
        integral=integral,
        num_probes=num_probes,
        lanczos_steps=steps,
        reorthogonalize=bool(reorthogonalize),
        hvps=operator.hvps,
        seconds=time.perf_counter() - started,
        **operator.describe(),
    )
    if save_png is not None:
        result.plot(save_png)
    return result


def _explicit_grid(grid):
    """None for a number of points (checked), else the grid points as a float64 array (checked)."""
    if isinstance(grid, bool):
        raise HessgapError(f"grid must be a number of points or the points themselves, got {grid!r}")
    if isinstance(grid, int):
        if grid < 2:
            raise HessgapError(f"grid needs at least 2 points, got {grid}")
        return None
    try:
        points = np.asarray(grid.detach().cpu() if isinstance(grid, torch.Tensor) else grid, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise HessgapError(f"grid must be a number of points or a 1-D sequence of points, got {type(grid).__name__}") from error
    if points.ndim != 1 or points.size < 2:
        raise HessgapError(f"grid must be 1-D with at least 2 points, got shape {points.shape}")
    if not np.isfinite(points).all() or not (np.diff(points) > 0).all():
        raise HessgapError("grid points must be finite and strictly increasing")
    return points


def _broadened(points: np.ndarray, nodes, weights, sigma: float) -> np.ndarray:
    """(1/probes) Σ_probes Σ_j w_j · N(t; θ_j, σ²) at every grid point t."""
    theta = np.concatenate(nodes)
    mass = np.concatenate(weights) / len(nodes)
    values = np.zeros_like(points)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for start in range(0, points.size, 4096):  # bounded (chunk × nodes) temporaries
        chunk = points[start : start + 4096]
        values[start : start + chunk.size] = (
            np.exp(-0.5 * ((chunk[:, None] - theta[None, :]) / sigma) ** 2) @ mass
        ) * norm
    return values


def _summed(operator: CheckedOperator, partial: torch.Tensor) -> torch.Tensor:
    """Inner products over a sharded operator's shards added up across the ranks (as they are otherwise)."""
    return operator.ranks.sum_(partial) if operator.sharded else partial


def _batched_lanczos(operator: CheckedOperator, probes: int, steps: int, reorthogonalize: bool, seed: int, progress: bool):
    """Independent Lanczos runs from normalized Rademacher probes, advanced together.

    Returns the tridiagonal coefficients (alphas[p, j], betas[p, j] couples steps j and j + 1) and
    each probe's number of steps (fewer than ``steps`` when its Krylov space became invariant).
    """
    n, dtype, device = operator.n, operator.dtype, operator.device
    eps = torch.finfo(dtype).eps
    # an FSDP2-sharded operator's vectors are this rank's shards: each rank draws its own, and every inner
    # product is summed over the ranks (_summed, the operator's norms)
    generator = operator.generator(seed)
    q = rademacher(probes, n, dtype=dtype, device=device, generator=generator).div_(math.sqrt(operator.total_n))
    q_previous = torch.zeros_like(q)
    beta_previous = torch.zeros(probes, dtype=dtype, device=device)
    basis = None
    if reorthogonalize:
        basis = torch.empty(probes, steps, n, dtype=dtype, device=device)
        basis[:, 0] = q
    alphas = np.zeros((probes, steps))
    betas = np.zeros((probes, steps))
    lengths = np.full(probes, steps)
    scale = np.zeros(probes)
    active = torch.arange(probes, device=device)

    from tqdm.auto import tqdm

    with tqdm(total=steps, desc="slq", unit="step", disable=not progress, leave=False) as bar:
        for step in range(steps):
            everyone = active.numel() == probes
            current = q if everyone else q[active]
            previous = q_previous if everyone else q_previous[active]
            w = operator.matmat(current)
            alpha = _summed(operator, torch.linalg.vecdot(w, current))
            w.addcmul_(alpha[:, None], current, value=-1).addcmul_(beta_previous[active, None], previous, value=-1)
            beta = operator.norms(w)
            if basis is not None:
                # Full reorthogonalization against this probe's own Lanczos vectors: classical Gram–Schmidt,
                # repeated only where it removed much of the vector (the DGKS test: "twice is enough").
                kept = basis[:, : step + 1] if everyone else basis[active, : step + 1]
                for _ in range(2):
                    coefficients = _summed(operator, torch.bmm(kept, w[:, :, None]))
                    w.sub_(torch.bmm(coefficients.transpose(1, 2), kept).squeeze(1))
                    before, beta = beta, operator.norms(w)
                    if bool((beta >= _DGKS * before).all()):
                        break
            index = active.cpu().numpy()
            alphas[index, step] = alpha.double().cpu().numpy()
            betas[index, step] = beta.double().cpu().numpy()
            scale[index] = np.maximum(scale[index], np.maximum(np.abs(alphas[index, step]), betas[index, step]))
            # A vanishing beta means the probe's Krylov space is invariant: its quadrature is exact.
            finished = betas[index, step] <= 100 * eps * np.maximum(scale[index], np.finfo(np.float64).tiny)
            lengths[index[finished]] = step + 1
            bar.update(1)
            if step == steps - 1:
                break
            w.div_(beta[:, None])
            if everyone and not finished.any():
                # The common case: no probe stopped, so swap in the new vectors without index copies.
                q_previous, q = q, w
                beta_previous = beta
                if basis is not None:
                    basis[:, step + 1] = w
                continue
            going = torch.as_tensor(~finished, device=device)
            active = active[going]
            if active.numel() == 0:
                break
            q_previous[active] = current[going]
            q[active] = w[going]
            beta_previous[active] = beta[going]
            if basis is not None:
                basis[active, step + 1] = q[active]
    return alphas, betas, lengths
