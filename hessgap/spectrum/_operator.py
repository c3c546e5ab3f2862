"""What the spectrum methods multiply by, and the checks on every product they get back.

Each spectrum function takes either ``(model, data)``, from which a
:class:`hessgap.curvature.operator.HessianOperator` is built (with ``cache_batches=True``: the batches
are held in memory for the repeated passes; build the operator yourself with ``cache_batches=False``
for data that does not fit), or a ready operator: any object with
``n``, ``dtype``, ``device`` and ``matmat(V)`` (V of shape (k, n) -> H·V of shape (k, n)). A square
tensor is taken as an explicit symmetric matrix (:class:`MatrixOperator`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import HessgapError, NonFiniteError

_OPERATOR_ATTRIBUTES = ("matmat", "n", "dtype", "device")


class MatrixOperator:
    """An explicit symmetric matrix behind the same interface as ``HessianOperator``.

    Useful to run the spectrum methods on a known matrix (tests, small problems, a Hessian that was
    formed explicitly). ``matmat(V)`` returns ``V @ A`` (= (A·Vᵀ)ᵀ since A is symmetric).
    """

    path = "matrix"

    def __init__(self, matrix, *, check_symmetric: bool = True):
        A = torch.as_tensor(matrix)
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise HessgapError(f"MatrixOperator needs a square 2-D matrix, got shape {tuple(A.shape)}")
        if A.shape[0] == 0:
            raise HessgapError("MatrixOperator needs a non-empty matrix, got shape (0, 0)")
        if not A.dtype.is_floating_point:
            raise HessgapError(f"MatrixOperator needs a floating-point matrix, got dtype {A.dtype}; cast it first")
        if not torch.isfinite(A).all():
            raise NonFiniteError("the matrix given to MatrixOperator holds NaN or inf")
        if check_symmetric:
            scale = float(A.abs().max())
            asym = float((A - A.T).abs().max())
            if asym > 1e3 * torch.finfo(A.dtype).eps * max(scale, 1e-300):
                raise HessgapError(
                    f"the matrix is not symmetric (max |A - Aᵀ| = {asym:.3g}, max |A| = {scale:.3g}); "
                    "Hessians are symmetric: pass (A + A.T) / 2, or check_symmetric=False if you know better"
                )
        self.matrix = A
        self.n = A.shape[0]
        self.dtype = A.dtype
        self.device = A.device
        self.hvps = 0

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        if V.dim() != 2 or V.shape[1] != self.n:
            raise HessgapError(f"matmat expects a (k, {self.n}) tensor, got shape {tuple(V.shape)}")
        self.hvps += V.shape[0]
        return V.to(self.dtype) @ self.matrix

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v.reshape(1, -1))[0]

    def as_linear_operator(self):
        """The matrix as a ``scipy.sparse.linalg.LinearOperator`` (numpy in, numpy out)."""
        from scipy.sparse.linalg import LinearOperator

        def apply(x):
            X = torch.as_tensor(x, dtype=self.dtype, device=self.device)
            if X.dim() == 1:
                return self.matmat(X[None])[0].cpu().numpy()
            return self.matmat(X.T).T.cpu().numpy()

        return LinearOperator((self.n, self.n), matvec=apply, matmat=apply, rmatvec=apply, dtype=self.matrix.cpu().numpy().dtype)


def resolve_operator(target, data=None, *, loss_fn=None, max_batches=None, caller: str = "this function"):
    """The operator a spectrum function should multiply by, built from a model or taken as given."""
    if isinstance(target, nn.Module):
        if data is None:
            raise HessgapError(
                f"{caller}(model, data, ...) needs the data the Hessian is taken over: "
                "pass a DataLoader (or an iterable of (inputs, targets)) or one (inputs, targets) batch"
            )
        try:
            from ..curvature.operator import HessianOperator
        except ImportError as error:  # pragma: no cover - only while the curvature package is incomplete
            raise HessgapError(
                f"hessgap.curvature.operator.HessianOperator is not available ({error}); "
                f"pass an operator object to {caller} instead of a model"
            ) from error
        # Every pass must see the same matrix (Lanczos breaks down otherwise), so the batches are read
        # once and kept: no reshuffled augmentation between passes, and no loader cost per pass.
        return HessianOperator(target, data, loss_fn=loss_fn, max_batches=max_batches, cache_batches=True)
    if data is not None or loss_fn is not None or max_batches is not None:
        raise HessgapError(
            f"{caller} got an operator together with data/loss_fn/max_batches; those only apply when a "
            "model is passed (the operator already fixes its data)"
        )
    if isinstance(target, torch.Tensor):
        return MatrixOperator(target)
    missing = [name for name in _OPERATOR_ATTRIBUTES if not hasattr(target, name)]
    if missing:
        raise HessgapError(
            f"{caller} expects a torch.nn.Module with its data, a square symmetric tensor, or an operator "
            f"with n, dtype, device and matmat(V); got {type(target).__name__} without {', '.join(missing)}"
        )
    if int(target.n) <= 0:
        raise HessgapError(f"the operator has n = {target.n}; it must act on at least one parameter")
    return target


class CheckedOperator:
    """Wraps an operator: counts the Hessian-vector products of one call, checks shape and finiteness."""

    def __init__(self, operator):
        self.operator = operator
        self.n = int(operator.n)
        self.dtype = operator.dtype
        self.device = torch.device(operator.device)
        self.path = getattr(operator, "path", None)
        self.hvps = 0

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        result = self.operator.matmat(V)
        if not isinstance(result, torch.Tensor) or tuple(result.shape) != tuple(V.shape):
            shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise HessgapError(f"the operator's matmat returned {shape} for input {tuple(V.shape)}; it must return H·V of the same shape")
        self.hvps += V.shape[0]
        if not torch.isfinite(result).all():
            raise NonFiniteError(
                "a Hessian-vector product returned NaN or inf; check the model's parameters, the data and the "
                "loss for non-finite values (a diverged model gives this)"
            )
        return result.to(self.dtype)


def generator_for(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``, so probes are reproducible and made where they are used."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise HessgapError(f"seed must be an int, got {seed!r}")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def rademacher(rows: int, n: int, *, dtype, device, generator) -> torch.Tensor:
    """A (rows, n) matrix of independent ±1 entries."""
    signs = torch.randint(0, 2, (rows, n), generator=generator, device=device, dtype=torch.int8)
    return signs.to(dtype).mul_(2).sub_(1)


def check_positive_int(value, name: str, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise HessgapError(f"{name} must be a positive integer, got {value!r}{hint}")
    return value
