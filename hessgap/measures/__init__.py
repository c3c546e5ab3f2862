"""Which sharpness predicts the generalization gap? Many measures of one minimum in one call.

``hessgap.measures(model, loader, names=None)`` (this package is callable: it runs
:func:`hessgap.measures.api.measures`) returns a :class:`MeasuresResult` with every measure's value, its
settings and time, and whether it is invariant to the ReLU/BatchNorm rescalings that leave the function
unchanged, checked on the model. The measures (:data:`NAMES`, see :mod:`.registry`):

- worst-case: Keskar et al.'s Metric 2.1 (full space, random subspace), adaptive sharpness ℓ∞ and ℓ2,
  m-sharpness (:mod:`.worst_case`);
- average-case: Gaussian sharpness, plain and adaptive (:mod:`.average_case`);
- PAC-Bayes: Jiang et al.'s 1/σ² and magnitude-aware 1/σ′² (:mod:`.pacbayes`);
- Hessian: λmax and trace of H and of D·H·D in Metric 2.1's coordinates, their ratio (:mod:`.hessian`),
  Petzka et al.'s relative flatness (:mod:`.relative_flatness`);
- the Fisher–Rao norm (:mod:`.fisher_rao`);
- on request (named, not in :data:`DEFAULT_NAMES`): the local learning coefficient of singular learning theory
  (:mod:`.llc`, SGLD chains of :mod:`.sgld`, diagnostics in :mod:`.llc_checks`; also ``hessgap.llc``).

:mod:`.ranking` holds Kendall's τ and Jiang et al.'s granulated τ, which ``hessgap correlate`` reports.
"""

from __future__ import annotations

import sys
import types

from .api import MeasuresResult
from .api import measures as compute
from .hessian import ScaledOperator
from .registry import DEFAULT_NAMES, MEASURES, NAMES

__all__ = ["DEFAULT_NAMES", "MEASURES", "NAMES", "MeasuresResult", "ScaledOperator", "compute", "measures"]


class _CallablePackage(types.ModuleType):
    """``hessgap.measures(model, data, ...)`` calls :func:`hessgap.measures.api.measures`."""

    def __call__(self, model, data, names=None, **options) -> MeasuresResult:
        return compute(model, data, names, **options)


sys.modules[__name__].__class__ = _CallablePackage
#: ``hessgap.measures`` is this package, callable; the name resolves to it also through hessgap's lazy API.
measures = sys.modules[__name__]
