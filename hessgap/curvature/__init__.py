"""The loss over the data, its gradient and its Hessian applied to vectors: the one place data is walked.

- :mod:`.objective`: :class:`~hessgap.curvature.objective.LossOverData`, the mean loss over a loader
  (batch weighting, device moves, the checks on bad input) and its gradient.
- :mod:`._flat`: directions in parameter space, as one (k, n) tensor or one tensor per parameter.
- :mod:`.engine`: :class:`~hessgap.curvature.engine.HvpEngine`, the pass over the data behind every
  Hessian-vector product (path choice, chunking of the directions, kept primal passes).
- :mod:`.fused`: the R-operator engine for plain layer stacks (layer and loss rules, the plan).
- :mod:`.hvp`: :func:`hessgap.hvp` and its :class:`~hessgap.curvature.hvp.HvpResult`.
- :mod:`.operator`: the operators the spectrum methods multiply by (``HessianOperator``,
  ``MatrixOperator``, ``CheckedOperator``, ``resolve_operator``).

Nothing here imports :mod:`hessgap.sharp` or :mod:`hessgap.spectrum`; they build on this package.
"""
