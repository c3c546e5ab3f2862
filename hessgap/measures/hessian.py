"""The Hessian of the training loss, plain and in the coordinates of Keskar et al.'s Metric 2.1.

Metric 2.1 lets weight i move by ε(|x_i| + 1). In the coordinates u with y = D u, D = diag(|x| + 1), the box
is the cube |u_i| ≤ ε and the loss's Hessian is D·H·D; for a small ε the maximum over the box is
ε²/2 · max_{u ∈ cube} uᵀ(DHD)u (the first-order term vanishes at a minimum), so the curvature that Metric 2.1
sees is that of D·H·D, not of H (Keskar et al. 2017, §2.1 and their Appendix C relate the metric to the
Hessian's largest eigenvalues). Measures:

- ``hessian_lmax``, ``hessian_trace``: λmax(H) (Lanczos) and tr(H) (Hutchinson), f the mean loss.
- ``scaled_lmax``, ``scaled_trace``, ``scaled_lmax_over_trace``: λmax(DHD), tr(DHD) and their ratio, the
  share of the curvature along the sharpest direction.

All run on one :class:`~hessgap.curvature.operator.HessianOperator` per model (batched HVPs through the fused
engine where the model allows it); :class:`ScaledOperator` wraps it as D·H·D for the spectrum methods.
"""

from __future__ import annotations

import torch

from ..curvature.gauss_newton import curvature_operator
from ..curvature.operator import HessianOperator
from ..errors import HessgapError
from ..spectrum.lanczos import eigenvalues
from ..spectrum.trace import trace
from .context import Context, Outcome

DEFAULT_PROBES = 32
DEFAULT_TOL = 1e-3


class ScaledOperator:
    """D·A·D for an operator A and a positive vector d = diag(D): ``matmat(V)`` returns rows D A D v_i.

    Any object with ``n``, ``dtype``, ``device`` and ``matmat`` works as A (a HessianOperator, a
    MatrixOperator); so does the result, for :func:`hessgap.eigenvalues`, :func:`hessgap.trace` and
    :func:`hessgap.density`.
    """

    def __init__(self, operator, d: torch.Tensor):
        d = torch.as_tensor(d)
        if d.dim() != 1 or d.numel() != int(operator.n):
            raise HessgapError(f"the scaling d must be a vector of the operator's size {operator.n}, got shape "
                               f"{tuple(d.shape)}")
        self.operator = operator
        self.n = int(operator.n)
        self.dtype = operator.dtype
        self.device = operator.device
        self.d = d.to(device=self.device, dtype=self.dtype)
        self.path = getattr(operator, "path", None)
        self.notes = getattr(operator, "notes", [])
        self.model_dtype = getattr(operator, "model_dtype", operator.dtype)
        ranks = getattr(operator, "ranks", None)
        if ranks is not None:
            self.ranks = ranks

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.operator.matmat(V * self.d) * self.d

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v.reshape(1, -1))[0]


def keskar_scaling(operator: HessianOperator) -> torch.Tensor:
    """d = |x| + 1 over the operator's parameters: the half-widths of Metric 2.1's box divided by ε."""
    return operator.flat_parameters().abs().add_(1).to(operator.dtype)


def _hessian(ctx: Context) -> HessianOperator:
    return ctx.shared("hessian", lambda: curvature_operator(ctx.curvature, ctx.model, ctx.batches,
                                                            loss_fn=ctx.loss_fn, cache_batches=True))


def _scaled(ctx: Context) -> ScaledOperator:
    return ctx.shared("scaled_hessian", lambda: ScaledOperator(_hessian(ctx), keskar_scaling(_hessian(ctx))))


def _top(ctx: Context, key: str, operator, tol: float) -> Outcome:
    def run():
        result = eigenvalues(operator, k=1, tol=tol, seed=ctx.seed)
        notes = [] if result.converged else [f"Lanczos did not converge (residual {result.residuals[0]:.3g})"]
        return Outcome(result.eigenvalues[0], None, notes=notes, details={
            "residual": result.residuals[0], "hvps": result.hvps, "path": getattr(operator, "path", None)})
    return ctx.shared(key, run)


def _trace(ctx: Context, key: str, operator, probes: int) -> Outcome:
    def run():
        result = trace(operator, num_probes=probes, seed=ctx.seed)
        return Outcome(result.value, result.stderr, details={"probes": probes, "ci": list(result.ci or ())})
    return ctx.shared(key, run)


def hessian_lmax(ctx: Context, tol: float = DEFAULT_TOL) -> Outcome:
    """λmax(H), f the mean training loss, by Lanczos."""
    return _top(ctx, "lmax", _hessian(ctx), tol)


def hessian_trace(ctx: Context, probes: int = DEFAULT_PROBES) -> Outcome:
    """tr(H) by Hutchinson with ``probes`` Rademacher probes in one batched pass, with its standard error."""
    return _trace(ctx, f"trace/{probes}", _hessian(ctx), probes)


def scaled_lmax(ctx: Context, tol: float = DEFAULT_TOL) -> Outcome:
    """λmax(D·H·D), D = diag(|x| + 1)."""
    return _top(ctx, "scaled_lmax", _scaled(ctx), tol)


def scaled_trace(ctx: Context, probes: int = DEFAULT_PROBES) -> Outcome:
    """tr(D·H·D) = Σ_i (|x_i| + 1)² H_ii, by Hutchinson."""
    return _trace(ctx, f"scaled_trace/{probes}", _scaled(ctx), probes)


def scaled_lmax_over_trace(ctx: Context, tol: float = DEFAULT_TOL, probes: int = DEFAULT_PROBES) -> Outcome:
    """λmax(DHD) / tr(DHD): near 1 when one direction holds the curvature, near 1/n when it is spread out."""
    top, total = scaled_lmax(ctx, tol), scaled_trace(ctx, probes)
    stderr = None
    if total.stderr is not None and total.value != 0:
        stderr = abs(top.value / total.value) * total.stderr / abs(total.value)
    return Outcome(top.value / total.value, stderr, details={"lmax": top.value, "trace": total.value},
                   notes=top.notes + total.notes)
