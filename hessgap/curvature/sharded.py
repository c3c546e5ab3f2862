"""Exact Hessian-vector products of FSDP2-sharded models, with vectors sharded like the parameters.

``torch.distributed.fsdp.fully_shard`` (FSDP2) keeps each parameter as a DTensor sharded on dim 0 across
the ranks and gathers it with hooks around each forward. Its hooks are not differentiable twice: a second
backward through them fails (the parameters never enter the autograd graph; pytorch/pytorch#172543 and
FSDP's own warning about double backward, pytorch/pytorch#120926). hessgap therefore runs the model without
FSDP's hooks, on parameters it gathers itself with *differentiable* collectives
(``torch.distributed.nn.functional.all_gather``, whose backward is a summing reduce-scatter and whose
double backward an all-gather again). Each rank differentiates with respect to its own local shards:

- a rank's gradient of its own batches' loss, reduce-scattered, is its shard of the gradient over the
  data of every rank, and a second backward with a direction's local shards gives its shard of H·v;
- no rank ever holds a full-size vector: vectors live as local shards (``n_local`` numbers per rank),
  and inner products are local dot products summed across the ranks (one all-reduce).

Memory per rank: the local shards of the parameters, of each direction and of the products (n/W each
for W ranks), plus, while a batch's graph is alive, the gathered parameters of the whole model (n) and
twice the activations, as a retained-graph double backward needs. The collectives per batch: one
all-gather per parameter tensor in the forward, one reduce-scatter per tensor in the first backward, and
per direction one all-gather and one reduce-scatter per tensor. Every rank walks the same number of
batches (a rank with fewer runs empty ones of weight 0), because each batch's passes are collectives.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import HessgapError, NonFiniteError
from ._flat import check_finite_products


def is_sharded(params) -> bool:
    """Whether the parameters are DTensors (FSDP2 or another DTensor sharding)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in params)


class ShardedParameters:
    """The selected parameters of an FSDP2 model as local shards (the variables a rank differentiates)."""

    def __init__(self, names: list[str], params: list[nn.Parameter]):
        from torch.distributed.tensor import DTensor, Shard

        self.names, self.params = names, params
        for name, p in zip(names, params):
            if not isinstance(p, DTensor):
                raise HessgapError(
                    f"parameter {name} is a plain tensor while others are sharded; shard the whole model with "
                    "fully_shard (or leave it unsharded)"
                )
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise HessgapError(
                    f"parameter {name} is sharded as {p.placements} on a {p.device_mesh.ndim}-D mesh; hessgap's "
                    "sharded products take FSDP2's layout (Shard(0) on a 1-D mesh)"
                )
        mesh = params[0].device_mesh
        self.group = mesh.get_group()
        self.world_size = mesh.size()
        self.local_shapes = [tuple(p.to_local().shape) for p in params]
        self.full_shapes = [tuple(p.shape) for p in params]

    @property
    def local_numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.local_shapes)

    def leaves(self) -> list[torch.Tensor]:
        """Fresh leaf tensors holding this rank's shards, to differentiate with respect to."""
        return [p.to_local().detach().clone().requires_grad_() for p in self.params]

    def gathered(self, leaves: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full parameters from the ranks' shards, by name, differentiable twice."""
        return {name: _gather(leaf, shape, self.world_size, self.group)
                for name, leaf, shape in zip(self.names, leaves, self.full_shapes)}


def _gather(local: torch.Tensor, full_shape: tuple, world_size: int, group) -> torch.Tensor:
    import torch.distributed.nn.functional as collectives

    rows = -(-full_shape[0] // world_size)  # FSDP2 shards dim 0 as torch.chunk does: ⌈rows / W⌉ per rank
    pad = rows - local.shape[0]
    if pad:
        local = torch.cat([local, local.new_zeros((pad,) + tuple(local.shape[1:]))])
    return torch.cat(collectives.all_gather(local, group=group))[: full_shape[0]]


@contextlib.contextmanager
def without_forward_hooks(model: nn.Module) -> Iterator[None]:
    """FSDP2's forward hooks (which gather and free parameters around each module) switched off, and restored."""
    saved = []
    for module in model.modules():
        saved.append((module, dict(module._forward_pre_hooks), dict(module._forward_hooks)))
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    try:
        yield
    finally:
        for module, pre, post in saved:
            module._forward_pre_hooks.update(pre)
            module._forward_hooks.update(post)


def rank_batches(objective):
    """``(batch, weight)`` for this rank's batches, as many as the rank with the most: a rank with fewer runs its
    first batch again at weight 0, since every batch's passes are collectives all ranks must join. Reading the
    shard is settled across the ranks first (it may fail on one rank only)."""
    ranks = objective.ranks
    error, batches = None, []
    try:
        batches = list(objective.batches())
    except Exception as exc:  # reading a shard may fail on one rank only
        error = exc
    ranks.settle(error)
    counts = ranks.sum_numbers([len(batches) if r == ranks.rank else 0 for r in range(ranks.world_size)])
    for index in range(int(max(counts))):
        yield (batches[index], batches[index].weight) if index < len(batches) else (batches[0], 0.0)


def sharded_pass(objective, rules, directions, flat_total: torch.Tensor, total: list[torch.Tensor], stats):
    """The HVP engine's pass for FSDP2 shards (``stats``: its PassStats, ``rules``: its SecondOrderRules): every
    rank walks as many batches as the rank with the most (collectives run inside each batch's passes), one
    direction at a time (the directions' shards cannot be vmapped through the collectives). The products come out summed over
    the ranks' data already; only the weights and losses are added up here."""
    ranks, sharded = objective.ranks, objective.sharded
    error = None  # a non-finite loss, raised after the loop
    for batch, weight in rank_batches(objective):
        leaves = sharded.leaves()
        with torch.enable_grad(), rules.watch(), without_forward_hooks(objective.model):
            parameters, failure = sharded.gathered(leaves), None
            try:
                loss = objective.batch_loss(batch, parameters=parameters)
            except Exception as exc:  # a batch that fails on one rank only (does not fit, own-loss check): the
                failure = exc         # others would wait in the backward's collectives, so every rank raises
            ranks.settle(failure)
            grads = torch.autograd.grad(loss * weight, leaves, create_graph=True, allow_unused=True)
        value = float(loss.detach())
        if not math.isfinite(value) and error is None:  # raised after the loop: the others are in collectives
            error = NonFiniteError(f"the loss of batch {batch.index} is {value}; check the model's parameters and "
                                   "inputs for NaN/inf")
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        for j in range(directions.k):
            products = torch.autograd.grad([grads[i] for i in live], leaves, retain_graph=True, allow_unused=True,
                                           grad_outputs=[directions.parts[i][j].to(leaves[i].dtype) for i in live])
            for acc, h in zip(total, products):
                if h is not None:
                    acc[j].add_(h)
        if weight:
            stats.batches += 1
            stats.samples += batch.samples
            stats.weight += weight
            stats.loss_sum += value * weight
    stats.chunk_size = 1
    ranks.settle(error)
    stats.samples, stats.weight, stats.loss_sum = ranks.sum_numbers([stats.samples, stats.weight, stats.loss_sum])
    stats.samples = int(stats.samples)
    flat_total.div_(stats.weight)
    ranks.together(check_finite_products, flat_total)
    return total, flat_total, stats

