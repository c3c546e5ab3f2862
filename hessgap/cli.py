"""The ``hessgap`` command line: the paper's experiments, one network at a time or all at once.

Every subcommand writes a run folder (``--out``, default ``./hessgap-runs/<name>``) with config.json,
results JSON, PNG figures and report.md; running the same command on the same folder resumes. User
errors (bad names, missing data files, too large batches, damaged checkpoints) print one line and exit
with status 1, without a traceback; an interrupted run exits with 130 and keeps what it finished.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import HessgapError

DEFAULT_ROOT = Path("hessgap-runs")
MODEL_NAMES = ("F1", "F2", "C1", "C2", "C3", "C4")
DATASET_NAMES = ("digits", "mnist1d", "mnist", "cifar10", "cifar100")
EXPERIMENT_NAMES = ("gap", "sharpness", "parametric", "spectrum", "along_training", "sweep", "warmstart", "remedies")
REMEDY_NAMES = ("augment", "conservative", "adversarial", "dynamic")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=100)


def _say(message: str) -> None:
    """Progress messages that do not break tqdm's bars."""
    try:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(message, file=sys.stderr)


def _checked(convert, accept, expected: str):
    """An argparse type: ``convert`` the text, then require ``accept(value)``; errors say what was expected."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v > 0, "a positive integer")
_nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: v > 0, "a positive number")


def _batch_size(text: str):
    if text.lower() in ("sb", "lb"):
        return text.lower()
    return _positive_int(text)


def _model_name(text: str) -> str:
    if text.upper() not in MODEL_NAMES:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose from {', '.join(MODEL_NAMES)}")
    return text.upper()


def _dataset_name(text: str) -> str:
    key = text.lower().replace("-", "").replace("_", "")
    if key not in DATASET_NAMES:
        raise argparse.ArgumentTypeError(f"unknown data set {text!r}; choose from {', '.join(DATASET_NAMES)}")
    return key


def _csv(kind, choices=None):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        values = [kind(t) for t in items]
        if choices is not None:
            bad = [v for v in values if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {', '.join(map(str, bad))}; choose from {', '.join(choices)}")
        return tuple(values)

    return parse


# -- shared option groups ------------------------------------------------------------------------------

def _add_run_options(parser, default_out: str) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", type=Path, default=None,
                       help=f"run folder; rerunning on the same folder resumes (default: {DEFAULT_ROOT}/{default_out})")
    group.add_argument("--device", default="auto",
                       help="where to compute: auto (CUDA when available), cpu, cuda, cuda:1 ... (default: auto)")
    group.add_argument("--seed", type=int, default=0,
                       help="random seed (initial weights, data order, random subspaces); default: 0")
    group.add_argument("--threads", type=_positive_int, default=None,
                       help="CPU threads of torch; one thread is fastest for small networks and on shared "
                            "machines (default: 1 for demo and the quick preset, else torch's default)")
    group.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")


def _add_model_data_options(parser, preset_defaults: bool) -> None:
    """Options that pick the network and data; ``preset_defaults`` says the defaults come from --preset."""
    d = (lambda text: "(default: the preset's)") if preset_defaults else (lambda text: f"(default: {text})")
    group = parser.add_argument_group("network and data")
    group.add_argument("--model", type=_model_name, default=None if preset_defaults else "F1",
                       help=f"network of the paper: {', '.join(MODEL_NAMES)} {d('F1')}")
    group.add_argument("--dataset", type=_dataset_name, default=None if preset_defaults else "digits",
                       help=f"data set: {', '.join(DATASET_NAMES)}; digits is embedded, mnist1d generated, the "
                            f"others are read from --data-root {d('digits')}")
    group.add_argument("--data-root", default=None,
                       help="folder with MNIST's IDX files or CIFAR's python pickles (default: none; not needed "
                            "for digits and mnist1d)")
    group.add_argument("--width", type=_positive_float, default=None if preset_defaults else 1.0,
                       help=f"scale of every layer's units/channels (the paper: 1) {d('1.0')}")
    group.add_argument("--depth", type=_positive_float, default=None if preset_defaults else 1.0,
                       help=f"scale of the number of repeated blocks (the paper: 1) {d('1.0')}")


def _add_training_options(parser) -> None:
    """Training overrides of a preset (reproduce, sweep, warmstart)."""
    group = parser.add_argument_group("training (defaults: the preset's)")
    group.add_argument("--epochs", type=_positive_int, help="epochs of SB runs (quick: 30, paper: 100)")
    group.add_argument("--lb-epochs", type=_positive_int,
                       help="epochs of LB runs; batches in between get epochs geometrically in between "
                            "(quick: 150, paper: same as --epochs)")
    group.add_argument("--patience", type=_positive_int,
                       help="stop when the training loss has not improved for this many epochs (default: off)")
    group.add_argument("--optimizer", choices=("adam", "sgd"), help="adam (the paper) or sgd with momentum 0.9 (default: adam)")
    group.add_argument("--lr", type=_positive_float, help="learning rate (default: 1e-3)")
    group.add_argument("--sb-batch", type=_positive_int, help="small batch (quick: 16, paper: 256)")
    group.add_argument("--lb-batch", type=_positive_int,
                       help="large batch (default: --lb-fraction of the training set)")
    group.add_argument("--lb-fraction", type=_positive_float,
                       help="large batch as a fraction of the training set (quick: 0.5, paper: 0.1)")
    group.add_argument("--seeds", type=_positive_int,
                       help="number of random starts, seeds --seed ... --seed+N-1 (quick: 2, paper: 5)")


def _add_sharpness_options(parser) -> None:
    group = parser.add_argument_group("sharpness (defaults: the preset's)")
    group.add_argument("--epsilons", type=_csv(_positive_float),
                       help="box sizes ε of Metric 2.1, comma-separated (default: 1e-3,5e-4)")
    group.add_argument("--subspace-dim", type=_nonneg_int,
                       help="dimension p of the random subspace of Table 4; 0 = full space only (default: 100)")
    group.add_argument("--solver", choices=("box-ascent", "lbfgsb"),
                       help="maximizer of Metric 2.1: box-ascent (default) or lbfgsb (the paper's L-BFGS-B)")
    group.add_argument("--sharpness-batches", type=_positive_int,
                       help="measure sharpness and spectra over the first N batches of --eval-batch training "
                            "samples (default: the whole training set)")
    group.add_argument("--eval-batch", type=_positive_int, help="batch size of evaluations (default: 1024)")


def _settings_from(args, base):
    """Apply the command line's overrides to a preset's :class:`Settings`."""
    changes = {}
    mapping = {
        "model": "model", "dataset": "dataset", "data_root": "data_root", "width": "width", "depth": "depth",
        "epochs": "epochs", "patience": "patience", "optimizer": "optimizer", "lr": "lr", "sb_batch": "sb_batch",
        "lb_batch": "lb_batch", "lb_fraction": "lb_fraction", "seeds": "seeds", "epsilons": "epsilons",
        "solver": "sharpness_solver", "sharpness_batches": "sharpness_batches", "eval_batch": "eval_batch",
        "sharpness_every": "sharpness_every", "spectrum_k": "spectrum_k", "trace_probes": "trace_probes",
        "alphas": "alphas",
        "sweep_batches": "sweep_batches", "warm_sb_epochs": "warmstart_sb_epochs",
        "warm_lb_epochs": "warmstart_lb_epochs", "warm_every": "warmstart_every", "lb_epochs": "lb_epochs",
        "remedies": "remedies", "experiments": "experiments",
    }
    for arg, field in mapping.items():
        value = getattr(args, arg, None)
        if value is not None:
            changes[field] = value
    if getattr(args, "subspace_dim", None) is not None:
        changes["subspace_dim"] = args.subspace_dim or None
    changes["seed"] = args.seed
    changes["device"] = args.device
    return base.replace(**changes)


def _check_data(settings) -> None:
    """Load the data before any folder is made: a missing data set fails at once, with its message."""
    from .experiments import networks

    networks.dataset(settings)


def _folder(args, command: str, settings: dict, default_name: str, ignore=("device", "experiments")):
    from .experiments.runs import RunFolder

    out = args.out if args.out is not None else DEFAULT_ROOT / default_name
    return RunFolder(out, command, settings, progress=not args.quiet, log=None if args.quiet else _say).open(ignore)


def _finish(folder) -> None:
    from .experiments.report import write_report

    report = write_report(folder.path)
    print(f"report: {report}")


# -- subcommands ---------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from .experiments import reproduce
    from .experiments.demo import demo_settings, summary_lines

    settings = demo_settings(seed=args.seed, device=args.device, dataset=args.dataset)
    folder = _folder(args, "demo", settings.to_dict(), "demo")
    outcome = reproduce(folder, settings)
    print("\n".join(summary_lines(outcome)))
    if outcome.get("parametric", {}).get("figures"):
        print(f"parametric plot: {folder.figures_dir / outcome['parametric']['figures']['parametric']}")
    _finish(folder)
    return 1 if any("error" in r for r in outcome.values()) else 0


def cmd_reproduce(args) -> int:
    from .experiments import reproduce
    from .experiments.demo import summary_lines
    from .experiments.presets import preset

    base = preset(args.preset, model=args.model, dataset=args.dataset)
    settings = _settings_from(args, base)
    _check_data(settings)
    name = f"reproduce-{args.preset}-{settings.model}-{settings.dataset}"
    folder = _folder(args, "reproduce", settings.to_dict(), name)
    outcome = reproduce(folder, settings)
    print("\n".join(summary_lines(outcome)))
    _finish(folder)
    return 1 if any("error" in r for r in outcome.values()) else 0


def _single_experiment(args, name: str, command: str) -> int:
    from .experiments import run_experiment
    from .experiments.presets import preset

    base = preset(args.preset, model=args.model, dataset=args.dataset)
    settings = _settings_from(args, base).replace(experiments=(name,))
    _check_data(settings)
    folder = _folder(args, command, settings.to_dict(), f"{command}-{args.preset}-{settings.model}-{settings.dataset}")
    result = run_experiment(name, folder, settings)
    for row in result["rows"]:
        key = "batch_size" if name == "sweep" else "warm_epoch"
        label = "batch" if name == "sweep" else "SB epochs"
        if row.get("test_acc") is not None:
            sharp = ", ".join(f"ε={k}: {v:.4g}" for k, v in row["sharpness"].items())
            print(f"{label} {row[key]:>5}: test accuracy {row['test_acc']:6.2f} %, sharpness {sharp}")
        else:
            status = row.get("skipped") or f"diverged at epoch {row.get('diverged')}"
            print(f"{label} {row[key]:>5}: {status}")
    _finish(folder)
    return 0


def cmd_sweep(args) -> int:
    return _single_experiment(args, "sweep", "sweep")


def cmd_warmstart(args) -> int:
    return _single_experiment(args, "warmstart", "warmstart")


def cmd_train(args) -> int:
    from .experiments import model_train
    from .train.config import TrainConfig

    schedule = tuple(args.batch_schedule) if args.batch_schedule else None
    if schedule is not None:
        schedule = (int(schedule[0]), int(schedule[1]), float(schedule[2]))
    config = TrainConfig(
        model=args.model, dataset=args.dataset, data_root=args.data_root, batch_size=args.batch_size,
        epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, patience=args.patience,
        seed=args.seed, width=args.width, depth=args.depth, dropout=args.dropout, remedy=args.remedy,
        prox_lambda=args.prox_lambda, fgsm_epsilon=args.fgsm_epsilon, batch_schedule=schedule,
        sharpness_every=args.sharpness_every, sharpness_epsilon=args.sharpness_epsilon,
        sharpness_batches=args.sharpness_batches, eval_batch_size=args.eval_batch, device=args.device,
    ).validate()
    name = f"train-{config.model}-{config.dataset}-b{config.batch_size}-seed{config.seed}"
    if config.remedy:
        name += f"-{config.remedy}"
    # the training loop itself checks a resumed run's configuration (and allows more epochs)
    folder = _folder(args, "train", config.to_dict(), name, ignore=tuple(config.to_dict()))
    result = model_train.run(folder, config)
    final = result["final"]
    _finish(folder)
    print(f"model: {folder.path / result['model_file']}")
    if result["diverged"] is not None:
        print(f"hessgap: error: training diverged at epoch {result['diverged']} (non-finite loss); the checkpoints "
              f"of the epochs before are kept in {folder.path / 'checkpoints'}; try a smaller --lr", file=sys.stderr)
        return 1
    print(f"after epoch {final.get('epoch')}: train loss {final.get('train_loss'):.4g}, "
          f"train accuracy {100 * final.get('train_acc'):.2f} %, test accuracy {100 * final.get('test_acc'):.2f} %")
    return 0


def cmd_sharpness(args) -> int:
    from .experiments import model_sharpness
    from .experiments.saved import model_file

    settings = {"model": str(Path(args.model_path).resolve()), "epsilons": list(args.epsilon),
                "subspace_dim": args.subspace_dim, "solver": args.solver, "seed": args.seed,
                "max_batches": args.max_batches, "eval_batch": args.eval_batch, "data_root": args.data_root,
                "device": args.device}
    path = model_file(args.model_path)
    folder = _folder(args, "sharpness", settings, f"sharpness-{path.parent.name}")
    result = model_sharpness.run(folder, args.model_path, args.epsilon, args.subspace_dim or None, args.solver,
                               args.seed, args.data_root, args.eval_batch, args.max_batches, args.device)
    for m in result["measurements"]:
        print(f"sharpness ({m['space']}, ε={m['epsilon']:g}): {m['value']:.5g}  (f(x) = {m['loss']:.4g}, "
              f"max f = {m['max_loss']:.4g})")
    _finish(folder)
    return 0


def cmd_spectrum(args) -> int:
    from .experiments import model_spectrum
    from .experiments.saved import model_file

    settings = {"model": str(Path(args.model_path).resolve()), "k": args.k, "trace": args.trace,
                "density": args.density, "probes": args.probes, "seed": args.seed, "max_batches": args.max_batches,
                "eval_batch": args.eval_batch, "data_root": args.data_root, "device": args.device}
    path = model_file(args.model_path)
    folder = _folder(args, "spectrum", settings, f"spectrum-{path.parent.name}")
    result = model_spectrum.run(folder, args.model_path, args.k, args.trace, args.density, args.probes, args.seed,
                              args.data_root, args.eval_batch, args.max_batches, args.device)
    print("top eigenvalues: " + ", ".join(f"{v:.5g}" for v in result["eigenvalues"]))
    if result.get("trace"):
        print(f"trace: {result['trace']['value']:.5g}")
    if result.get("density"):
        print(f"density plot: {folder.figures_dir / 'density.png'}")
    _finish(folder)
    return 0


def cmd_interpolate(args) -> int:
    from .experiments import interpolate
    from .experiments.saved import model_file

    paths = ("linear", "curved") if args.path == "both" else (args.path,)
    changes = {"alphas": args.points, "alpha_range": (args.alpha_min, args.alpha_max), "paths": paths}
    settings = {"models": [str(Path(p).resolve()) for p in (args.model_a, args.model_b)], **changes,
                "data_root": args.data_root, "eval_batch": args.eval_batch, "device": args.device}
    name = f"interpolate-{model_file(args.model_a).parent.name}-{model_file(args.model_b).parent.name}"
    folder = _folder(args, "interpolate", settings, name)
    result = interpolate.run(folder, args.model_a, args.model_b, changes, args.data_root, args.eval_batch, args.device)
    for path_name, curve in result["curves"].items():
        losses = [v for v in curve["train_loss"] if v is not None]
        print(f"{path_name} path: train loss at α=0 {curve['train_loss'][_nearest(curve['alpha'], 0)]:.4g}, "
              f"at α=1 {curve['train_loss'][_nearest(curve['alpha'], 1)]:.4g}, largest {max(losses):.4g}")
    print(f"figure: {folder.figures_dir / result['figures']['parametric']}")
    _finish(folder)
    return 0


def _nearest(values, target) -> int:
    return min(range(len(values)), key=lambda i: abs(values[i] - target))


# -- parser --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessgap",
        formatter_class=_Formatter,
        description="Sharpness, Hessian spectra and the large-batch generalization gap (Keskar et al. 2017).\n"
                    "Each command writes a run folder with config.json, results/*.json, figures/*.png and "
                    "report.md;\nrunning it again on the same folder resumes where it stopped.",
        epilog="Start with `hessgap demo` (a few minutes on a CPU). `hessgap <command> --help` explains each option.",
    )
    parser.add_argument("--version", action="version", version=f"hessgap {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    p = sub.add_parser("demo", formatter_class=_Formatter, help="the paper's headline in minutes on a CPU",
                       description="Train an F1-type network on the embedded digits data (or MNIST-1D, --dataset) with a "
                                   "small (16) and a large (half the data) batch from the same start; print the "
                                   "generalization "
                                   "gap, both sharpness values (full space, ε = 1e-3), the top Hessian "
                                   "eigenvalues of both, and write the parametric plot and report.md.")
    p.add_argument("--dataset", choices=("digits", "mnist1d"), default="digits",  # data that needs no files
                   help="digits: scikit-learn's handwritten digits (embedded); mnist1d: MNIST-1D generated "
                        "locally, harder, where the generalization gap shows (default: digits)")
    _add_run_options(p, "demo")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("reproduce", formatter_class=_Formatter, help="every experiment of the paper from a preset",
                       description="Run the paper's experiments in order: gap (Table 2), sharpness (Tables 3-4), "
                                   "parametric (Figs. 3, 7), spectrum, along_training (Fig. 6), sweep (Fig. 4), "
                                   "warmstart (Fig. 5), remedies (Appendix E). Presets: quick (F1 x0.5 on "
                                   "digits, minutes on a CPU), paper (the paper's settings, for a GPU). Options "
                                   "below override the preset.")
    p.add_argument("--preset", choices=("quick", "paper"), default="quick", help="settings to start from (default: quick)")
    p.add_argument("--experiments", type=_csv(str, EXPERIMENT_NAMES),
                   help=f"comma-separated subset of {', '.join(EXPERIMENT_NAMES)} (default: all)")
    _add_model_data_options(p, preset_defaults=True)
    _add_training_options(p)
    _add_sharpness_options(p)
    extra = p.add_argument_group("experiment details (defaults: the preset's)")
    extra.add_argument("--alphas", type=_positive_int, help="points on each interpolation path (default: 25)")
    extra.add_argument("--spectrum-k", type=_positive_int, help="top eigenvalues per network (quick: 5, paper: 10)")
    extra.add_argument("--sharpness-every", type=_nonneg_int,
                       help="measure sharpness every N epochs of the first seed, for Fig. 6 (quick: 5, paper: 5)")
    extra.add_argument("--trace-probes", type=_nonneg_int,
                       help="spectrum: also the Hessian trace with N Hutchinson probes, 0 = off (quick: 16, paper: 0)")
    extra.add_argument("--sweep-batches", type=_csv(_positive_int),
                       help="batch sizes of the sweep, comma-separated (quick: 16,64,256,1024)")
    _add_warmstart_options(extra)
    extra.add_argument("--remedies", type=_csv(str, REMEDY_NAMES),
                       help=f"remedies to try: {', '.join(REMEDY_NAMES)} (default: all)")
    _add_run_options(p, "reproduce-<preset>-<model>-<dataset>")
    p.set_defaults(handler=cmd_reproduce)

    p = sub.add_parser("train", formatter_class=_Formatter, help="train one network (SB, LB or with a remedy)",
                       description="Train one network, checkpointed every epoch in --out (rerun to resume); "
                                   "writes model.pt for the sharpness, spectrum and interpolate commands.")
    _add_model_data_options(p, preset_defaults=False)
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=_batch_size, default="sb",
                   help="an integer, sb (256, the paper's small batch) or lb (10%% of the training set) (default: sb)")
    g.add_argument("--epochs", type=_positive_int, default=10, help="epochs, the maximum with --patience (default: 10)")
    g.add_argument("--patience", type=_positive_int, default=None,
                   help="stop when the training loss has not improved for this many epochs (default: off)")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="optimizer (default: adam, the paper's)")
    g.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate (default: 1e-3)")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum of sgd (default: 0.9)")
    g.add_argument("--dropout", type=float, default=0.5, help="dropout of the C-networks' dense layers (default: 0.5)")
    g.add_argument("--eval-batch", type=_positive_int, default=1024, help="batch size of evaluations (default: 1024)")
    g = p.add_argument_group("remedies (Appendix E)")
    g.add_argument("--remedy", choices=REMEDY_NAMES, default=None, help="train with a remedy (default: none)")
    g.add_argument("--prox-lambda", type=float, default=1e-3, help="conservative: proximal weight λ (default: 1e-3)")
    g.add_argument("--fgsm-epsilon", type=_positive_float, default=0.1,
                   help="adversarial: FGSM step on the standardized inputs (default: 0.1)")
    g.add_argument("--batch-schedule", nargs=3, metavar=("START", "FINAL", "GROWTH"), type=float, default=None,
                   help="dynamic: batch size START grown ×GROWTH per epoch up to FINAL (default: batch size, "
                        "10%% of the data, 1.2)")
    g = p.add_argument_group("sharpness along training")
    g.add_argument("--sharpness-every", type=_nonneg_int, default=0,
                   help="measure Metric 2.1 every N epochs, 0 = never (default: 0)")
    g.add_argument("--sharpness-epsilon", type=_positive_float, default=1e-3, help="its ε (default: 1e-3)")
    g.add_argument("--sharpness-batches", type=_positive_int, default=None,
                   help="over the first N evaluation batches (default: the whole training set)")
    _add_run_options(p, "train-<model>-<dataset>-b<batch>-seed<seed>")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("sharpness", formatter_class=_Formatter, help="sharpness (Metric 2.1) of a saved network",
                       description="Metric 2.1 of a network saved by `hessgap train`, over its training set.")
    p.add_argument("model_path", help="model.pt written by `hessgap train`, or its --out folder")
    p.add_argument("--epsilon", type=_positive_float, nargs="+", default=[1e-3, 5e-4],
                   help="one or more box sizes ε (default: 1e-3 5e-4)")
    p.add_argument("--subspace-dim", type=_nonneg_int, default=0,
                   help="also measure in a random p-dimensional subspace (the paper: 100); 0 = full space only "
                        "(default: 0)")
    p.add_argument("--solver", choices=("box-ascent", "lbfgsb"), default="box-ascent",
                   help="box-ascent (default) or lbfgsb (the paper's 10 iterations of L-BFGS-B)")
    _add_data_override(p)
    _add_run_options(p, "sharpness-<model folder>")
    p.set_defaults(handler=cmd_sharpness)

    p = sub.add_parser("spectrum", formatter_class=_Formatter, help="top Hessian eigenvalues, trace and density",
                       description="Hessian spectrum of a network saved by `hessgap train`, over its training set.")
    p.add_argument("model_path", help="model.pt written by `hessgap train`, or its --out folder")
    p.add_argument("--k", type=_positive_int, default=10, help="number of top eigenvalues (Lanczos) (default: 10)")
    p.add_argument("--trace", action="store_true", help="also estimate the trace (Hutchinson)")
    p.add_argument("--density", action="store_true", help="also the spectral density and its plot (SLQ)")
    p.add_argument("--probes", type=_positive_int, default=64, help="probe vectors of the trace (default: 64)")
    _add_data_override(p)
    _add_run_options(p, "spectrum-<model folder>")
    p.set_defaults(handler=cmd_spectrum)

    p = sub.add_parser("interpolate", formatter_class=_Formatter, help="parametric plots between two saved networks",
                       description="Figures 3 and 7: loss and accuracy along x(α) = α x_B + (1 − α) x_A (linear) "
                                   "and sin(απ/2) x_B + cos(απ/2) x_A (curved). BatchNorm networks are evaluated "
                                   "in eval mode with interpolated running statistics.")
    p.add_argument("model_a", help="the network at α = 0 (x_SB in the paper): model.pt or a `hessgap train` folder")
    p.add_argument("model_b", help="the network at α = 1 (x_LB in the paper)")
    p.add_argument("--points", type=_positive_int, default=25, help="values of α (default: 25)")
    p.add_argument("--alpha-min", type=float, default=-1.0, help="first α (default: -1)")
    p.add_argument("--alpha-max", type=float, default=2.0, help="last α (default: 2)")
    p.add_argument("--path", choices=("linear", "curved", "both"), default="both", help="which path (default: both)")
    p.add_argument("--data-root", default=None, help="data folder, when it moved since training (default: as trained)")
    p.add_argument("--eval-batch", type=_positive_int, default=1024, help="batch size of evaluations (default: 1024)")
    _add_run_options(p, "interpolate-<a>-<b>")
    p.set_defaults(handler=cmd_interpolate)

    for name, what, figure in (("sweep", "batch-size sweep", "Figure 4: test accuracy and sharpness vs batch size"),
                               ("warmstart", "warm-started LB", "Figure 5: LB runs started from the SB iterate after "
                                                               "every N-th epoch")):
        p = sub.add_parser(name, formatter_class=_Formatter, help=f"{what} ({figure.split(':')[0]})",
                           description=f"{figure}. Defaults come from --preset; options override them.")
        p.add_argument("--preset", choices=("quick", "paper"), default="quick", help="settings to start from (default: quick)")
        _add_model_data_options(p, preset_defaults=True)
        _add_training_options(p)
        _add_sharpness_options(p)
        if name == "sweep":
            p.add_argument("--sweep-batches", type=_csv(_positive_int),
                           help="batch sizes, comma-separated (quick: 16,64,256,1024)")
        else:
            _add_warmstart_options(p)
        _add_run_options(p, f"{name}-<preset>-<model>-<dataset>")
        p.set_defaults(handler=cmd_sweep if name == "sweep" else cmd_warmstart)
    return parser


def _add_warmstart_options(parser) -> None:
    parser.add_argument("--warm-sb-epochs", type=_positive_int, help="warm start: SB epochs (quick: 10, paper: 100)")
    parser.add_argument("--warm-lb-epochs", type=_positive_int,
                        help="warm start: LB epochs from each SB iterate (quick: 60, paper: 100)")
    parser.add_argument("--warm-every", type=_positive_int,
                        help="warm start: from the SB iterate of every N-th epoch (quick: 2, paper: 10)")


def _add_data_override(parser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data-root", default=None, help="data folder, when it moved since training (default: as trained)")
    group.add_argument("--max-batches", type=_positive_int, default=None,
                       help="use only the first N batches of --eval-batch training samples (default: all)")
    group.add_argument("--eval-batch", type=_positive_int, default=1024, help="batch size (default: 1024)")


def _version() -> str:
    from . import __version__

    return __version__


def main(argv=None) -> int:
    """Entry point of the ``hessgap`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads is None and (args.command == "demo" or getattr(args, "preset", None) == "quick"):
        threads = 1  # small networks: more threads only add synchronization, badly so on a busy machine
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        if getattr(args, "device", None) is not None:
            from .train.config import resolve_device

            resolve_device(args.device)  # an unusable --device fails before any work starts
        return args.handler(args)
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
