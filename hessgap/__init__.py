"""hessgap: sharpness, Hessian spectra and the large-batch generalization gap (Keskar et al. 2017).

The public API reads like PyTorch::

    import hessgap
    result = hessgap.sharpness(model, loader, epsilon=1e-3)          # Metric 2.1 of Keskar et al.
    top = hessgap.eigenvalues(model, loader, k=5)                    # Lanczos on batched HVPs
    Hv = hessgap.hvp(model, loader, vectors)                         # H·v for k vectors in one pass

Names are imported on first use, so ``import hessgap`` stays light (no matplotlib, no scipy).
"""

from __future__ import annotations

import importlib

from ._version import __version__

# public name -> module that defines it
_API = {
    "sharpness": "hessgap.sharp.metric",
    "adaptive_sharpness": "hessgap.sharp.metric",
    "SharpnessResult": "hessgap.sharp.metric",
    "hvp": "hessgap.curvature.hvp",
    "HvpResult": "hessgap.curvature.hvp",
    "HessianOperator": "hessgap.curvature.operator",
    "GGNOperator": "hessgap.curvature.gauss_newton",
    "FisherOperator": "hessgap.curvature.gauss_newton",
    "eigenvalues": "hessgap.spectrum.lanczos",
    "trace": "hessgap.spectrum.trace",
    "density": "hessgap.spectrum.density",
    "block_spectrum": "hessgap.spectrum.blocks",
    "measures": "hessgap.measures",
    "MeasuresResult": "hessgap.measures",
    "llc": "hessgap.measures.llc",
    "LLCResult": "hessgap.measures.llc",
    "landscape": "hessgap.landscape",
    "LandscapeResult": "hessgap.landscape",
    "BlockSpectrumResult": "hessgap.spectrum.blocks",
    "MatrixOperator": "hessgap.curvature.operator",
    "EigenResult": "hessgap.spectrum._results",
    "TraceResult": "hessgap.spectrum._results",
    "DensityResult": "hessgap.spectrum._results",
    "TrainConfig": "hessgap.train",
    "TrainResult": "hessgap.train",
    "build_model": "hessgap.train",
    "load_dataset": "hessgap.train",
    "make_loader": "hessgap.train",
    "evaluate": "hessgap.train",
    "LossOverData": "hessgap.curvature.objective",
    "preserved": "hessgap._state",
    "Tracker": "hessgap.tracking",
    "critical_sharpness": "hessgap.tracking",
    "CriticalResult": "hessgap.tracking",
    "HessgapError": "hessgap.errors",
    "NonFiniteError": "hessgap.errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'hessgap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
