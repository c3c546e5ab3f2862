"""The ``hessgap`` command line: the paper's experiments, one network at a time or all at once.

Every subcommand writes a run folder (``--out``, default ``./hessgap-runs/<name>``) with config.json,
results JSON, PNG figures and report.md; running the same command on the same folder resumes, and a
second process on a folder in use is refused. A measurement of a saved model records the file's sha256:
a model trained further gets a new default folder, and an old folder refuses it. A bad option value exits
with status 2 and the usage line; other user errors (bad names, missing data files, too large batches or
networks, damaged checkpoints) print one line and exit with status 1, without a traceback, and a command that
fails before it finished anything leaves no folder behind; an interrupted run exits with 130 and keeps what
it finished.

The parser (this module and :mod:`.options`) needs neither torch nor the experiments' modules, so
``hessgap --help`` answers at once; :mod:`.commands`, which runs them, is imported when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from .._version import __version__
from ..errors import HessgapError
from ..experiments.presets import DEMO_DATASET
from ..experiments.registry import EXPERIMENTS
from ..names import (
    BATCHNORM_MODES,
    OPTIMIZER_NAMES,
    PRESET_NAMES,
    REMEDY_NAMES,
    SHARPNESS_SOLVERS,
    TRAIN_TRACK_MEASURES,
)
from .landscape_options import add_parser as add_landscape_parser
from .measures_options import add_parsers as add_measures_parsers
from .options import (
    BATCHNORM_HELP,
    DEMO_DATASETS,
    PATH_CHOICES,
    SOLVER_HELP,
    BatchScheduleAction,
    Formatter,
    add_data_override,
    add_model_data_options,
    add_run_options,
    add_sharpness_options,
    add_training_options,
    add_warmstart_options,
    batch_size,
    csv,
    experiment_name,
    finite_float,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    remedy_name,
    track_name,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessgap",
        formatter_class=Formatter,
        description="Sharpness, Hessian spectra and the large-batch generalization gap (Keskar et al. 2017).\n"
                    "Each command writes a run folder with config.json, results/*.json, figures/*.png and "
                    "report.md;\nrunning it again on the same folder resumes where it stopped.",
        epilog="Start with `hessgap demo` (a few minutes on a CPU). `hessgap <command> --help` explains each option.",
    )
    parser.add_argument("--version", action="version", version=f"hessgap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    p = sub.add_parser("demo", formatter_class=Formatter, help="the paper's headline in minutes on a CPU",
                       description="Train an F1-type network on MNIST-1D (generated locally; or the embedded digits, "
                                   "--dataset) with a small (16) and a large (half the data) batch from the same "
                                   "start, for two seeds; print the generalization gap and both sharpness values "
                                   "(full space, ε = 1e-3) as mean ± std over the seeds, the top Hessian "
                                   "eigenvalues of both, and write the parametric plot and report.md.")
    p.add_argument("--dataset", choices=DEMO_DATASETS, default=DEMO_DATASET,
                   help="mnist1d: MNIST-1D generated locally, where the generalization gap shows; digits: "
                        "scikit-learn's handwritten digits (embedded), too easy for the gap to show "
                        f"(default: {DEMO_DATASET})")
    add_run_options(p, "demo-<dataset>")

    p = sub.add_parser("reproduce", formatter_class=Formatter, help="every experiment of the paper from a preset",
                       description="Run the paper's experiments in order: gap (Table 2), sharpness (Tables 3-4), "
                                   "parametric (Figs. 3, 7), spectrum, along_training (Fig. 6), sweep (Fig. 4), "
                                   "warmstart (Fig. 5), remedies (Appendix E). Presets: quick (F1 x0.5 on "
                                   "digits, minutes on a CPU), paper (the paper's settings, for a GPU). Options "
                                   "below override the preset.")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="settings to start from (default: quick)")
    p.add_argument("--experiments", type=csv(experiment_name),
                   help=f"comma-separated subset of {', '.join(EXPERIMENTS)} (default: all)")
    add_model_data_options(p, preset_defaults=True)
    add_training_options(p)
    add_sharpness_options(p)
    extra = p.add_argument_group("experiment details (defaults: the preset's)")
    extra.add_argument("--alphas", type=positive_int, help="points on each interpolation path (default: 25)")
    extra.add_argument("--spectrum-k", type=positive_int, help="top eigenvalues per network (quick: 5, paper: 10)")
    extra.add_argument("--sharpness-every", type=nonnegative_int,
                       help="measure sharpness every N epochs of the first seed, for Fig. 6 (quick: 5, paper: 5)")
    extra.add_argument("--trace-probes", type=nonnegative_int,
                       help="spectrum: also the Hessian trace with N Hutchinson probes, 0 = off (quick: 16, paper: 0)")
    extra.add_argument("--sweep-batches", type=csv(positive_int),
                       help="batch sizes of the sweep, comma-separated (quick: 16,64,256,1024)")
    add_warmstart_options(extra)
    extra.add_argument("--remedies", type=csv(remedy_name),
                       help=f"remedies to try: {', '.join(REMEDY_NAMES)} (default: all)")
    add_run_options(p, "reproduce-<preset>-<model>-<dataset>")

    p = sub.add_parser("train", formatter_class=Formatter, help="train one network (SB, LB or with a remedy)",
                       description="Train one network, checkpointed every epoch in --out (rerun to resume); "
                                   "writes model.pt for the sharpness, spectrum and interpolate commands.")
    add_model_data_options(p, preset_defaults=False)
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=batch_size, default="sb",
                   help="an integer, sb (256, the paper's small batch) or lb (10%% of the training set) (default: sb)")
    g.add_argument("--epochs", type=positive_int, default=10, help="epochs, the maximum with --patience (default: 10)")
    g.add_argument("--patience", type=positive_int, default=None,
                   help="stop when the training loss has not improved for this many epochs (default: off)")
    g.add_argument("--min-delta", type=nonnegative_float, default=0.0,
                   help="with --patience: a fall of the training loss by at most this much is no improvement "
                        "(default: 0)")
    g.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="adam", help="optimizer (default: adam, the paper's)")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default: 1e-3)")
    g.add_argument("--momentum", type=nonnegative_float, default=0.9, help="momentum of sgd (default: 0.9)")
    g.add_argument("--dropout", type=fraction, default=0.5, help="dropout of the C-networks' dense layers (default: 0.5)")
    g.add_argument("--eval-batch", type=positive_int, default=1024, help="batch size of evaluations (default: 1024)")
    g = p.add_argument_group("remedies (Appendix E)")
    g.add_argument("--remedy", choices=REMEDY_NAMES, default=None, help="train with a remedy (default: none)")
    g.add_argument("--prox-lambda", type=nonnegative_float, default=1e-3, help="conservative: proximal weight λ (default: 1e-3)")
    g.add_argument("--fgsm-epsilon", type=positive_float, default=0.1,
                   help="adversarial: FGSM step on the standardized inputs (default: 0.1)")
    g.add_argument("--batch-schedule", nargs=3, metavar=("START", "FINAL", "GROWTH"), action=BatchScheduleAction,
                   default=None,
                   help="dynamic: batch size START grown ×GROWTH per epoch up to FINAL (default: batch size, "
                        "10%% of the data, 1.2)")
    g = p.add_argument_group("sharpness along training")
    g.add_argument("--sharpness-every", type=nonnegative_int, default=0,
                   help="measure Metric 2.1 every N epochs, 0 = never (default: 0)")
    g.add_argument("--sharpness-epsilon", type=positive_float, default=1e-3, help="its ε (default: 1e-3)")
    g.add_argument("--sharpness-batches", type=positive_int, default=None,
                   help="over the first N evaluation batches (default: the whole training set)")
    g.add_argument("--sharpness-solver", choices=SHARPNESS_SOLVERS, default="auto",
                   help=f"{SOLVER_HELP} (default: auto)")
    g.add_argument("--sharpness-batchnorm", choices=BATCHNORM_MODES, default="eval",
                   help=f"{BATCHNORM_HELP} (default: eval)")
    g = p.add_argument_group("curvature step by step (hessgap.Tracker; does not change the run)")
    g.add_argument("--track", type=csv(track_name), default=None,
                   help=f"measures to take every --track-every optimizer steps, comma-separated: "
                        f"{', '.join(TRAIN_TRACK_MEASURES)} (eos_ratio: sgd only) (default: none)")
    g.add_argument("--track-every", type=positive_int, default=50, help="optimizer steps between records (default: 50)")
    g.add_argument("--track-batches", type=positive_int, default=1,
                   help="over the first N evaluation batches of the training set (default: 1)")
    add_run_options(p, "train-<model>-<dataset>-b<batch>-seed<seed>")

    p = sub.add_parser("sharpness", formatter_class=Formatter, help="sharpness (Metric 2.1) of a saved network",
                       description="Metric 2.1 of a network saved by `hessgap train`, over its training set.")
    p.add_argument("model_path", help="model.pt written by `hessgap train`, or its --out folder")
    p.add_argument("--epsilon", type=positive_float, nargs="+", default=[1e-3, 5e-4],
                   help="one or more box sizes ε (default: 1e-3 5e-4)")
    p.add_argument("--subspace-dim", type=nonnegative_int, default=0,
                   help="also measure in a random p-dimensional subspace (the paper: 100); 0 = full space only "
                        "(default: 0)")
    p.add_argument("--solver", choices=SHARPNESS_SOLVERS, default="auto", help=f"{SOLVER_HELP} (default: auto)")
    p.add_argument("--batchnorm", choices=BATCHNORM_MODES, default="eval", help=f"{BATCHNORM_HELP} (default: eval)")
    add_data_override(p)
    add_run_options(p, "sharpness-<model>-<sha256 prefix>")

    p = sub.add_parser("spectrum", formatter_class=Formatter, help="top Hessian eigenvalues, trace and density",
                       description="Hessian spectrum of a network saved by `hessgap train`, over its training set.")
    p.add_argument("model_path", help="model.pt written by `hessgap train`, or its --out folder")
    p.add_argument("--k", type=positive_int, default=10, help="number of top eigenvalues (Lanczos) (default: 10)")
    p.add_argument("--trace", action="store_true", help="also estimate the trace (Hutchinson)")
    p.add_argument("--density", action="store_true", help="also the spectral density and its plot (SLQ)")
    p.add_argument("--probes", type=positive_int, default=64, help="probe vectors of the trace (default: 64)")
    add_data_override(p)
    add_run_options(p, "spectrum-<model>-<sha256 prefix>")

    p = sub.add_parser("interpolate", formatter_class=Formatter, help="parametric plots between two saved networks",
                       description="Figures 3 and 7: loss and accuracy along x(α) = α x_B + (1 − α) x_A (linear) "
                                   "and sin(απ/2) x_B + cos(απ/2) x_A (curved). BatchNorm networks are evaluated "
                                   "in eval mode with interpolated running statistics.")
    p.add_argument("model_a", help="the network at α = 0 (x_SB in the paper): model.pt or a `hessgap train` folder")
    p.add_argument("model_b", help="the network at α = 1 (x_LB in the paper)")
    p.add_argument("--points", type=positive_int, default=25, help="values of α (default: 25)")
    p.add_argument("--alpha-min", type=finite_float, default=-1.0, help="first α (default: -1)")
    p.add_argument("--alpha-max", type=finite_float, default=2.0, help="last α (default: 2)")
    p.add_argument("--path", choices=PATH_CHOICES, default="both", help="which path (default: both)")
    p.add_argument("--data-root", default=None, help="data folder, when it moved since training (default: as trained)")
    p.add_argument("--eval-batch", type=positive_int, default=1024, help="batch size of evaluations (default: 1024)")
    add_run_options(p, "interpolate-<a>-<b>-<sha256 prefix>")

    for name, what, figure in (("sweep", "batch-size sweep", "Figure 4: test accuracy and sharpness vs batch size"),
                               ("warmstart", "warm-started LB", "Figure 5: LB runs started from the SB iterate after "
                                                               "every N-th epoch")):
        p = sub.add_parser(name, formatter_class=Formatter, help=f"{what} ({figure.split(':')[0]})",
                           description=f"{figure}. Defaults come from --preset; options override them.")
        p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="settings to start from (default: quick)")
        add_model_data_options(p, preset_defaults=True)
        add_training_options(p)
        add_sharpness_options(p)
        if name == "sweep":
            p.add_argument("--sweep-batches", type=csv(positive_int),
                           help="batch sizes, comma-separated (quick: 16,64,256,1024)")
        else:
            add_warmstart_options(p)
        add_run_options(p, f"{name}-<preset>-<model>-<dataset>")
    add_measures_parsers(sub)
    add_landscape_parser(sub)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``hessgap`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        from . import commands  # torch and the experiments: only once a command runs

        return commands.run(args)
    except HessgapError as exc:
        print(f"hessgap: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hessgap: interrupted; finished results and checkpoints are kept: rerun the same command to resume",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (`hessgap demo | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # unreadable folders, full disks: the user's environment, not a bug
        print(f"hessgap: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
