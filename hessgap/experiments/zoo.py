"""The zoo of ``hessgap correlate``: which networks it trains, under which settings, and the named presets.

A zoo is the Cartesian product of its axes (batch size, learning rate, width, seed) on each of its data sets,
every member an F-type network (:func:`hessgap.train.build_model`) trained with ADAM for a budget that grows
with the batch size (``epochs`` at the smallest batch, ``lb_epochs`` at the largest, geometric in between,
as the paper's LB runs need more epochs for as many steps). Members are trained through
:func:`hessgap.experiments.networks.train`, so each is a resumable run folder under ``models/``, named by
its configuration.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

from .. import _checks
from ..errors import HessgapError
from ..names import DATASET_NAMES, DATASETS_ON_DISK, DEFAULT_MEASURE_NAMES, MEASURE_NAMES, ZOO_PRESETS, model_name

__all__ = ["AXES", "ZOO_PRESETS", "ZooSettings", "preset"]
#: The hyperparameter axes granulated τ averages over (the seed is held fixed within a group, not averaged).
AXES = ("batch_size", "lr", "width")


@dataclass
class ZooSettings:
    """Everything that decides a correlate run's numbers (``device`` only decides where)."""

    datasets: tuple = ("mnist1d", "digits")
    model: str = "F1"
    depth: float = 0.4
    widths: tuple = (0.25, 0.5)
    batch_sizes: tuple = (32, 128, 512)
    lrs: tuple = (1e-3, 3e-3)
    seeds: tuple = (0, 1)
    epochs: int = 50
    lb_epochs: int = 120
    optimizer: str = "adam"
    min_train_acc: float = 98.0  # percent; members below it are excluded from the correlations, with the reason
    measures: tuple = DEFAULT_MEASURE_NAMES
    measure_samples: int | None = 2048  # measure over the first N training samples (None: all)
    invariance_models: int = 1  # check invariance on the first N included members of each data set
    options: dict = field(default_factory=dict)  # per-measure settings (see hessgap.measures)
    eval_batch: int = 1024
    data_root: str | None = None
    data_seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        for name in ("datasets", "widths", "batch_sizes", "lrs", "seeds", "measures"):
            setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        if not self.datasets:
            raise HessgapError("the zoo needs at least one data set")
        for name in self.datasets:
            _checks.choice(name, DATASET_NAMES, "data set")
            if name in DATASETS_ON_DISK and self.data_root is None:
                raise HessgapError(f"data set {name!r} is read from files: pass --data-root with its folder")
        self.model = model_name(self.model)
        _checks.positive_number(self.depth, "depth")
        for w in self.widths:
            _checks.positive_number(w, "width")
        for b in self.batch_sizes:
            _checks.positive_int(b, "batch size")
        for lr in self.lrs:
            _checks.positive_number(lr, "learning rate")
        for s in self.seeds:
            _checks.seed(s)
        for name in ("epochs", "lb_epochs", "eval_batch", "invariance_models"):
            _checks.positive_int(getattr(self, name), name)
        _checks.positive_int(self.measure_samples, "measure_samples", allow_none=True)
        if not 0 <= self.min_train_acc <= 100:
            raise HessgapError(f"min_train_acc is a percentage in [0, 100], got {self.min_train_acc!r}")
        for name in self.measures:
            _checks.choice(name, MEASURE_NAMES, "measure")
        if not self.measures:
            raise HessgapError("the zoo needs at least one measure")
        if not isinstance(self.options, dict):
            raise HessgapError(f"options must map measure names to settings, got {type(self.options).__name__}")
        for name, settings in self.options.items():
            _checks.choice(name, MEASURE_NAMES, "measure in options")
            if not isinstance(settings, dict):
                raise HessgapError(f"options[{name!r}] must be a dict of settings, got {type(settings).__name__}")
        if not all(isinstance(a, (list, tuple)) and len(set(a)) == len(a) for a in
                   (self.widths, self.batch_sizes, self.lrs, self.seeds)) or not all(
                (self.widths, self.batch_sizes, self.lrs, self.seeds)):
            raise HessgapError("every zoo axis (widths, batch sizes, learning rates, seeds) needs at least one "
                               "value, each once")

    def epochs_for(self, batch_size: int) -> int:
        """``epochs`` at the smallest batch size, ``lb_epochs`` at the largest, geometric in log batch size."""
        low, high = min(self.batch_sizes), max(self.batch_sizes)
        if high == low:
            return self.epochs
        t = math.log(batch_size / low) / math.log(high / low)
        return max(1, int(round(self.epochs * (self.lb_epochs / self.epochs) ** t)))

    def members(self) -> list[dict]:
        """Every network of the zoo: data set, batch size, learning rate, width and seed."""
        return [dict(dataset=d, batch_size=b, lr=lr, width=w, seed=s)
                for d, b, lr, w, s in itertools.product(self.datasets, self.batch_sizes, self.lrs, self.widths,
                                                       self.seeds)]

    def replace(self, **changes) -> ZooSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> ZooSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise HessgapError(f"unknown zoo settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def preset(name: str) -> ZooSettings:
    """``quick``: 48 small F1 networks (2 data sets × 3 batch sizes × 2 learning rates × 2 widths × 2 seeds),
    every measure, under 30 minutes on a 2-core CPU (one torch thread). ``full``: three values per axis, three seeds, the whole
    training set measured, for a larger machine."""
    _checks.choice(name, ZOO_PRESETS, "zoo preset")
    if name == "quick":
        return ZooSettings()
    return ZooSettings(widths=(0.25, 0.5, 1.0), batch_sizes=(32, 256, 2048), lrs=(3e-4, 1e-3, 3e-3),
                       seeds=(0, 1, 2), depth=1.0, epochs=60, lb_epochs=200, measure_samples=None)
