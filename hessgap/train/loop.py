"""SB/LB training as in Keskar et al. (2017): ADAM, mean cross-entropy, per-epoch metrics, checkpoints.

:func:`train` runs one configuration (:class:`TrainConfig`) and returns a :class:`TrainResult`. Per epoch it
records train/test loss and accuracy (eval mode, over the whole split), the distance ‖x − x0‖ from the
starting point, the batch size, the learning rate and the time, and what its epoch callbacks measure
(the sharpness, Metric 2.1, with ``TrainConfig.sharpness_every``: :mod:`hessgap.train.sharpness_log`).
With ``out_dir`` every epoch is checkpointed (see :mod:`hessgap.train.checkpoint`) and rerunning on the
same folder resumes bit-exactly where it stopped; a finished run returns at once. The folder is locked
while the run trains (:class:`hessgap._io.FolderLock`): a second process training into it is refused.

Epoch callbacks, in the order the loop calls them after an epoch's evaluation:

1. measurements, ``measure(record, model, last)``: they add their entries to the epoch's record (and
   declare them, with the value on epochs they skip, in ``measure.fields``); ``last`` says the run ends
   after this epoch. They run *before* the checkpoint, so what they measure is saved with the epoch and
   a resumed run is bit-exact. :func:`train` composes them from the configuration.
2. the checkpoint and ``history.json`` (with ``out_dir``).
3. the caller's ``epoch_callback(record, model)``: it sees a copy of the finished record, exactly as the
   checkpoint holds it, with the model in eval mode; returning True stops the run there.

Step by step, ``TrainConfig.track`` is measured every ``track_every`` optimizer steps by a
:class:`hessgap.Tracker` (:mod:`hessgap.train.tracking_log`), into ``<out_dir>/tracking`` with a run folder.

Reproducibility: the initial weights come from ``seed``; the data order of epoch e from (seed, e); dropout
and augmentation from RNG states saved in every checkpoint. Measurements run under a forked RNG (the tracker
also leaves the optimizer's state alone), so turning them on does not change the trajectory. The caller's
global RNG state is left as it was.

On several ranks (an initialized default process group, e.g. under ``torchrun``) the run trains with
DistributedDataParallel on the one-process global batch: see :mod:`hessgap.train.parallel`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from .._io import FolderLock, read_json, remove, write_json
from ..errors import HessgapError, one_line
from .checkpoint import (
    CHECKPOINT_DIR,
    HISTORY_FILE,
    RESUME_ENTRIES,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    repair_hint,
    save_checkpoint,
)
from .config import TrainConfig, check_fits, check_same_run, resolve_batch_size, resolve_device
from .data import Dataset, epoch_seed, large_batch_size, load_dataset, make_loader
from .evaluation import evaluation_sums, loss_and_accuracy
from .models import build_model
from .parallel import Replicas, rank_device
from .remedies import BatchSchedule, make_training_step
from .result import TrainResult
from .sharpness_log import SharpnessLog
from .tracking_log import make_tracker, tracking_records

_AUGMENT_STREAM = 1 << 30  # the augmentation generator's seed stream, apart from the epochs' streams


def _rng_state(device: torch.device, augment_generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "augment": augment_generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device, augment_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    augment_generator.set_state(state["augment"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer.lower() == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


def train(
    config: TrainConfig | dict,
    out_dir: str | Path | None = None,
    dataset: Dataset | None = None,
    init_state: dict | None = None,
    progress: bool = True,
    epoch_callback: Callable[[dict, nn.Module], Any] | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` (or on the given ``dataset``) and return the result.

    ``init_state`` (a ``state_dict``) warm-starts from given weights; x0 is then that point.
    ``epoch_callback(record, model)`` runs after every epoch, after its checkpoint (the record it gets is a
    copy of the one saved), with the model in eval mode; returning True stops the run there (not marked
    finished: rerunning on ``out_dir`` continues). The sharpness of ``config.sharpness_every`` is measured
    by a :class:`~hessgap.train.sharpness_log.SharpnessLog` callback before the checkpoint.
    Diverging runs (non-finite loss) stop at once, record the epoch and keep the earlier checkpoints.
    """
    config = TrainConfig.from_dict(config.to_dict() if isinstance(config, TrainConfig) else config).validate()
    replicas = Replicas.resolve()
    device = resolve_device(config.device)
    if replicas is not None:
        device = rank_device(device)
        progress = progress and replicas.rank == 0
    folder = Path(out_dir) if out_dir is not None else None
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_root, seed=config.data_seed, preprocess=config.preprocess)
    elif not isinstance(dataset, Dataset):
        raise HessgapError(f"dataset must be a hessgap.train.data.Dataset, got {type(dataset).__name__}")
    elif dataset.name != config.dataset:
        raise HessgapError(
            f"the configuration names data set {config.dataset!r} but the Dataset passed is {dataset.name!r}; "
            f"set TrainConfig.dataset={dataset.name!r} so that the run records what it trained on"
        )
    else:
        dataset = dataset.with_class_labels()  # a caller's own labels may be int32, or not class indices
    batch_size, schedule = batch_plan(config, dataset)
    check_fits(config, dataset, device)  # before the folder is locked (made) and the network built
    data = dataset.to(device) if device.type != "cpu" else dataset

    measurements = [SharpnessLog.from_config(config, data.train, device, replicas)]
    devices = [device] if device.type == "cuda" else []
    # one process per run folder: two trainings into one folder would interleave their checkpoints
    lock = FolderLock(folder) if folder is not None else contextlib.nullcontext()
    with lock, torch.random.fork_rng(devices=devices):  # leave the caller's RNG as it was
        run = _Run(config, device, folder, dataset, data, batch_size, schedule, init_state, replicas)
        return run.run(progress, measurements, epoch_callback)


def batch_plan(config: TrainConfig, dataset: Dataset) -> tuple[int, BatchSchedule | None]:
    """(first batch size, dynamic sampling's schedule or None) of ``config`` on ``dataset``; a batch larger
    than the training set raises (callers check this before making a run folder)."""
    batch_size = resolve_batch_size(config.batch_size, dataset.num_train)
    schedule = None
    if config.remedy == "dynamic":
        schedule = BatchSchedule.from_value(
            config.batch_schedule or (batch_size, max(batch_size, large_batch_size(dataset)), 1.2))
        batch_size = schedule.start
    largest = schedule.final if schedule else batch_size
    if largest > dataset.num_train:
        raise HessgapError(
            f"batch size {largest} is larger than the training set of {dataset.name} ({dataset.num_train} samples); "
            f"use at most {dataset.num_train} (the paper's large batch, 10%, is {large_batch_size(dataset)})"
        )
    return batch_size, schedule


class _Run:
    """One training run's mutable state: model, optimizer, RNGs, history, and its run folder (if any)."""

    def __init__(self, config: TrainConfig, device: torch.device, folder: Path | None, dataset: Dataset,
                 data: Dataset, batch_size: int, schedule: BatchSchedule | None, init_state: dict | None,
                 replicas: Replicas | None = None):
        self.config, self.device, self.folder, self.replicas = config, device, folder, replicas
        self.dataset, self.data, self.batch_size, self.schedule = dataset, data, batch_size, schedule
        torch.manual_seed(config.seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(config.seed)
        self.model = build_model(config.model, dataset.input_shape, dataset.num_classes, config.width,
                                 config.depth, config.dropout, init=config.init,
                                 conv_dropout=config.conv_dropout).to(device)
        if init_state is not None:
            try:
                self.model.load_state_dict(init_state)
            except (RuntimeError, TypeError, AttributeError) as exc:
                raise HessgapError(f"init_state does not fit model {config.model} (width {config.width}, depth "
                                   f"{config.depth}) on {dataset.name}: {exc}") from exc
        self.warm_started = init_state is not None
        # the replica the steps train (DDP on several ranks); self.model is the module itself, what is saved
        self.trained = replicas.wrap(self.model, device) if replicas is not None else self.model
        self.optimizer = _make_optimizer(config, self.model)
        self.augment_generator = torch.Generator().manual_seed(epoch_seed(config.seed, _AUGMENT_STREAM))
        self.loss_scale = 1.0  # a rank's share of the global batch (see hessgap.train.parallel)
        self.step = make_training_step(config.remedy, loss_fn=self._scaled_loss, flip_ok=dataset.flip_ok,
                                       image=dataset.image,
                                       prox_lambda=config.prox_lambda, prox_steps=config.prox_steps,
                                       fgsm_epsilon=config.fgsm_epsilon, generator=self.augment_generator)
        self.x0 = parameters_to_vector(self.model.parameters()).detach().clone()
        self.history: list[dict] = []
        self.best_loss, self.bad_epochs = math.inf, 0
        self.diverged = self.stopped_early = self.resumed_from = None
        self.meta = {"input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
                     "dataset": dataset.name}
        self.last_good: dict | None = None  # the last finite weights, handed back if an epoch diverges
        self.tracker = None  # curvature every track_every optimizer steps (made once the run is set up)
        self.global_step = 0  # optimizer steps taken, over every epoch

    def _scaled_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets) * self.loss_scale if self.loss_scale != 1.0 else \
            F.cross_entropy(outputs, targets)

    # --- the run folder -------------------------------------------------------------------------------

    def result(self) -> TrainResult:
        self.model.eval()
        return TrainResult(model=self.model, x0=self.x0, history=self.history, diverged=self.diverged,
                           config=self.config, input_shape=tuple(self.dataset.input_shape),
                           num_classes=self.dataset.num_classes, dataset=self.dataset.name,
                           stopped_early=self.stopped_early, out_dir=str(self.folder) if self.folder else None,
                           resumed_from=self.resumed_from, tracking=tracking_records(self.tracker, self.folder))

    def payload(self, epoch: int) -> dict:
        return {
            "format": 1, "epoch": epoch, "config": self.config.to_dict(), **self.meta,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": _rng_state(self.device, self.augment_generator), "history": self.history, "x0": self.x0,
            "best_loss": self.best_loss, "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early,
        }

    def write_history(self) -> None:
        finished = (self.diverged is not None or self.stopped_early is not None
                    or len(self.history) >= self.config.epochs)
        write_json(self.folder / HISTORY_FILE, {"config": self.config.to_dict(), **self.meta, "history": self.history,
                                                 "diverged": self.diverged, "stopped_early": self.stopped_early,
                                                 "finished": finished})

    def start_or_resume(self) -> bool:
        """Set up the run folder or restore its latest checkpoint; False when the run has nothing left to do."""
        if self.folder is None:
            self.last_good = _copy_state(self.model)
            return True
        available = list_checkpoints(self.folder)
        history_file = self.folder / HISTORY_FILE
        if not available and history_file.is_file() and read_json(history_file).get("history"):
            raise HessgapError(
                f"{history_file} records a run but {self.folder / CHECKPOINT_DIR} holds no checkpoint to resume from; "
                "use a new output folder (or move that history.json away to start over here)"
            )
        if not available:
            save_checkpoint(checkpoint_path(self.folder, 0), self.payload(0))  # the starting point x0
            self.write_history()
            return True
        last_epoch, last_path = next(reversed(available.items()))
        state = load_checkpoint(last_path, map_location="cpu", needs=RESUME_ENTRIES)  # RNG states stay on the CPU
        check_same_run(state["config"], self.config, self.folder)
        if self.warm_started and not torch.equal(self.x0.cpu(), state["x0"]):
            raise HessgapError(
                f"{self.folder} holds a run warm-started from other weights than the init_state given; "
                "use a new output folder for a new warm start"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"], self.device, self.augment_generator)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise HessgapError(f"{last_path} does not fit the run it belongs to ({one_line(exc)}); "
                               f"{repair_hint(last_path)}") from exc
        self.x0 = state["x0"].to(self.device)
        self.history = list(state["history"])
        self.best_loss, self.bad_epochs = state["best_loss"], state["bad_epochs"]
        self.stopped_early = state["stopped_early"]
        self.resumed_from = last_epoch
        recorded = read_json(self.folder / HISTORY_FILE) if (self.folder / HISTORY_FILE).is_file() else {}
        if recorded.get("diverged") is not None:  # the epoch after the last checkpoint diverged
            self.diverged = recorded["diverged"]
            self.history += [h for h in recorded.get("history", []) if h["epoch"] > last_epoch][:1]
            return False
        return self.stopped_early is None and len(self.history) < self.config.epochs

    # --- one epoch ------------------------------------------------------------------------------------

    def drop_last(self, size: int) -> bool:
        """Whether an epoch of batch size ``size`` drops its last batch: BatchNorm cannot train on one sample, so
        a last (global) batch too small to give every rank two is dropped."""
        world = self.replicas.world_size if self.replicas is not None else 1
        rest = len(self.data.train) % size
        return 0 < rest < 2 * world if world > 1 else rest == 1

    def train_epoch(self, epoch: int, size: int, progress: bool) -> float:
        """One pass over the shuffled training set; returns the mean loss of the training batches."""
        total = len(self.data.train)
        world = self.replicas.world_size if self.replicas is not None else 1
        part = self.replicas.part if self.replicas is not None else None
        loader = make_loader(self.data.train, size, shuffle=True, seed=self.config.seed, epoch=epoch,
                             drop_last=self.drop_last(size), part=part)
        self.trained.train()
        running = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on the device: no sync
        seen = 0
        for index, (inputs, targets) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, unit="batch",
                                                       disable=not progress)):
            global_size = min(size, total - index * size)
            self.loss_scale = inputs.shape[0] * world / global_size if world > 1 else 1.0
            loss = self.step(self.trained, self.optimizer, inputs, targets)
            running += loss.double() / self.loss_scale * inputs.shape[0]
            seen += inputs.shape[0]
            self.global_step += 1
            if self.tracker is not None:
                self.tracker.step(self.global_step)
        self.loss_scale = 1.0
        if self.replicas is not None:
            summed, count = self.replicas.sum([float(running), seen])
            return summed / max(count, 1)
        return float(running) / max(seen, 1)

    def evaluate(self, split) -> tuple[float, float]:
        """(mean loss, accuracy) of the model over a split: on several ranks each evaluates its shard."""
        if self.replicas is not None:
            split = self.replicas.shard(split)
        sums = [0.0, 0.0, 0, 0]
        if len(split):
            loader = make_loader(split, min(self.config.eval_batch_size, len(split)), shuffle=False)
            sums = list(evaluation_sums(self.model, loader))
        if self.replicas is not None:
            sums = self.replicas.sum(sums)
        return loss_and_accuracy(*sums)

    def update_patience(self, epoch: int, train_loss: float) -> None:
        if self.config.patience is None:
            return
        if train_loss < self.best_loss - self.config.min_delta:
            self.best_loss, self.bad_epochs = train_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.config.patience:
            self.stopped_early = epoch

    def stop_diverged(self, epoch: int) -> None:
        """Record the diverged epoch and put the last finite weights back (the latest checkpoint's)."""
        self.diverged = epoch
        if self.folder is not None:
            earlier = {e: p for e, p in list_checkpoints(self.folder).items() if e < epoch}
            if earlier:
                self.last_good = load_checkpoint(earlier[max(earlier)], map_location="cpu")["model"]
            self.write_history()
        if self.last_good is not None:
            self.model.load_state_dict(self.last_good)

    def run(self, progress: bool, measurements: Sequence[Callable[[dict, nn.Module, bool], None]],
            epoch_callback: Callable[[dict, nn.Module], Any] | None) -> TrainResult:
        if not self.start_or_resume():
            return self.result()
        self.global_step = sum(len(make_loader(self.data.train, r["batch_size"], shuffle=False,  # steps done
                                               drop_last=self.drop_last(r["batch_size"]))) for r in self.history)
        self.tracker = make_tracker(self.config, self.data.train, self.model, self.optimizer, self.folder,
                                    self.replicas)
        try:
            return self._epochs(progress, measurements, epoch_callback)
        finally:
            if self.tracker is not None:
                self.tracker.close()

    def _epochs(self, progress: bool, measurements, epoch_callback) -> TrainResult:
        config, model = self.config, self.model
        slots = {key: value for measure in measurements for key, value in measure.fields.items()}
        start = len(self.history) + 1
        bar = tqdm(total=config.epochs, initial=start - 1, desc=f"{config.model} on {self.dataset.name}",
                   unit="epoch", disable=not progress)
        try:
            for epoch in range(start, config.epochs + 1):
                began = time.perf_counter()
                size = self.schedule.batch_size(epoch) if self.schedule else self.batch_size
                batch_loss = self.train_epoch(epoch, size, progress)
                (train_loss, train_acc), (test_loss, test_acc) = (self.evaluate(split) for split in
                                                                  (self.data.train, self.data.test))
                with torch.no_grad():
                    x = parameters_to_vector(model.parameters())
                    finite = bool(torch.isfinite(x).all()) and all(
                        math.isfinite(v) for v in (batch_loss, train_loss, test_loss))
                    distance = float(torch.linalg.vector_norm(x - self.x0))
                record = {
                    "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
                    "test_acc": test_acc, "distance_from_start": distance, **slots, "batch_size": size,
                    "lr": self.optimizer.param_groups[0]["lr"], "batch_loss": batch_loss,
                    "seconds": time.perf_counter() - began,
                }
                self.history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.3g}", train=f"{train_acc:.3f}", test=f"{test_acc:.3f}")
                if not finite:
                    self.stop_diverged(epoch)
                    break
                self.update_patience(epoch, train_loss)
                last = epoch == config.epochs or self.stopped_early is not None
                for measure in measurements:  # before the checkpoint: what they add is saved with the epoch
                    measure(record, model, last)
                if self.folder is not None:
                    save_checkpoint(checkpoint_path(self.folder, epoch), self.payload(epoch))
                    self.write_history()
                    _prune(self.folder, config.keep_checkpoints)
                else:
                    self.last_good = _copy_state(model)
                model.eval()  # a callback that runs the model must not move BatchNorm statistics
                if epoch_callback is not None and epoch_callback(dict(record), model):
                    break
                if self.stopped_early is not None:
                    break
        finally:
            bar.close()
        return self.result()


def _copy_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _prune(folder: Path, keep: int | None) -> None:
    if keep is None:
        return
    # the starting point (epoch 0) always stays: distances from x0 and warm starts are checked against it
    available = list_checkpoints(folder)
    for epoch in [e for e in available if e != 0][:-keep]:
        remove(available[epoch])
