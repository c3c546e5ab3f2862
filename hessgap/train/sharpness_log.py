"""Sharpness along training (Figure 6 of Keskar et al.): Metric 2.1 measured every few epochs of a run.

:class:`SharpnessLog` is one of the epoch callbacks of :func:`hessgap.train.train`, which composes it from
``TrainConfig.sharpness_every`` (0 = never). The loop calls it after each epoch's evaluation and *before*
the epoch's checkpoint is written, so the value is part of the checkpointed history and a resumed run is
bit-exact. The metric runs under a forked RNG: measuring does not change the training trajectory.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..sharp import sharpness
from .data import make_loader


class SharpnessLog:
    """Epoch callback: Metric 2.1 (full space, ``epsilon``) of the model over the training set every ``every``
    epochs and at the run's last epoch, written into the epoch's record as ``sharpness`` (None where it did
    not measure) and ``sharpness_seconds``.

    ``max_batches`` limits the measurement to the first batches of ``batch_size`` training samples.
    """

    #: the entries this callback adds to every epoch's record, with their value on epochs it does not measure
    fields = {"sharpness": None}

    def __init__(self, train_set: TensorDataset, every: int, epsilon: float = 1e-3, max_batches: int | None = None,
                 batch_size: int = 1024, device: torch.device | None = None):
        self.train_set, self.every, self.epsilon = train_set, every, epsilon
        self.max_batches, self.batch_size, self.device = max_batches, batch_size, device

    @classmethod
    def from_config(cls, config, train_set: TensorDataset, device: torch.device, replicas=None) -> SharpnessLog:
        """The log a :class:`~hessgap.train.config.TrainConfig` asks for (``sharpness_every``, ``sharpness_epsilon``,
        ``sharpness_batches``, batches of ``eval_batch_size``). On several ranks (``replicas``) each measures its
        shard of those samples, and the metric adds the shards up: the value of one process."""
        max_batches = config.sharpness_batches
        if replicas is not None:
            if max_batches is not None:
                count = min(len(train_set), max_batches * config.eval_batch_size)
                train_set = TensorDataset(*(t[:count] for t in train_set.tensors))
            train_set, max_batches = replicas.shard(train_set), None
        return cls(train_set, config.sharpness_every, config.sharpness_epsilon, max_batches,
                   config.eval_batch_size, device)

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
            result = sharpness(model, loader, epsilon=self.epsilon, max_batches=self.max_batches)
        record["sharpness"] = float(result.value)
        record["sharpness_seconds"] = time.perf_counter() - began
