"""The options of ``hessgap measures`` (a saved network) and ``hessgap correlate`` (a zoo), without torch."""

from __future__ import annotations

import argparse
import json

from .. import names
from ..experiments.zoo import ZooSettings
from .options import (
    Formatter,
    add_data_override,
    add_run_options,
    csv,
    dataset_name,
    model_name,
    nonnegative_float,
    nonnegative_int,
    one_of,
    positive_float,
    positive_int,
)

measure_name = one_of(names.MEASURE_NAMES, "measure")
_DEFAULTS = ZooSettings()
SET_HELP = ("a measure's setting, MEASURE.SETTING=VALUE (repeatable), e.g. keskar.epsilon=5e-4 or "
            "gaussian.samples=64; `hessgap measures --help` lists the measures, their docs the settings")


def measure_setting(text: str) -> tuple[str, str, object]:
    """An argparse type: ``MEASURE.SETTING=VALUE``; the value is read as JSON (numbers, true/false, strings
    in quotes) or else kept as text."""
    key, sep, value = text.partition("=")
    measure, dot, setting = key.strip().partition(".")
    if not sep or not dot or not setting:
        raise argparse.ArgumentTypeError(f"expected MEASURE.SETTING=VALUE (e.g. keskar.epsilon=5e-4), got {text!r}")
    measure_name(measure)
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value.strip()
    return measure, setting.strip(), parsed


#: ``hessgap measures`` option (argparse dest) -> the LLC setting it gives
LLC_OPTIONS = {"llc_chains": "chains", "llc_draws": "draws", "llc_burn_in": "burn_in", "llc_step_size": "step_size",
               "llc_localization": "localization", "llc_n_beta": "n_beta"}


def options_from(sets, args=None) -> dict:
    """``--set`` items (and, from ``args``, the ``--llc-*`` options) as the ``options`` of
    :func:`hessgap.measures`."""
    options: dict = {}
    for measure, setting, value in sets or ():
        options.setdefault(measure, {})[setting] = value
    for dest, setting in LLC_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is not None:
            options.setdefault("llc", {})[setting] = value
    return options


def add_parsers(sub) -> None:
    p = sub.add_parser("measures", formatter_class=Formatter, help="every sharpness/flatness measure of a saved network",
                       description="Sharpness, flatness and norm measures of a network saved by `hessgap train`, "
                                   "over its training set: Keskar's Metric 2.1 (full, subspace), adaptive ℓ∞/ℓ2, "
                                   "m-sharpness, Gaussian (plain, adaptive), PAC-Bayes 1/σ² and 1/σ′², λmax and "
                                   "trace of H and of D·H·D, relative flatness, the Fisher–Rao norm; when named, "
                                   "the local learning coefficient (llc: SGLD chains, traces in figures/, "
                                   "diagnostics) and geodesic sharpness (geodesic); each checked for invariance on "
                                   "a function-preserving ReLU/BatchNorm/attention transform of the network.")
    p.add_argument("model_path", help="model.pt written by `hessgap train`, or its --out folder")
    p.add_argument("--names", type=csv(measure_name), default=None,
                   help=f"comma-separated measures (default: all but llc and geodesic): {', '.join(names.MEASURE_NAMES)}")
    p.add_argument("--no-invariance", action="store_true", help="skip the invariance check (about half the time)")
    p.add_argument("--set", dest="sets", type=measure_setting, action="append", metavar="MEASURE.SETTING=VALUE",
                   help=SET_HELP)
    g = p.add_argument_group("local learning coefficient (with --names llc; defaults: set from λmax and n/log n)")
    g.add_argument("--llc-chains", type=positive_int, help="SGLD chains (default: 4)")
    g.add_argument("--llc-draws", type=positive_int, help="steps averaged per chain after burn-in (default: 200)")
    g.add_argument("--llc-burn-in", type=nonnegative_int, help="steps left out at each chain's start (default: 100)")
    g.add_argument("--llc-step-size", type=positive_float, help="SGLD step ε (default: 0.08/(nβλmax + γ))")
    g.add_argument("--llc-localization", type=nonnegative_float,
                   help="pull γ towards the weights (default: 1e-3·nβλmax)")
    g.add_argument("--llc-n-beta", type=positive_float, help="nβ, the inverse temperature times n (default: n/log n)")
    add_data_override(p)
    add_run_options(p, "measures-<model>-<sha256 prefix>")

    d = _DEFAULTS
    p = sub.add_parser("correlate", formatter_class=Formatter, help="which measure predicts the generalization gap",
                       description="Train a zoo of networks (batch sizes × learning rates × widths × seeds on each "
                                   "data set), measure each with every measure of `hessgap measures`, and report "
                                   "Kendall's τ, Jiang et al.'s granulated τ and Dziugaite et al.'s sign-error "
                                   "(robust: the worst hyperparameter's) of each measure against the "
                                   "generalization gap, with scatter plots and report.md. Presets: quick (48 small "
                                   "F1 networks on MNIST-1D and digits, under 30 minutes on a 2-core CPU), full.")
    p.add_argument("--preset", choices=names.ZOO_PRESETS, default="quick", help="the zoo to start from (default: quick)")
    g = p.add_argument_group("zoo (defaults: the preset's)")
    g.add_argument("--datasets", type=csv(dataset_name),
                   help=f"data sets, comma-separated (quick: {','.join(d.datasets)}; cifar10/mnist need --data-root)")
    g.add_argument("--data-root", default=None, help="folder with MNIST's IDX files or CIFAR's python pickles")
    g.add_argument("--model", type=model_name, help=f"network (default: {d.model})")
    g.add_argument("--depth", type=positive_float, help=f"depth scale of the network (quick: {d.depth:g})")
    g.add_argument("--widths", type=csv(positive_float), help="width scales, comma-separated (quick: 0.25,0.5)")
    g.add_argument("--batch-sizes", type=csv(positive_int), help="batch sizes, comma-separated (quick: 32,128,512)")
    g.add_argument("--lrs", type=csv(positive_float), help="ADAM learning rates, comma-separated (quick: 0.001,0.003)")
    g.add_argument("--seeds", type=csv(nonnegative_int), help="seeds, comma-separated (quick: 0,1)")
    g.add_argument("--epochs", type=positive_int, help=f"epochs at the smallest batch (quick: {d.epochs})")
    g.add_argument("--lb-epochs", type=positive_int, help=f"epochs at the largest batch (quick: {d.lb_epochs})")
    g.add_argument("--min-train-acc", type=float,
                   help=f"exclude networks below this training accuracy, %% (quick: {d.min_train_acc:g})")
    g = p.add_argument_group("measures")
    g.add_argument("--names", type=csv(measure_name), default=None, help="measures, comma-separated (default: all)")
    g.add_argument("--set", dest="sets", type=measure_setting, action="append", metavar="MEASURE.SETTING=VALUE",
                   help=SET_HELP)
    g.add_argument("--measure-samples", type=nonnegative_int,
                   help=f"measure over the first N training samples, 0 = all (quick: {d.measure_samples})")
    g.add_argument("--invariance-models", type=positive_int,
                   help="check invariance on the first N included networks of each data set (default: 1)")
    g.add_argument("--eval-batch", type=positive_int, help=f"batch size of evaluations (default: {d.eval_batch})")
    add_run_options(p, "correlate-<preset>")


#: option (argparse dest) -> the ZooSettings field it overrides
ZOO_FIELDS = {"datasets": "datasets", "data_root": "data_root", "model": "model", "depth": "depth", "widths": "widths",
              "batch_sizes": "batch_sizes", "lrs": "lrs", "seeds": "seeds", "epochs": "epochs",
              "lb_epochs": "lb_epochs", "min_train_acc": "min_train_acc", "names": "measures",
              "invariance_models": "invariance_models", "eval_batch": "eval_batch"}


def zoo_from(args, base: ZooSettings) -> ZooSettings:
    """The preset's zoo with the command line's overrides."""
    changes = {field: getattr(args, arg) for arg, field in ZOO_FIELDS.items() if getattr(args, arg, None) is not None}
    if args.measure_samples is not None:
        changes["measure_samples"] = args.measure_samples or None
    if args.sets:
        changes["options"] = options_from(args.sets)
    changes["device"] = args.device
    return base.replace(**changes)
