"""Results of the spectrum methods: plain numbers plus the tensors, each JSON-serializable via ``to_dict``.

Each says what it ran on: ``n``, ``dtype`` (of the vectors and sums: float32 for a half-precision model),
``model_dtype`` (the dtype the Hessian-vector products ran in), ``device``, ``path`` (fused or generic) and
``notes`` (what the products changed to run, e.g. attention on PyTorch's math kernels).
"""

from __future__ import annotations

import dataclasses

import torch

from .._results import JsonResult


@dataclasses.dataclass(repr=False)
class EigenResult(JsonResult):
    """Extreme eigenvalues of the Hessian found by (block) Lanczos.

    ``eigenvalues`` are ordered by ``which``: descending for "LA", ascending for "SA", by descending
    magnitude for "LM". ``eigenvectors`` (k × n, unit rows, same order) are left out of ``to_dict``;
    save them with :meth:`save_eigenvectors`. ``residuals`` are ‖H·v − λ·v‖ computed explicitly from
    the returned vectors: each bounds the distance from its eigenvalue to the nearest true one (up to the
    products' rounding). ``error_estimates`` are Kato–Temple estimates min(r, r²/gap) of |λ − λ_true|,
    usually much smaller than r but not guaranteed (see :func:`hessgap.eigenvalues`). ``ritz`` holds the
    final basis's most wanted Ritz vectors when ``ritz_vectors=`` asked for them (a warm start), else None.
    """

    eigenvalues: list[float]
    eigenvectors: torch.Tensor
    residuals: list[float]
    error_estimates: list[float]
    converged: bool
    which: str
    tol: float
    criterion: str
    block_size: int
    max_basis: int
    iterations: int
    restarts: int
    hvps: int
    seconds: float
    n: int
    dtype: str
    device: str
    path: str | None
    model_dtype: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    ritz: torch.Tensor | None = None

    _left_out = ("eigenvectors", "ritz")

    def save_eigenvectors(self, path: str) -> None:
        """Write the eigenvectors (k × n tensor, on CPU) with ``torch.save``."""
        torch.save(self.eigenvectors.detach().cpu(), path)


@dataclasses.dataclass(repr=False)
class TraceResult(JsonResult):
    """Hutchinson estimate of tr(H) with its standard error and a Student-t confidence interval.

    ``estimates`` holds zᵀHz for every Rademacher probe z; ``value`` is their mean. With one probe
    ``stderr`` and ``ci`` are None (no spread to estimate them from).
    """

    value: float
    stderr: float | None
    ci: tuple[float, float] | None
    confidence: float
    num_probes: int
    estimates: list[float]
    hvps: int
    seconds: float
    n: int
    dtype: str
    device: str
    path: str | None
    model_dtype: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    method: str = "hutchinson"  # or "hutch++", "adaptive-hutch++": value = low_rank + the mean of estimates
    low_rank: float = 0.0  # tr(QᵀHQ) over the Hutch++ sketch Q, taken exactly
    sketch: int = 0  # the rows of Q (products spent on it: twice that)


@dataclasses.dataclass(repr=False)
class DensityResult(JsonResult):
    """Spectral density of the Hessian by stochastic Lanczos quadrature.

    ``nodes[i]`` and ``weights[i]`` are the Ritz values and Gauss quadrature weights of probe i
    (weights sum to 1); ``density`` is their average, broadened by Gaussians of width ``sigma`` and
    evaluated on ``grid``, so it integrates to about 1 over a grid that covers the nodes; ``integral`` is
    its integral over the grid (the call warns when that is off by more than 2 %).
    """

    grid: list[float]
    density: list[float]
    nodes: list[list[float]]
    weights: list[list[float]]
    sigma: float
    integral: float
    num_probes: int
    lanczos_steps: int
    reorthogonalize: bool
    hvps: int
    seconds: float
    n: int
    dtype: str
    device: str
    path: str | None
    model_dtype: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def mean(self) -> float:
        """Σ weights·nodes averaged over probes: an estimate of tr(H) / n."""
        return sum(sum(w * x for w, x in zip(ws, xs)) for ws, xs in zip(self.weights, self.nodes)) / len(self.nodes)

    def plot(self, path: str, *, log: bool = True, title: str | None = None) -> str:
        """Write the density as a PNG (log scale by default, as Hessian spectra span decades); returns ``path``."""
        # A bare Figure renders with the Agg canvas and leaves pyplot's global backend alone.
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.4, 4.0), dpi=120)
        axes = figure.add_subplot(1, 1, 1)
        values = torch.tensor(self.density, dtype=torch.float64)
        if log:
            floor = max(float(values.max()) * 1e-8, 1e-300)
            axes.semilogy(self.grid, values.clamp_min(floor).tolist(), color="C0", linewidth=1.2)
            axes.set_ylim(bottom=floor)
        else:
            axes.plot(self.grid, values.tolist(), color="C0", linewidth=1.2)
        axes.set_xlabel("eigenvalue")
        axes.set_ylabel("density")
        axes.set_title(
            title
            if title is not None
            else f"Hessian spectral density (n={self.n}, {self.num_probes} probes × {self.lanczos_steps} Lanczos steps)",
            fontsize=9,
        )
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, format="png")
        return path
