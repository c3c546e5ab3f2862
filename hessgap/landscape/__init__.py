"""Loss landscapes: 1-D and 2-D surfaces of the loss and accuracy around a model or between models, with many
grid points evaluated per pass over the data.

    import hessgap.landscape
    result = hessgap.landscape(model, loader, steps=21)                  # filter-normalized random plane
    result = hessgap.landscape(model_sb, loader, directions=model_lb,    # the paper's Figure 3
                               dims=1, path="linear", steps=25)

Modules: :mod:`.surface` (the call and its run folder), :mod:`.grid`, :mod:`.plane` (points as combinations
of basis states), :mod:`.directions` (random, Hessian, given), :mod:`.interpolation` (between models),
:mod:`.evaluate` (the pass over the data), :mod:`.stack` (with :mod:`.layers`) and :mod:`.functional` (the engines),
:mod:`.result`, :mod:`.export` (npz, VTK, PNG), :mod:`.folder` (resumable rows, checked against the digests of
:mod:`.fingerprint`), :mod:`.command` (CLI).
"""

from __future__ import annotations

import sys
import types

from .result import LandscapeResult
from .surface import landscape, run_landscape

__all__ = ["LandscapeResult", "landscape", "run_landscape"]


class _CallablePackage(types.ModuleType):
    """Importing ``hessgap.landscape`` binds this package to that name, where users call the function; so the
    package itself calls :func:`landscape`."""

    def __call__(self, *args, **kwargs) -> LandscapeResult:
        return landscape(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
