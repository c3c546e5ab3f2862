"""The graph engine as the HVP engine sees it (:class:`GraphPlan`): the model's capture found or made, made
concrete and compiled for each batch shape, and the passes of
:class:`~hessgap.curvature.graph.program.Program` over each batch.

A model is captured once per batch structure (which tensors, their dtypes and ranks): for a loader, with
dynamic batch and sequence sizes (:mod:`.capture`), so that one capture serves every batch of a ragged
loader; for a single batch, with its static sizes, which export in a third of the time (tiny GPT-2: 0.3 s
against 0.9 s of CPU time; T5, whose graph then needs decompositions, 2.3 s against 9 s). A batch whose
sizes no capture serves (another shape after a static capture, a size of 1 where the capture's was larger,
a sequence longer than a guard allows) gets one more capture, with dynamic sizes. Each distinct batch
shape then costs one walk over the graph (:func:`~.shapes.specialize`) and one :class:`Program`, both kept
with the capture.

Captures and their programs are shared between calls on the same model (``hessgap.hvp`` called in a loop,
several operators) while the model's modules, parameters, buffers and modes stay the same objects in the
same state.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ... import _extension
from ..batches import Batch
from ..sums import ChunkSums
from .capture import Captured, call_inputs, capture, sizes, structure
from .program import GraphState, Program
from .rules import GraphUnsupported
from .shapes import specialize

#: captures per batch structure before the plan gives up on the model (each static capture serves one shape)
MAX_CAPTURES = 8
#: captures kept between calls, over every model (the oldest go first)
MAX_KEPT_CAPTURES = 32
#: programs (one per batch shape) kept per capture, and per plan
MAX_KEPT_PROGRAMS = 256
_CAPTURES: OrderedDict = OrderedDict()  # (id(model), fingerprint, structure, loss) -> [Captured] | GraphUnsupported
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


def _keep(table: OrderedDict, key, value, limit: int) -> None:
    table[key] = value
    while len(table) > limit:
        table.popitem(last=False)


class GraphPlan:
    """Captures the batch loss of ``model`` and runs the R-operator passes over the graph; ``one_batch``: the
    data is a single batch (see the module docstring).

    ``captured`` lists the captures this plan made (not those it found kept from an earlier call), for the
    result's notes: their seconds, and whether their sizes are dynamic.
    """

    #: capture the model's output tensor beside the loss (the Gauss-Newton passes split the graph there)
    with_output = False

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor], loss_fn, one_batch: bool = False,
                 memory_budget: int | None = None):
        if not _extension.available():
            raise GraphUnsupported(f"the compiled extension is not available ({_extension.load_error()})")
        if not params[0].is_floating_point():
            raise GraphUnsupported(f"parameters of dtype {params[0].dtype}")
        self.model = model
        self.loss_fn = loss_fn
        self.one_batch = one_batch  # the data is one batch: its first capture needs no other sizes
        self.memory_budget = memory_budget  # what a rule may hold beyond its inputs and outputs (see OpRule)
        self.index_of = {id(p): i for i, p in enumerate(params)}
        self._params_key = tuple(id(p) for p in params)
        self.num_params = sum(p.numel() for p in params)
        self._programs: OrderedDict = OrderedDict()  # (structure, sizes) -> Program
        self.captured: list[Captured] = []
        self.max_memory: int | None = None  # bytes for the chunked rules (the fused LM head)
        if id(model) not in _WATCHED:
            _WATCHED.add(id(model))
            weakref.finalize(model, _forget, id(model))

    @property
    def capture_seconds(self) -> float:
        return sum(c.seconds for c in self.captured)

    def token_chunks(self) -> dict:
        """The chunks of tokens and vocabulary the fused LM head chose, over this plan's programs."""
        found: dict = {}
        for program in self._programs.values():
            found.update(program.chunks())
        return found

    def program_for(self, batch: Batch) -> tuple[Program, list]:
        own_loss = self.loss_fn is None and bool(batch.kwargs)
        inputs = call_inputs(batch, own_loss)
        leaves = pytree.tree_leaves(inputs)
        key = (structure(inputs), sizes(leaves))
        program = self._programs.get(key)
        if program is None:
            program = self._compile(inputs, leaves, key[0], own_loss)
            _keep(self._programs, key, program, MAX_KEPT_PROGRAMS)
        if len(leaves) != sum(1 for kind, _ in program.captured.placeholders if kind == "input"):
            raise GraphUnsupported("the captured graph's inputs do not match the batch's tensors")
        program.set_memory(self.max_memory, self.memory_budget)  # programs are shared by the calls on a model
        return program, leaves

    def compile(self, captured: Captured) -> Program:
        """The passes over a captured graph (a subclass may compile other passes over the same graph)."""
        return Program(captured, self.index_of, self.num_params, self.memory_budget)

    def _compile(self, inputs, leaves, structure_key, own_loss: bool) -> Program:
        """The program for a batch: from a kept capture that serves its sizes, else from a new capture."""
        key = (id(self.model), _fingerprint(self.model), structure_key, id(self.loss_fn), own_loss, self.with_output)
        found = _CAPTURES.get(key, [])
        if isinstance(found, GraphUnsupported):
            raise GraphUnsupported(str(found))
        for captured in reversed(found):
            program = self._program(captured, leaves)
            if program is not None:
                return program
        for captured in found:  # the rules could not run its graph: they will not run another shape's either
            refused = next((p for p in captured.programs.values() if isinstance(p, GraphUnsupported)), None)
            if refused is not None:
                raise GraphUnsupported(str(refused))
        if len(found) >= MAX_CAPTURES:
            why = found[-1].static_reason or "sizes outside the ranges the captures allow"
            raise GraphUnsupported(
                f"the batches come in more than {MAX_CAPTURES} shapes that no graph capture serves (one capture "
                f"each: {why}); pad them to a few fixed shapes to use the fused path")
        # static sizes for a single batch's first capture, else dynamic ones unless export failed with them
        failed = next((c.static_reason for c in found if c.static_reason), None)
        try:
            captured = capture(self.model, self.loss_fn, own_loss, inputs,
                               dynamic=(bool(found) or not self.one_batch) and failed is None,
                               with_output=self.with_output)
        except GraphUnsupported as exc:
            if not found:
                _keep(_CAPTURES, key, exc, MAX_KEPT_CAPTURES)
            raise
        captured.static_reason = captured.static_reason or failed
        self.captured.append(captured)
        _keep(_CAPTURES, key, [*found, captured], MAX_KEPT_CAPTURES)
        program = self._program(captured, leaves)
        if program is None:  # pragma: no cover - a capture serves the batch it was made from
            raise GraphUnsupported("the capture does not serve the batch it was made from")
        return program

    def _program(self, captured: Captured, leaves) -> Program | None:
        """The capture's program for the batch's sizes, made concrete and compiled once per shape; None when
        the capture does not serve those sizes. A model the rules cannot handle raises GraphUnsupported."""
        shape = sizes(leaves)
        if captured.sizes is None:
            binding = None
            if shape != captured.example_sizes:
                return None
        else:
            binding = captured.sizes.bind(leaves)
            if binding is None:
                return None
        key = (shape, self._params_key)
        program = captured.programs.get(key)
        if program is None:
            concrete = captured
            if binding is not None:
                specialized = specialize(captured.graph, captured.loss_node, binding, captured.output_node)
                if specialized is None:  # a run-time size check of the graph fails for these sizes
                    return None
                graph, loss_node, output_node = specialized
                concrete = dataclasses.replace(captured, graph=graph, loss_node=loss_node, output_node=output_node,
                                               sizes=None, programs=OrderedDict())
            try:
                program = self.compile(concrete)
            except GraphUnsupported as exc:
                program = exc
            _keep(captured.programs, key, program, MAX_KEPT_PROGRAMS)
        if isinstance(program, GraphUnsupported):
            raise GraphUnsupported(str(program))
        return program

    def forward_backward(self, batch: Batch, weight: float) -> GraphState:
        program, leaves = self.program_for(batch)
        state = program.forward_backward(leaves, weight)
        state.program = program
        return state

    def apply(self, state: GraphState, directions: Sequence[torch.Tensor], sums: ChunkSums) -> None:
        """w·H·v for the chunk of directions, added into ``sums`` (see :meth:`Program.apply`)."""
        state.program.apply(state, directions, sums)
