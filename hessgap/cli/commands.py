"""The handlers of the ``hessgap`` subcommands: each builds its settings from the parsed options, opens its
run folder, runs the experiments or the command's work, prints a summary and writes ``report.md``.

:func:`run` is what :func:`hessgap.cli.main` calls once the options parsed; this module (and so torch and
the experiments) is imported only then.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..errors import HessgapError, one_line
from ..experiments import interpolate, model_sharpness, model_spectrum, model_train, networks, reproduce, run_experiment
from ..experiments.demo import demo_settings, summary_lines
from ..experiments.presets import ADDED_SETTINGS, PATHS, preset
from ..experiments.report import write_report
from ..experiments.runs import RunFolder, claimed
from ..experiments.saved import SavedModel, load, settings_for
from ..sharp.epsilon import check_box
from ..train.config import TrainConfig, check_fits, resolve_device
from ..train.data import load_dataset
from ..train.loop import batch_plan
from . import measures_commands
from .options import DEFAULT_ROOT, settings_from


def run(args) -> int:
    """Run the subcommand ``args.command`` with its parsed options; returns the exit status.

    Under ``torchrun`` (its environment names a world of several processes) the ranks join one process group
    first (NCCL on GPUs, gloo on CPUs) and run the command together: training with DistributedDataParallel,
    measurements over each rank's shard of the data; rank 0 alone prints and writes the run folder.
    """
    with _process_group(), _memory_errors():
        return _run(args)


@contextlib.contextmanager
def _memory_errors():
    """An allocation that fails (a network or batch too large for the device, found only once it runs) as one
    line, like the other user errors, after the run folder kept or removed what it holds."""
    try:
        yield
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.cuda.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        raise HessgapError(f"out of memory ({one_line(exc)}); use a smaller --width or --depth, --batch-size or "
                           "--eval-batch, or another --device") from exc


@contextlib.contextmanager
def _process_group():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        with contextlib.ExitStack() as stack:
            if dist.get_rank() != 0:  # one summary on the terminal, rank 0's
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            yield
    finally:
        dist.destroy_process_group()


def _run(args) -> int:
    if dist.is_initialized() and dist.get_rank() != 0:
        args.quiet = True  # progress bars and messages from rank 0 only
    threads = getattr(args, "threads", None)
    if threads is None and (args.command in ("demo", "measures") or getattr(args, "preset", None) == "quick"):
        threads = 1  # small networks: more threads only add synchronization, badly so on a busy machine
    if threads:
        torch.set_num_threads(threads)
    if getattr(args, "device", None) is not None:
        resolve_device(args.device)  # an unusable --device fails before any work starts
    return HANDLERS[args.command](args)


def _say(message: str) -> None:
    """Progress messages that do not break tqdm's bars."""
    tqdm.write(message, file=sys.stderr)


def _check_data(settings) -> None:
    """Load the data before any folder is made: a missing data set fails at once, with its message."""
    networks.dataset(settings)


def _check_measurement(saved: SavedModel, *, k: int | None = None, subspace_dim: int | None = None,
                       epsilons=()) -> None:
    """What a measurement of a saved network can be refused for from its size and weights alone, checked before
    its folder is made: it would fail only after writing the folder, or after keeping its first results."""
    weights = [p.detach() for p in saved.result.model.parameters() if p.requires_grad]
    n = sum(w.numel() for w in weights)
    if k is not None and k > n:
        raise HessgapError(f"--k {k} asks for more eigenvalues than the Hessian of {saved.describe()} has: it is "
                           f"{n} × {n}; use --k ≤ {n}")
    if subspace_dim and subspace_dim > n:
        raise HessgapError(f"--subspace-dim {subspace_dim} is larger than the {n} parameters of {saved.describe()}; "
                           f"use --subspace-dim ≤ {n} (the paper: 100), or 0 for the full space only")
    for epsilon in epsilons:
        check_box(weights, epsilon, "keskar", weights[0].dtype)


def _folder(args, command: str, settings: dict, default_name: str, ignore=("device", "experiments")):
    """The command's run folder, opened (and locked until the command ends: use it in a ``with`` block).

    Call it only once the inputs are checked: a command that fails on its inputs leaves no folder behind."""
    out = args.out if args.out is not None else DEFAULT_ROOT / default_name
    return RunFolder(out, command, settings, progress=not args.quiet, log=None if args.quiet else _say).open(
        ignore, added=ADDED_SETTINGS)


def _finish(folder) -> None:
    report = write_report(folder.path)
    print(f"report: {report}")


# -- subcommands ---------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    settings = demo_settings(seed=args.seed, device=args.device, dataset=args.dataset)
    with _folder(args, "demo", settings.to_dict(), f"demo-{settings.dataset}") as folder:
        outcome = reproduce(folder, settings)
        print("\n".join(summary_lines(outcome)))
        if outcome.get("parametric", {}).get("figures"):
            print(f"parametric plot: {folder.figures_dir / outcome['parametric']['figures']['parametric']}")
        _finish(folder)
    return 1 if any("error" in r for r in outcome.values()) else 0


def cmd_reproduce(args) -> int:
    base = preset(args.preset, model=args.model, dataset=args.dataset)
    settings = settings_from(args, base)
    networks.check_inputs(settings)
    name = f"reproduce-{args.preset}-{settings.model}-{settings.dataset}"
    with _folder(args, "reproduce", settings.to_dict(), name) as folder:
        outcome = reproduce(folder, settings)
        print("\n".join(summary_lines(outcome)))
        _finish(folder)
    return 1 if any("error" in r for r in outcome.values()) else 0


def _single_experiment(args, name: str, command: str) -> int:
    base = preset(args.preset, model=args.model, dataset=args.dataset)
    settings = settings_from(args, base).replace(experiments=(name,))
    networks.check_inputs(settings)
    default_name = f"{command}-{args.preset}-{settings.model}-{settings.dataset}"
    with _folder(args, command, settings.to_dict(), default_name) as folder:
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
    config = TrainConfig(
        model=args.model, dataset=args.dataset, data_root=args.data_root, batch_size=args.batch_size,
        epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, patience=args.patience,
        min_delta=args.min_delta, seed=args.seed, width=args.width, depth=args.depth, dropout=args.dropout,
        conv_dropout=args.conv_dropout, init=args.init, preprocess=args.preprocess, remedy=args.remedy,
        prox_lambda=args.prox_lambda, fgsm_epsilon=args.fgsm_epsilon, batch_schedule=args.batch_schedule,
        sharpness_every=args.sharpness_every, sharpness_epsilon=args.sharpness_epsilon,
        sharpness_batches=args.sharpness_batches, sharpness_solver=args.sharpness_solver,
        sharpness_batchnorm=args.sharpness_batchnorm, eval_batch_size=args.eval_batch, device=args.device,
        track=list(args.track or []), track_every=args.track_every if args.track else 0,
        track_batches=args.track_batches,
    ).validate()
    # the data, the batch size and the network's size are checked before the folder is made
    data = load_dataset(config.dataset, config.data_root, seed=config.data_seed, preprocess=config.preprocess)
    batch_plan(config, data)
    check_fits(config, data)
    name = f"train-{config.model}-{config.dataset}-b{config.batch_size}-seed{config.seed}"
    if config.remedy:
        name += f"-{config.remedy}"
    # the training loop itself checks a resumed run's configuration (and allows more epochs)
    with _folder(args, "train", config.to_dict(), name, ignore=tuple(config.to_dict())) as folder:
        result = model_train.run(folder, config, data)
        final = result["final"]
        _finish(folder)
        print(f"model: {folder.path / result['model_file']}")
        if result["diverged"] is not None:
            print(f"hessgap: error: training diverged at epoch {result['diverged']} (non-finite loss); the "
                  f"checkpoints of the epochs before are kept in {folder.path / 'checkpoints'}; try a smaller --lr",
                  file=sys.stderr)
            return 1
    print(f"after epoch {final.get('epoch')}: train loss {final.get('train_loss'):.4g}, "
          f"train accuracy {100 * final.get('train_acc'):.2f} %, test accuracy {100 * final.get('test_acc'):.2f} %")
    if result.get("tracking"):
        last = result["tracking"][-1]
        values = ", ".join(f"{name} {last[name]:.4g}" if isinstance(last.get(name), float) else f"{name} –"
                           for name in config.track)
        print(f"at step {last['step']}: {values} ({len(result['tracking'])} records, "
              f"figure {folder.figures_dir / result['figures']['tracking']})")
    return 0


def _saved(path, args) -> SavedModel:
    """The saved network at ``path`` and its data, checked (the data loaded) before any folder is made."""
    saved = load(path, args.device)
    _check_data(settings_for(saved.result, args.data_root, args.eval_batch, device=args.device))
    return saved


def cmd_sharpness(args) -> int:
    saved = _saved(args.model_path, args)
    _check_measurement(saved, subspace_dim=args.subspace_dim, epsilons=args.epsilon)
    settings = {"model": str(Path(args.model_path).resolve()), "model_sha256": saved.sha256,
                "epsilons": list(args.epsilon), "subspace_dim": args.subspace_dim, "solver": args.solver,
                "sharpness_batchnorm": args.batchnorm,
                "seed": args.seed, "max_batches": args.max_batches, "eval_batch": args.eval_batch,
                "data_root": args.data_root, "device": args.device}
    with _folder(args, "sharpness", settings, f"sharpness-{saved.label}-{saved.sha256[:8]}") as folder:
        result = model_sharpness.run(folder, saved, args.epsilon, args.subspace_dim or None, args.solver, args.seed,
                                     args.data_root, args.eval_batch, args.max_batches, args.device,
                                     batchnorm=args.batchnorm)
        print(f"model: {saved.describe()}")
        for m in result["measurements"]:
            print(f"sharpness ({m['space']}, ε={m['epsilon']:g}): {m['value']:.5g}  (f(x) = {m['loss']:.4g}, "
                  f"max f = {m['max_loss']:.4g})")
        _finish(folder)
    return 0


def cmd_spectrum(args) -> int:
    saved = _saved(args.model_path, args)
    _check_measurement(saved, k=args.k)
    settings = {"model": str(Path(args.model_path).resolve()), "model_sha256": saved.sha256, "k": args.k,
                "trace": args.trace, "density": args.density, "probes": args.probes, "seed": args.seed,
                "max_batches": args.max_batches, "eval_batch": args.eval_batch, "data_root": args.data_root,
                "device": args.device}
    with _folder(args, "spectrum", settings, f"spectrum-{saved.label}-{saved.sha256[:8]}") as folder:
        result = model_spectrum.run(folder, saved, args.k, args.trace, args.density, args.probes, args.seed,
                                    args.data_root, args.eval_batch, args.max_batches, args.device)
        print(f"model: {saved.describe()}")
        print("top eigenvalues: " + ", ".join(f"{v:.5g}" for v in result["eigenvalues"]))
        if result.get("trace"):
            print(f"trace: {result['trace']['value']:.5g}")
        if result.get("density"):
            print(f"density plot: {folder.figures_dir / 'density.png'}")
        _finish(folder)
    return 0


def cmd_interpolate(args) -> int:
    a, b = _saved(args.model_a, args), _saved(args.model_b, args)
    interpolate.check_pair(a, b)
    paths = PATHS if args.path == "both" else (args.path,)
    changes = {"alphas": args.points, "alpha_range": (args.alpha_min, args.alpha_max), "paths": paths}
    settings_for(a.result, args.data_root, args.eval_batch, None, args.device, **changes)  # checked before the folder
    settings = {"models": [str(Path(p).resolve()) for p in (args.model_a, args.model_b)],
                "model_sha256": [a.sha256, b.sha256], **changes, "data_root": args.data_root,
                "eval_batch": args.eval_batch, "device": args.device}
    pair_digest = hashlib.sha256(f"{a.sha256} {b.sha256}".encode()).hexdigest()[:8]
    with _folder(args, "interpolate", settings, f"interpolate-{a.label}-{b.label}-{pair_digest}") as folder:
        result = interpolate.run(folder, a, b, changes, args.data_root, args.eval_batch, args.device)
        print(f"models: α = 0 {a.describe()}, α = 1 {b.describe()}")
        for path_name, curve in result["curves"].items():
            losses = [v for v in curve["train_loss"] if v is not None]
            at = {target: _nearest(curve["alpha"], target) for target in (0, 1)}
            print(f"{path_name} path: train loss at α={curve['alpha'][at[0]]:.3g} {curve['train_loss'][at[0]]:.4g}, "
                  f"at α={curve['alpha'][at[1]]:.3g} {curve['train_loss'][at[1]]:.4g}, largest {max(losses):.4g}")
        print(f"figure: {folder.figures_dir / result['figures']['parametric']}")
        _finish(folder)
    return 0


def _nearest(values, target) -> int:
    return min(range(len(values)), key=lambda i: abs(values[i] - target))


def cmd_landscape(args) -> int:
    from ..landscape import command as landscape_command  # its engines load only for this command

    landscape_command.check_grid(args)
    saved = _saved(args.model, args)
    out = args.out if args.out is not None else DEFAULT_ROOT / f"landscape-{saved.label}-{saved.sha256[:8]}"

    def network_and_data(path):
        network = saved if path == args.model else _saved(path, args)
        settings = settings_for(network.result, args.data_root, args.eval_batch, args.max_batches, device=args.device)
        return network.result.model, networks.analysis_loader(settings), networks.test_loader(settings)

    print(f"model: {saved.describe()}")
    with claimed(out):  # the landscape's folder keeps its own config.json and rows; one process at a time
        landscape_command.run(args, load=network_and_data, out_dir=out)
    return 0


def cmd_measures(args) -> int:
    return measures_commands.cmd_measures(args, _folder, _saved, _finish)


def cmd_correlate(args) -> int:
    return measures_commands.cmd_correlate(args, _folder, _finish)


HANDLERS = {
    "demo": cmd_demo, "reproduce": cmd_reproduce, "train": cmd_train, "sharpness": cmd_sharpness,
    "spectrum": cmd_spectrum, "interpolate": cmd_interpolate, "sweep": cmd_sweep, "warmstart": cmd_warmstart,
    "measures": cmd_measures, "correlate": cmd_correlate, "landscape": cmd_landscape,
}
