"""The trained networks that experiments analyse: data, training runs in the run folder, evaluation, sharpness.

Training runs are named by a hash of their configuration, so two experiments that need the same
network (the gap table's SB model and the sweep's point at the same batch size) share one run, and a
repeated command finds it finished. Sharpness values are cached per network in the run folder too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import TensorDataset

from .._io import read_json
from ..errors import HessgapError
from ..train import loop
from ..train.config import ADDED_DEFAULTS, TrainConfig, check_fits
from ..train.data import load_dataset, make_loader
from ..train.evaluation import evaluate as evaluate_model
from ..train.parallel import Replicas
from ..train.result import TrainResult
from ..train.sharpness_log import measure_sharpness
from .presets import Settings
from .runs import RunFolder, digest

_DATASETS: dict[tuple, Any] = {}


@dataclass
class Trained:
    """A training run of the folder: its tag (folder name under models/), config and result."""

    tag: str
    result: TrainResult
    out_dir: Path

    @property
    def model(self):
        return self.result.model

    @property
    def diverged(self):
        return self.result.diverged

    @property
    def history(self) -> list[dict]:
        return self.result.history


def dataset(settings: Settings):
    """The settings' data set, loaded once per process (the split depends on ``data_seed`` only, not on
    the seeds of the training runs)."""
    key = (settings.dataset, settings.data_root, settings.data_seed, settings.preprocess)
    if key not in _DATASETS:
        _DATASETS[key] = load_dataset(settings.dataset, root=settings.data_root, seed=settings.data_seed,
                                      preprocess=settings.preprocess)
    return _DATASETS[key]


def eval_loader(tensor_dataset, settings: Settings):
    """A fixed-order loader for evaluation and sharpness (batches of ``settings.eval_batch``)."""
    return make_loader(tensor_dataset, batch_size=min(settings.eval_batch, len(tensor_dataset)), shuffle=False)


def analysis_loader(settings: Settings):
    """The training data that sharpness and spectra are measured over: all of it, or the first
    ``sharpness_batches`` batches of ``eval_batch`` samples (a fixed subset, the same for every network).
    On several ranks (torchrun), each rank's contiguous shard of it: the measurements add the shards up."""
    train_set = dataset(settings).train
    if settings.sharpness_batches is not None:
        count = min(len(train_set), settings.sharpness_batches * settings.eval_batch)
        train_set = TensorDataset(*(t[:count] for t in train_set.tensors))
    return eval_loader(_rank_shard(train_set), settings)


def test_loader(settings: Settings):
    """The whole test set in fixed order; on several ranks, each rank's contiguous shard of it."""
    return eval_loader(_rank_shard(dataset(settings).test), settings)


def _rank_shard(tensor_dataset):
    replicas = Replicas.resolve()
    return replicas.shard(tensor_dataset) if replicas is not None else tensor_dataset


def train_config(
    settings: Settings,
    batch_size: int,
    seed: int,
    remedy: str | None = None,
    sharpness_every: int = 0,
    epochs: int | None = None,
    batch_schedule: tuple | None = None,
    keep_checkpoints: int | None = 1,
    fixed_epochs: bool = False,
) -> TrainConfig:
    """The :class:`hessgap.train.config.TrainConfig` of one run under ``settings``.

    Only the latest checkpoint is kept by default (enough to resume): at the paper's scale a C2 checkpoint
    is ~180 MB, so keeping every epoch of every run would fill a disk. ``keep_checkpoints=None`` keeps all
    (the warm-start experiment starts LB runs from every SB epoch). ``fixed_epochs``: a run the paper
    trained for a fixed number of epochs (Figs. 4 and 5); with ``settings.stop == "plateau"`` the others
    train until the loss stops improving, at most ``settings.max_epochs`` (``epochs`` is then ignored).
    """
    patience = settings.patience
    if settings.trains_to_plateau():
        if fixed_epochs:
            patience = None
        else:
            epochs = settings.max_epochs
    kwargs = dict(
        model=settings.model,
        dataset=settings.dataset,
        data_root=settings.data_root,
        data_seed=settings.data_seed,
        batch_size=batch_size,
        epochs=epochs if epochs is not None else settings.epochs,
        optimizer=settings.optimizer,
        lr=settings.lr,
        patience=patience,
        min_delta=settings.min_delta,
        seed=seed,
        width=settings.width,
        depth=settings.depth,
        init=settings.init,
        conv_dropout=settings.conv_dropout,
        preprocess=settings.preprocess,
        remedy=remedy,
        sharpness_every=sharpness_every,
        sharpness_epsilon=settings.epsilons[0],
        sharpness_batches=settings.sharpness_batches,
        sharpness_solver=settings.sharpness_solver,
        sharpness_batchnorm=settings.sharpness_batchnorm,
        eval_batch_size=settings.eval_batch,
        device=settings.device,
        keep_checkpoints=keep_checkpoints,
    )
    if remedy == "conservative":
        kwargs["prox_lambda"] = settings.prox_lambda
    if remedy == "adversarial" and settings.fgsm_epsilon is not None:
        kwargs["fgsm_epsilon"] = settings.fgsm_epsilon
    if batch_schedule is not None:
        kwargs["batch_schedule"] = tuple(batch_schedule)
    return TrainConfig(**kwargs)


def train(run: RunFolder, config, label: str, data=None, init_state=None, init_label: str | None = None,
          epoch_callback=None) -> Trained:
    """Train (or resume, or load the finished) run ``config`` in ``run.models_dir``.

    A diverged run (non-finite loss) is reported and returned with ``diverged`` set; its checkpoints stay.
    """
    # what does not change the trained weights does not name the run; nor do options added later while they
    # keep the value runs had before them (so a folder's earlier runs keep their names)
    identity = {k: v for k, v in config.to_dict().items() if k not in ("device", "data_root", "keep_checkpoints")
                and not (k in ADDED_DEFAULTS and v == ADDED_DEFAULTS[k])}
    if init_state is not None:
        if init_label is None:
            raise HessgapError("a warm-started run needs init_label naming where its weights came from")
        identity["init"] = init_label
    tag = f"{label}-{digest(identity)}"
    if tag in run.memory:  # already trained or loaded by this command
        return run.memory[tag]
    out_dir = run.models_dir / tag
    state = "training"
    if (out_dir / "history.json").exists():
        state = "loading" if read_json(out_dir / "history.json").get("finished") else "resuming"
    run.log(f"{state} {tag} (batch {config.batch_size}, seed {config.seed})")
    result = loop.train(
        config, out_dir=out_dir, dataset=data, init_state=init_state, progress=run.progress,
        epoch_callback=epoch_callback,
    )
    if result.diverged is not None:
        run.log(
            f"warning: {tag} diverged at epoch {result.diverged} (non-finite training loss); it is left out of "
            f"the statistics; its checkpoints are kept in {out_dir} (a smaller --lr may help)"
        )
    trained = Trained(tag=tag, result=result, out_dir=out_dir)
    run.memory[tag] = trained
    return trained


def train_pair(run: RunFolder, settings: Settings, seed: int) -> dict[str, Trained]:
    """The SB and the LB network of one seed (same initial weights); the first seed records sharpness per epoch."""
    data = dataset(settings)
    n = len(data.train)
    sb, lb = settings.sb_batch, settings.lb_size(n)
    check_batch(sb, n, "SB batch size")
    check_batch(lb, n, "LB batch size")
    every = settings.sharpness_every if seed == settings.seed else 0
    return {
        regime: train(run, train_config(settings, batch, seed, sharpness_every=every,
                                        epochs=settings.epochs_for(batch, n)), f"{regime}-seed{seed}", data)
        for regime, batch in (("sb", sb), ("lb", lb))
    }


def check_inputs(settings: Settings) -> None:
    """What a run of ``settings.experiments`` can be refused for before its folder is made: the data set loads,
    the network fits memory for training, and the batch sizes fit the training set (the SB and LB networks
    of every experiment but the sweep, the sweep's own)."""
    data = dataset(settings)
    n = len(data.train)
    check_fits(train_config(settings, min(settings.sb_batch, n), settings.seed).validate(), data)
    if any(name != "sweep" for name in settings.experiments):
        check_batch(settings.sb_batch, n, "SB batch size")
        check_batch(settings.lb_size(n), n, "LB batch size")
    if "sweep" in settings.experiments:
        for batch in settings.sweep_batches:
            check_batch(batch, n, "sweep batch size")


def check_batch(batch_size: int, n: int, what: str = "batch size") -> None:
    if batch_size > n:
        raise HessgapError(
            f"the {what} {batch_size} is larger than the training set ({n} samples); choose at most {n}"
        )


def evaluate(model, settings: Settings) -> dict:
    """Train and test loss and accuracy (percent) of ``model`` in eval mode, over the whole splits."""
    data = dataset(settings)
    out = {}
    for split in ("train", "test"):
        loss, acc = evaluate_model(model, eval_loader(getattr(data, split), settings))
        out[f"{split}_loss"] = float(loss)
        out[f"{split}_acc"] = percent(acc)
    return out


def final_metrics(trained: Trained) -> dict:
    """Train/test loss and accuracy (percent) after the last epoch, as the training loop measured them
    (eval mode, whole splits), and the distance from the start."""
    last = trained.history[-1] if trained.history else {}
    return {
        "train_loss": last.get("train_loss"),
        "train_acc": percent(last["train_acc"]) if last.get("train_acc") is not None else None,
        "test_loss": last.get("test_loss"),
        "test_acc": percent(last["test_acc"]) if last.get("test_acc") is not None else None,
        "distance_from_start": last.get("distance_from_start"),
    }


def percent(accuracy: float) -> float:
    """Accuracy in percent (the training module reports a fraction in [0, 1])."""
    return float(accuracy) * 100.0


def sharpness(run: RunFolder, trained: Trained, settings: Settings, epsilon: float, subspace_dim: int | None = None,
              seed: int = 0) -> dict:
    """Metric 2.1 of a trained network over the training set (solver and BatchNorm mode of ``settings``),
    cached in the run folder per network."""
    key = f"{trained.tag}/{'full' if subspace_dim is None else f'sub{subspace_dim}'}/eps{epsilon:g}/seed{seed}"
    cache = run.parts("measurements")
    if key in cache:
        return cache.get(key)
    result = measure_sharpness(trained.model, analysis_loader(settings), epsilon, subspace_dim=subspace_dim,
                               seed=seed, solver=settings.sharpness_solver, batchnorm=settings.sharpness_batchnorm)
    run.log(f"sharpness {key}: {result.value:.4g} (loss {result.loss:.3g}, {result.seconds:.1f} s)")
    return cache.put(key, result.to_dict())



def mean_std(values) -> tuple[float, float] | None:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return (mean, 0.0)
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return (mean, math.sqrt(var))
