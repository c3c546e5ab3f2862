"""Sharpness of a minimizer: Keskar et al.'s ε-sharpness (Metric 2.1) and adaptive sharpness.

``hessgap.sharpness`` is :func:`hessgap.sharp.metric.sharpness`; the solvers and their step rules live
in :mod:`hessgap.sharp.solvers`, the spaces they search (full, scaled, random subspace) in
:mod:`hessgap.sharp.spaces` and the random subspace A in :mod:`hessgap.sharp.subspace`.
"""

from .metric import SharpnessResult, adaptive_sharpness, sharpness

__all__ = ["SharpnessResult", "adaptive_sharpness", "sharpness"]
