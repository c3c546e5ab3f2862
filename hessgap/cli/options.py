"""The command line's option types and shared option groups, and how options override a preset.

Names come from :mod:`hessgap.names` (networks, data sets, remedies, optimizers, presets, solvers) and
from :mod:`hessgap.experiments.registry` (experiments); values are checked by :mod:`hessgap._checks`. An
argparse type turns a failed check into argparse's own words ("expected a positive integer, got 0",
"unknown model 'F9'; choose from F1, ..."), so a bad option exits with status 2 and the usage line.
This module imports no torch: ``hessgap --help`` stays instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import _checks, names
from ..errors import HessgapError
from ..experiments.presets import PATHS
from ..experiments.registry import EXPERIMENTS

DEFAULT_ROOT = Path("hessgap-runs")
#: The data sets the demo may use: those that need no files (digits is embedded, mnist1d generated).
DEMO_DATASETS = tuple(name for name in names.DATASET_NAMES if name not in names.DATASETS_ON_DISK)
#: --path of `interpolate`: one of the paths, or both.
PATH_CHOICES = (*PATHS, "both")


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=100)


# -- argparse types ------------------------------------------------------------------------------------

def checked(convert: Callable[[str], object], check: Callable, expected: str):
    """An argparse type: ``convert`` the text, then ``check(value, name)`` it (a :mod:`hessgap._checks`
    function); errors say what was expected."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            return check(value, "value")
        except HessgapError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}") from None

    return parse


positive_int = checked(int, _checks.positive_int, "a positive integer")
nonnegative_int = checked(int, _checks.nonnegative_int, "an integer >= 0")
nonnegative_float = checked(float, _checks.nonnegative_number, "a number >= 0")
positive_float = checked(float, _checks.positive_number, "a positive number")
seed = checked(int, _checks.seed, "an integer >= 0")
finite_float = checked(float, _checks.finite_number, "a finite number")
fraction = checked(float, _checks.in_unit_interval, "a number in [0, 1)")


class BatchScheduleAction(argparse.Action):
    """``--batch-schedule START FINAL GROWTH``: two batch sizes (positive integers) and a growth factor per
    epoch (a positive number; that it is at least 1 and START ≤ FINAL is checked with the training options)."""

    def __call__(self, parser, namespace, values, option_string=None):
        start, final, growth = values
        try:
            schedule = (positive_int(start), positive_int(final), positive_float(growth))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, schedule)


def named(normalize: Callable[[str], str], choices: Sequence[str], what: str):
    """An argparse type: ``normalize(text)`` (a :mod:`hessgap.names` function, or a check against
    ``choices``); an unknown name lists the choices."""

    def parse(text: str) -> str:
        try:
            return normalize(text)
        except HessgapError:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose from {', '.join(choices)}") from None

    return parse


def one_of(choices: Sequence[str], what: str):
    """An argparse type for one of ``choices`` (spelled exactly)."""
    return named(lambda text: _checks.choice(text, choices, what), choices, what)


model_name = named(names.model_name, names.MODEL_NAMES, "model")
dataset_name = named(names.dataset_name, names.DATASET_NAMES, "data set")
experiment_name = one_of(EXPERIMENTS, "experiment")
remedy_name = one_of(names.REMEDY_NAMES, "remedy")
track_name = one_of(names.TRAIN_TRACK_MEASURES, "tracked measure")


def batch_size(text: str):
    """An integer, or "sb" / "lb" (the paper's small and large batch)."""
    if text.lower() in ("sb", "lb"):
        return text.lower()
    return positive_int(text)


def csv(kind):
    """An argparse type: a comma-separated list, each item of type ``kind``; a tuple."""

    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return tuple(kind(t) for t in items)

    return parse


# -- shared option groups ------------------------------------------------------------------------------

def add_run_options(parser, default_out: str) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", type=Path, default=None,
                       help=f"run folder; rerunning on the same folder resumes; one process at a time "
                            f"(default: {DEFAULT_ROOT}/{default_out})")
    group.add_argument("--device", default="auto",
                       help="where to compute: auto (CUDA when available), cpu, cuda, cuda:1 ... (default: auto)")
    group.add_argument("--seed", type=seed, default=0,
                       help="random seed (initial weights, data order, random subspaces); default: 0")
    group.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads of torch; one thread is fastest for small networks and on shared "
                            "machines (default: 1 for demo and the quick preset, else torch's default)")
    group.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")


def add_model_data_options(parser, preset_defaults: bool) -> None:
    """Options that pick the network and data; ``preset_defaults`` says the defaults come from --preset."""
    d = (lambda text: "(default: the preset's)") if preset_defaults else (lambda text: f"(default: {text})")
    group = parser.add_argument_group("network and data")
    group.add_argument("--model", type=model_name, default=None if preset_defaults else "F1",
                       help=f"network of the paper: {', '.join(names.MODEL_NAMES)} {d('F1')}")
    group.add_argument("--dataset", type=dataset_name, default=None if preset_defaults else "digits",
                       help=f"data set: {', '.join(names.DATASET_NAMES)}; digits is embedded, mnist1d generated, the "
                            f"others are read from --data-root {d('digits')}")
    group.add_argument("--data-root", default=None,
                       help="folder with MNIST's IDX files or CIFAR's python pickles (default: none; not needed "
                            "for digits and mnist1d)")
    group.add_argument("--width", type=positive_float, default=None if preset_defaults else 1.0,
                       help=f"scale of every layer's units/channels (the paper: 1) {d('1.0')}")
    group.add_argument("--depth", type=positive_float, default=None if preset_defaults else 1.0,
                       help=f"scale of the number of repeated blocks (the paper: 1) {d('1.0')}")
    paper = (lambda quick, text: f"(quick: {quick}, paper: {text})") if preset_defaults else (
        lambda quick, text: f"(default: {quick}; the paper: {text})")
    group.add_argument("--preprocess", choices=names.PREPROCESS_NAMES, default=None if preset_defaults else "standardize",
                       help="standardize: inputs standardized per channel with the training split's statistics; none: "
                            f"pixels in [0, 1] as the authors' code fed them (MNIST-1D is the same either way) "
                            f"{paper('standardize', 'none')}")
    group.add_argument("--init", choices=names.INIT_NAMES, default=None if preset_defaults else "pytorch",
                       help="initial weights: pytorch (its default) or glorot (Glorot-uniform, zero biases: Keras's, "
                            f"the paper's) {paper('pytorch', 'glorot')}")
    group.add_argument("--conv-dropout", action=argparse.BooleanOptionalAction, default=None if preset_defaults else False,
                       help="C2/C4: the authors' dropout between convolutions (0.3 after the first, 0.4 after the others "
                            f"but each stack's last) and before the dense layer; other networks have none "
                            f"{paper('off', 'on')}")


def add_training_options(parser) -> None:
    """Training overrides of a preset (reproduce, sweep, warmstart)."""
    group = parser.add_argument_group("training (defaults: the preset's)")
    group.add_argument("--epochs", type=positive_int, help="epochs of SB runs (quick: 30, paper: 100)")
    group.add_argument("--lb-epochs", type=positive_int,
                       help="epochs of LB runs; batches in between get epochs geometrically in between "
                            "(quick: 150, paper: same as --epochs)")
    group.add_argument("--patience", type=positive_int,
                       help="stop when the training loss has not improved for this many epochs (quick: off, paper: 10)")
    group.add_argument("--stop", choices=names.STOP_RULES,
                       help="epochs: every run trains --epochs; plateau: the tables' SB and LB networks train until "
                            "the loss has not improved for --patience epochs, at most --max-epochs, while the sweep "
                            "and warm starts keep their fixed epochs, as in the paper (quick: epochs, paper: plateau)")
    group.add_argument("--max-epochs", type=positive_int,
                       help="with --stop plateau: at most this many epochs (default: 500)")
    group.add_argument("--min-delta", type=nonnegative_float,
                       help="a fall of the training loss by at most this much is no improvement (default: 0)")
    group.add_argument("--optimizer", choices=names.OPTIMIZER_NAMES,
                       help="adam (the paper) or sgd with momentum 0.9 (default: adam)")
    group.add_argument("--lr", type=positive_float, help="learning rate (default: 1e-3)")
    group.add_argument("--sb-batch", type=positive_int, help="small batch (quick: 16, paper: 256)")
    group.add_argument("--lb-batch", type=positive_int,
                       help="large batch (default: --lb-fraction of the training set)")
    group.add_argument("--lb-fraction", type=positive_float,
                       help="large batch as a fraction of the training set (quick: 0.5, paper: 0.1)")
    group.add_argument("--seeds", type=positive_int,
                       help="number of random starts, seeds --seed ... --seed+N-1 (quick: 2, paper: 5)")


SOLVER_HELP = ("maximizer of Metric 2.1: auto (the paper's L-BFGS-B and the sign ascent, keeping the larger value), "
               "box-ascent, lbfgsb (the paper's 10 iterations of L-BFGS-B) or lbfgsb-scipy (scipy's own, for reference)")


BATCHNORM_HELP = ("BatchNorm while sharpness is measured: eval (running statistics) or train (each batch's "
                  "statistics, dropout off, as the authors' Keras BatchNormalization(mode=2))")


def add_sharpness_options(parser) -> None:
    group = parser.add_argument_group("sharpness (defaults: the preset's)")
    group.add_argument("--epsilons", type=csv(positive_float),
                       help="box sizes ε of Metric 2.1, comma-separated (default: 1e-3,5e-4)")
    group.add_argument("--subspace-dim", type=nonnegative_int,
                       help="dimension p of the random subspace of Table 4; 0 = full space only (default: 100)")
    group.add_argument("--solver", choices=names.SHARPNESS_SOLVERS, help=f"{SOLVER_HELP} (quick: auto, paper: lbfgsb)")
    group.add_argument("--sharpness-batchnorm", choices=names.BATCHNORM_MODES, help=f"{BATCHNORM_HELP} (quick: eval, paper: train)")
    group.add_argument("--sharpness-batches", type=positive_int,
                       help="measure sharpness and spectra over the first N batches of --eval-batch training "
                            "samples (default: the whole training set)")
    group.add_argument("--eval-batch", type=positive_int, help="batch size of evaluations (default: 1024)")


def add_warmstart_options(parser) -> None:
    parser.add_argument("--warm-sb-epochs", type=positive_int, help="warm start: SB epochs (quick: 10, paper: 100)")
    parser.add_argument("--warm-lb-epochs", type=positive_int,
                        help="warm start: LB epochs from each SB iterate (quick: 60, paper: 100)")
    parser.add_argument("--warm-every", type=positive_int,
                        help="warm start: from the SB iterate of every N-th epoch (quick: 2, paper: 1, the paper's)")


def add_data_override(parser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data-root", default=None, help="data folder, when it moved since training (default: as trained)")
    group.add_argument("--max-batches", type=positive_int, default=None,
                       help="use only the first N batches of --eval-batch training samples (default: all)")
    group.add_argument("--eval-batch", type=positive_int, default=1024, help="batch size (default: 1024)")


# -- options over a preset -----------------------------------------------------------------------------

#: option (argparse dest) -> the Settings field it overrides
SETTINGS_FIELDS = {
    "model": "model", "dataset": "dataset", "data_root": "data_root", "width": "width", "depth": "depth",
    "epochs": "epochs", "patience": "patience", "optimizer": "optimizer", "lr": "lr", "sb_batch": "sb_batch",
    "lb_batch": "lb_batch", "lb_fraction": "lb_fraction", "seeds": "seeds", "epsilons": "epsilons",
    "solver": "sharpness_solver", "sharpness_batches": "sharpness_batches", "eval_batch": "eval_batch",
    "sharpness_every": "sharpness_every", "spectrum_k": "spectrum_k", "trace_probes": "trace_probes",
    "alphas": "alphas",
    "sweep_batches": "sweep_batches", "warm_sb_epochs": "warmstart_sb_epochs",
    "warm_lb_epochs": "warmstart_lb_epochs", "warm_every": "warmstart_every", "lb_epochs": "lb_epochs",
    "remedies": "remedies", "experiments": "experiments", "stop": "stop", "max_epochs": "max_epochs",
    "min_delta": "min_delta", "preprocess": "preprocess", "init": "init", "conv_dropout": "conv_dropout",
    "sharpness_batchnorm": "sharpness_batchnorm",
}


def settings_from(args, base):
    """Apply the command line's overrides to a preset's :class:`~hessgap.experiments.presets.Settings`."""
    changes = {}
    for arg, field in SETTINGS_FIELDS.items():
        value = getattr(args, arg, None)
        if value is not None:
            changes[field] = value
    if getattr(args, "subspace_dim", None) is not None:
        changes["subspace_dim"] = args.subspace_dim or None
    changes["seed"] = args.seed
    changes["device"] = args.device
    return base.replace(**changes)
