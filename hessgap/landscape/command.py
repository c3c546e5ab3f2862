"""The ``hessgap landscape RUN_OR_MODEL`` command: its options and its run, for the command line to call.

The command line adds these options to its ``landscape`` subcommand with :func:`add_arguments` (its shared
run options, ``--out --device --seed --threads --quiet``, come from the command line itself) and calls
:func:`run` with a function that loads a saved network and its data; the run folder is resumed when it exists.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .directions import HESSIAN_KINDS, NORMALIZATIONS
from .evaluate import BATCHNORM_MODES, ENGINES
from .interpolation import PATHS
from .result import LandscapeResult
from .surface import run_landscape

#: ``load(path) -> (model, training data, test data)`` for a saved network (file, train folder or run folder)
Loader = Callable[[str], tuple]


def _numbers(kind, counts: tuple[int, ...], what: str):
    def parse(text: str):
        try:
            values = [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if len(values) not in counts:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The landscape's own arguments (the model, directions, grid, BatchNorm mode, data and evaluation)."""
    parser.add_argument("model", metavar="RUN_OR_MODEL",
                        help="a network saved by `hessgap train` (model.pt or its folder) or a training run folder")
    group = parser.add_argument_group("landscape")
    group.add_argument("--directions", default="random", metavar="random|hessian|hessian-min|MODEL[,MODEL]",
                       help="random (filter-normalized, Li et al.), the Hessian's top eigenvectors, its top and "
                            "most negative ones, or one saved network (the paper's path from RUN_OR_MODEL to it) "
                            "or two (the plane through the three); default: random")
    group.add_argument("--dims", type=int, choices=(1, 2), default=None,
                       help="1 (a line) or 2 (a plane); default: 2, or as many as the models given")
    group.add_argument("--steps", type=_numbers(int, (1, 2), "N or NX,NY"), default=[21],
                       help="points per axis, both ends included (default: 21)")
    group.add_argument("--span", type=_numbers(float, (1, 2, 4), "R, LOW,HIGH or XLOW,XHIGH,YLOW,YHIGH"),
                       default=None, help="coordinates per axis: R for -R..R, LOW,HIGH, or per axis "
                                          "(default: -1,1; -1,2 between models)")
    group.add_argument("--normalization", choices=NORMALIZATIONS, default="filter",
                       help="of random directions (default: filter)")
    group.add_argument("--ignore", choices=("biasbn", "none"), default="biasbn",
                       help="biasbn: random directions leave biases and BatchNorm alone (default)")
    group.add_argument("--path", choices=PATHS, default="linear",
                       help="between two models: the line or the paper's curve (default: linear)")
    group.add_argument("--batchnorm", choices=BATCHNORM_MODES, default="eval",
                       help="eval: running statistics (default); train: each point's batch statistics")
    group.add_argument("--test", action="store_true", help="also the test set's loss and accuracy")
    group.add_argument("--data-root", default=None, help="where the network's data set is, when it moved")
    group.add_argument("--eval-batch", type=int, default=1024, help="batch size of the evaluation (default: 1024)")
    group.add_argument("--max-batches", type=int, default=None, help="only the first N batches of the data")
    group.add_argument("--engine", choices=ENGINES, default="auto", help="evaluation engine (default: auto)")
    group.add_argument("--memory-budget", type=float, default=2.0, metavar="GIB",
                       help="memory for the points evaluated together, in GiB (default: 2)")


def _span(values: list[float] | None):
    if values is None:
        return None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return tuple(values)
    return (tuple(values[:2]), tuple(values[2:]))


def options(args: argparse.Namespace, load: Loader) -> dict:
    """Keyword arguments of :func:`~hessgap.landscape.run_landscape` from the parsed command line."""
    if args.directions in ("random",) + HESSIAN_KINDS:
        directions = args.directions
    else:
        models = [load(path.strip())[0] for path in args.directions.split(",") if path.strip()]
        directions = models[0] if len(models) == 1 else models
    return {
        "directions": directions, "dims": args.dims,
        "steps": args.steps[0] if len(args.steps) == 1 else tuple(args.steps), "span": _span(args.span),
        "normalization": args.normalization, "ignore": None if args.ignore == "none" else args.ignore,
        "path": args.path, "batchnorm": args.batchnorm, "seed": args.seed, "max_batches": args.max_batches,
        "engine": args.engine, "memory_budget": int(args.memory_budget * 2**30),
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


def run(args: argparse.Namespace, *, load: Loader, out_dir: str | Path) -> LandscapeResult:
    """The landscape of ``args.model`` into ``out_dir`` (resumed when it holds finished rows); prints a summary."""
    model, train_data, test_data = load(args.model)
    result = run_landscape(out_dir, model, train_data, test_data=test_data if args.test else None,
                           progress=not args.quiet, **options(args, load))
    print("\n".join(summary(result)))
    return result
