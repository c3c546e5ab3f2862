"""The graph engine as the HVP engine sees it (:class:`GraphPlan`): one capture per batch signature, kept,
and the passes of :class:`~hessgap.curvature.graph.program.Program` over each batch.

Captures are shared between calls on the same model (``hessgap.hvp`` called in a loop, several operators)
while the model's modules, parameters, buffers and modes stay the same objects in the same state.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ... import _extension
from ..batches import Batch
from .capture import Captured, call_inputs, capture, signature
from .program import GraphState, Program
from .rules import GraphUnsupported

#: distinct batch signatures (shapes, structure) captured per plan before the plan gives up on the model
MAX_SIGNATURES = 8
#: captures kept between calls, over every model (the oldest go first)
MAX_KEPT_CAPTURES = 32
_CAPTURES: OrderedDict = OrderedDict()  # (id(model), fingerprint, signature, loss) -> Captured | GraphUnsupported
_WATCHED: set[int] = set()  # models whose captures are dropped when they are collected


def _fingerprint(model: nn.Module) -> tuple:
    """What a capture depends on besides the batch: the module objects, their modes, parameters and buffers."""
    modules = tuple((id(m), type(m), m.training, id(m.__dict__.get("forward"))) for m in model.modules())
    tensors = tuple((id(t), tuple(t.shape), t.dtype, t.requires_grad)
                    for t in (*model.parameters(), *model.buffers()))
    return modules, tensors


def _forget(model_id: int) -> None:
    _WATCHED.discard(model_id)
    for key in [k for k in _CAPTURES if k[0] == model_id]:
        _CAPTURES.pop(key, None)


class GraphPlan:
    """Captures the batch loss of ``model`` and runs the R-operator passes over the graph."""

    #: capture the model's output tensor beside the loss (the Gauss-Newton passes split the graph there)
    with_output = False

    def token_chunks(self) -> dict:
        found: dict = {}
        for program in self._programs.values():
            found.update(program.chunks())
        return found

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor], loss_fn):
        if not _extension.available():
            raise GraphUnsupported(f"the compiled extension is not available ({_extension.load_error()})")
        if not params[0].is_floating_point():
            raise GraphUnsupported(f"parameters of dtype {params[0].dtype}")
        self.model = model
        self.loss_fn = loss_fn
        self.index_of = {id(p): i for i, p in enumerate(params)}
        self.num_params = sum(p.numel() for p in params)
        self._programs: OrderedDict = OrderedDict()
        self.capture_seconds = 0.0
        self.max_memory: int | None = None  # bytes for the chunked rules (the fused LM head)
        if id(model) not in _WATCHED:
            _WATCHED.add(id(model))
            weakref.finalize(model, _forget, id(model))

    def _captured(self, batch: Batch, own_loss: bool, inputs) -> Captured:
        key = (id(self.model), _fingerprint(self.model), signature(inputs), id(self.loss_fn), own_loss,
               self.with_output)
        found = _CAPTURES.get(key)
        if found is None:
            try:
                found = capture(self.model, self.loss_fn, own_loss, inputs, self.with_output)
                self.capture_seconds += found.seconds
            except GraphUnsupported as exc:
                found = exc
            _CAPTURES[key] = found
            while len(_CAPTURES) > MAX_KEPT_CAPTURES:
                _CAPTURES.popitem(last=False)
        if isinstance(found, GraphUnsupported):
            raise GraphUnsupported(str(found))
        return found

    def program_for(self, batch: Batch) -> tuple[Program, list]:
        own_loss = self.loss_fn is None and bool(batch.kwargs)
        inputs = call_inputs(batch, own_loss)
        key = signature(inputs)
        program = self._programs.get(key)
        if program is None:
            if len(self._programs) >= MAX_SIGNATURES:
                raise GraphUnsupported(
                    f"the batches come in more than {MAX_SIGNATURES} shapes (one graph capture each); pad them to "
                    "a few fixed shapes to use the fused path")
            captured = self._captured(batch, own_loss, inputs)
            program = self.compile(captured)
            program.set_max_memory(self.max_memory)
            self._programs[key] = program
        leaves = pytree.tree_leaves(inputs)
        if len(leaves) != sum(1 for kind, _ in program.captured.placeholders if kind == "input"):
            raise GraphUnsupported("the captured graph's inputs do not match the batch's tensors")
        return program, leaves

    def compile(self, captured: Captured) -> Program:
        """The passes over a captured graph (a subclass may compile other passes over the same graph)."""
        return Program(captured, self.index_of, self.num_params)

    def forward_backward(self, batch: Batch, weight: float) -> GraphState:
        program, leaves = self.program_for(batch)
        state = program.forward_backward(leaves, weight)
        state.program = program
        return state

    def apply(self, state: GraphState, directions: Sequence[torch.Tensor], out=None, write: bool = False):
        """w·H·v for the chunk of directions, added into (or with ``write``, written into) ``out`` when given
        (see :meth:`Program.apply`)."""
        return state.program.apply(state, directions, out, write)
