"""The Hessian's spectrum from batched Hessian-vector products.

- :func:`eigenvalues`: extreme eigenvalues and eigenvectors (block Lanczos, thick restart)
- :func:`trace`: Hutchinson trace estimate with a confidence interval
- :func:`density`: spectral density by stochastic Lanczos quadrature
- :func:`block_spectrum`: top eigenvalues and trace of every diagonal block (per module), sharing every pass

Each takes a model with its data, an operator (``n``, ``dtype``, ``device``, ``matmat``), or an
explicit symmetric matrix (:class:`MatrixOperator`), and returns a JSON-serializable result. The
operators live in :mod:`hessgap.curvature.operator`; the random probes in :mod:`hessgap.curvature.probes`.
"""

from ..curvature.operator import MatrixOperator
from ._results import DensityResult, EigenResult, TraceResult
from .blocks import BlockSpectrumResult, block_spectrum
from .density import density
from .lanczos import eigenvalues
from .trace import trace

__all__ = ["eigenvalues", "trace", "density", "block_spectrum", "MatrixOperator", "EigenResult", "TraceResult",
           "DensityResult", "BlockSpectrumResult"]
