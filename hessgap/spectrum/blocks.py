"""Per-block curvature: the top eigenvalues and the trace of every diagonal block H_jj of the Hessian at once.

A block is a group of parameters (one per module that owns parameters by default: a Linear's weight and
bias, a LayerNorm, an embedding; or one per parameter tensor; or blocks you name). H_jj is the Hessian of
f with respect to block j alone, the other parameters held fixed.

Every pass over the data serves all blocks: a direction of block j is zero outside block j, so H·v
restricted to block j is H_jj·v_j, and the directions of every block are stacked into one batched
Hessian-vector product. One block Lanczos run per block advances in lockstep (each yields its next block
of vectors; one product serves them all), and Hutchinson's probes of every block share the passes too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import _checks
from .._io import save_figure
from .._results import JsonResult
from ..curvature.gauss_newton import curvature_operator
from ..curvature.operator import CheckedOperator
from ..curvature.params import parameter_blocks
from ..curvature.probes import generator_for, rademacher
from ..errors import HessgapError
from .lanczos import BlockLanczos, basis_sizes


@dataclass(repr=False)
class BlockSpectrumResult(JsonResult):
    """Top eigenvalues and trace of every diagonal block of the Hessian, by block name.

    ``eigenvalues[j]`` are block j's ``k`` largest eigenvalues (descending), ``residuals[j]`` their
    residual norms (bounds on the distance to the nearest true eigenvalue of H_jj), ``converged[j]``
    whether Lanczos met ``tol``; ``traces[j]`` is Hutchinson's estimate of tr(H_jj) with its standard
    error (None without probes). ``passes`` counts the passes over the data, shared by all blocks.
    """

    blocks: list[str]
    sizes: list[int]
    eigenvalues: list[list[float]]
    residuals: list[list[float]]
    converged: list[bool]
    traces: list[float] | None
    trace_stderr: list[float] | None
    k: int
    num_probes: int
    hvps: int
    passes: int
    seconds: float
    n: int
    dtype: str
    model_dtype: str
    device: str
    path: str | None
    notes: list[str] = field(default_factory=list)

    def plot(self, path: str, *, title: str | None = None):
        """A bar plot per block of its top eigenvalue (and trace, when measured); returns ``path``.

        The axis is logarithmic, or symmetric-logarithmic when some value is ≤ 0 (an indefinite block's
        trace, a block whose largest eigenvalue is negative), so that no bar silently vanishes.
        """
        from matplotlib.figure import Figure

        count = len(self.blocks)
        figure = Figure(figsize=(max(6.4, 0.35 * count + 2), 4.2), dpi=110)
        axes = figure.add_subplot(1, 1, 1)
        positions = list(range(count))
        top = [values[0] for values in self.eigenvalues]
        width = 0.4 if self.traces is not None else 0.8
        axes.bar([p - width / 2 if self.traces is not None else p for p in positions], top, width=width,
                 color="tab:red", label="top eigenvalue λ_max(H_jj)")
        if self.traces is not None:
            axes.bar([p + width / 2 for p in positions], self.traces, width=width, color="tab:blue",
                     label="trace tr(H_jj)")
        scale, linthresh = axis_scale(top + (self.traces or []))
        if scale == "symlog":
            axes.set_yscale("symlog", linthresh=linthresh)
            axes.axhline(0.0, color="black", linewidth=0.6)
        else:
            axes.set_yscale("log")
        axes.set_xticks(positions, self.blocks, rotation=70, ha="right", fontsize=7)
        axes.set_ylabel("curvature of the block")
        axes.set_title(title or f"Per-block Hessian curvature ({count} blocks, n = {self.n})", fontsize=9)
        axes.legend(fontsize=8)
        axes.grid(True, axis="y", alpha=0.3)
        figure.tight_layout()
        save_figure(figure, path)
        return path


def axis_scale(values) -> tuple[str, float | None]:
    """``("log", None)`` for positive values; ``("symlog", linear threshold)`` when some are ≤ 0 (the linear
    part spans the smallest non-zero magnitude, or 1e-3 of the largest when that is smaller)."""
    finite = [abs(v) for v in values if v == v and abs(v) != float("inf")]
    if all(v > 0 for v in values):
        return "log", None
    largest = max(finite, default=1.0) or 1.0
    nonzero = [v for v in finite if v > 0]
    return "symlog", max(min(nonzero, default=largest), 1e-3 * largest)


#: Stacked, zero-padded probes of all blocks held at once when estimating the traces.
PROBE_BYTES = 512 * 2**20


class _BlockView:
    """Block j of the operator, as one Lanczos run sees it (its products come from the shared pass)."""

    def __init__(self, parent: CheckedOperator, columns: torch.Tensor, total_n: int):
        self.parent, self.columns = parent, columns
        self.n = int(columns.numel())  # this rank's shards of the block, for an FSDP2-sharded model
        self.total_n = total_n  # the block's size over every rank
        self.dtype, self.device, self.path = parent.dtype, parent.device, parent.path
        self.model_dtype = parent.model_dtype
        self.ranks, self.sharded = parent.ranks, parent.sharded
        self.hvps = 0
        # the vector algebra of the whole operator serves the block's vectors too (summed over the ranks when
        # the vectors are shards)
        self.gram, self.norms, self.pivot_signs, self.generator = parent.gram, parent.norms, parent.pivot_signs, parent.generator

    def describe(self) -> dict:
        return dict(self.parent.describe(), n=self.total_n)


def block_spectrum(
    model,
    data,
    *,
    blocks="module",
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    num_probes: int = 16,
    seed: int = 0,
    progress: bool = False,
    save_png: str | None = None,
    curvature: str = "hessian",
    **operator_options,
) -> BlockSpectrumResult:
    """Top-``k`` eigenvalues and the trace of every diagonal block of the Hessian, sharing every pass.

    ``blocks``: ``"module"`` (default: one block per module that owns parameters), ``"parameter"`` (one per
    parameter tensor), a list of module names, or a dict ``{block name: params}`` (names, tensors or modules,
    as ``params=``). ``num_probes`` Rademacher probes per block estimate each trace (0: no traces). The
    remaining keywords are those of :class:`~hessgap.curvature.operator.HessianOperator` (``loss_fn``,
    ``compute_loss``, ``weight_fn``, ``max_batches``, ``params``, ``train_mode``, ``group``, ...).
    ``save_png`` writes the per-block bar plot there (also :meth:`BlockSpectrumResult.plot`). ``curvature``
    takes the blocks of another matrix (``"ggn"``, ``"empirical-fisher"``, ``"true-fisher"``).
    """
    started = time.perf_counter()
    _checks.positive_int(k, "k", "the number of eigenvalues per block")
    _checks.positive_int(max_iter, "max_iter")
    _checks.nonnegative_int(num_probes, "num_probes", "Hutchinson probes per block (0: no traces)")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < 1):
        raise HessgapError(f"tol is a relative tolerance and must lie in (0, 1), got {tol!r}")
    hessian = curvature_operator(curvature, model, data, cache_batches=True, **operator_options)
    operator = CheckedOperator(hessian)
    groups = parameter_blocks(model, hessian.names, blocks)
    operator.ranks.agree("the arguments of hessgap.block_spectrum", (list(groups), k, tol, max_iter, num_probes, seed))
    # a direction's pieces: the parameters, or this rank's shards of them for an FSDP2-sharded model
    local = hessian.objective.vector_params
    offsets = torch.tensor([0] + [p.numel() for p in local]).cumsum(0).tolist()
    columns = {
        name: torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in members]).to(operator.device)
        for name, members in groups.items()
    }
    params = hessian.objective.params
    views = {name: _BlockView(operator, cols, sum(params[i].numel() for i in groups[name]))
             for name, cols in columns.items()}
    passes = 0

    def product(requests: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """H_jj·V_j for every block's vectors V_j, from one product of the stacked, zero-padded directions."""
        nonlocal passes
        rows = sum(V.shape[0] for V in requests.values())
        stacked = torch.zeros(rows, operator.n, dtype=operator.dtype, device=operator.device)
        start, spans = 0, {}
        for name, V in requests.items():
            stacked[start : start + V.shape[0]].index_copy_(1, columns[name], V.to(operator.dtype))
            spans[name] = (start, start + V.shape[0])
            start += V.shape[0]
        HV = operator.matmat(stacked)
        passes += 1
        out = {}
        for name, (a, b) in spans.items():
            out[name] = HV[a:b].index_select(1, columns[name])
            views[name].hvps += b - a
        return out

    eigen = _lockstep_lanczos(views, product, k, tol, max_iter, seed, progress)
    traces = stderr = None
    if num_probes:
        traces, stderr = _block_traces(views, product, num_probes, seed)
    names = list(groups)
    result = BlockSpectrumResult(
        blocks=names,
        sizes=[views[name].total_n for name in names],
        eigenvalues=[eigen[name][0] for name in names],
        residuals=[eigen[name][1] for name in names],
        converged=[eigen[name][2] for name in names],
        traces=[traces[name] for name in names] if traces else None,
        trace_stderr=[stderr[name] for name in names] if stderr else None,
        k=k,
        num_probes=num_probes,
        hvps=operator.hvps,
        passes=passes,
        seconds=time.perf_counter() - started,
        **operator.describe(),
    )
    if save_png is not None:
        result.plot(save_png)
    return result


def _lockstep_lanczos(views, product, k, tol, max_iter, seed, progress) -> dict:
    """(eigenvalues, residuals, converged) per block; every step multiplies every unfinished block at once."""
    solvers, pending = {}, {}
    for index, (name, view) in enumerate(views.items()):
        wanted = min(k, view.total_n)
        block_size, max_basis = basis_sizes(view.total_n, wanted, None, None)
        solver = BlockLanczos(view, wanted, "LA", float(tol), "eigenvalue", block_size, max_basis, seed + index)
        steps = solver.iterate(max_iter, progress=False)
        solvers[name] = (solver, steps)
        pending[name] = next(steps)
    from tqdm.auto import tqdm

    with tqdm(total=max_iter, desc="block lanczos", unit="step", disable=not progress, leave=False) as bar:
        while pending:
            products = product(pending)
            for name in list(pending):
                solver, steps = solvers[name]
                try:
                    pending[name] = steps.send(products[name])
                except StopIteration:
                    del pending[name]
            bar.update(1)
            bar.set_postfix(blocks_left=len(pending))
    out = {}
    for name, (solver, _) in solvers.items():
        found = solver.result(seconds=0.0)
        out[name] = (found.eigenvalues, found.residuals, found.converged)
    return out


def _block_traces(views, product, num_probes: int, seed: int) -> tuple[dict, dict]:
    """Hutchinson's tr(H_jj) per block with its standard error; each pass serves some probes of every block."""
    # sharded blocks: each rank draws its own shards of the probes, and every zᵀHz is summed over the ranks
    some = next(iter(views.values()))
    stream = 1_000_003 * some.ranks.rank if some.sharded else 0
    generators = {name: generator_for(view.device, seed + 7919 * (index + 1) + stream)
                  for index, (name, view) in enumerate(views.items())}
    itemsize = torch.empty(0, dtype=some.dtype).element_size()
    per_probe = len(views) * some.parent.n * itemsize  # one probe of every block, zero-padded to n
    chunk = max(1, min(num_probes, PROBE_BYTES // per_probe))
    estimates = {name: [] for name in views}
    done = 0
    while done < num_probes:
        rows = min(chunk, num_probes - done)
        probes = {name: rademacher(rows, view.n, dtype=view.dtype, device=view.device, generator=generators[name])
                  for name, view in views.items()}
        products = product(probes)
        for name, Z in probes.items():
            values = (Z.double() * products[name].double()).sum(dim=1)
            estimates[name].append(some.ranks.sum_(values) if some.sharded else values)
        done += rows
    traces, stderr = {}, {}
    for name in views:
        values = torch.cat(estimates[name])
        traces[name] = float(values.mean())
        stderr[name] = float(values.std() / num_probes**0.5) if num_probes > 1 else float("nan")
    return traces, stderr
