"""Curvature along a training run, step by step: ``TrainConfig.track`` measured every ``track_every`` optimizer
steps by a :class:`hessgap.Tracker` (``hessgap train --track lambda_max,critical_sharpness --track-every N``).

The tracked data are the first ``track_batches`` batches of ``eval_batch_size`` training samples (on several
ranks, each rank's shard of them), measured in eval mode. The tracker leaves the weights, the optimizer's state
and every random stream as they were, so tracking does not change the trajectory; with a run folder its records
go to ``<run>/tracking/`` (``history.jsonl``, ``tracking.png``) and a resumed run continues them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..tracking import Tracker
from ..tracking.folder import read_records
from .data import make_loader

TRACKING_DIR = "tracking"


def make_tracker(config, train_set: TensorDataset, model: nn.Module, optimizer: torch.optim.Optimizer,
                 folder: Path | None, replicas=None) -> Tracker | None:
    """The tracker ``config`` asks for (None when ``track`` is empty), on ``model`` and its ``optimizer``."""
    if not config.track:
        return None
    count = len(train_set) if config.track_batches is None else min(len(train_set),
                                                                    config.track_batches * config.eval_batch_size)
    data = TensorDataset(*(t[:count] for t in train_set.tensors))
    if replicas is not None:
        data = replicas.shard(data)
    # the tracker reads the loader itself, under its preserved RNG: iterating a DataLoader draws a seed from
    # torch's generator, which would shift the training's dropout
    loader = make_loader(data, min(config.eval_batch_size, len(data)), shuffle=False)
    return Tracker(model, loader, every=config.track_every, measures=tuple(config.track), optimizer=optimizer,
                   out=folder / TRACKING_DIR if folder is not None else None)


def tracking_records(tracker: Tracker | None, folder: Path | None) -> list[dict]:
    """The run's records: the tracker's, or for a finished run that was not resumed, those in its folder."""
    if tracker is not None:
        return list(tracker.history)
    return read_records(folder / TRACKING_DIR) if folder is not None else []
