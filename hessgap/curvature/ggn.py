"""The data pass of the Gauss-Newton and Fisher products: Σ_b w_b·M_b·V / Σ_b w_b for k directions in one pass.

For a loss L(z) of the model's output z = f(θ) (:mod:`hessgap.curvature.output_loss`), with J = ∂z/∂θ:

- the generalized Gauss-Newton matrix G = Jᵀ·H_L·J, H_L = ∂²L/∂z²: the Hessian without the network's
  second-order terms; positive semi-definite for a convex loss (cross-entropy, MSE);
- the empirical Fisher F = Σ_u g_u g_uᵀ / N over the objective's units u (per-unit gradients g_u = J_uᵀ·∇ℓ_u);
- the true Fisher, the same with targets drawn from the model's predictive distribution (``samples`` draws
  per unit, seeded); for softmax cross-entropy and MSE its expectation over the draws is G.

Every product has the form Jᵀ·M·J·v, M block diagonal over the units at z (H_L, or Σ r rᵀ), and never
differentiates the network twice. :class:`GaussNewtonEngine` is the HVP engine's pass with two other passes
per batch:

- ``"fused"`` (the graph engine, :mod:`hessgap.curvature.graph.ggn`): R-forward to z and beyond, the head's
  R-backward (GGN) or M (Fishers) at z, then the rules' first-order backward of the k cotangents; the
  primal pass, kept between calls like the HVP's, also keeps z and ∂L/∂z. Plain layer stacks take it too;
- ``"generic"`` (any model the graph engine refuses, train mode, half precision): J·v by forward-mode AD
  (``torch.func.jvp`` of the model's output, one direction at a time), M at z by autograd on the output
  space (H_L as the Hessian of the loss of z alone), Jᵀ·(M·J·v) by one ordinary backward of the batch's
  output graph per direction. Dropout sees the same masks in every pass of a batch (the random state is
  replayed), so train mode measures one function.

Both paths are exact (to rounding) and give the same numbers. FSDP2-sharded models are refused here; the
Hessian's finite-difference products serve them.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import HessgapError
from . import fused
from .batches import Batch
from .engine import HvpEngine, _accumulate
from .graph.ggn import GaussNewtonPlan
from .objective import output_tensor
from .output_loss import FisherAtOutput, loss_of_output, output_loss, refuse_closure

#: What the engine multiplies by: the GGN, the empirical Fisher, the true Fisher.
MATRICES = ("ggn", "empirical", "true")


class GaussNewtonEngine(HvpEngine):
    """The pass behind :class:`~hessgap.curvature.gauss_newton.GGNOperator` and ``FisherOperator``."""

    def __init__(self, objective, *, matrix: str = "ggn", samples: int = 1, seed: int = 0, path: str = "auto",
                 train_mode: bool = False, chunk_size: int | None = None,
                 max_memory: int | str | None = None, memory_budget: int | str | None = None):
        if matrix not in MATRICES:
            raise HessgapError(f"matrix must be one of {MATRICES}, got {matrix!r}")
        if objective.sharded is not None:
            raise HessgapError(
                "the Gauss-Newton and Fisher products do not take FSDP2-sharded models yet; the Hessian does "
                "(exactly, or by finite differences: hessgap.hvp(..., method='finite-difference'))")
        refuse_closure(objective)
        self.matrix = matrix
        self.fisher = None if matrix == "ggn" else FisherAtOutput(objective, matrix, samples, seed)
        self._first_sample = 0  # the global number of the current batch's first sample (the true Fisher's draws)
        self._rank_offset: int | None = None
        super().__init__(objective, path=path, train_mode=train_mode, chunk_size=chunk_size,
                         max_memory=max_memory, memory_budget=memory_budget)

    def _fused_plan(self) -> GaussNewtonPlan:
        if self.train_mode:
            raise fused.FusedUnsupported("the matrix is taken in train mode (train_mode=True)")
        outer = None if self.fisher is None else self._outer
        return GaussNewtonPlan(self.model, self.objective.params, self.objective.loss_fn, outer)

    def _outer(self, batch: Batch, z: torch.Tensor, grad_z: torch.Tensor):
        return self.fisher(batch, z, grad_z, self._first_sample, 1.0)

    def run(self, directions):
        if self.matrix == "true" and self._rank_offset is None:
            self._rank_offset = self._samples_before_this_rank()
        return super().run(directions)

    def _samples_before_this_rank(self) -> int:
        """The samples of the ranks before this one: samples are numbered across the ranks in rank order."""
        ranks = self.objective.ranks
        if not ranks.active:
            return 0
        local = ranks.together(lambda: sum(batch.samples for batch in self.objective.batches()))
        return int(sum(ranks.gather_object(local)[: ranks.rank]))

    def _fused_batch(self, batch: Batch, directions, total, stats) -> float:
        self._first_sample = (self._rank_offset or 0) + stats.samples
        return super()._fused_batch(batch, directions, total, stats)

    # ---- the generic path --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _replayed_randomness(self, state):
        """Every forward of one batch draws the same random numbers (dropout masks in train mode)."""
        if not self.train_mode:
            yield
            return
        devices = [self.objective.device] if self.objective.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.random.set_rng_state(state[0])
            if devices:
                torch.cuda.set_rng_state(state[1], self.objective.device)
            yield

    def _generic_batch(self, batch: Batch, directions, total, stats) -> float:
        objective, params = self.objective, self.objective.params
        self._first_sample = (self._rank_offset or 0) + stats.samples
        loss_at = output_loss(objective, batch)
        randomness = (torch.random.get_rng_state(),
                      torch.cuda.get_rng_state(objective.device) if objective.device.type == "cuda" else None)
        with torch.enable_grad(), self.rules.watch():
            with objective.naming_failures(batch), self._replayed_randomness(randomness):
                outputs = self.model(*batch.args, **batch.kwargs)
            z = output_tensor(outputs)
            at_z = z.detach().requires_grad_()
            head = loss_of_output(objective, loss_at, batch, at_z)
            value = self._check_loss(head, batch.index)
            if loss_at.own:
                self._check_own_loss(outputs, value, batch)
            (grad_z,) = torch.autograd.grad(head, at_z, create_graph=self.fisher is None)
        if self.fisher is not None:
            middle = self.fisher(batch, at_z, grad_z * batch.weight, self._first_sample, 1.0 / batch.weight)
        else:
            middle = _LossHessian(at_z, grad_z)
        first = not stats.written
        if first and not objective.ranks.active:
            stats.unit = batch.weight
        stats.chunk_size = 1
        scale = batch.weight / stats.unit
        names = objective.names
        primals = tuple(p.detach() for p in params)

        def output_of(*tensors):
            with self._replayed_randomness(randomness):
                return output_tensor(torch.func.functional_call(self.model, dict(zip(names, tensors)), batch.args,
                                                                batch.kwargs))

        for j in range(directions.k):
            tangents = tuple(part[j].to(p.dtype) for part, p in zip(directions.parts, params))
            with self.rules.watch(), objective.naming_failures(batch):
                _, jv = torch.func.jvp(output_of, primals, tangents)
            cotangent = middle(jv.unsqueeze(0))[0].to(z.dtype)
            products = torch.autograd.grad(z, params, grad_outputs=cotangent, retain_graph=True, allow_unused=True)
            _accumulate(total, [None if h is None else h.unsqueeze(0) for h in products], j, 1, scale, first)
        stats.written = True
        return value

    def _check_own_loss(self, outputs, value: float, batch: Batch) -> None:
        """The model's own loss must be the cross-entropy of its logits that the generic path differentiates."""
        own = getattr(outputs, "loss", None)
        if not isinstance(own, torch.Tensor):
            return
        own = float(own.detach())
        if abs(own - value) > 64 * torch.finfo(torch.float32).eps * max(1.0, abs(own)):
            raise HessgapError(
                f"batch {batch.index}: the model's own loss is {own:.8g}, but the mean cross-entropy of its logits over "
                f"the label tokens is {value:.8g}; the Gauss-Newton split needs the loss as a function of the logits: "
                "pass loss_fn= (and weight_fn=)")


class _LossHessian:
    """H_L·u at z by autograd on the output space (∂/∂z of ⟨∂L/∂z, u⟩), u of shape (k, *z.shape)."""

    def __init__(self, z: torch.Tensor, grad_z: torch.Tensor):
        self.z, self.grad_z = z, grad_z

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        if not self.grad_z.requires_grad:  # a loss linear in z: H_L = 0
            return torch.zeros_like(u)
        rows = []
        for row in u:
            (h,) = torch.autograd.grad(self.grad_z, self.z, grad_outputs=row.to(self.z.dtype), retain_graph=True,
                                       allow_unused=True)
            rows.append(torch.zeros_like(row) if h is None else h)
        return torch.stack(rows)
