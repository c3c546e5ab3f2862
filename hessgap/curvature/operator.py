"""The Hessian of the mean loss over the data as a linear operator, for eigen-solvers and trace estimators.

:class:`HessianOperator` is what the spectrum methods are written against: ``matmat`` applies H to k
directions in one pass over the data (fused or generic path, see :mod:`hessgap.curvature.hvp`), ``hvps``
counts the Hessian-vector products done, and ``as_linear_operator`` hands the same operator to scipy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import HessgapError
from ._flat import as_directions
from .hvp import DEFAULT_MEMORY_BUDGET, HvpEngine
from .objective import LossOverData


class HessianOperator:
    """H = ∇²f(θ), f = mean loss of ``model`` over ``data``, θ = the trainable parameters (n of them).

    Args:
        model: any ``nn.Module``; left bit-exactly unchanged between and during calls.
        data: a DataLoader (any iterable of ``(inputs, targets)``) or one ``(inputs, targets)`` batch.
        loss_fn: mean loss of a batch (default ``nn.CrossEntropyLoss()``).
        max_batches: use only the first batches of the loader.
        path: ``"auto"``, ``"fused"`` or ``"generic"`` (see :func:`hessgap.hvp`); ``.path`` says which runs
            and ``.fallback_reason`` why the fused engine does not, when it does not.
        cache_batches: keep the batches in memory between calls (faster repeated passes over a loader;
            also fixes the order and any random augmentation of the batches).
        chunk_size, memory_budget, train: as in :func:`hessgap.hvp`.

    The Hessian is taken in eval mode unless ``train=True`` (BatchNorm running statistics, no dropout).
    """

    def __init__(
        self,
        model: nn.Module,
        data,
        loss_fn=None,
        max_batches: int | None = None,
        path: str = "auto",
        *,
        cache_batches: bool = False,
        chunk_size: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        train: bool = False,
    ):
        self.objective = LossOverData(model, data, loss_fn, max_batches=max_batches)
        if cache_batches:
            self.objective.cache_batches()
        self.model = model
        self._engine = HvpEngine(
            self.objective, path=path, train=train, chunk_size=chunk_size, memory_budget=memory_budget
        )
        self.n: int = self.objective.num_parameters
        self.dtype: torch.dtype = self.objective.dtype
        self.device: torch.device = self.objective.device
        self.hvps: int = 0
        self.passes: int = 0
        self.last_loss: float | None = None

    @property
    def path(self) -> str:
        """``"fused"`` or ``"generic"``: the path the next product takes."""
        return self._engine.path

    @property
    def fallback_reason(self) -> str | None:
        """Why the fused engine does not run (None when it does, or when ``path="generic"`` was asked)."""
        return self._engine.fallback_reason

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H Vᵀ for the k rows of ``V`` (shape (k, n)), returned as a (k, n) tensor: rows are H v_i."""
        directions = as_directions(V, self.objective.params, self.objective.names)
        _, flat, stats = self._engine.run(directions)
        self.hvps += directions.k
        self.passes += 1
        self.last_loss = stats.loss_sum / stats.samples
        return flat

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for one vector of shape (n,)."""
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise HessgapError(f"matvec takes one vector of shape ({self.n},), got {shape}; use matmat for (k, n)")
        return self.matmat(v.unsqueeze(0))[0]

    def flat_parameters(self) -> torch.Tensor:
        """The current trainable parameters as one (n,) tensor (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.objective.params])

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` with float64 numpy input and output (symmetric: rmatvec = matvec)."""
        from scipy.sparse.linalg import LinearOperator

        def to_torch(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(x), dtype=self.dtype, device=self.device)

        def matvec(x):
            return self.matvec(to_torch(np.asarray(x).reshape(-1))).detach().double().cpu().numpy()

        def matmat(X):
            # scipy passes (n, k); the operator works on rows
            return self.matmat(to_torch(np.asarray(X).T)).detach().double().cpu().numpy().T

        return LinearOperator((self.n, self.n), matvec=matvec, rmatvec=matvec, matmat=matmat, rmatmat=matmat,
                              dtype=np.float64)

    def __repr__(self) -> str:
        return f"HessianOperator(n={self.n}, dtype={self.dtype}, device={self.device}, path={self.path!r})"
