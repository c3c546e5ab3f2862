"""Settings of the paper's experiments and the named presets (``quick`` for a CPU, ``paper`` for a GPU).

One :class:`Settings` object drives every experiment of a run, so the SB and LB networks that the
gap table reports are the same ones whose sharpness, spectrum and parametric plots follow.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import HessgapError

EXPERIMENTS = ("gap", "sharpness", "parametric", "spectrum", "along_training", "sweep", "warmstart", "remedies")
REMEDY_NAMES = ("augment", "conservative", "adversarial", "dynamic")
PRESET_NAMES = ("quick", "paper")


@dataclass
class Settings:
    """Everything that decides the numbers of a run (``device`` and ``experiments`` only decide where and what)."""

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
    sb_batch: int = 256
    lb_batch: int | None = None  # None: lb_fraction of the training set (the paper's 10 %)
    lb_fraction: float = 0.1
    seed: int = 0  # seeds used: seed, seed + 1, ..., seed + seeds - 1
    seeds: int = 5
    # sharpness (Metric 2.1)
    epsilons: tuple = (1e-3, 5e-4)
    subspace_dim: int | None = 100  # None: full space only
    sharpness_solver: str = "box-ascent"
    sharpness_batches: int | None = None  # None: the whole training set
    eval_batch: int = 1024
    # experiment-specific
    alphas: int = 25
    alpha_range: tuple = (-1.0, 2.0)
    paths: tuple = ("linear", "curved")
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
        self.validate()

    def validate(self) -> None:
        def positive(name, value, integer=True):
            if value is None:
                return
            if (integer and (not isinstance(value, int) or isinstance(value, bool))) or value <= 0:
                kind = "a positive integer" if integer else "positive"
                raise HessgapError(f"{name} must be {kind}, got {value!r}")

        for name in ("epochs", "sb_batch", "lb_batch", "seeds", "lb_epochs", "subspace_dim", "sharpness_batches", "eval_batch",
                     "alphas", "spectrum_k", "warmstart_sb_epochs", "warmstart_lb_epochs", "warmstart_every",
                     "patience"):
            positive(name, getattr(self, name))
        positive("width", self.width, integer=False)
        positive("depth", self.depth, integer=False)
        positive("lr", self.lr, integer=False)
        for name in ("epsilons",):
            if not self.epsilons or any(e <= 0 for e in self.epsilons):
                raise HessgapError(f"every sharpness epsilon must be > 0, got {self.epsilons}")
        if not 0 < self.lb_fraction <= 1:
            raise HessgapError(f"lb_fraction must be in (0, 1], got {self.lb_fraction}")
        if self.trace_probes < 0:
            raise HessgapError(f"trace_probes must be >= 0 (0 = no trace), got {self.trace_probes}")
        if self.sharpness_every < 0:
            raise HessgapError(f"sharpness_every must be >= 0 (0 = never), got {self.sharpness_every}")
        if self.alpha_range[0] >= self.alpha_range[1]:
            raise HessgapError(f"alpha_range must be (low, high) with low < high, got {self.alpha_range}")
        for path in self.paths:
            if path not in ("linear", "curved"):
                raise HessgapError(f"unknown interpolation path {path!r}; choose from linear, curved")
        for remedy in self.remedies:
            if remedy not in REMEDY_NAMES:
                raise HessgapError(f"unknown remedy {remedy!r}; choose from {', '.join(REMEDY_NAMES)}")
        for name in self.experiments:
            if name not in EXPERIMENTS:
                raise HessgapError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
        if any(b <= 0 for b in self.sweep_batches):
            raise HessgapError(f"sweep batch sizes must be positive, got {self.sweep_batches}")

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

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise HessgapError(f"unknown settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)


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
            sb_batch=256,
            lb_fraction=0.1,
            seeds=5,
            sweep_batches=_PAPER_SWEEP.get(model, _PAPER_SWEEP["F1"]),
            warmstart_sb_epochs=100,
            warmstart_lb_epochs=100,
            warmstart_every=10,
            sharpness_every=5,
            sharpness_batches=None,
        )
    raise HessgapError(f"unknown preset {name!r}; choose from {', '.join(PRESET_NAMES)}")
