"""The data pass behind every Hessian-vector product: Σ_b (B_b / N) H_b·V for k directions in one pass.

:class:`HvpEngine` is shared by :func:`hessgap.curvature.hvp.hvp` and
:class:`hessgap.curvature.operator.HessianOperator`. It decides the path once (the fused R-operator engine
of :mod:`hessgap.curvature.fused`, or torch.func forward-over-reverse), cuts the k directions into chunks
that fit a memory budget, keeps each cached batch's primal pass between calls while the model is
unchanged, and checks losses and products for NaN/inf. The model is left as it was (see
:func:`hessgap._state.preserved`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import _checks
from .._state import preserved
from ..errors import HessgapError, NonFiniteError
from . import fused
from ._flat import Directions, all_finite, unflatten
from .objective import LossOverData

PATHS = ("auto", "fused", "generic")

#: Default memory budget (bytes) for the per-direction working set of one chunk of directions.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3

#: On CPU the fused engine also keeps one chunk's largest R-activation within about this many bytes: a
#: stacked (k·B, width) operand that spills out of the cache makes the GEMMs and element-wise passes
#: slower per direction than smaller chunks (measured on F1 and C1 at batch 1024/256: chunks of 2–4
#: directions beat 16 by 10–40 %).
CPU_CHUNK_BYTES = 8 * 1024**2
# Primal passes (activations and output gradients of every batch) kept between calls when the batches are
# cached and the model has not changed: later products then cost only the R-passes, as a retained graph does.
PRIMAL_CACHE_BYTES = 512 * 1024**2


@dataclass
class PassStats:
    batches: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    chunk_size: int = 0


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
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        if path not in PATHS:
            raise HessgapError(f"path must be one of {PATHS}, got {path!r}")
        _checks.positive_int(chunk_size, "chunk_size", "the number of directions per chunk", allow_none=True)
        _checks.positive_number(memory_budget, "memory_budget", "a number of bytes")
        self.objective = objective
        self.model = objective.model
        self.train_mode = bool(train_mode)
        self.requested_path = path
        self.chunk_size = chunk_size
        self.memory_budget = int(memory_budget)
        self.fallback_reason: str | None = None
        self._plan: fused.FusedPlan | None = None
        self._primal_states: dict[int, fused.BatchState] = {}
        self._primal_key: tuple | None = None
        self._primal_bytes = 0
        self.path = "generic"
        if path != "generic":
            try:
                if self.train_mode:
                    raise fused.FusedUnsupported("the Hessian is taken in train mode (train_mode=True)")
                self._plan = fused.plan(self.model, objective.params, objective.loss_fn, self.train_mode)
                self.path = "fused"
            except fused.FusedUnsupported as exc:
                self._unsupported(exc)

    def _unsupported(self, exc: fused.FusedUnsupported) -> None:
        if self.requested_path == "fused":
            raise HessgapError(f"the fused HVP path cannot run: {exc}; use path='auto' or 'generic'") from None
        self._plan = None
        self.path = "generic"
        self.fallback_reason = str(exc)

    def run(self, directions: Directions) -> tuple[list[torch.Tensor], torch.Tensor, PassStats]:
        """Σ_b (B_b / N) H_b v for the per-parameter directions: per-parameter views of one (k, n) tensor,
        that tensor, and what the pass saw."""
        with preserved(self.model, train_mode=self.train_mode):
            self._forget_stale_primal_states()
            if self._plan is not None:
                try:
                    return self._pass(directions, fused_path=True)
                except fused.FusedUnsupported as exc:
                    self._unsupported(exc)
            return self._pass(directions, fused_path=False)

    def _forget_stale_primal_states(self) -> None:
        # Any in-place change to a parameter or buffer (optimizer step, load_state_dict) bumps its version.
        tensors = (*self.model.parameters(), *self.model.buffers())
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if key != self._primal_key or not self.objective.batches_cached:
            self._primal_states.clear()
            self._primal_bytes = 0
            self._primal_key = key

    def _primal_state(self, index, inputs, targets, size) -> fused.BatchState:
        state = self._primal_states.get(index)
        if state is not None:
            return state
        state = self._plan.forward_backward(inputs, targets, float(size), self.objective.batch_loss)
        # activations, output gradients and the layers' saved masks: about three activations' worth
        state_bytes = 3 * state.activation_numel * inputs.element_size()
        if self.objective.batches_cached and self._primal_bytes + state_bytes <= PRIMAL_CACHE_BYTES:
            self._primal_states[index] = state
            self._primal_bytes += state_bytes
        return state

    # ---- one pass over the data -------------------------------------------------------------------------

    def _pass(self, directions: Directions, fused_path: bool):
        stats = PassStats()
        params = self.objective.params
        flat_total = torch.zeros(directions.k, self.objective.num_parameters, dtype=params[0].dtype,
                                 device=params[0].device)
        total = unflatten(flat_total, params)
        for index, (inputs, targets) in enumerate(self.objective.batches()):
            size = inputs.shape[0]
            if fused_path:
                loss = self._fused_batch(index, inputs, targets, size, directions, total, stats)
            else:
                loss = self._generic_batch(index, inputs, targets, size, directions, total, stats)
            stats.batches += 1
            stats.samples += size
            stats.loss_sum += loss * size
        flat_total.div_(stats.samples)
        if not all_finite(flat_total):
            raise NonFiniteError(
                "the Hessian-vector product is not finite; check the parameters and inputs for huge or "
                "NaN values (the loss itself was finite)"
            )
        return total, flat_total, stats

    def _chunk(self, per_direction_bytes: int, k: int) -> int:
        if self.chunk_size is not None:
            return min(self.chunk_size, k)
        return max(1, min(k, self.memory_budget // max(per_direction_bytes, 1)))

    def _check_loss(self, loss: torch.Tensor, index: int) -> float:
        value = float(loss)
        if not math.isfinite(value):
            raise NonFiniteError(
                f"the loss of batch {index} is {value}; check the model's parameters and inputs for NaN/inf"
            )
        return value

    def _fused_batch(self, index, inputs, targets, size, directions, total, stats) -> float:
        with torch.no_grad():
            state = self._primal_state(index, inputs, targets, size)
            loss = self._check_loss(state.loss, index)
            if stats.chunk_size == 0:
                itemsize = directions.parts[0].element_size()
                per_direction = itemsize * (2 * state.activation_numel + 3 * self._plan.num_params)
                stats.chunk_size = self._chunk(per_direction, directions.k)
                if self.chunk_size is None and inputs.device.type == "cpu":
                    cache_fit = CPU_CHUNK_BYTES // (itemsize * state.largest_activation_numel)
                    stats.chunk_size = max(1, min(stats.chunk_size, cache_fit))
            start = 0
            for chunk in directions.chunks(stats.chunk_size):
                part = self._plan.apply(state, chunk)
                for acc, hv in zip(total, part):
                    acc[start : start + hv.shape[0]].add_(hv)
                start += chunk[0].shape[0]
        return loss

    def _generic_batch(self, index, inputs, targets, size, directions, total, stats) -> float:
        model, names, objective = self.model, self.objective.names, self.objective
        primals = tuple(p.detach() for p in objective.params)

        # Floating inputs and targets ride along as jvp primals with explicit zero tangents: without one,
        # forward AD hands some double-backward formulas (mse_loss's) an immutable ZeroTensor to write into.
        data = {"inputs": inputs, "targets": targets}
        riding = [key for key, t in data.items() if t.is_floating_point()]

        buffers = dict(model.named_buffers()) if self.train_mode else {}

        def loss_of(params, *riding_values):
            batch = dict(data, **dict(zip(riding, riding_values)))
            state = dict(zip(names, params))
            # train mode updates BatchNorm's running buffers in place: give it copies made inside the transform
            state.update({name: b.clone() for name, b in buffers.items()})
            outputs = torch.func.functional_call(model, state, (batch["inputs"],))
            loss = objective.batch_loss(outputs, batch["targets"], index)
            return loss, loss.detach()

        grad_of = torch.func.grad(loss_of, argnums=0, has_aux=True)
        riding_primals = tuple(data[key] for key in riding)
        riding_zeros = tuple(torch.zeros_like(t) for t in riding_primals)

        def hvp_one(v):
            _, hv, loss = torch.func.jvp(grad_of, (primals,) + riding_primals, (v,) + riding_zeros, has_aux=True)
            return hv, loss

        if stats.chunk_size == 0:
            itemsize = directions.parts[0].element_size()
            per_direction = itemsize * (4 * _activation_numel(model, inputs) + 4 * sum(p.numel() for p in primals))
            stats.chunk_size = self._chunk(per_direction, directions.k)
        batched = torch.func.vmap(hvp_one, randomness="same")
        loss = None
        start = 0
        for chunk in directions.chunks(stats.chunk_size):
            hv, losses = batched(tuple(chunk))
            if loss is None:
                loss = self._check_loss(losses[0], index)
            for acc, h in zip(total, hv):
                acc[start : start + h.shape[0]].add_(h.detach(), alpha=size)
            start += chunk[0].shape[0]
        return loss


def _activation_numel(model: nn.Module, inputs: torch.Tensor) -> int:
    """Elements of every leaf module's output for this batch: the scale of a direction's working set."""
    count = [inputs.numel()]

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            count[0] += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    return count[0]
