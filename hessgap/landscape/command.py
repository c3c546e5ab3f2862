"""The ``hessgap landscape RUN_OR_MODEL`` command's run: the parsed options (:mod:`hessgap.cli.landscape_options`)
as the call's arguments, the call into the run folder (resumed when it exists) and the summary it prints."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .directions import HESSIAN_KINDS
from .grid import make_grid
from .result import LandscapeResult
from .surface import run_landscape

#: ``load(path) -> (model, training data, test data)`` for a saved network (file, train folder or run folder)
Loader = Callable[[str], tuple]


def _span(values: list[float] | None):
    if values is None:
        return None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return tuple(values)
    return (tuple(values[:2]), tuple(values[2:]))


def _steps(args: argparse.Namespace):
    return args.steps[0] if len(args.steps) == 1 else tuple(args.steps)


def _model_paths(args: argparse.Namespace) -> list[str] | None:
    """The saved networks ``--directions`` names, or None for random or Hessian directions."""
    if args.directions in ("random",) + HESSIAN_KINDS:
        return None
    return [path.strip() for path in args.directions.split(",") if path.strip()]


def check_grid(args: argparse.Namespace) -> None:
    """Refuse steps and spans that make no grid, before the run folder is made (the call itself checks them
    only once its directions are computed and saved there)."""
    paths = _model_paths(args)
    dims = args.dims or (len(paths) if paths else 2)
    span = _span(args.span)
    make_grid(dims, _steps(args), ((-1.0, 2.0) if paths else (-1.0, 1.0)) if span is None else span)


def options(args: argparse.Namespace, load: Loader) -> dict:
    """Keyword arguments of :func:`~hessgap.landscape.run_landscape` from the parsed command line."""
    paths = _model_paths(args)
    if paths is None:
        directions = args.directions
    else:
        models = [load(path)[0] for path in paths]
        directions = models[0] if len(models) == 1 else models
    return {
        "directions": directions, "dims": args.dims,
        "steps": _steps(args), "span": _span(args.span),
        "normalization": args.normalization, "ignore": None if args.ignore == "none" else args.ignore,
        "path": args.path, "batchnorm": args.batchnorm, "seed": args.seed, "max_batches": args.max_batches,
        "engine": args.engine, "memory_budget": int(args.memory_budget * 2**30),
        # the batch size makes the batches (and their statistics): a rerun with another one is named as such
        "data_settings": {"eval_batch": args.eval_batch},
    }


def summary(result: LandscapeResult) -> list[str]:
    """Lines for the terminal: the grid, the lowest loss and where, the time and the files."""
    grid = " × ".join(str(n) for n in result.loss.shape[::-1])
    lines = [f"landscape: {grid} points, {result.kind} directions, {result.engine} engine, {result.passes} pass(es), "
             f"{result.rows_resumed} row(s) resumed, {result.timing['total']:.1f} s"]
    finite = np.where(np.isfinite(result.loss), result.loss, np.inf)
    if np.isfinite(finite).any():
        index = np.unravel_index(np.argmin(finite), finite.shape)
        where = f"x = {result.x[index[-1]]:.3g}" + (f", y = {result.y[index[0]]:.3g}" if result.y is not None else "")
        lines.append(f"lowest training loss {finite[index]:.5g} at {where}")
    lines += [f"{name}: {path}" for name, path in result.files.items()]
    return lines


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"hessgap: warning: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, *, load: Loader, out_dir: str | Path) -> LandscapeResult:
    """The landscape of ``args.model`` into ``out_dir`` (resumed when it holds finished rows); prints a summary.
    Warnings (a large grid's size and time) are printed as they come, as one ``hessgap: warning:`` line each."""
    model, train_data, test_data = load(args.model)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        result = run_landscape(out_dir, model, train_data, test_data=test_data if args.test else None,
                               progress=not args.quiet, **options(args, load))
    print("\n".join(summary(result)))
    return result
