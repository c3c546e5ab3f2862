"""``hessgap.landscape``: loss and accuracy on a 1-D or 2-D grid around a model or between models.

Each pass over the data evaluates a block of grid rows: every batch is read and moved once and serves all
points of the block (see :mod:`.evaluate`). Without an output folder the whole grid is one pass; with one,
each row is a pass and is saved as soon as it is finished, so a rerun resumes where the last run stopped.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from pathlib import Path

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from .._checks import choice, positive_int
from .._checks import seed as check_seed
from .._io import FolderLock
from .._state import preserved
from ..curvature.objective import LossOverData, check_finite_parameters
from ..distributed import Ranks
from ..errors import HessgapError
from ..names import BATCHNORM_MODES, CURVATURES
from . import directions as dirs
from .evaluate import DEFAULT_MEMORY_BUDGET, Evaluator, seconds_per_point, set_batchnorm_mode
from .export import write_all
from .fingerprint import data_digest, describe, loss_identity, model_digest, tensor_digest
from .folder import LandscapeFolder
from .grid import WARN_POINTS, make_grid
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
           max_batches, folder, curvature="hessian") -> Plane:
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
                                                    max_batches=max_batches, seed=seed, curvature=curvature)
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
              cache_batches: bool = True, out: str | Path | None = None, data_settings: dict | None = None,
              progress: bool = False, on_row=None, curvature: str = "hessian") -> LandscapeResult:
    """Training (and test) loss and accuracy on a grid around ``model``'s weights x0, or between models.

    Around x0, the points are x0 + x·d1 (+ y·d2) with ``directions``:

    - ``"random"``: Gaussian directions drawn from ``seed``, normalized as Li et al. (2018):
      ``normalization="filter"`` (default), ``"layer"`` or ``"none"``; ``ignore="biasbn"`` (default) gives
      biases and BatchNorm parameters a zero direction, ``ignore=None`` keeps them.
    - ``"hessian"``: unit eigenvectors of the Hessian's largest eigenvalues (via :func:`hessgap.eigenvalues`;
      ``curvature=`` takes them of the GGN or a Fisher instead, :data:`hessgap.names.CURVATURES`);
      ``"hessian-min"``: the smallest (most negative) eigenvalue's on a line, largest and smallest on a plane.
    - tensors: a (dims, n) or (n,) tensor over the trainable parameters in ``model.parameters()`` order, or per
      direction a list of tensors shaped like the parameters.
    - another model (or two): the paper's parametric plots, ``path="linear"`` x(α) = (1 − α)x0 + α·x_B or
      ``path="curved"`` x(α) = cos(απ/2)x0 + sin(απ/2)x_B, with BatchNorm statistics interpolated like the
      weights (see :mod:`hessgap.landscape.interpolation`); two models span the plane
      (1 − a − b)x0 + a·x_B + b·x_C.

    ``dims`` is 1 or 2 (default: 2 for the named directions, else as many as given). ``steps`` points per
    axis (≥ 2; a pair (nx, ny) per axis) over ``span`` ((low, high) or r for (−r, r); per axis as a pair of
    pairs; default (−1, 1), (−1, 2) between models). Each point is one evaluation of the loss over the data:
    a grid whose values would take more than half of the machine's memory is refused, and one of more than
    10⁴ points warns with a rough time (see :mod:`hessgap.landscape.grid`). ``batchnorm="eval"`` uses the
    running statistics; ``"train"`` normalizes each point with its own batch statistics (the model's buffers
    are not touched). Dropout is always off. ``data``/``test_data``, ``loss_fn`` and ``max_batches`` are as in
    :class:`~hessgap.curvature.objective.LossOverData`; the loss is the sample-weighted mean over the data. A
    point where the loss is not finite has NaN loss and accuracy. Parameters that hold NaN or inf (in the
    model or a model given as directions) are refused.

    Evaluation: ``engine="auto"`` takes the layer-stack engine for plain ``nn.Sequential`` networks of
    standard layers and ``functional_call`` otherwise; points are evaluated in chunks sized to
    ``memory_budget`` bytes (default 2 GiB). ``rows_per_pass`` rows share one pass over the data (default:
    the whole grid, or 1 row with ``out``); with more than one pass the batches are held in memory
    (``cache_batches``), so every row sees the very same batches.

    ``out``: a run folder, locked while the call runs (a second process is refused); finished rows are saved
    as they finish and a rerun skips them; the result is written there as JSON, ``.npz``, ``.vtp`` (2-D) and
    PNG plots. A rerun resumes only with the very same settings and inputs (the model's parameters and
    buffers, every byte of the batches used, the loss function, the directions: see
    :mod:`hessgap.landscape.fingerprint`), and otherwise raises an error that names what changed.
    ``data_settings`` (plain values, say the batch size that made ``data``) are kept with the settings and
    named when they change. ``on_row(row, values)`` is called after each finished (and saved) row. The model
    is left exactly as it was.

    On several ranks (torch.distributed) each rank passes its shard of the data and the same arguments: the
    ranks compare the arguments and the model first and all raise, naming what differs, when they disagree.
    """
    started = time.perf_counter()
    ranks, digests = Ranks.resolve(), {}
    if ranks.active:  # before anything that could fail on some ranks only, or run collectives that differ
        ranks.agree("the arguments of hessgap.landscape", describe({
            "directions": directions, "dims": dims, "steps": steps, "span": span,
            "normalization": normalization, "ignore": ignore, "path": path, "batchnorm": batchnorm,
            "test_data": "given" if test_data is not None else None, "loss_fn": loss_fn, "max_batches": max_batches,
            "seed": seed, "curvature": curvature, "engine": engine, "memory_budget": memory_budget, "rows_per_pass": rows_per_pass,
            "cache_batches": cache_batches, "out": None if out is None else str(out), "data_settings": data_settings,
            "trainable parameters": [n for n, p in model.named_parameters() if p.requires_grad]
            if isinstance(model, nn.Module) else type(model).__name__,
        }, digests))
        if isinstance(model, nn.Module):  # the same parameters and buffers, bit for bit
            ranks.agree_on_model("the model of hessgap.landscape", model)
    choice(normalization, dirs.NORMALIZATIONS, "normalization")
    choice(curvature, CURVATURES, "curvature")
    if ignore not in dirs.IGNORE:
        raise HessgapError(f"ignore must be 'biasbn' or None, got {ignore!r}")
    choice(path, PATHS, "path")
    choice(batchnorm, BATCHNORM_MODES, "batchnorm")
    seed = check_seed(seed)
    memory_budget = positive_int(memory_budget, "memory_budget", "bytes", allow_none=True) or DEFAULT_MEMORY_BUDGET
    rows_per_pass = positive_int(rows_per_pass, "rows_per_pass", allow_none=True)
    if data_settings is not None and not isinstance(data_settings, dict):
        raise HessgapError(f"data_settings must be a dict of plain values (say {{'batch_size': 128}}), got "
                           f"{type(data_settings).__name__}")
    # a shard that fails on one rank (no data) fails on every rank instead of leaving the others waiting
    objective = ranks.together(LossOverData, model, data, loss_fn, max_batches=max_batches)
    test_objective = (ranks.together(LossOverData, model, test_data, loss_fn, max_batches=max_batches)
                      if test_data is not None else None)
    kind, dims, others = _kind(directions, dims)
    given = dirs.given_directions(directions, objective.names, objective.params) if kind == "tensors" else None
    if given is not None:
        if dims is not None and dims != len(given):
            raise HessgapError(f"dims={dims} does not match the {len(given)} given direction(s); leave dims out")
        dims = len(given)
    grid = make_grid(dims, steps, span if span is not None else
                     ((-1.0, 2.0) if kind in ("model", "models") else (-1.0, 1.0)))  # refuses a grid too large
    objective.check_finite_parameters()
    for index, other in enumerate(others):
        which = "directions" if len(others) == 1 else f"directions[{index}]"
        ranks.together(check_finite_parameters, [p.detach() for p in other.parameters()],
                       [f"{name} of the other model ({which})" for name, _ in other.named_parameters()])
    # what decides the values: a run folder resumes only with the same (and the same fingerprint of the inputs)
    settings = {
        "directions": kind, "dims": dims, "steps": steps, "span": span, "batchnorm": batchnorm, "seed": seed,
        "max_batches": max_batches, "test": test_data is not None,
    }
    if kind == "random":
        settings.update(normalization=normalization, ignore=ignore)
    if kind in ("hessian", "hessian-min") and curvature != "hessian":
        settings.update(curvature=curvature)  # a Hessian run folder (written before curvature=) still resumes
    if kind in ("model", "models"):
        settings["path"] = path
    if data_settings is not None:
        settings["data_settings"] = data_settings
    objectives = [one for one in (objective, test_objective) if one is not None]
    per_pass = rows_per_pass or (1 if out is not None else grid.rows)

    with _locked(out, ranks), preserved(model):
        for one in objectives:
            # several passes, or one after the fingerprint's read of a one-shot iterator: every pass sees the
            # very same batches, read once
            if cache_batches and (grid.rows > per_pass or (out is not None and one.source.one_shot)):
                one.cache_batches()
        _warn_if_large(grid, objectives, ranks)
        folder = None
        if out is not None:
            inputs = _fingerprint(model, others, given, objective, test_objective, loss_fn, digests)
            folder = LandscapeFolder(out, settings, inputs).open()
        plane = _plane(kind, model, objective, dims, others, given, normalization=normalization, ignore=ignore,
                       path=path, seed=seed, loss_fn=loss_fn, max_batches=max_batches, folder=folder,
                       curvature=curvature)
        seconds_directions = time.perf_counter() - started
        set_batchnorm_mode(model, batchnorm)
        finished = folder.rows() if folder is not None else {}
        pending = [row for row in range(grid.rows) if row not in finished]
        blocks = [pending[i : i + per_pass] for i in range(0, len(pending), per_pass)]
        evaluators = [
            Evaluator(model, one, plane, batchnorm=batchnorm, engine=engine, memory_budget=memory_budget,
                      cache_batches=cache_batches)
            for one in objectives
        ]
        evaluation_started = time.perf_counter()
        _evaluate_rows(blocks, grid, plane, evaluators, finished, folder, progress, on_row)
        seconds_evaluation = time.perf_counter() - evaluation_started

        result = LandscapeResult(
            x=grid.x, y=grid.y, loss=_surface(finished, grid, "loss"), accuracy=_surface(finished, grid, "accuracy"),
            test_loss=_surface(finished, grid, "test_loss"),
            test_accuracy=_surface(finished, grid, "test_accuracy"),
            directions=plane.directions, kind=kind, dims=plane.dims,
            settings=settings | {"loss_fn": _loss_name(loss_fn),
                                 "span": [[float(a[0]), float(a[-1])] for a in (grid.x, grid.y) if a is not None],
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


def _fingerprint(model, others, given, objective, test_objective, loss_fn, digests: dict) -> dict:
    """Digests of everything the numbers are computed from (see :mod:`.fingerprint`); reads the data once.
    ``digests`` holds the models' digests already taken (by id)."""
    return {
        "model": digests.get(id(model)) or model_digest(model),
        "others": [digests.get(id(other)) or model_digest(other) for other in others],
        "directions": None if given is None else tensor_digest(
            (f"{axis} {name}", d) for axis, row in enumerate(given) for name, d in zip(objective.names, row)),
        "data": data_digest(objective),
        "test_data": None if test_objective is None else data_digest(test_objective),
        "loss_fn": loss_identity(loss_fn),
    }


@contextlib.contextmanager
def _locked(out, ranks: Ranks):
    """The run folder's lock for the whole call, as the command line takes it (none without a folder)."""
    if out is None:
        yield
        return
    lock = FolderLock(out)
    ranks.together(lock.acquire)  # rank 0 takes it for all; when it cannot, every rank raises
    try:
        yield
    finally:
        lock.release()


def _warn_if_large(grid, objectives: list[LossOverData], ranks: Ranks) -> None:
    """A warning with the number of points and a rough time when there are more than WARN_POINTS."""
    points = math.prod(grid.shape)
    if points <= WARN_POINTS:
        return
    times = [seconds_per_point(one) for one in objectives]
    if None in times:
        pace = "its time could not be estimated (the data cannot be read ahead: a one-shot iterator, or no len())"
    else:
        each = sum(times)
        pace = (f"about {_duration(points * each)} at {each:.3g} s a point (the forward pass on the first batch, "
                "timed, times the number of batches; the engines share work between points, so often less)")
    if ranks.rank == 0:
        warnings.warn(f"a landscape grid of {' × '.join(map(str, grid.shape[::-1]))} = {points} points, each one "
                      f"evaluation of the loss over the data: {pace}; pass fewer steps for a quicker look (grids of "
                      f"more than {WARN_POINTS} points get this warning)", stacklevel=4)


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def _loss_name(loss_fn) -> str:
    """A short name of the loss function for the result's settings (the fingerprint holds its identity)."""
    if loss_fn is None:
        return "default"
    if isinstance(loss_fn, functools.partial):
        return f"partial({_loss_name(loss_fn.func)})"
    return getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__


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
                folder.append_rows({row: finished[row] for row in block})
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
