"""Curvature as linear operators: the one place for everything the eigen-solvers and trace estimators multiply by.

- :class:`HessianOperator`: the Hessian of the mean loss over the data; ``matmat`` applies H to k
  directions in one pass over the data (fused or generic path, see :mod:`hessgap.curvature.hvp`),
  ``hvps`` counts the Hessian-vector products done, and ``as_linear_operator`` hands it to scipy.
- :class:`MatrixOperator`: an explicit symmetric matrix behind the same interface (tests, small problems).
- :class:`CheckedOperator`: wraps any operator, counts the products of one call and checks their shape
  and finiteness.
- :func:`resolve_operator`: what a spectrum function multiplies by, given a model with its data (a
  :class:`HessianOperator`), a square symmetric tensor (a :class:`MatrixOperator`) or a ready operator.

An *operator* is any object with ``n``, ``dtype``, ``device`` and ``matmat(V)`` (V of shape (k, n) ->
H·V of shape (k, n)).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..distributed import Ranks
from ..errors import HessgapError, NonFiniteError
from ._flat import all_finite, as_directions
from .engine import HvpEngine
from .finite_difference import METHODS, FiniteDifferenceEngine
from .objective import LossOverData
from .probes import generator_for

#: What makes an object an operator.
OPERATOR_ATTRIBUTES = ("matmat", "n", "dtype", "device")


class HessianOperator:
    """H = ∇²f(θ), f = mean loss of ``model`` over ``data``, θ = the trainable (or selected) parameters.

    Args:
        model: any ``nn.Module``; left bit-exactly unchanged between and during calls.
        data: a DataLoader (any iterable of batches) or one batch: ``(inputs, targets)`` pairs, tuples of
            several inputs and targets, or mappings passed as ``model(**batch)`` (Hugging Face); see
            :mod:`hessgap.curvature.batches`.
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch (default cross-entropy, or the
            output's ``.loss`` for mapping batches).
        compute_loss: ``compute_loss(model, batch)`` → the batch's mean loss, for any other structure.
        weight_fn: ``weight_fn(batch)`` → the units the batch's mean averages over (default: samples, or
            counted label tokens).
        max_batches: use only the first batches of the loader (the same ones on every call).
        params: restrict H to these parameters (names, tensors or modules), the others held fixed.
        path: ``"auto"``, ``"fused"`` or ``"generic"`` (see :func:`hessgap.hvp`); ``.path`` says which runs
            and ``.fallback_reason`` why the fused engine does not, when it does not.
        cache_batches: keep the batches in memory between calls (faster repeated passes over a loader;
            also fixes the order and any random augmentation of the batches).
        chunk_size, max_memory (memory_budget), train_mode: as in :func:`hessgap.hvp`.
        group: a torch.distributed process group (default: the default group when one is initialized);
            each rank passes its own shard and every rank gets the products over all the data.
        method: ``"exact"`` (default) or ``"finite-difference"``: central differences of exact gradients, for
            setups without a double backward and as a cross-check (see :mod:`hessgap.curvature.finite_difference`;
            ``step`` overrides its h).
        resample: the stochastic mode: every product is taken over one fresh batch of the loader (the next one;
            a new epoch when it ends), so the matrix changes from product to product: Lanczos on it gives an
            SGD-like estimate, the curvature of the mini-batch losses rather than of f (see the README).

    The Hessian is taken in eval mode (BatchNorm running statistics, no dropout) unless ``train_mode=True``.
    ``dtype`` is the dtype of the vectors it takes and returns: the model's, or float32 for float16/bfloat16
    models (the products run in the model's dtype and are summed over the loader in float32).
    """

    def __init__(
        self,
        model: nn.Module,
        data,
        *,
        loss_fn=None,
        compute_loss=None,
        weight_fn=None,
        max_batches: int | None = None,
        params=None,
        path: str = "auto",
        cache_batches: bool = False,
        chunk_size: int | None = None,
        max_memory: int | str | None = None,
        memory_budget: int | None = None,
        train_mode: bool = False,
        group=None,
        method: str = "exact",
        step: float | None = None,
        resample: bool = False,
    ):
        if method not in METHODS:
            raise HessgapError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.method, self.step = method, step
        self.objective = LossOverData(model, data, loss_fn, compute_loss=compute_loss, weight_fn=weight_fn,
                                      max_batches=max_batches, params=params, group=group, resample=resample)
        self.objective.check_finite_parameters()
        self.ranks = self.objective.ranks
        self.objective.agree_across_ranks("the parameters the Hessian is taken over")
        if cache_batches:
            self.objective.cache_batches()
        self.model = model
        self._engine_options = dict(path=path, train_mode=train_mode, chunk_size=chunk_size,
                                    max_memory=max_memory, memory_budget=memory_budget)
        self._engine = self._make_engine()
        self._earlier_capture_seconds = 0.0  # of engines replaced since (see _follow_replaced_tensors)
        self._buffers = list(model.buffers())
        self.n: int = self.objective.num_parameters  # this rank's shards only, for an FSDP2-sharded model
        self.total_parameters: int = self.objective.total_parameters
        self.sharded: bool = self.objective.sharded is not None
        self.dtype: torch.dtype = self.objective.accumulation_dtype
        self.model_dtype: torch.dtype = self.objective.dtype
        self.device: torch.device = self.objective.device
        self.hvps: int = 0
        self.passes: int = 0
        self.last_loss: float | None = None

    def _make_engine(self):
        """The pass over the data each product runs (a subclass multiplies by another matrix)."""
        if self.method == "finite-difference":
            return FiniteDifferenceEngine(self.objective, step=self.step,
                                          train_mode=self._engine_options["train_mode"])
        return HvpEngine(self.objective, **self._engine_options)

    @property
    def resample(self) -> bool:
        """Whether every product sees a fresh batch (the stochastic mode)."""
        return self.objective.resample

    @property
    def names(self) -> list[str]:
        """The parameters H is taken over, in the order of the n coordinates."""
        return self.objective.names

    @property
    def notes(self) -> list[str]:
        """What the products did that a result should say (e.g. attention on PyTorch's math kernels)."""
        return self._engine.notes

    @property
    def path(self) -> str:
        """``"fused"`` or ``"generic"``: the path the next product takes."""
        return self._engine.path

    @property
    def fallback_reason(self) -> str | None:
        """Why the fused engine does not run (None when it does, or when ``path="generic"`` was asked)."""
        return self._engine.fallback_reason

    @property
    def capture_seconds(self) -> float:
        """Seconds this operator's products spent capturing the model's graph (0 when the captures were kept
        from an earlier call or operator, or when no graph was captured)."""
        return self._earlier_capture_seconds + self._engine.capture_seconds

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H Vᵀ for the k rows of ``V`` (shape (k, n)), returned as a (k, n) tensor: rows are H v_i."""
        self._follow_replaced_tensors()
        directions = as_directions(V, self.objective.vector_params, self.objective.names)
        if self.objective.resample:
            self.objective.next_batch()
        _, flat, stats = self._engine.run(directions)
        self.hvps += directions.k
        self.passes += 1
        self.last_loss = stats.loss
        return flat

    def _follow_replaced_tensors(self) -> None:
        """A new engine when the model's Parameter or buffer objects were replaced since the last product: the
        old one's plan, captured graphs and kept primal passes belong to the old objects (the products would be
        the old Hessian's, or zero). Decided on every rank alike, so that all of them run the same collectives."""
        replaced = self.ranks.together(self._replaced)
        if self.ranks.active:
            replaced = self.ranks.sum_numbers([float(replaced)])[0] > 0
        if not replaced:
            return
        self.objective.check_finite_parameters()
        self.objective.agree_across_ranks("the replaced parameters the Hessian is taken over")
        notes = self._engine.rules.notes
        self._earlier_capture_seconds += self._engine.capture_seconds
        self._engine = self._make_engine()
        self._engine.rules.notes = notes  # one list of notes over the operator's life (results hold it)

    def _replaced(self) -> bool:
        parameters = self.objective.reselect_parameters()
        buffers = list(self.model.buffers())  # a captured graph takes BatchNorm's statistics as inputs too
        moved = len(buffers) != len(self._buffers) or any(a is not b for a, b in zip(buffers, self._buffers))
        self._buffers = buffers
        return parameters or moved

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
        return f"{type(self).__name__}(n={self.n}, dtype={self.dtype}, device={self.device}, path={self.path!r})"



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


def resolve_operator(model, data=None, *, caller: str = "this function", curvature: str = "hessian", **options):
    """The operator a spectrum function should multiply by, built from a model or taken as given.

    ``model`` is a model, or an operator / square symmetric tensor. A model with its ``data`` (and the
    ``options`` of :class:`HessianOperator`: ``loss_fn``, ``compute_loss``, ``weight_fn``, ``max_batches``,
    ``params``, ``train_mode``, ``group``, ``path``, ...) gives the operator of the matrix ``curvature`` names
    (:data:`hessgap.names.CURVATURES`: the Hessian by default, the GGN or a Fisher) with
    ``cache_batches=True``: the batches are held in memory for the repeated passes (build the operator
    yourself with ``cache_batches=False`` for data that does not fit; ``resample=True`` draws a batch per
    product instead). A square tensor is taken as an explicit symmetric matrix (:class:`MatrixOperator`); any
    other object must be an operator already. ``caller`` names the public function in the messages.
    """
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(model, nn.Module):
        if data is None:
            raise HessgapError(
                f"{caller}(model, data, ...) needs the data the Hessian is taken over: "
                "pass a DataLoader (or an iterable of batches) or one batch"
            )
        from .gauss_newton import curvature_operator

        # Every pass must see the same matrix (Lanczos breaks down otherwise), so the batches are read
        # once and kept: no reshuffled augmentation between passes, and no loader cost per pass.
        return curvature_operator(curvature, model, data, cache_batches=not given.get("resample", False), **given)
    if data is not None or given or curvature != "hessian":
        named = sorted(given) + (["curvature"] if curvature != "hessian" else [])
        raise HessgapError(
            f"{caller} got an operator together with data or {', '.join(named) or 'data options'}; those "
            "only apply when a model is passed (the operator already fixes its data and its matrix)"
        )
    if isinstance(model, torch.Tensor):
        return MatrixOperator(model)
    missing = [name for name in OPERATOR_ATTRIBUTES if not hasattr(model, name)]
    if missing:
        raise HessgapError(
            f"{caller} expects a torch.nn.Module with its data, a square symmetric tensor, or an operator "
            f"with n, dtype, device and matmat(V); got {type(model).__name__} without {', '.join(missing)}"
        )
    if int(model.n) <= 0:
        raise HessgapError(f"the operator has n = {model.n}; it must act on at least one parameter")
    return model


#: Columns per float64 chunk of :meth:`CheckedOperator.row_dots` (16M: 128 MiB per float64 row copy).
DOT_CHUNK = 1 << 24


class CheckedOperator:
    """Wraps an operator: counts the Hessian-vector products of one call, checks shape and finiteness, and
    provides the vector algebra the spectrum methods use (inner products, norms, random vectors), which for
    an FSDP2-sharded operator works on this rank's shards and sums across the ranks."""

    def __init__(self, operator):
        self.operator = operator
        self.n = int(operator.n)  # the length of the vectors this rank holds
        self.dtype = operator.dtype
        self.device = torch.device(operator.device)
        self.path = getattr(operator, "path", None)
        self.notes = getattr(operator, "notes", [])
        self.ranks = getattr(operator, "ranks", Ranks())
        self.sharded = bool(getattr(operator, "sharded", False))
        self.total_n = int(getattr(operator, "total_parameters", self.n))  # over every rank's shards
        self.model_dtype = getattr(operator, "model_dtype", operator.dtype)
        self.hvps = 0

    def describe(self) -> dict:
        """What a spectrum result records about the operator it ran on."""
        return {"n": self.total_n, "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
                "path": self.path, "model_dtype": str(self.model_dtype).replace("torch.", ""),
                "notes": list(self.notes)}

    def refuse_sharded(self, what: str) -> None:
        if self.sharded:
            raise HessgapError(
                f"{what} does not take FSDP2-sharded models yet; eigenvalues, trace, density and block_spectrum do "
                "(their vectors are sharded like the parameters)"
            )

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        result = self.operator.matmat(V)
        if not isinstance(result, torch.Tensor) or tuple(result.shape) != tuple(V.shape):
            shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise HessgapError(f"the operator's matmat returned {shape} for input {tuple(V.shape)}; it must return H·V of the same shape")
        self.hvps += V.shape[0]
        if not all_finite(result):  # one summing pass: a mask of a (k, n) product cost seconds at n = 4M
            raise NonFiniteError(
                "a Hessian-vector product returned NaN or inf; check the model's parameters, the data and the "
                "loss for non-finite values (a diverged model gives this)"
            )
        return result.to(self.dtype)

    # -- vector algebra over the whole (possibly sharded) vectors -------------------------------------------

    def gram(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """A·Bᵀ: the inner products of A's rows with B's rows."""
        product = A @ B.T
        return self.ranks.sum_(product) if self.sharded else product

    def norms(self, A: torch.Tensor) -> torch.Tensor:
        """The Euclidean norm of each row of A."""
        if not self.sharded:
            return A.norm(dim=1)
        return self.ranks.sum_(A.pow(2).sum(dim=1)).sqrt()

    def row_dots(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Σ_j A_ij·B_ij per row, in float64, over column chunks: whole float64 copies of a 0.55B-parameter
        probe and its product took 13 GB (the trace's peak rose from 7 to 20 GB)."""
        dots = torch.zeros(A.shape[0], dtype=torch.float64, device=A.device)
        for start in range(0, A.shape[1], DOT_CHUNK):
            end = start + DOT_CHUNK
            dots += (A[:, start:end].double() * B[:, start:end].double()).sum(dim=1)
        return self.ranks.sum_(dots) if self.sharded else dots

    def pivot_signs(self, X: torch.Tensor) -> torch.Tensor:
        """The sign of each row's entry of largest magnitude (over all shards): fixes eigenvectors' signs."""
        values = X.gather(1, X.abs().argmax(dim=1, keepdim=True))[:, 0]
        if self.sharded:  # the largest entry of every rank, then the largest of those
            candidates = torch.stack(self.ranks.gather(values))
            values = candidates.gather(0, candidates.abs().argmax(dim=0, keepdim=True))[0]
        signs = torch.sign(values)
        return torch.where(signs == 0, torch.ones_like(signs), signs)

    def generator(self, seed: int) -> torch.Generator:
        """The generator of random vectors: one stream per rank for sharded vectors (each draws its shard)."""
        return generator_for(self.device, seed + 1_000_003 * self.ranks.rank if self.sharded else seed)
