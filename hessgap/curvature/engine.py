"""The data pass behind every Hessian-vector product: Σ_b w_b·H_b·V / Σ_b w_b for k directions in one pass.

:class:`HvpEngine` is shared by :func:`hessgap.curvature.hvp.hvp` and
:class:`hessgap.curvature.operator.HessianOperator`. Per batch it takes one of two paths:

- ``"fused"``: the R-operator engine, over a layer list for plain layer stacks (:mod:`hessgap.curvature.fused`)
  and over the captured ATen graph of the batch loss for any other model (:mod:`hessgap.curvature.graph`:
  residual networks, transformers, Hugging Face models);
- ``"generic"``: any model, through autograd: the batch's gradient is built once with its graph kept
  (``create_graph``), so the forward and first backward are shared by all k directions; each chunk of
  directions is then one backward through that graph: a plain one for a chunk of one direction (the CPU
  default for real models), a batched one (``is_grads_batched``, a vmap over the chunk) otherwise.
  Attention runs on kernels that have double-backward rules (:mod:`hessgap.curvature.second_order`).

It cuts the k directions into chunks that fit a memory budget, keeps each cached batch's primal pass
between calls while the model is unchanged (compared value by value, so edits through ``.data`` count),
accumulates in float32 for half-precision models, adds the sums up across ranks, and checks losses and
products for NaN/inf. The model is left as it was (see :func:`hessgap._state.preserved`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import _checks
from .._memory import parse_bytes
from .._state import preserved
from ..errors import HessgapError, NonFiniteError
from . import fused, graph
from ._flat import Directions, check_finite_products, unflatten
from .batches import Batch
from .objective import LossOverData
from .second_order import SecondOrderRules, check_differentiable, modules_calling
from .sharded import sharded_pass
from .sums import ChunkSums

PATHS = ("auto", "fused", "generic")  # what users ask for; an FSDP2-sharded model runs the "sharded" pass

#: Default memory budget (bytes) for the per-direction working set of one chunk of directions.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3

#: On CPU the fused engine also keeps one chunk's largest R-activation within about this many bytes: a
#: stacked (k·B, width) operand that spills out of the cache makes the GEMMs and element-wise passes
#: slower per direction than smaller chunks (measured on F1 and C1 at batch 1024/256: chunks of 2–4
#: directions beat 16 by 10–40 %).
CPU_CHUNK_BYTES = 8 * 1024**2
#: The same for the generic path: above it a chunk is one direction, a plain second backward. On CPU the
#: vmapped backward (is_grads_batched) gains nothing from its larger GEMMs and pays for the copies its
#: batching rules make: one thread, k = 16, per direction in gradients (benchmarks/hvp_models_ratio.py):
#: GPT-2 (4 × 256, batch 8 × 128) chunk 1 2.17, chunks 2–16 3.04–3.80; transformers ResNet-18 (batch 32)
#: chunk 1 2.90, chunks 2–16 2.83–3.41 (4 within noise of 1). Only models whose largest activation is
#: under 256K elements (tests, toy nets, where the per-call overhead dominates) still take batched chunks.
GENERIC_CPU_CHUNK_BYTES = 1024**2
# Primal passes (activations and output gradients of every batch) kept between calls when the batches are
# cached and the model has not changed: later products then cost only the R-passes, as a retained graph does.
PRIMAL_CACHE_BYTES = 512 * 1024**2


@dataclass
class PassStats:
    batches: int = 0
    samples: int = 0
    weight: float = 0.0  # units (samples or tokens) over every rank
    loss_sum: float = 0.0  # Σ w_b·L_b over every rank
    chunk_size: int = 0
    written: bool = False  # whether a batch has written the sums (the first one writes, later ones add)
    unit: float = 1.0  # the sums hold Σ_b (w_b / unit)·H_b·V: unit = the first batch's weight on one rank

    @property
    def loss(self) -> float:
        return self.loss_sum / self.weight if self.weight else math.nan


class HvpEngine:
    """The data pass shared by :func:`hvp` and :class:`~hessgap.curvature.operator.HessianOperator`.

    Decides the path once (``path="auto"`` falls back to ``"generic"`` with a recorded reason, also when a
    batch turns out to be unsupported mid-way, in which case the pass restarts on the generic path).
    """

    def __init__(
        self,
        objective: LossOverData,
        *,
        path: str = "auto",
        train_mode: bool = False,
        chunk_size: int | None = None,
        max_memory: int | str | None = None,
        memory_budget: int | str | None = None,
    ):
        if path not in PATHS:
            raise HessgapError(f"path must be one of {PATHS}, got {path!r}")
        _checks.positive_int(chunk_size, "chunk_size", "the number of directions per chunk", allow_none=True)
        if max_memory is not None and memory_budget is not None:
            raise HessgapError("pass max_memory or its former name memory_budget, not both")
        given = max_memory if max_memory is not None else memory_budget
        name = "max_memory" if max_memory is not None else "memory_budget"
        # an explicit budget bounds the fused LM head too; without one it takes a share of the free memory
        self.max_memory = parse_bytes(given, name) if given is not None else None
        self.objective = objective
        self.model = objective.model
        self.train_mode = bool(train_mode)
        self.requested_path = path
        self.chunk_size = chunk_size
        self.memory_budget = self.max_memory if self.max_memory is not None else DEFAULT_MEMORY_BUDGET
        self.fallback_reason: str | None = None
        self.rules = SecondOrderRules()
        self._plan: fused.FusedPlan | graph.GraphPlan | None = None
        self._primal_states: dict[tuple, fused.BatchState] = {}  # (batch index, seed weight) -> state
        self._primal_snapshot: list[torch.Tensor] | None = None
        self._primal_bytes = 0
        self._batch: Batch | None = None  # the batch a pass is on, to name the modules of an op without a rule
        self.capture_seconds = 0.0  # spent capturing the model's graph (captures kept from earlier calls cost 0)
        self._captures_seen = 0
        self.path = "generic"
        if objective.sharded is not None:
            self.path = "sharded"  # FSDP2 shards: their own pass (see :mod:`hessgap.curvature.sharded`)
        elif path != "generic":
            try:
                self._plan = self._fused_plan()
                self.path = "fused"
            except fused.FusedUnsupported as exc:
                self._unsupported(exc)

    @property
    def notes(self) -> list[str]:
        """What the pass did that the result should say (attention rerouted, ...)."""
        return self.rules.notes

    def token_chunks(self) -> dict:
        """The chunks of tokens and vocabulary the fused LM head chose on the last pass (empty without one)."""
        if not isinstance(self._plan, graph.GraphPlan):
            return {}
        return self._plan.token_chunks()

    def _fused_plan(self) -> fused.FusedPlan | graph.GraphPlan:
        """The layer-stack plan when the model is a plain nn.Sequential, else the graph plan (which captures
        the model at its first batch and may still raise FusedUnsupported then)."""
        if self.train_mode:
            raise fused.FusedUnsupported("the Hessian is taken in train mode (train_mode=True)")
        if self.objective.compute_loss is not None:
            raise fused.FusedUnsupported("the loss is a compute_loss closure")
        loss_fn = self.objective.loss_fn if self.objective.loss_fn is not None else nn.CrossEntropyLoss()
        try:
            return fused.plan(self.model, self.objective.params, loss_fn, self.train_mode)
        except fused.FusedUnsupported:
            plan = graph.GraphPlan(self.model, self.objective.params, self.objective.loss_fn,
                                   one_batch=self._one_batch(), memory_budget=self.memory_budget)
            plan.max_memory = self.max_memory
            return plan

    def _one_batch(self) -> bool:
        """Whether every pass sees a single batch (its capture then needs no other sizes)."""
        objective = self.objective
        if objective.source.single or objective.max_batches == 1:
            return True
        try:
            return len(objective.data) == 1
        except TypeError:  # an iterable without a length
            return False

    def _unsupported(self, exc: fused.FusedUnsupported) -> None:
        if self.requested_path == "fused":
            raise HessgapError(f"the fused HVP path cannot run: {exc}; use path='auto' or 'generic'") from None
        self._plan = None
        self.path = "generic"
        self.fallback_reason = str(exc)

    def run(self, directions: Directions) -> tuple[list[torch.Tensor], torch.Tensor, PassStats]:
        """Σ_b w_b·H_b·V / Σ_b w_b for the per-parameter directions: per-parameter views of one (k, n) tensor
        (in the accumulation dtype), that tensor, and what the pass saw."""
        self._batch = None
        plan = self._plan
        try:
            with preserved(self.model, train_mode=self.train_mode, parameters=False), \
                    self.rules.active(self.model, locate=self._modules_calling):
                self._forget_stale_primal_states()
                if self._plan is not None:
                    try:
                        return self._pass(directions, fused_path=True)
                    except fused.FusedUnsupported as exc:
                        self._unsupported(exc)
                return self._pass(directions, fused_path=False)
        finally:
            if isinstance(plan, graph.GraphPlan):
                self._note_captures(plan)

    def _note_captures(self, plan: graph.GraphPlan) -> None:
        """Count the seconds of the captures ``plan`` made in a pass, and say in the notes how they were made."""
        made: dict[str, list[float]] = {}
        for captured in plan.captured[self._captures_seen:]:
            made.setdefault(captured.how, []).append(captured.seconds)
        self._captures_seen = len(plan.captured)
        for how, seconds in made.items():
            self.capture_seconds += sum(seconds)
            times = f"{len(seconds)} times" if len(seconds) > 1 else "once"
            self.rules.note(f"the graph engine captured the model {times} in {sum(seconds):.2f} s, with {how}")

    def _forget_stale_primal_states(self) -> None:
        if not self.objective.batches_cached or self._plan is None:
            self._primal_states.clear()
            self._primal_snapshot = None
            self._primal_bytes = 0
            return
        # Compared by value: edits through .data (or load_state_dict) do not bump version counters.
        current = [t.detach() for t in (*self.model.parameters(), *self.model.buffers())]
        snapshot = self._primal_snapshot
        if snapshot is None or len(snapshot) != len(current) or not all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(snapshot, current)):
            self._primal_states.clear()
            self._primal_bytes = 0
            self._primal_snapshot = [t.clone() for t in current]

    # ---- one pass over the data -------------------------------------------------------------------------

    def _pass(self, directions: Directions, fused_path: bool):
        objective = self.objective
        stats = PassStats()
        # Not zero-filled: the first batch writes its products (a pass over k·n numbers fewer; see .sums)
        flat_total = torch.empty(directions.k, objective.num_parameters, dtype=objective.accumulation_dtype,
                                 device=objective.device)
        total = unflatten(flat_total, objective.vector_params)
        if objective.sharded is not None:
            return sharded_pass(objective, self.rules, directions, flat_total.zero_(), total, stats)
        error = None
        try:
            for batch in objective.batches():
                self._batch = batch
                if fused_path:
                    if not batch.is_pair and not isinstance(self._plan, graph.GraphPlan):
                        raise fused.FusedUnsupported("the batches are not (inputs, targets) pairs")
                    loss = self._fused_batch(batch, directions, total, stats)
                else:
                    loss = self._generic_batch(batch, directions, total, stats)
                stats.batches += 1
                stats.samples += batch.samples
                stats.weight += batch.weight
                stats.loss_sum += loss * batch.weight
        except fused.FusedUnsupported:
            raise  # the same on every rank (it depends on the model and the batch structure only)
        except Exception as exc:  # every rank must reach the collective below, also the one that failed
            error = exc
        ranks = objective.ranks
        ranks.settle(error)
        if not stats.written:  # no batch on this rank held anything to average
            flat_total.zero_()
        ranks.sum_(flat_total)
        stats.samples, stats.weight, stats.loss_sum = ranks.sum_numbers([stats.samples, stats.weight, stats.loss_sum])
        stats.samples = int(stats.samples)
        factor = stats.unit / stats.weight
        if factor != 1.0:  # one batch: the products are already the mean's
            flat_total.mul_(factor)
        check_finite_products(flat_total)
        return total, flat_total, stats

    def _modules_calling(self, op: str) -> list[str]:
        """The modules that call ``op`` on the batch a pass failed on (none for FSDP2 shards, whose forward is
        a collective that the other ranks do not rerun)."""
        if self._batch is None or self.objective.sharded is not None:
            return []
        try:
            with torch.enable_grad():  # the ops of a differentiated forward (embedding_bag's, not its no-grad twin)
                return modules_calling(self.model, lambda: self.objective.batch_loss(self._batch), op)
        except Exception:  # noqa: BLE001 - naming the module is a courtesy: the error itself is raised anyway
            return []

    def _chunk(self, per_direction_bytes: int, k: int) -> int:
        if self.chunk_size is not None:
            return min(self.chunk_size, k)
        return max(1, min(k, self.memory_budget // max(per_direction_bytes, 1)))

    def _cpu_fit(self, chunk: int, cache_bytes: int, itemsize: int, largest: int, device: torch.device) -> int:
        if self.chunk_size is not None or device.type != "cpu":
            return chunk
        return max(1, min(chunk, cache_bytes // max(itemsize * largest, 1)))

    @staticmethod
    def _check_loss(loss: torch.Tensor, index: int) -> float:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteError(
                f"the loss of batch {index} is {value}; check the model's parameters and inputs for NaN/inf"
            )
        return value

    def _primal_state(self, batch: Batch, weight: float) -> fused.BatchState:
        state = self._primal_states.get((batch.index, weight))
        if state is not None:
            return state

        def loss_of(outputs, targets):
            return self.objective.loss_of_outputs(outputs, batch)

        with self.objective.naming_failures(batch):
            if isinstance(self._plan, graph.GraphPlan):
                self.objective.check_own_loss(batch)  # the captured graph's outputs never reach the objective
                try:
                    state = self._plan.forward_backward(batch, weight)
                except fused.FusedUnsupported:
                    raise
                except Exception:
                    self.objective.batch_loss(batch)  # the reference pass names bad targets or shapes, if that is it
                    raise
            else:
                state = self._plan.forward_backward(batch.inputs, batch.targets, weight, loss_of)
        # activations, output gradients and the layers' saved masks: about three activations' worth
        state_bytes = 3 * state.activation_numel * self.objective.params[0].element_size()
        if self._primal_snapshot is not None and self._primal_bytes + state_bytes <= PRIMAL_CACHE_BYTES:
            self._primal_states[(batch.index, weight)] = state
            self._primal_bytes += state_bytes
        return state

    def _fused_batch(self, batch: Batch, directions, total, stats) -> float:
        objective = self.objective
        if not stats.written and not objective.ranks.active and objective.dtype != objective.accumulation_dtype:
            # a half-precision model's gradients are seeded with w_b / unit, not w_b: a float16 seed of 10⁵
            # tokens overflows (the generic path scales the same way)
            stats.unit = batch.weight
        with torch.no_grad():
            state = self._primal_state(batch, batch.weight / stats.unit)
            loss = self._check_loss(state.loss, batch.index)
            if stats.chunk_size == 0:
                itemsize = directions.parts[0].element_size()
                per_direction = itemsize * (2 * state.activation_numel + 3 * self._plan.num_params)
                stats.chunk_size = self._cpu_fit(self._chunk(per_direction, directions.k), CPU_CHUNK_BYTES, itemsize,
                                                 state.largest_activation_numel, self.objective.device)
            start = 0
            for chunk in directions.chunks(stats.chunk_size):
                k = chunk[0].shape[0]
                sums = ChunkSums(total, start, k, fresh=not stats.written)  # products already weighted by the batch
                self._plan.apply(state, chunk, sums)
                sums.close()
                start += k
            stats.written = True
        return loss

    def _generic_batch(self, batch: Batch, directions, total, stats) -> float:
        params = self.objective.params
        counter = _ActivationCounter(self.model) if stats.chunk_size == 0 else contextlib.nullcontext()
        with torch.enable_grad():
            with counter, self.rules.watch():
                loss = self.objective.batch_loss(batch)
            value = self._check_loss(loss, batch.index)
            self._note_loss_precision(loss)
            # The batch's weight scales the products in the accumulation dtype, not the loss in the model's:
            # a float16 loss times a token count overflows long before the products do.
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if stats.chunk_size == 0:  # the first batch of the pass: its graph stands for the others'
            check_differentiable(loss, [grads[i] for i in live])
            itemsize = params[0].element_size()
            per_direction = itemsize * (4 * counter.numel + 4 * self.objective.num_parameters)
            stats.chunk_size = self._cpu_fit(self._chunk(per_direction, directions.k), GENERIC_CPU_CHUNK_BYTES,
                                             itemsize, counter.largest, params[0].device)
        first = not stats.written
        if first and not self.objective.ranks.active:
            stats.unit = batch.weight  # a single batch's products are then written as they come
        scale = batch.weight / stats.unit
        if not live:  # the gradient does not depend on the parameters: this batch's Hessian is 0
            ChunkSums(total, 0, directions.k, fresh=first).close()
            stats.written = True
            return value
        outputs = [grads[i] for i in live]
        start = 0
        for chunk in directions.chunks(stats.chunk_size):
            k = chunk[0].shape[0]
            grad_outputs = [chunk[i].to(params[i].dtype) for i in live]
            if k == 1:  # one direction: a plain backward, without vmap's batching rules and their copies
                products = torch.autograd.grad(outputs, params, grad_outputs=[g[0] for g in grad_outputs],
                                               retain_graph=True, allow_unused=True)
                products = [None if h is None else h.unsqueeze(0) for h in products]
            else:
                products = torch.autograd.grad(outputs, params, grad_outputs=grad_outputs, retain_graph=True,
                                               is_grads_batched=True, allow_unused=True)
            sums = ChunkSums(total, start, k, fresh=first, scale=scale)
            for slot, product in enumerate(products):
                if product is not None:
                    sums.add(slot, product)
            sums.close()
            start += k
        stats.written = True
        return value

    def _note_loss_precision(self, loss: torch.Tensor) -> None:
        """Say so when the loss is less precise than the model (Hugging Face computes its losses in float32)."""
        dtype = self.objective.dtype
        if loss.dtype.is_floating_point and torch.finfo(loss.dtype).eps > torch.finfo(dtype).eps:
            self.rules.note(
                f"the loss came out in {str(loss.dtype).replace('torch.', '')} for a "
                f"{str(dtype).replace('torch.', '')} model (Hugging Face computes its losses in float32), so the "
                "products carry its rounding; pass loss_fn= (with weight_fn= for token counts) to compute it in "
                "the model's dtype"
            )


class _ActivationCounter:
    """Elements of every leaf module's output during one forward: the scale of a direction's working set."""

    def __init__(self, model: nn.Module):
        self.model, self.numel, self.largest, self._handles = model, 0, 1, []

    def _hook(self, _module, _inputs, output):
        if isinstance(output, torch.Tensor):
            self.numel += output.numel()
            self.largest = max(self.largest, output.numel())

    def __enter__(self):
        leaves = [m for m in self.model.modules() if not list(m.children())]
        self._handles = [m.register_forward_hook(self._hook) for m in leaves]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return False
