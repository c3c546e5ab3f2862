"""Training on several ranks: PyTorch's DistributedDataParallel, with the global batch of one process.

When a default process group is initialized (``torchrun --nproc_per_node N -m hessgap train ...``), every
rank trains a replica of the model (``DistributedDataParallel`` averages the gradients) on its slice of
each *global* batch: the epoch's permutation is drawn from (seed, epoch) on every rank and cut into global
batches of ``batch_size`` as in one process, and rank r takes the r-th of ``world_size`` near-equal parts of
each (``torch.tensor_split``). So a global batch holds the same samples as in one process, and with each
rank's mean loss scaled by n_r·W/N (n_r its part of the N samples, W ranks) DDP's average of the ranks'
gradients is the global batch's mean gradient: the run follows the one-process run to float tolerance
(PyTorch's ``DistributedSampler`` shards the epoch first, which would put other samples together).

BatchNorm: on GPUs its layers become ``SyncBatchNorm`` (statistics over the global batch, as in one
process); ``SyncBatchNorm`` runs on GPUs only, so on CPUs (gloo) each rank normalizes over its own part,
as plain DDP does, and such runs differ from one process. Dropout draws the same masks on every rank
(same seed), for other samples.

Evaluation and the sharpness along training run on contiguous shards of the splits, their sums added up
across the ranks. Only rank 0 writes files (see :func:`hessgap._io.atomic_write`); checkpoints do not
depend on the world size, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..distributed import Ranks


class Replicas:
    """The ranks a training run spans (the default process group), and what changes with them."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.rank, self.world_size = ranks.rank, ranks.world_size

    @classmethod
    def resolve(cls) -> Replicas | None:
        """The default process group's ranks, or None in a single process."""
        ranks = Ranks.resolve()
        return cls(ranks) if ranks.active else None

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` as a DistributedDataParallel replica (SyncBatchNorm on GPUs)."""
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
        return nn.parallel.DistributedDataParallel(model)

    def part(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch's sample indices."""
        return torch.tensor_split(indices, self.world_size)[self.rank]

    def shard(self, dataset: TensorDataset) -> TensorDataset:
        """A contiguous shard of ``dataset`` for this rank (evaluation, sharpness)."""
        bounds = torch.tensor_split(torch.arange(len(dataset)), self.world_size)[self.rank]
        start, stop = (int(bounds[0]), int(bounds[-1]) + 1) if len(bounds) else (0, 0)
        return TensorDataset(*(t[start:stop] for t in dataset.tensors))

    def sum(self, values: list[float]) -> list[float]:
        return self.ranks.sum_numbers(values)


def rank_device(device: torch.device) -> torch.device:
    """On GPUs, each rank its own device: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` (torchrun sets it)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device
