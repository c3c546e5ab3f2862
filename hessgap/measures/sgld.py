"""Stochastic-gradient Langevin chains around a point w* of the loss: the sampler of the local learning
coefficient (:mod:`hessgap.measures.llc`).

Each step moves every chain by the update of Lau et al. 2023 (as devinterp's SGLD):

    w ← w − (ε/2)·(nβ·∇L_m(w) + γ·(w − w*)) + √ε·ξ,   ξ ~ N(0, I)

with L_m the mean loss of one minibatch, nβ the inverse temperature times the number of units and γ the
localization around w*. It records L_m(w_t) at every step and the same minibatch's loss at w*, L_m(w*),
so that the estimate can average the differences (the minibatch's own sampling noise cancels).

- **Minibatches** are the loader's batches (kept by the caller), one per step, in a seeded random order
  that is drawn again every pass over them. On several ranks each step takes one batch of every rank (the
  union is the step's minibatch, as a data-parallel training step), with the batches' unit weights.
- **Chains batched**: the C chains' parameters are stacked (C, ...) and one ``torch.func.vmap`` over
  ``functional_call`` computes every chain's loss and gradient on the minibatch; a model that does not
  vmap (data-dependent control flow, ops without batching rules) runs the chains one after the other, with
  the very same noise, so both paths give the same chains up to rounding (``Chains.path`` says which ran).
- **Seeded**: the noise comes from one generator on the parameters' device and the batch order from
  another, both from ``seed``, so a rerun repeats the chains and every rank draws the same numbers.
- A chain whose loss or gradient stops being finite is stopped (put back at w* and frozen); its step is
  recorded and its loss trace is NaN from there on.

The model's own parameters are never written: the chains live in tensors of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..curvature.objective import LossOverData, accumulation_dtype


@dataclass
class Chains:
    """What the chains recorded: per step and chain the minibatch loss at the chain's position (``losses``,
    float64, shape (chains, steps)), the same minibatch's loss at w* (``reference``, (steps,)) and its unit
    weight (``weights``), the step at which each chain diverged (None when it did not), the chains' last
    positions (name → (chains, ...) tensors) and how the chains were evaluated."""

    losses: torch.Tensor
    reference: torch.Tensor
    weights: torch.Tensor
    diverged: list
    final: dict[str, torch.Tensor]
    path: str
    notes: list[str] = field(default_factory=list)


def _batch_order(count: int, steps: int, seed: int) -> list[int]:
    """Which of ``count`` batches each step uses: a fresh seeded permutation for every pass."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps:
        order.extend(torch.randperm(count, generator=generator).tolist())
    return order[:steps]


class _Gradients:
    """Every chain's loss and gradient on one batch: one vmap over the stacked chains, or a loop."""

    def __init__(self, objective: LossOverData, names: list[str], vectorize: bool):
        self.objective, self.names = objective, names
        self.path = "vmap" if vectorize else "loop"
        self.notes: list[str] = []

    def __call__(self, batch, stacked: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        def loss_of(parameters):
            return self.objective.batch_loss(batch, parameters)

        value_and_grad = torch.func.grad_and_value(loss_of)
        if self.path == "vmap":
            try:
                grads, losses = torch.func.vmap(value_and_grad, randomness="different")(stacked)
                return losses, grads
            except Exception as exc:  # noqa: BLE001 - any vmap failure: the loop below names real errors
                self.path = "loop"
                self.notes.append(f"the chains ran one after the other: the model does not vmap "
                                  f"({type(exc).__name__}: {str(exc)[:200]})")
        chains = next(iter(stacked.values())).shape[0]
        losses, grads = [], {name: [] for name in self.names}
        for c in range(chains):
            grad, loss = value_and_grad({name: t[c] for name, t in stacked.items()})
            losses.append(loss)
            for name in self.names:
                grads[name].append(grad[name])
        return torch.stack(losses), {name: torch.stack(g) for name, g in grads.items()}


def run_chains(objective: LossOverData, *, step_size: float, n_beta: float, localization: float, chains: int,
               steps: int, seed: int, vectorize: bool = True,
               progress: Callable | None = None) -> Chains:
    """Run ``chains`` SGLD chains of ``steps`` steps from the model's parameters w* (see the module docstring).

    ``objective`` holds the kept batches (this rank's shard); its model is evaluated in whatever mode the
    caller set (eval mode for the measures). ``progress`` wraps the range of steps (a tqdm bar)."""
    ranks = objective.ranks
    batches = list(objective.batches())
    names = list(objective.names)
    centre = {name: p.detach().to(accumulation_dtype(p.dtype)) for name, p in zip(names, objective.params)}
    dtype = next(iter(centre.values())).dtype
    device = objective.device
    with torch.no_grad():  # each batch's loss at w*: the control variate of its losses along the chains
        at_centre = ranks.together(lambda: [float(objective.batch_loss(batch)) for batch in batches])
    order = _batch_order(len(batches), steps, seed * 7919 + 1)
    noise = torch.Generator(device=device).manual_seed(seed)
    stacked = {name: x.unsqueeze(0).repeat(chains, *([1] * x.dim())).contiguous() for name, x in centre.items()}
    gradients = _Gradients(objective, names, vectorize)
    alive = torch.ones(chains, dtype=torch.bool, device=device)
    diverged: list = [None] * chains
    losses = torch.full((chains, steps), float("nan"), dtype=torch.float64)
    reference = torch.zeros(steps, dtype=torch.float64)
    weights = torch.zeros(steps, dtype=torch.float64)
    half, root = 0.5 * step_size, step_size ** 0.5
    steps_range = range(steps) if progress is None else progress(range(steps))
    for t in steps_range:
        batch = batches[order[t]]
        error = None
        try:
            chain_losses, grads = gradients(batch, stacked)
        except Exception as exc:  # every rank must reach the all-reduce below, also the one that failed
            error = exc
            chain_losses, grads = torch.zeros(chains, dtype=dtype, device=device), {n: torch.zeros_like(x)
                                                                                   for n, x in stacked.items()}
        # one all-reduce per step: every rank's weighted sums (losses, w* loss, weight, gradients) and whether
        # its step failed, so that every rank raises together instead of waiting for the failed one
        weight = float(batch.weight)
        head = torch.cat([chain_losses.detach().to(dtype) * weight,
                          torch.tensor([at_centre[order[t]] * weight, float(error is not None), weight], dtype=dtype,
                                       device=device)])
        summed = [head] + [grads[name].detach().to(dtype).mul_(weight) for name in names]
        ranks.sum_bucket_(summed)
        if float(summed[0][-2]) > 0:
            ranks.settle(error)
        total = float(summed[0][-1])
        step_losses = summed[0][:chains] / total
        finite = torch.isfinite(step_losses) & torch.stack(
            [torch.isfinite(g.reshape(chains, -1)).all(1) for g in summed[1:]]).all(0)
        for c in torch.nonzero(alive & ~finite).flatten().tolist():
            diverged[c] = t
        alive &= finite
        losses[:, t] = torch.where(alive, step_losses, torch.full_like(step_losses, float("nan"))).double().cpu()
        reference[t] = float(summed[0][chains]) / total
        weights[t] = total
        keep = alive.to(dtype)
        for name, g in zip(names, summed[1:]):
            x, x0 = stacked[name], centre[name]
            drift = g.div_(total).mul_(n_beta).add_(x - x0, alpha=localization)
            xi = torch.randn(x.shape, generator=noise, dtype=dtype, device=device)
            moved = x - half * drift + root * xi
            mask = keep.reshape(-1, *([1] * (x.dim() - 1)))
            # a diverged chain goes back to w* and stays there, so no NaN reaches the other chains' sums
            stacked[name] = torch.where(mask.bool(), moved, x0.expand_as(x))
    return Chains(losses=losses, reference=reference, weights=weights, diverged=diverged,
                  final={name: t.detach() for name, t in stacked.items()}, path=gradients.path,
                  notes=gradients.notes)
