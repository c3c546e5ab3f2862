"""Loads the compiled extension ``hessgap._C`` once and says clearly how to build it when it is missing.

Importing hessgap never fails because of the extension: only a call that needs a fused kernel does.
"""

from __future__ import annotations

import importlib

_module = None
_error: Exception | None = None

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(CUDA kernels are built when torch is a CUDA build and nvcc is found; set TORCH_CUDA_ARCH_LIST "
    "for your GPU)"
)


def load():
    """The extension module, or None when it could not be imported (see :func:`load_error`)."""
    global _module, _error
    if _module is None and _error is None:
        try:
            import torch  # noqa: F401  (the extension links against libtorch)

            _module = importlib.import_module("hessgap._C")
        except ImportError as exc:  # not built, or built against another torch
            _error = exc
    return _module


def load_error() -> Exception | None:
    load()
    return _error


def available() -> bool:
    return load() is not None


def cuda_kernels_built() -> bool:
    module = load()
    return bool(module is not None and module.with_cuda)


def require():
    """The extension module; raises a RuntimeError saying how to build it when it is missing."""
    module = load()
    if module is None:
        raise RuntimeError(f"hessgap's compiled extension hessgap._C is not available ({_error}); {BUILD_HINT}")
    return module
