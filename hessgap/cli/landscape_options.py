"""The options of ``hessgap landscape RUN_OR_MODEL``, without torch (the run is :mod:`hessgap.landscape.command`)."""

from __future__ import annotations

import argparse
import math

from .. import names
from .options import Formatter, add_run_options, positive_float, positive_int


def _numbers(kind, counts: tuple[int, ...], what: str, valid=lambda value: True):
    """An argparse type: comma-separated numbers, as many as one of ``counts``, each one ``valid``."""

    def parse(text: str):
        try:
            values = [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if len(values) not in counts or not all(valid(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


def add_parser(sub) -> None:
    p = sub.add_parser("landscape", formatter_class=Formatter, help="1-D/2-D loss landscape of a saved network",
                       description="The training loss (and accuracy) on a line or a plane through a network saved "
                                   "by `hessgap train`: along filter-normalized random directions (Li et al.), the "
                                   "Hessian's top eigenvectors, or towards other saved networks (the paper's "
                                   "Figures 3 and 7). Many grid points share each pass over the data; finished rows "
                                   "are saved as they finish and a rerun resumes. Writes landscape.json/.npz, a VTK "
                                   "surface (.vtp) and PNG plots.")
    p.add_argument("model", metavar="RUN_OR_MODEL",
                   help="a network saved by `hessgap train` (model.pt or its folder) or a training run folder")
    group = p.add_argument_group("landscape")
    group.add_argument("--directions", default="random", metavar="random|hessian|hessian-min|MODEL[,MODEL]",
                       help="random (filter-normalized, Li et al.), the Hessian's top eigenvectors, its top and "
                            "most negative ones, or one saved network (the paper's path from RUN_OR_MODEL to it) "
                            "or two (the plane through the three); default: random")
    group.add_argument("--dims", type=int, choices=(1, 2), default=None,
                       help="1 (a line) or 2 (a plane); default: 2, or as many as the models given")
    group.add_argument("--steps", type=_numbers(int, (1, 2), "N or NX,NY, each at least 2", lambda n: n >= 2),
                       default=[21],
                       help="points per axis, both ends included (default: 21)")
    group.add_argument("--span", type=_numbers(float, (1, 2, 4), "finite numbers R, LOW,HIGH or XLOW,XHIGH,YLOW,YHIGH",
                                               math.isfinite),
                       default=None, help="coordinates per axis: R for -R..R, LOW,HIGH, or per axis "
                                          "(default: -1,1; -1,2 between models)")
    group.add_argument("--normalization", choices=names.LANDSCAPE_NORMALIZATIONS, default="filter",
                       help="of random directions (default: filter)")
    group.add_argument("--ignore", choices=("biasbn", "none"), default="biasbn",
                       help="biasbn: random directions leave biases and BatchNorm alone (default)")
    group.add_argument("--path", choices=names.INTERPOLATION_PATHS, default="linear",
                       help="between two models: the line or the paper's curve (default: linear)")
    group.add_argument("--batchnorm", choices=names.BATCHNORM_MODES, default="eval",
                       help="eval: running statistics (default); train: each point's batch statistics")
    group.add_argument("--test", action="store_true", help="also the test set's loss and accuracy")
    group.add_argument("--engine", choices=names.LANDSCAPE_ENGINES, default="auto",
                       help="evaluation engine (default: auto)")
    group.add_argument("--memory-budget", type=positive_float, default=2.0, metavar="GIB",
                       help="memory for the points evaluated together, in GiB (default: 2)")
    group = p.add_argument_group("data")
    group.add_argument("--data-root", default=None, help="data folder, when it moved since training (default: as trained)")
    group.add_argument("--eval-batch", type=positive_int, default=1024, help="batch size (default: 1024)")
    group.add_argument("--max-batches", type=positive_int, default=None,
                       help="use only the first N batches of --eval-batch training samples (default: all)")
    add_run_options(p, "landscape-<model>-<sha256 prefix>")
