"""``hessgap.landscape``: loss and accuracy on a 1-D or 2-D grid around a model or between models.

Each pass over the data evaluates a block of grid rows: every batch is read and moved once and serves all
points of the block (see :mod:`.evaluate`). Without an output folder the whole grid is one pass; with one,
each row is a pass and is saved as soon as it is finished, so a rerun resumes where the last run stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._checks import choice, positive_int
from .._checks import seed as check_seed
from .._state import preserved
from ..curvature.objective import LossOverData
from ..errors import HessgapError
from ..names import BATCHNORM_MODES
from . import directions as dirs
from .evaluate import DEFAULT_MEMORY_BUDGET, Evaluator, set_batchnorm_mode
from .export import write_all
from .folder import LandscapeFolder, fingerprint
from .grid import make_grid
from .interpolation import PATHS, model_plane
from .plane import Plane, offset_plane
from .result import LandscapeResult

NAMED_DIRECTIONS = ("random",) + dirs.HESSIAN_KINDS


def _kind(directions, dims) -> tuple[str, int | None, list[nn.Module]]:
    """(kind, dims or None when the given tensors decide, other models) of the ``directions`` argument."""
    if dims is not None and dims not in (1, 2):
        raise HessgapError(f"dims must be 1 (a line) or 2 (a plane), got {dims!r}")
    if isinstance(directions, str):
        choice(directions, NAMED_DIRECTIONS, "directions")
        return directions, dims or 2, []
    models = [directions] if isinstance(directions, nn.Module) else (
        list(directions) if isinstance(directions, (list, tuple)) and any(isinstance(d, nn.Module) for d in directions)
        else None)
    if models is None:
        return "tensors", dims, []
    if len(models) > 2 or not all(isinstance(m, nn.Module) for m in models):
        raise HessgapError("directions as models takes one other model (a line or curve) or two (a plane), "
                           f"got {len(models)} items of types {', '.join(type(m).__name__ for m in models)}")
    if dims is not None and dims != len(models):
        raise HessgapError(f"dims={dims} does not match {len(models)} other model(s); leave dims out")
    return ("model" if len(models) == 1 else "models"), len(models), models


def _plane(kind, model, objective, dims, others, given, *, normalization, ignore, path, seed, loss_fn,
           max_batches, folder) -> Plane:
    names, params = objective.names, objective.params
    if kind in ("model", "models"):
        return model_plane(model, others, path, names)
    if kind == "tensors":
        return offset_plane(kind, names, params, given)
    stored = folder.load_directions() if folder is not None else None
    if stored is not None:
        flat, eigenvalues = stored["directions"], stored["eigenvalues"]
        if tuple(flat.shape) != (dims, objective.num_parameters):
            raise HessgapError(f"{folder.directions_path} holds directions of shape {tuple(flat.shape)}, expected "
                               f"({dims}, {objective.num_parameters}); the folder belongs to another model")
        axes = [dirs.split_flat(row, params) for row in flat]
    elif kind == "random":
        axes, eigenvalues = dirs.random_directions(params, dims, normalization, ignore, seed), None
    else:
        rows, eigenvalues = dirs.hessian_directions(model, objective.data, kind, dims, loss_fn=loss_fn,
                                                    max_batches=max_batches, seed=seed)
        axes = [dirs.split_flat(row, params) for row in rows]
    plane = offset_plane(kind, names, params, axes, eigenvalues)
    if folder is not None and stored is None:
        folder.save_directions(plane.directions, eigenvalues)
    return plane


def _as_array(values) -> np.ndarray:
    """JSON numbers back as floats (None, written for a non-finite value, as NaN)."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _row_values(passes, coefficients, plane, start: int, width: int, engine: str) -> dict:
    part = slice(start, start + width)
    row = {"engine": engine}
    for prefix, result in zip(("", "test_"), passes):
        row[prefix + "loss"] = result.loss[part].tolist()
        row[prefix + "accuracy"] = None if result.accuracy is None else result.accuracy[part].tolist()
        row[prefix + "samples"] = result.samples
    if plane.clamped:
        row["clamped_variances"] = plane.clamped_counts(coefficients[part]).tolist()
    return row


def landscape(model: nn.Module, data, *, directions="random", dims: int | None = None, steps=21, span=None,
              normalization: str = "filter", ignore: str | None = "biasbn", path: str = "linear",
              batchnorm: str = "eval", test_data=None, loss_fn=None, max_batches: int | None = None, seed: int = 0,
              engine: str = "auto", memory_budget: int | None = None, rows_per_pass: int | None = None,
              cache_batches: bool = True, out: str | Path | None = None, progress: bool = False,
              on_row=None) -> LandscapeResult:
    """Training (and test) loss and accuracy on a grid around ``model``'s weights x0, or between models.

    Around x0, the points are x0 + x·d1 (+ y·d2) with ``directions``:

    - ``"random"``: Gaussian directions drawn from ``seed``, normalized as Li et al. (2018):
      ``normalization="filter"`` (default), ``"layer"`` or ``"none"``; ``ignore="biasbn"`` (default) gives
      biases and BatchNorm parameters a zero direction, ``ignore=None`` keeps them.
    - ``"hessian"``: unit eigenvectors of the Hessian's largest eigenvalues (via :func:`hessgap.eigenvalues`);
      ``"hessian-min"``: the smallest (most negative) eigenvalue's on a line, largest and smallest on a plane.
    - tensors: a (dims, n) or (n,) tensor over the trainable parameters in ``model.parameters()`` order, or per
      direction a list of tensors shaped like the parameters.
    - another model (or two): the paper's parametric plots, ``path="linear"`` x(α) = (1 − α)x0 + α·x_B or
      ``path="curved"`` x(α) = cos(απ/2)x0 + sin(απ/2)x_B, with BatchNorm statistics interpolated like the
      weights (see :mod:`hessgap.landscape.interpolation`); two models span the plane
      (1 − a − b)x0 + a·x_B + b·x_C.

    ``dims`` is 1 or 2 (default: 2 for the named directions, else as many as given). ``steps`` points per
    axis (≥ 2; a pair (nx, ny) per axis) over ``span`` ((low, high) or r for (−r, r); per axis as a pair of
    pairs; default (−1, 1), (−1, 2) between models). ``batchnorm="eval"`` uses the running statistics;
    ``"train"`` normalizes each point with its own batch statistics (the model's buffers are not touched).
    Dropout is always off. ``data``/``test_data``, ``loss_fn`` and ``max_batches`` are as in
    :class:`~hessgap.curvature.objective.LossOverData`; the loss is the sample-weighted mean over the data.

    Evaluation: ``engine="auto"`` takes the layer-stack engine for plain ``nn.Sequential`` networks of
    standard layers and ``functional_call`` otherwise; points are evaluated in chunks sized to
    ``memory_budget`` bytes (default 2 GiB). ``rows_per_pass`` rows share one pass over the data (default:
    the whole grid, or 1 row with ``out``); with more than one pass the batches are held in memory
    (``cache_batches``), so every row sees the very same batches.

    ``out``: a run folder; finished rows are saved as they finish and a rerun skips them; the result is
    written there as JSON, ``.npz``, ``.vtp`` (2-D) and PNG plots. ``on_row(row, values)`` is called after
    each finished (and saved) row. The model is left exactly as it was.
    """
    started = time.perf_counter()
    choice(normalization, dirs.NORMALIZATIONS, "normalization")
    if ignore not in dirs.IGNORE:
        raise HessgapError(f"ignore must be 'biasbn' or None, got {ignore!r}")
    choice(path, PATHS, "path")
    choice(batchnorm, BATCHNORM_MODES, "batchnorm")
    seed = check_seed(seed)
    memory_budget = positive_int(memory_budget, "memory_budget", "bytes", allow_none=True) or DEFAULT_MEMORY_BUDGET
    rows_per_pass = positive_int(rows_per_pass, "rows_per_pass", allow_none=True)
    objective = LossOverData(model, data, loss_fn, max_batches=max_batches)
    test_objective = LossOverData(model, test_data, loss_fn, max_batches=max_batches) if test_data is not None else None
    kind, dims, others = _kind(directions, dims)
    given = dirs.given_directions(directions, objective.names, objective.params) if kind == "tensors" else None
    if given is not None:
        if dims is not None and dims != len(given):
            raise HessgapError(f"dims={dims} does not match the {len(given)} given direction(s); leave dims out")
        dims = len(given)
    # what decides the values: a run folder resumes only with the same
    settings = {
        "directions": kind, "dims": dims, "steps": steps, "span": span, "batchnorm": batchnorm, "seed": seed,
        "loss_fn": type(objective.loss_fn).__name__, "max_batches": max_batches, "test": test_data is not None,
    }
    if kind == "random":
        settings.update(normalization=normalization, ignore=ignore)
    if kind in ("model", "models"):
        settings["path"] = path
    objective.agree_across_ranks("the arguments of hessgap.landscape", settings)
    folder = _folder(out, settings, model, others, given) if out is not None else None

    with preserved(model):
        plane = _plane(kind, model, objective, dims, others, given, normalization=normalization, ignore=ignore,
                       path=path, seed=seed, loss_fn=loss_fn, max_batches=max_batches, folder=folder)
        seconds_directions = time.perf_counter() - started
        grid = make_grid(plane.dims, steps, span if span is not None else
                         ((-1.0, 2.0) if kind in ("model", "models") else (-1.0, 1.0)))
        set_batchnorm_mode(model, batchnorm)
        finished = folder.rows() if folder is not None else {}
        pending = [row for row in range(grid.rows) if row not in finished]
        per_pass = rows_per_pass or (1 if folder is not None else grid.rows)
        blocks = [pending[i : i + per_pass] for i in range(0, len(pending), per_pass)]
        evaluators = [
            Evaluator(model, one, plane, batchnorm=batchnorm, engine=engine, memory_budget=memory_budget,
                      cache_batches=cache_batches)
            for one in (objective, test_objective) if one is not None
        ]
        if len(blocks) > 1 and cache_batches:  # every block sees the very same batches, read once
            for evaluator in evaluators:
                evaluator.objective.cache_batches()
        evaluation_started = time.perf_counter()
        _evaluate_rows(blocks, grid, plane, evaluators, finished, folder, progress, on_row)
        seconds_evaluation = time.perf_counter() - evaluation_started

    result = LandscapeResult(
        x=grid.x, y=grid.y, loss=_surface(finished, grid, "loss"), accuracy=_surface(finished, grid, "accuracy"),
        test_loss=_surface(finished, grid, "test_loss"), test_accuracy=_surface(finished, grid, "test_accuracy"),
        directions=plane.directions, kind=kind, dims=plane.dims,
        settings=settings | {"span": [[float(a[0]), float(a[-1])] for a in (grid.x, grid.y) if a is not None],
                             "engine": engine, "rows_per_pass": per_pass, "memory_budget": memory_budget},
        eigenvalues=plane.eigenvalues, clamped_variances=_surface(finished, grid, "clamped_variances", np.int64),
        engine=finished[0]["engine"], fallback_reason=evaluators[0].fallback_reason if blocks else None,
        samples=finished[0]["samples"], test_samples=finished[0].get("test_samples"),
        passes=len(blocks), rows_resumed=grid.rows - len(pending),
        timing={"directions": seconds_directions, "evaluation": seconds_evaluation,
                "total": time.perf_counter() - started},
        files={},
    )
    if folder is not None:
        write_all(result, folder.results_dir, folder.figures_dir)
    return result


def _folder(out, settings: dict, model: nn.Module, others: list[nn.Module], given) -> LandscapeFolder:
    """The run folder, checked against these settings and models before any work is done."""
    models = {"model": fingerprint(model), "others": [fingerprint(m) for m in others]}
    if given is not None:
        flat = torch.cat([d.reshape(-1).double().cpu() for axis in given for d in axis])
        models["directions"] = {"sum": float(flat.sum()), "norm": float(flat.norm())}
    return LandscapeFolder(out, settings, models).open()


def _evaluate_rows(blocks, grid, plane, evaluators, finished: dict, folder, progress: bool, on_row) -> None:
    """Each block of rows in one pass over the data (and the test data); rows saved as their block finishes."""
    batches = [sum(1 for _ in e.objective.batches()) if e.objective.batches_cached else None for e in evaluators]
    width = len(grid.x)
    total = sum(len(block) for block in blocks) * width * sum(batches) if None not in batches else None
    with tqdm(total=total, desc="landscape", unit="point-batch", unit_scale=True, disable=not progress,
              leave=False) as bar:
        for block in blocks:
            coefficients = plane.coefficients(grid.points(block), evaluators[0].objective.params[0])
            passes = [e.run(coefficients, on_batch=bar.update) for e in evaluators]
            for i, row in enumerate(block):
                finished[row] = _row_values(passes, coefficients, plane, i * width, width, evaluators[0].engine.name)
            if folder is not None:
                folder.save_rows(finished)
            if on_row is not None:
                for row in block:
                    on_row(row, finished[row])


def _surface(finished: dict, grid, key: str, dtype=np.float64) -> np.ndarray | None:
    """One surface from the finished rows, shaped like the grid (None when the rows do not have it)."""
    if finished[0].get(key) is None:
        return None
    values = np.stack([_as_array(finished[row][key]) for row in range(grid.rows)])
    return values.reshape(grid.shape).astype(dtype)


def run_landscape(out_dir: str | Path, model: nn.Module, data, *, progress: bool = True, **options) -> LandscapeResult:
    """The command-line entry: :func:`landscape` into the run folder ``out_dir`` (resumes what it finds there)."""
    return landscape(model, data, out=out_dir, progress=progress, **options)
