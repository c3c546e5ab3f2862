"""The generalized Gauss-Newton matrix and the Fishers as operators beside the Hessian, and ``curvature=``.

- :class:`GGNOperator`: G = Jᵀ·H_L·J of the mean loss over the data, J the Jacobian of the model's output
  (the logits the loss compares) and H_L the loss's Hessian there; positive semi-definite for cross-entropy
  and MSE. Its products cost less than the Hessian's (no second-order terms through the network).
- :class:`FisherOperator`: ``kind="empirical"``: F = Σ_u g_u g_uᵀ / N over the objective's units (samples,
  or the counted tokens of a token loss), g_u each unit's own gradient; ``kind="true"``: the same with each
  unit's target drawn from the model's predictive distribution, ``samples`` draws per unit, fixed by
  ``seed`` for the operator's life (an unbiased estimate of G for softmax cross-entropy and MSE).
- :func:`curvature_operator`: the operator a ``curvature=`` name stands for (:data:`hessgap.names.CURVATURES`).

Both take the data and options of :class:`~hessgap.curvature.operator.HessianOperator` (loss_fn, weight_fn,
params, train_mode, group, resample, ...; not compute_loss, which hides the model's output) and serve every
spectrum function as it does; see :mod:`hessgap.curvature.ggn` for the passes.
"""

from __future__ import annotations

from .. import _checks
from ..names import CURVATURES
from .ggn import GaussNewtonEngine
from .operator import HessianOperator

FISHER_KINDS = ("empirical", "true")


class GGNOperator(HessianOperator):
    """G = Jᵀ·H_L·J of the mean loss of ``model`` over ``data`` (see the module docstring); the arguments are
    :class:`~hessgap.curvature.operator.HessianOperator`'s."""

    matrix = "ggn"

    def __init__(self, model, data, *, loss_fn=None, compute_loss=None, weight_fn=None, max_batches: int | None = None,
                 params=None, path: str = "auto", cache_batches: bool = False, chunk_size: int | None = None,
                 max_memory: int | str | None = None, memory_budget: int | str | None = None,
                 train_mode: bool = False, group=None,
                 resample: bool = False):
        self._matrix_options = getattr(self, "_matrix_options", {})
        super().__init__(model, data, loss_fn=loss_fn, compute_loss=compute_loss, weight_fn=weight_fn,
                         max_batches=max_batches, params=params, path=path, cache_batches=cache_batches,
                         chunk_size=chunk_size, max_memory=max_memory, memory_budget=memory_budget,
                         train_mode=train_mode, group=group,
                         resample=resample)

    def _make_engine(self):
        return GaussNewtonEngine(self.objective, matrix=self.matrix, **self._matrix_options, **self._engine_options)


class FisherOperator(GGNOperator):
    """The empirical (``kind="empirical"``) or true (``kind="true"``) Fisher of the mean loss of ``model`` over
    ``data``; the true Fisher draws ``samples`` targets per unit from the model, seeded by ``seed``. The other
    arguments are :class:`~hessgap.curvature.operator.HessianOperator`'s."""

    def __init__(self, model, data, *, kind: str = "empirical", samples: int = 1, seed: int = 0, **options):
        _checks.choice(kind, FISHER_KINDS, "Fisher kind")
        _checks.positive_int(samples, "samples", "targets drawn per unit for the true Fisher")
        _checks.seed(seed)
        self.kind, self.samples, self.seed = kind, samples, seed
        self.matrix = kind
        self._matrix_options = dict(samples=samples, seed=seed)
        super().__init__(model, data, **options)
        self.ranks.agree("the arguments of hessgap.FisherOperator", (kind, samples, seed))


def curvature_operator(curvature: str, model, data, **options) -> HessianOperator:
    """The operator of the matrix ``curvature`` names (:data:`~hessgap.names.CURVATURES`) over ``model`` and
    ``data``; ``options`` are the operator's keywords."""
    _checks.choice(curvature, CURVATURES, "curvature")
    if curvature == "hessian":
        return HessianOperator(model, data, **options)
    if curvature == "ggn":
        return GGNOperator(model, data, **options)
    return FisherOperator(model, data, kind=curvature.removesuffix("-fisher"), **options)
