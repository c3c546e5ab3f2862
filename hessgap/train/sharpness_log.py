"""Sharpness along training (Figure 6 of Keskar et al.): Metric 2.1 measured every few epochs of a run.

:class:`SharpnessLog` is one of the epoch callbacks of :func:`hessgap.train.train`, which composes it from
``TrainConfig.sharpness_every`` (0 = never). The loop calls it after each epoch's evaluation and *before*
the epoch's checkpoint is written, so the value is part of the checkpointed history and a resumed run is
bit-exact. The metric runs under a forked RNG: measuring does not change the training trajectory.

:func:`measure_sharpness` is how hessgap's training and experiments measure Metric 2.1 of a network: with
``batchnorm="eval"`` (the default) the network is in eval mode (BatchNorm on its running statistics); with
``batchnorm="train"`` BatchNorm normalizes with each batch's statistics, as the authors' Keras
BatchNormalization(mode=2) always did, while dropout stays off (the metric is then still a deterministic
function of the weights).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .. import _checks
from ..names import BATCHNORM_MODES
from ..sharp import SharpnessResult, sharpness
from ..sharp.epsilon import check_epsilons
from .data import make_loader


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[nn.Module]:
    """Every dropout layer of ``model`` at p = 0 inside the block (an identity also in train mode); the
    rates are put back on leaving, also on error."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    rates = [m.p for m in layers]
    try:
        for m in layers:
            m.p = 0.0
        yield model
    finally:
        for m, p in zip(layers, rates):
            m.p = p


def measure_sharpness(model: nn.Module, data, epsilon: float, *, batchnorm: str = "eval", solver: str = "auto",
                      **options) -> SharpnessResult:
    """Metric 2.1 of ``model`` over ``data`` (:func:`hessgap.sharpness` with ``options``) with BatchNorm on its
    running statistics (``batchnorm="eval"``) or on each batch's statistics (``"train"``, dropout off)."""
    _checks.choice(batchnorm, BATCHNORM_MODES, "sharpness BatchNorm mode")
    if batchnorm == "eval":
        return sharpness(model, data, epsilon=epsilon, solver=solver, **options)
    with dropout_off(model):
        return sharpness(model, data, epsilon=epsilon, solver=solver, train_mode=True, **options)


def check_sharpness_epsilons(model: nn.Module, data, epsilons, *, batchnorm: str = "eval",
                             max_batches: int | None = None) -> None:
    """Each ε of :func:`measure_sharpness` with ``batchnorm``, refused before any is measured when its box
    cannot be (see :func:`hessgap.sharp.epsilon.check_epsilons`)."""
    _checks.choice(batchnorm, BATCHNORM_MODES, "sharpness BatchNorm mode")
    if batchnorm == "eval":
        return check_epsilons(model, data, epsilons, max_batches=max_batches)
    with dropout_off(model):
        return check_epsilons(model, data, epsilons, train_mode=True, max_batches=max_batches)


class SharpnessLog:
    """Epoch callback: Metric 2.1 (full space, ``epsilon``) of the model over the training set every ``every``
    epochs and at the run's last epoch, written into the epoch's record as ``sharpness`` (None where it did
    not measure) and ``sharpness_seconds``.

    ``max_batches`` limits the measurement to the first batches of ``batch_size`` training samples;
    ``solver`` and ``batchnorm`` are those of :func:`measure_sharpness`.
    """

    #: the entries this callback adds to every epoch's record, with their value on epochs it does not measure
    fields = {"sharpness": None}

    def __init__(self, train_set: TensorDataset, every: int, epsilon: float = 1e-3, max_batches: int | None = None,
                 batch_size: int = 1024, device: torch.device | None = None, solver: str = "auto",
                 batchnorm: str = "eval"):
        self.train_set, self.every, self.epsilon = train_set, every, epsilon
        self.max_batches, self.batch_size, self.device = max_batches, batch_size, device
        self.solver, self.batchnorm = solver, batchnorm

    @classmethod
    def from_config(cls, config, train_set: TensorDataset, device: torch.device, replicas=None) -> SharpnessLog:
        """The log a :class:`~hessgap.train.config.TrainConfig` asks for (``sharpness_every``, ``sharpness_epsilon``,
        ``sharpness_batches``, batches of ``eval_batch_size``, ``sharpness_solver``, ``sharpness_batchnorm``). On
        several ranks (``replicas``) each measures its shard of those samples, and the metric adds the shards up:
        the value of one process."""
        max_batches = config.sharpness_batches
        if replicas is not None:
            if max_batches is not None:
                count = min(len(train_set), max_batches * config.eval_batch_size)
                train_set = TensorDataset(*(t[:count] for t in train_set.tensors))
            train_set, max_batches = replicas.shard(train_set), None
        return cls(train_set, config.sharpness_every, config.sharpness_epsilon, max_batches,
                   config.eval_batch_size, device, config.sharpness_solver, config.sharpness_batchnorm)

    def due(self, epoch: int, last: bool) -> bool:
        """Whether epoch ``epoch`` is measured (``last``: the run ends after it)."""
        return bool(self.every) and (epoch % self.every == 0 or last)

    def __call__(self, record: dict, model: nn.Module, last: bool = False) -> None:
        if not self.due(record["epoch"], last):
            return
        began = time.perf_counter()
        loader = make_loader(self.train_set, min(self.batch_size, len(self.train_set)), shuffle=False)
        devices = [self.device] if self.device is not None and self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            result = measure_sharpness(model, loader, self.epsilon, batchnorm=self.batchnorm, solver=self.solver,
                                       max_batches=self.max_batches)
        record["sharpness"] = float(result.value)
        record["sharpness_seconds"] = time.perf_counter() - began
