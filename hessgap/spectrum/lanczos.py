"""Extreme eigenvalues of the Hessian by block Lanczos with full reorthogonalization and thick restart.

Each Lanczos step multiplies one block of ``block_size`` vectors by the Hessian in a single batched
``matmat`` (one pass over the data serves the whole block). The basis is kept explicitly together
with its Hessian images, so the projected matrix T = V·(HV)ᵀ is exact (no three-term recurrence to
lose orthogonality) and a thick restart (Krylov–Schur) keeps the most wanted Ritz vectors and their
images without any new product. Convergence is judged on residual norms ‖H·x − θ·x‖.
"""

from __future__ import annotations

import math
import time

import torch

from .._checks import nonnegative_int, positive_int
from ..curvature.operator import CheckedOperator, resolve_operator
from ..errors import HessgapError
from ._results import EigenResult

_WHICH = ("LA", "SA", "LM")
_CRITERIA = ("eigenvalue", "residual")
# Orthogonalize a second time when one pass shrank a vector below this fraction of its norm ("twice is enough").
_DGKS = 1 / math.sqrt(2)


def eigenvalues(
    model,
    data=None,
    *,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-3,
    criterion: str = "eigenvalue",
    block_size: int | None = None,
    max_basis: int | None = None,
    max_iter: int = 300,
    min_iter: int = 1,
    seed: int = 0,
    start: torch.Tensor | None = None,
    ritz_vectors: int = 0,
    progress: bool = False,
    **operator_options,
) -> EigenResult:
    """The k extreme eigenvalues of the Hessian, with eigenvectors and residual norms.

    ``model`` is a model, or an operator / square symmetric tensor: a model's ``data`` and
    ``operator_options`` (the keywords of :class:`~hessgap.curvature.operator.HessianOperator`:
    ``loss_fn``, ``compute_loss``, ``weight_fn``, ``max_batches``, ``params``, ``train_mode``, ``group``,
    ``path``, ``chunk_size``) build the Hessian operator over the mean loss of the data, its batches held in
    memory for the repeated passes; an operator is any object with ``n``, ``dtype``, ``device`` and
    ``matmat``. Half-precision models multiply in their dtype; the Lanczos vectors are float32.

    ``which``: "LA" largest algebraic (descending), "SA" smallest algebraic (ascending), "LM"
    largest magnitude (by descending magnitude).

    Stopping rule (``tol`` is relative): a Ritz pair (θ, x) is accepted when its error estimate is at
    most ``tol · max(|θ|, ε^(2/3)·‖T‖)`` (ARPACK's scaling). With ``criterion="residual"`` the estimate
    is the residual norm r = ‖H·x − θ·x‖, a bound: some eigenvalue lies within r of θ (up to the rounding
    of the products). With ``criterion="eigenvalue"`` (default) it is min(r, r²/gap), Kato–Temple's
    estimate of the eigenvalue error with the gap measured to the other Ritz values (each shrunk by its
    own residual): the eigenvalue is then accurate to about ``tol`` and the eigenvector to about r/gap.
    It is an *estimate*, not a bound: the Ritz gap can exceed the true one and the products' own rounding
    (about 1e-7 relative in float32) is not in it; the result's ``residuals`` are the bounds. For a
    bfloat16 or float16 model the products carry the model dtype's rounding (about 1e-2 and 1e-3 of ‖H‖),
    which no residual gets much below: a pair whose residual is within twice the model dtype's unit roundoff
    of the largest wanted |θ| also counts as converged (its eigenvalue is then accurate to about that
    much of the top eigenvalue, not of itself).

    ``block_size`` vectors are multiplied per step (default 1 for k = 1, else min(k, 4)); larger blocks
    find clustered or repeated eigenvalues more reliably and use batched Hessian products.
    ``max_basis`` bounds the basis (default max(30, 3k + 4·block_size), at most n); memory is
    2 · max_basis · n numbers. ``max_iter`` bounds the steps, so at most ``max_iter · block_size``
    Hessian-vector products. Results that did not converge come back with ``converged=False``.

    ``start`` warm-starts the run: up to ``block_size`` vectors (an (r, n) tensor, or one (n,) vector) that
    make the first block, the rest of it random (from ``seed``). Eigenvectors of a nearby Hessian (the
    previous measurement of a training run) make a start from which the wanted pairs converge in a few
    steps. For an FSDP2-sharded model the rows are this rank's shards, as every vector of the run. A start
    close to *one* eigenvector makes a Ritz pair converge at once, also when a larger eigenvalue it has
    little of exists (the Kato–Temple gap is measured to Ritz values that have not resolved the others yet):
    start from a combination of several previous Ritz vectors (``ritz_vectors``) and take ``min_iter`` steps
    at least, so that the basis spans them before any pair is accepted.

    ``min_iter``: no Ritz pair is accepted before this many steps (unless the basis fills the space).
    ``ritz_vectors``: also return that many of the final basis's most wanted Ritz vectors (``result.ritz``,
    unit rows, converged or not; no extra products): the warm start of a next call on a nearby operator.
    """
    started = time.perf_counter()
    if which not in _WHICH:
        raise HessgapError(f"which must be one of {', '.join(_WHICH)} (largest algebraic, smallest algebraic, largest magnitude), got {which!r}")
    if criterion not in _CRITERIA:
        raise HessgapError(f"criterion must be 'eigenvalue' or 'residual', got {criterion!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < 1):
        raise HessgapError(f"tol is a relative tolerance and must lie in (0, 1), got {tol!r}")
    positive_int(k, "k", "the number of eigenvalues wanted")
    positive_int(max_iter, "max_iter")
    positive_int(min_iter, "min_iter")
    if min_iter > max_iter:
        raise HessgapError(f"min_iter = {min_iter} exceeds max_iter = {max_iter}; the run could never accept a pair")
    nonnegative_int(ritz_vectors, "ritz_vectors", "Ritz vectors to return besides the eigenvectors")
    operator = CheckedOperator(
        resolve_operator(model, data, caller="eigenvalues", **operator_options)
    )
    block_size, max_basis = basis_sizes(operator.total_n, k, block_size, max_basis)
    start = operator.ranks.together(start_block, start, operator, block_size)
    operator.ranks.agree("the arguments of hessgap.eigenvalues", (k, which, tol, criterion, block_size, max_basis,
                                                                  max_iter, min_iter, seed, start is None))
    solver = BlockLanczos(operator, k, which, float(tol), criterion, block_size, max_basis, seed, start=start,
                          min_iter=min_iter)
    solver.run(max_iter, progress)
    result = solver.result(time.perf_counter() - started)
    if ritz_vectors:
        result.ritz = solver.ritz_vectors(ritz_vectors)
    return result


def basis_sizes(n: int, k: int, block_size: int | None, max_basis: int | None) -> tuple[int, int]:
    """The block size and the largest basis for k eigenvalues of an n × n operator (defaults, checks)."""
    if k > n:
        raise HessgapError(f"k = {k} eigenvalues asked for, but the Hessian is only {n} × {n}; use k <= {n}")
    if block_size is None:
        block_size = 1 if k == 1 else min(k, 4)
    positive_int(block_size, "block_size")
    block_size = min(block_size, n)
    if max_basis is None:
        max_basis = max(30, 3 * k + 4 * block_size)
    positive_int(max_basis, "max_basis")
    max_basis = min(max_basis, n)
    if max_basis < n and max_basis < k + 2 * block_size:
        raise HessgapError(
            f"max_basis = {max_basis} is too small for k = {k} and block_size = {block_size}: the basis must hold "
            f"the k kept vectors and two blocks, so use max_basis >= {k + 2 * block_size}"
        )
    return block_size, max_basis


def start_block(start, operator: CheckedOperator, block_size: int) -> torch.Tensor | None:
    """``start`` checked and shaped as the rows of a first block: (r, n) with 1 ≤ r ≤ block_size, finite, in
    the operator's dtype and on its device (None stays None). A zero row is replaced by a random one, as any
    row that vanishes in the orthogonalization."""
    if start is None:
        return None
    if not isinstance(start, torch.Tensor) or not start.dtype.is_floating_point:
        raise HessgapError(f"start must be a floating-point tensor of shape (n,) or (r, n), got {type(start).__name__}"
                           + (f" of dtype {start.dtype}" if isinstance(start, torch.Tensor) else ""))
    rows = start.reshape(1, -1) if start.dim() == 1 else start
    if rows.dim() != 2 or rows.shape[1] != operator.n or not 1 <= rows.shape[0] <= block_size:
        raise HessgapError(
            f"start has shape {tuple(start.shape)}; it must be ({operator.n},) or (r, {operator.n}) with "
            f"1 <= r <= block_size = {block_size} (pass block_size=r for more start vectors)"
        )
    rows = rows.detach().to(device=operator.device, dtype=operator.dtype)
    if not bool(torch.isfinite(rows).all()):
        raise HessgapError("start holds NaN or inf; pass finite vectors (or start=None for a random start)")
    return rows


def _wanted_order(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of the Ritz values, most wanted first."""
    if which == "LA":
        key = -theta
    elif which == "SA":
        key = theta
    else:
        key = -theta.abs()
    return torch.argsort(key, stable=True)


def _error_estimates(theta, residuals, wanted, tol, criterion, eps, product_eps=0.0):
    """Bounds on |λ − θ| for the wanted Ritz values and whether each meets the tolerance.

    ``product_eps`` is the relative rounding of the products themselves (the model's dtype when that is
    coarser than the vectors', e.g. bfloat16): no residual gets much below product_eps·‖H‖, so a pair whose
    residual is within twice that of the largest wanted |θ| also counts as converged, to the precision the
    products have.
    """
    wanted_theta = theta[wanted]
    r = residuals[wanted]
    if criterion == "residual" or theta.numel() == 1:
        bound = r
    else:
        # Distance from each wanted Ritz value to every other one, minus the other's own uncertainty.
        gaps = (theta[None, :] - wanted_theta[:, None]).abs() - residuals[None, :]
        gaps[torch.arange(wanted.numel()), wanted] = math.inf
        gap = gaps.min(dim=1).values
        kato_temple = torch.where(gap > 0, r * r / gap.clamp_min(1e-300), torch.full_like(r, math.inf))
        bound = torch.minimum(r, kato_temple)
    floor = eps ** (2.0 / 3.0) * float(theta.abs().max())
    threshold = tol * wanted_theta.abs().clamp_min(floor)
    ok = bound <= threshold
    if product_eps:
        # The residual itself (a bound) at the products' rounding, measured against the wanted eigenvalues:
        # against ‖T‖ a large eigenvalue at the other end would let an unconverged pair through.
        ok = ok | (r <= 2 * product_eps * float(wanted_theta.abs().max()))
    return bound, ok, threshold


class BlockLanczos:
    """One block Lanczos run. :meth:`run` multiplies by its operator; :meth:`iterate` is the same run as a
    generator that yields each block to multiply and takes its product back, so that several runs can
    share one pass over the data (see :mod:`hessgap.spectrum.blocks`)."""

    def __init__(self, operator: CheckedOperator, k, which, tol, criterion, block_size, max_basis, seed, start=None,
                 min_iter: int = 1):
        self.op = operator
        self.k, self.which, self.tol, self.criterion = k, which, tol, criterion
        self.block_size, self.max_basis = block_size, max_basis
        self.dtype, self.device, self.n = operator.dtype, operator.device, operator.n
        # the dimension of the space: n, or every rank's shards together for a sharded operator
        self.dimension = getattr(operator, "total_n", operator.n)
        self.eps = torch.finfo(self.dtype).eps
        # Products of a half-precision model carry its rounding (unit roundoff eps/2), however precise the
        # vectors are.
        model_eps = torch.finfo(getattr(operator, "model_dtype", self.dtype)).eps
        self.product_eps = model_eps / 2 if model_eps > self.eps else 0.0
        # A direction whose part outside the basis is this small (relative) carries no new information.
        self.drop_tol = 100 * self.eps
        self.generator = operator.generator(seed)
        self.start = start  # the first rows of the first block (see :func:`start_block`), or None
        self.min_iter = min_iter  # no pair is accepted before this many steps
        self.V = torch.empty(max_basis, self.n, dtype=self.dtype, device=self.device)
        self.HV = torch.empty_like(self.V)
        self.m = 0
        self.T = torch.zeros(0, 0, dtype=torch.float64)
        self.iterations = 0
        self.restarts = 0
        self.converged = False

    # -- pieces -----------------------------------------------------------------------------------

    def _random(self, rows: int) -> torch.Tensor:
        return torch.randn(rows, self.n, generator=self.generator, dtype=self.dtype, device=self.device)

    def _first_block(self) -> torch.Tensor:
        """The start vectors given, the rest of the block random."""
        if self.start is None:
            return self._random(self.block_size)
        return torch.cat([self.start, self._random(self.block_size - self.start.shape[0])])

    def _orthonormal_block(self, W: torch.Tensor, max_rows: int) -> torch.Tensor:
        """Rows of W made orthonormal and orthogonal to the basis (classical Gram–Schmidt, twice).

        A row that vanishes (the Krylov space became invariant) is replaced by a random direction, so
        the basis keeps growing; fewer rows come back only when the basis would exceed ``max_rows``.
        """
        V = self.V[: self.m]
        reference = self.op.norms(W)
        W = W.clone()
        norms = reference
        for _ in range(2):  # classical Gram–Schmidt, repeated only when the DGKS test asks for it
            if not self.m:
                break
            W -= self.op.gram(W, V) @ V
            before, norms = norms, self.op.norms(W)
            if bool((norms >= _DGKS * before).all()):
                break
        accepted: list[torch.Tensor] = []
        for row in range(W.shape[0]):
            if len(accepted) >= max_rows:
                break
            w, size = W[row], reference[row]
            for _attempt in range(4):
                if accepted:
                    Q = torch.stack(accepted)
                    for _ in range(2):
                        w = w - self.op.gram(w[None], Q)[0] @ Q
                norm = self.op.norms(w[None])[0]
                if norm > self.drop_tol * size:
                    accepted.append(w / norm)
                    break
                w = self._random(1)[0]
                size = self.op.norms(w[None])[0]
                for _ in range(2):
                    if self.m:
                        w = w - self.op.gram(w[None], V)[0] @ V
        if not accepted:
            return W.new_zeros(0, self.n)
        return torch.stack(accepted)

    def _append(self, P: torch.Tensor, HP: torch.Tensor) -> None:
        m0, m = self.m, self.m + P.shape[0]
        self.V[m0:m] = P
        self.HV[m0:m] = HP
        self.m = m
        coupling = self.op.gram(self.V[:m], HP).to(torch.float64).cpu()  # (m, b): new columns of T = V·(HV)ᵀ
        T = torch.zeros(m, m, dtype=torch.float64)
        T[:m0, :m0] = self.T
        T[:, m0:] = coupling
        T[m0:, :m0] = coupling[:m0].T
        diagonal_block = coupling[m0:]
        T[m0:, m0:] = (diagonal_block + diagonal_block.T) / 2
        self.T = T

    def _restart(self, S: torch.Tensor, theta: torch.Tensor, order: torch.Tensor) -> None:
        """Thick restart: keep the most wanted Ritz vectors and their images (no new products)."""
        room = self.max_basis - 2 * self.block_size
        keep = max(self.k, min(room, self.k + (self.max_basis - self.k) // 2, self.m - 1))
        kept = order[:keep]
        rotation = S[:, kept].to(self.dtype).to(self.device)
        self.V[:keep] = (rotation.T @ self.V[: self.m]).clone()
        self.HV[:keep] = (rotation.T @ self.HV[: self.m]).clone()
        self.m = keep
        self.T = torch.diag(theta[kept])
        self.restarts += 1

    def _explicit(self, S, theta, wanted):
        """Ritz vectors of the wanted pairs and their true residual norms."""
        rotation = S[:, wanted].to(self.dtype).to(self.device)
        X = rotation.T @ self.V[: self.m]
        HX = rotation.T @ self.HV[: self.m]
        values = theta[wanted].to(self.dtype).to(self.device)
        residual = self.op.norms(HX - values[:, None] * X).to(torch.float64).cpu()
        return X, residual

    # -- the iteration ----------------------------------------------------------------------------

    def run(self, max_iter: int, progress: bool) -> None:
        steps = self.iterate(max_iter, progress)
        block = next(steps)
        try:
            while True:
                block = steps.send(self.op.matmat(block))
        except StopIteration:
            pass

    def iterate(self, max_iter: int, progress: bool):
        """The run as a generator: yields the next block of vectors, receives its product H·block."""
        from tqdm.auto import tqdm

        block = self._orthonormal_block(self._first_block(), self.block_size)
        bar = tqdm(total=max_iter, desc="lanczos", unit="step", disable=not progress, leave=False)
        try:
            while True:
                HP = yield block
                self.iterations += 1
                bar.update(1)
                self._append(block, HP)
                theta, S = torch.linalg.eigh(self.T)
                order = _wanted_order(theta, self.which)
                wanted = order[: self.k]
                exhausted = self.m >= self.dimension
                if exhausted:
                    next_block = None
                    estimates = torch.zeros_like(theta)
                else:
                    # The next block is H·(last block) made orthogonal to the basis; every Ritz
                    # residual lies in its span, so its coefficients give the residual norms cheaply.
                    next_block = self._orthonormal_block(HP, self.dimension - self.m)
                    coefficients = self.op.gram(self.HV[: self.m], next_block).to(torch.float64).cpu()
                    estimates = (coefficients.T @ S).norm(dim=0)
                bound, ok, threshold = _error_estimates(theta, estimates, wanted, self.tol, self.criterion, self.eps,
                                                    self.product_eps)
                bar.set_postfix(worst=f"{float((bound / threshold).max()):.2g}")
                out_of_steps = self.iterations >= max_iter
                ok = ok & (self.iterations >= self.min_iter)
                if bool(ok.all()) or exhausted or out_of_steps:
                    X, residual = self._explicit(S, theta, wanted)
                    checked = estimates.clone()
                    checked[wanted] = residual
                    bound, ok, _ = _error_estimates(theta, checked, wanted, self.tol, self.criterion, self.eps,
                                                      self.product_eps)
                    ok = ok & (self.iterations >= self.min_iter)
                    if bool(ok.all()) or exhausted or out_of_steps:
                        self.converged = bool(ok.all()) or exhausted
                        self._final = (theta[wanted], X, residual, bound)
                        return
                if self.m + next_block.shape[0] > self.max_basis:
                    self._restart(S, theta, order)
                block = next_block
        finally:
            bar.close()

    def ritz_vectors(self, count: int) -> torch.Tensor:
        """The ``count`` most wanted Ritz vectors of the final basis as unit rows (fewer when the basis is
        smaller), converged or not: computed from the basis, without products."""
        theta, S = torch.linalg.eigh(self.T)
        chosen = _wanted_order(theta, self.which)[: min(count, self.m)]
        X = S[:, chosen].to(self.dtype).to(self.device).T @ self.V[: self.m]
        return X / self.op.norms(X)[:, None]

    def result(self, seconds: float) -> EigenResult:
        values, X, residual, bound = self._final
        X = X / self.op.norms(X)[:, None]
        # Fix each eigenvector's sign (largest entry positive) so results are reproducible.
        X = X * self.op.pivot_signs(X)[:, None]
        if not self.converged:
            import warnings

            warnings.warn(
                f"Lanczos stopped after {self.iterations} steps without reaching tol={self.tol}; "
                "raise max_iter or max_basis, or loosen tol (float32 cannot reach much below 1e-5)",
                RuntimeWarning,
                stacklevel=3,
            )
        return EigenResult(
            eigenvalues=[float(v) for v in values],
            eigenvectors=X,
            residuals=[float(r) for r in residual],
            error_estimates=[float(b) for b in bound],
            converged=self.converged,
            which=self.which,
            tol=self.tol,
            criterion=self.criterion,
            block_size=self.block_size,
            max_basis=self.max_basis,
            iterations=self.iterations,
            restarts=self.restarts,
            hvps=self.op.hvps,
            seconds=seconds,
            **self.op.describe(),
        )
