"""Settings of the paper's experiments and the named presets (``quick`` for a CPU, ``paper`` for a GPU).

One :class:`Settings` object drives every experiment of a run, so the SB and LB networks that the
gap table reports are the same ones whose sharpness, spectrum and parametric plots follow.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from .. import _checks
from ..errors import HessgapError
from ..names import (
    BATCHNORM_MODES,
    INIT_NAMES,
    INTERPOLATION_PATHS,
    PREPROCESS_NAMES,
    PRESET_NAMES,
    REMEDY_NAMES,
    SHARPNESS_SOLVERS,
    STOP_RULES,
)
from .registry import EXPERIMENTS

__all__ = ["ADDED_SETTINGS", "EXPERIMENTS", "PATHS", "PRESET_NAMES", "REMEDY_NAMES", "Settings", "preset"]

#: The interpolation paths of Figures 3 and 7 (see :mod:`hessgap.experiments.parametric`).
PATHS = INTERPOLATION_PATHS


@dataclass
class Settings:
    """Everything that decides the numbers of a run (``device`` and ``experiments`` only decide where and what).

    Stopping: with ``stop="epochs"`` every run trains ``epochs`` epochs (LB ``lb_epochs``; ``patience``, when
    set, stops any run earlier once its training loss has not improved by more than ``min_delta`` for that
    many epochs). With ``stop="plateau"`` the SB and LB networks of the tables (and the remedies' LB runs)
    train until their training loss has not improved by more than ``min_delta`` for ``patience`` epochs, at
    most ``max_epochs``, as the paper trained "until the loss function ceased to improve"; the sweep (Fig. 4)
    and the warm starts (Fig. 5) train their fixed epochs, as the paper's did (100 each).
    """

    model: str = "F1"
    dataset: str = "digits"
    data_root: str | None = None
    data_seed: int = 0  # fixes the data split (digits) and sample (MNIST-1D); vary `seed` across runs
    width: float = 1.0
    depth: float = 1.0
    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 100
    lb_epochs: int | None = None  # None: `epochs`; LB takes fewer steps per epoch and may need more epochs
    patience: int | None = None
    stop: str = "epochs"  # "epochs" or "plateau" (see above)
    max_epochs: int = 500  # stop="plateau": at most this many epochs
    min_delta: float = 0.0  # an improvement of the training loss by at most this much does not count
    # the paper's choices where hessgap's defaults differ (the paper preset sets them)
    preprocess: str = "standardize"  # "none": pixels in [0, 1], as the authors' code fed them
    init: str = "pytorch"  # "glorot": Keras's Glorot-uniform weights and zero biases
    conv_dropout: bool = False  # True: the authors' dropout between C2/C4's convolutions
    sb_batch: int = 256
    lb_batch: int | None = None  # None: lb_fraction of the training set (the paper's 10 %)
    lb_fraction: float = 0.1
    seed: int = 0  # seeds used: seed, seed + 1, ..., seed + seeds - 1
    seeds: int = 5
    # sharpness (Metric 2.1)
    epsilons: tuple = (1e-3, 5e-4)
    subspace_dim: int | None = 100  # None: full space only
    sharpness_solver: str = "auto"  # one of hessgap.names.SHARPNESS_SOLVERS; auto: the metric's choice
    sharpness_batchnorm: str = "eval"  # "train": BatchNorm on batch statistics while measuring (the authors' Keras)
    sharpness_batches: int | None = None  # None: the whole training set
    eval_batch: int = 1024
    # experiment-specific
    alphas: int = 25
    alpha_range: tuple = (-1.0, 2.0)
    paths: tuple = PATHS
    spectrum_k: int = 10
    trace_probes: int = 0  # spectrum: also Hutchinson's trace of the Hessian with this many probes (0 = off)
    sharpness_every: int = 1  # along training (Fig. 6): sharpness every this many epochs of the first seed
    sweep_batches: tuple = (32, 64, 128, 256, 512, 1024, 2048, 4096, 6000)
    warmstart_sb_epochs: int = 100
    warmstart_lb_epochs: int = 100
    warmstart_every: int = 10
    remedies: tuple = REMEDY_NAMES
    fgsm_epsilon: float | None = None  # None: the training module's default
    prox_lambda: float = 1e-3
    experiments: tuple = EXPERIMENTS
    device: str = "auto"  # "auto": CUDA when available

    def __post_init__(self):
        self.epsilons = tuple(float(e) for e in self.epsilons)
        self.alpha_range = tuple(float(a) for a in self.alpha_range)
        for name in ("paths", "sweep_batches", "remedies", "experiments"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("seed", "data_seed"):  # numpy's integers as Python ints (JSON, range and the checks take those)
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                setattr(self, name, int(value))
        self.validate()

    def validate(self) -> None:
        for name in ("epochs", "sb_batch", "lb_batch", "seeds", "lb_epochs", "subspace_dim", "sharpness_batches", "eval_batch",
                     "alphas", "spectrum_k", "warmstart_sb_epochs", "warmstart_lb_epochs", "warmstart_every",
                     "patience"):
            _checks.positive_int(getattr(self, name), name, allow_none=True)
        _checks.positive_int(self.max_epochs, "max_epochs")
        _checks.nonnegative_number(self.min_delta, "min_delta")
        _checks.choice(self.stop, STOP_RULES, "stop rule")
        if self.stop == "plateau" and self.patience is None:
            raise HessgapError("stop='plateau' needs patience: the number of epochs without improvement of the "
                               "training loss after which a run stops (the paper preset: 10)")
        _checks.choice(self.preprocess, PREPROCESS_NAMES, "preprocess")
        _checks.choice(self.init, INIT_NAMES, "init")
        _checks.flag(self.conv_dropout, "conv_dropout")
        _checks.choice(self.sharpness_batchnorm, BATCHNORM_MODES, "sharpness_batchnorm")
        for name in ("width", "depth", "lr"):
            _checks.positive_number(getattr(self, name), name)
        _checks.seed(self.seed, "seed")
        _checks.seed(self.data_seed, "data_seed")
        if not self.epsilons or not all(e > 0 and math.isfinite(e) for e in self.epsilons):
            raise HessgapError(f"every sharpness epsilon must be a finite number > 0, got {self.epsilons}")
        _checks.in_unit_interval(self.lb_fraction, "lb_fraction", closed_low=False, closed_high=True)
        _checks.nonnegative_int(self.trace_probes, "trace_probes", "0 = no trace")
        _checks.nonnegative_int(self.sharpness_every, "sharpness_every", "0 = never")
        _checks.choice(self.sharpness_solver, SHARPNESS_SOLVERS, "sharpness solver")
        if not all(math.isfinite(a) for a in self.alpha_range) or self.alpha_range[0] >= self.alpha_range[1]:
            raise HessgapError(f"alpha_range must be finite (low, high) with low < high, got {self.alpha_range}")
        for path in self.paths:
            _checks.choice(path, PATHS, "interpolation path")
        for remedy in self.remedies:
            _checks.choice(remedy, REMEDY_NAMES, "remedy")
        for name in self.experiments:
            _checks.choice(name, EXPERIMENTS, "experiment")
        for batch in self.sweep_batches:
            _checks.positive_int(batch, "sweep batch size")

    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))

    def lb_size(self, train_size: int) -> int:
        """The LB batch size for a training set of ``train_size`` samples."""
        if self.lb_batch is not None:
            return self.lb_batch
        return max(1, int(round(self.lb_fraction * train_size)))

    def epochs_for(self, batch_size: int, train_size: int) -> int:
        """Epochs of a run with ``batch_size``: ``epochs`` at the SB size, ``lb_epochs`` at the LB size,
        geometrically in between (in log batch size), so every run of a sweep gets a comparable budget."""
        if self.lb_epochs is None:
            return self.epochs
        lb = self.lb_size(train_size)
        if lb <= self.sb_batch:
            return self.epochs
        t = math.log(batch_size / self.sb_batch) / math.log(lb / self.sb_batch)
        t = min(1.0, max(0.0, t))
        return max(1, int(round(self.epochs * (self.lb_epochs / self.epochs) ** t)))

    def trains_to_plateau(self) -> bool:
        """Whether the tables' networks train until their loss stops improving (``stop="plateau"``)."""
        return self.stop == "plateau"

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise HessgapError(f"unknown settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)


#: settings added after run folders had been recorded, with the value a folder that lacks them had: such a
#: folder resumes while they keep these values
ADDED_SETTINGS = {
    "stop": "epochs", "max_epochs": 500, "min_delta": 0.0, "preprocess": "standardize", "init": "pytorch",
    "conv_dropout": False, "sharpness_batchnorm": "eval",
}

#: The demo's data set when none is named: MNIST-1D, where the generalization gap shows (digits is too easy).
DEMO_DATASET = "mnist1d"

# The data set each network of the paper used, where it is available offline (TIMIT is not: F2 is
# run on MNIST-1D, a 40-feature sequence task, unless --dataset says otherwise).
PAPER_DATA = {"F1": "mnist", "F2": "mnist1d", "C1": "cifar10", "C2": "cifar10", "C3": "cifar100", "C4": "cifar100"}

# Fig. 4's batch sizes: C1 ran about 100-5000; F-nets up to 10 % of MNIST
_PAPER_SWEEP = {
    "F1": (64, 128, 256, 512, 1024, 2048, 4096, 6000),
    "F2": (64, 128, 256, 512, 1024, 2048, 4000),
    "C1": (100, 250, 500, 1000, 2500, 5000),
    "C2": (100, 250, 500, 1000, 2500, 5000),
    "C3": (100, 250, 500, 1000, 2500, 5000),
    "C4": (100, 250, 500, 1000, 2500, 5000),
}


def preset(name: str, model: str | None = None, dataset: str | None = None) -> Settings:
    """The settings of a named preset.

    ``quick``: F1 at a small width on the embedded digits data, a few epochs, 2 seeds: every
    experiment on a 2-core CPU in minutes. ``paper``: the paper's settings (ADAM lr 1e-3, SB 256,
    LB 10 % of the training set, 100 epochs, 5 seeds, ε ∈ {1e-3, 5e-4}, 100-dim subspace, 25 α),
    for a GPU; the data set defaults to the one the network was trained on in the paper.
    """
    _checks.choice(name, PRESET_NAMES, "preset")
    if name == "quick":
        # digits: 1437 training samples; SB 16 vs LB half the data (45× larger, like the paper's 23×);
        # both fit the training set, LB with 2 steps per epoch needs 5× the epochs
        return Settings(
            model=model or "F1",
            dataset=dataset or "digits",
            width=0.5,
            depth=1.0,
            epochs=30,
            lb_epochs=150,
            sb_batch=16,
            lb_batch=None,
            lb_fraction=0.5,
            seeds=2,
            subspace_dim=100,
            sharpness_batches=None,
            eval_batch=2048,
            alphas=25,
            spectrum_k=5,
            trace_probes=16,
            sharpness_every=5,
            sweep_batches=(16, 64, 256, 1024),
            warmstart_sb_epochs=10,
            warmstart_lb_epochs=60,
            warmstart_every=2,
        )
    if name == "paper":
        model = model or "F1"
        return Settings(
            model=model,
            dataset=dataset or PAPER_DATA.get(model, "mnist"),
            epochs=100,
            stop="plateau",
            patience=10,
            max_epochs=500,
            preprocess="none",
            init="glorot",
            conv_dropout=True,
            sb_batch=256,
            lb_fraction=0.1,
            seeds=5,
            sharpness_solver="lbfgsb",
            sharpness_batchnorm="train",
            sweep_batches=_PAPER_SWEEP.get(model, _PAPER_SWEEP["F1"]),
            warmstart_sb_epochs=100,
            warmstart_lb_epochs=100,
            warmstart_every=1,
            sharpness_every=5,
            sharpness_batches=None,
        )
