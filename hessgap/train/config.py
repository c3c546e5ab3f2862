"""The configuration of a training run (:class:`TrainConfig`): its options, their checks, and which of them
may change when a run is resumed; how its device and batch size are resolved, and whether its network can be
trained in the device's memory.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _checks
from ..errors import HessgapError
from ..names import (
    BATCHNORM_MODES,
    INIT_NAMES,
    OPTIMIZER_NAMES,
    PREPROCESS_NAMES,
    REMEDY_NAMES,
    SHARPNESS_SOLVERS,
    TRAIN_TRACK_MEASURES,
    dataset_name,
    model_name,
)
from .data import SMALL_BATCH, Dataset, large_batch_size
from .models import check_fits_memory, parameter_count
from .remedies import BatchSchedule

# fields that may change between a run and its resumption (they do not change the trajectory)
RESUMABLE_CHANGES = frozenset({
    "epochs", "patience", "min_delta", "device", "data_root", "sharpness_every", "sharpness_epsilon",
    "sharpness_batches", "eval_batch_size", "keep_checkpoints", "sharpness_solver", "sharpness_batchnorm",
    "track", "track_every", "track_batches",
})

#: options added after runs had been recorded, with the value a recorded run that lacks them had: a run folder
#: written before they existed resumes, and keeps its name in an experiment's folder while they keep these values
ADDED_DEFAULTS = {
    "preprocess": "standardize", "init": "pytorch", "conv_dropout": False, "sharpness_solver": "auto",
    "sharpness_batchnorm": "eval", "track": [], "track_every": 0, "track_batches": 1,
}


@dataclass
class TrainConfig:
    """Everything that defines a training run; JSON round-trips through :meth:`to_dict` / :meth:`from_dict`.

    ``batch_size``: an integer, or ``"sb"`` (256, the paper's small batch) or ``"lb"`` (10% of the
    training set, the paper's large batch). ``patience``: None trains exactly ``epochs`` epochs; an integer
    stops once the training loss has not improved by more than ``min_delta`` for that many epochs
    (``epochs`` is then the maximum). ``remedy``: None or one of "augment", "conservative", "adversarial",
    "dynamic". ``batch_schedule`` (dynamic sampling): (start size, final size, growth factor per epoch);
    None uses (batch_size, 10% of the training set, 1.2). ``fgsm_epsilon`` is in units of the standardized
    inputs. ``sharpness_every``: compute Metric 2.1 every that many epochs (and at the last), 0 = never;
    ``sharpness_batches`` limits it to the first batches of the training set. ``keep_checkpoints``: None
    keeps every epoch's checkpoint, k keeps the starting point (epoch 0) and the last k (a checkpoint holds the weights and ADAM's two moments,
    about 3× the parameters' bytes: 21 MB for C1, 180 MB for C2 per epoch). ``device``: "auto" (CUDA if available), "cpu", "cuda", ...
    ``track``: measures of :class:`hessgap.Tracker` (``TRAIN_TRACK_MEASURES``) taken every ``track_every``
    optimizer steps over the first ``track_batches`` batches of ``eval_batch_size`` training samples (see
    :mod:`hessgap.train.tracking_log`); they do not change the trajectory.

    The paper's choices where hessgap's defaults differ (the ``paper`` preset sets them): ``preprocess="none"``
    (pixels in [0, 1], not standardized), ``init="glorot"`` (Keras's Glorot-uniform weights, zero biases),
    ``conv_dropout=True`` (the authors' dropout between C2/C4's convolutions), ``sharpness_solver="lbfgsb"``
    and ``sharpness_batchnorm="train"`` (BatchNorm on batch statistics while sharpness is measured, as
    the authors' Keras BatchNormalization(mode=2) normalized); ``patience`` stops at a plateau.
    """

    model: str = "F1"
    dataset: str = "digits"
    data_root: str | None = None
    batch_size: Any = SMALL_BATCH
    epochs: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    patience: int | None = None
    min_delta: float = 0.0
    seed: int = 0
    data_seed: int = 0
    width: float = 1.0
    depth: float = 1.0
    dropout: float = 0.5
    conv_dropout: bool = False
    init: str = "pytorch"
    preprocess: str = "standardize"
    remedy: str | None = None
    prox_lambda: float = 1e-3
    prox_steps: int = 3
    fgsm_epsilon: float = 0.1
    batch_schedule: tuple | None = None
    sharpness_every: int = 0
    sharpness_epsilon: float = 1e-3
    sharpness_batches: int | None = None
    sharpness_solver: str = "auto"
    sharpness_batchnorm: str = "eval"
    eval_batch_size: int = 1024
    keep_checkpoints: int | None = None
    track: list = dataclasses.field(default_factory=list)
    track_every: int = 0
    track_batches: int | None = 1
    device: str = "auto"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["track"] = list(out["track"])
        if out["batch_schedule"] is not None:
            out["batch_schedule"] = list(out["batch_schedule"])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        if isinstance(data, TrainConfig):
            return data
        if not isinstance(data, dict):
            raise HessgapError(f"a training configuration must be a dict or TrainConfig, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HessgapError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(data)
        if values.get("batch_schedule") is not None:
            values["batch_schedule"] = tuple(values["batch_schedule"])
        return cls(**values)

    def validate(self) -> TrainConfig:
        """Raise :class:`HessgapError` naming the first bad option; returns self (names normalized)."""
        self.model = model_name(self.model)
        try:
            self.dataset = dataset_name(self.dataset)
        except HessgapError:
            pass  # a Dataset of the caller's own may carry any name; load_dataset lists the ones it knows
        self.optimizer = str(self.optimizer).lower()
        if isinstance(self.batch_size, str):
            if self.batch_size.lower() not in ("sb", "lb"):
                raise HessgapError(f"batch_size must be a positive integer, 'sb' or 'lb', got {self.batch_size!r}")
        else:
            _checks.positive_int(self.batch_size, "batch_size")
        _checks.positive_int(self.epochs, "epochs")
        self.seed = _checks.seed(_plain_int(self.seed), "seed")
        self.data_seed = _checks.seed(_plain_int(self.data_seed), "data_seed")
        _checks.positive_int(self.patience, "patience", allow_none=True)
        _checks.positive_int(self.eval_batch_size, "eval_batch_size")
        _checks.positive_int(self.sharpness_batches, "sharpness_batches", allow_none=True)
        _checks.positive_int(self.keep_checkpoints, "keep_checkpoints", allow_none=True)
        _checks.positive_int(self.prox_steps, "prox_steps")
        _checks.nonnegative_int(self.sharpness_every, "sharpness_every", "0 = never")
        self._validate_tracking()
        _checks.choice(self.optimizer, OPTIMIZER_NAMES, "optimizer")
        for name in ("lr", "sharpness_epsilon", "fgsm_epsilon", "width", "depth"):
            _checks.positive_number(getattr(self, name), name)
        for name in ("momentum", "prox_lambda", "min_delta"):
            _checks.nonnegative_number(getattr(self, name), name)
        _checks.in_unit_interval(self.dropout, "dropout")
        _checks.choice(self.init, INIT_NAMES, "init")
        _checks.choice(self.preprocess, PREPROCESS_NAMES, "preprocess")
        _checks.choice(self.sharpness_solver, SHARPNESS_SOLVERS, "sharpness_solver")
        _checks.choice(self.sharpness_batchnorm, BATCHNORM_MODES, "sharpness_batchnorm")
        _checks.flag(self.conv_dropout, "conv_dropout")
        if self.remedy is not None and self.remedy not in REMEDY_NAMES:
            raise HessgapError(f"unknown remedy {self.remedy!r}; choose None or one of {', '.join(REMEDY_NAMES)}")
        if self.batch_schedule is not None:
            if self.remedy != "dynamic":
                raise HessgapError("batch_schedule is used by remedy='dynamic' only; set remedy='dynamic' or drop it")
            BatchSchedule.from_value(self.batch_schedule)
        resolve_device(self.device)
        return self


    def _validate_tracking(self) -> None:
        if isinstance(self.track, str) or not isinstance(self.track, (list, tuple)):
            raise HessgapError(f"track must be a list of measures from {', '.join(TRAIN_TRACK_MEASURES)}, got {self.track!r}")
        self.track = list(self.track)
        for name in self.track:
            _checks.choice(name, TRAIN_TRACK_MEASURES, "tracked measure")
        _checks.nonnegative_int(self.track_every, "track_every", "optimizer steps between records, 0 = never")
        _checks.positive_int(self.track_batches, "track_batches", allow_none=True)
        if bool(self.track) != bool(self.track_every):
            raise HessgapError("track and track_every go together: name the measures (track) and how often to take "
                               f"them (track_every ≥ 1); got track={self.track!r}, track_every={self.track_every}")
        if "eos_ratio" in self.track and str(self.optimizer).lower() != "sgd":
            raise HessgapError("eos_ratio is SGD's edge-of-stability ratio; with optimizer='adam' track "
                               "critical_sharpness, whose ratio η·λc/2 follows Adam's update")


def _plain_int(value):
    """numpy's integers as Python ints (the checks, torch's seeding and JSON take those); other values as they are."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise HessgapError(f"unknown device {device!r}: {exc}; use 'auto', 'cpu' or 'cuda[:index]'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HessgapError(f"device {device!r} asked for, but this torch build or machine has no CUDA device; use 'cpu'")
    return resolved


def _training_state(config: TrainConfig) -> tuple[int, str]:
    """How many numbers training holds per parameter, and which."""
    if config.optimizer == "adam":
        return 4, "training with adam (the weights, their gradients and ADAM's two moments)"
    if config.momentum > 0:
        return 3, "training with sgd (the weights, their gradients and the momentum)"
    return 2, "training with sgd (the weights and their gradients)"


def check_fits(config: TrainConfig, dataset: Dataset, device: torch.device | None = None) -> int:
    """Refuse ``config``'s network when training it cannot fit the memory of ``device`` (the configuration's
    device by default): counted, not built, so an absurd width is refused at once. Returns its parameter count."""
    count = parameter_count(config.model, dataset.input_shape, dataset.num_classes, config.width, config.depth)
    copies, held = _training_state(config)
    check_fits_memory(f"{config.model} (width {config.width:g}, depth {config.depth:g}) on {dataset.name}", count,
                      resolve_device(config.device) if device is None else device, copies, held)
    return count


def resolve_batch_size(batch_size, num_train: int) -> int:
    if isinstance(batch_size, str):
        return SMALL_BATCH if batch_size.lower() == "sb" else large_batch_size(num_train)
    return int(batch_size)


def check_same_run(saved: dict, config: TrainConfig, folder: Path) -> None:
    """Refuse to resume the run in ``folder`` (configuration ``saved``) with a configuration that would change
    its trajectory (any field outside :data:`RESUMABLE_CHANGES`)."""
    current = config.to_dict()
    saved = {**ADDED_DEFAULTS, **saved}  # a run recorded before an option existed had its default
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_CHANGES:
            continue
        if saved.get(key) != current.get(key):
            raise HessgapError(
                f"{folder} holds a run with {key}={saved.get(key)!r}, but this configuration has {key}={current.get(key)!r}; "
                "use a new output folder (or the same configuration to resume that run)"
            )
