"""A captured graph compiled for the R-operator passes (:class:`Program`) and its passes over one batch.

Compiling first rewrites written-out forms of fused ops (:mod:`.fusion`), then marks which nodes depend on the parameters θ (they carry tangents) and lead to the loss (they
carry gradients): only those *active* nodes need a rule; every other node (masks, positions, casts of the
inputs) runs in the primal pass only. Then, per batch:

- :meth:`Program.forward_backward`: the primal forward (each active rule saves what its R-passes need; other
  values are freed after their last use) and the first-order backward from the seed ∂(w·L)/∂L = w, keeping
  ∂L/∂y where a rule's R-backward reads it: the :class:`GraphState`, shared by every chunk of directions;
- :meth:`Program.apply`: for a chunk of k directions, R-forward in graph order (parameters' tangents are the
  directions) and R-backward in reverse order (R{∂L/∂L} = 0); R{∂L/∂θ} = w·H·v goes into the pass's sums
  (:class:`~hessgap.curvature.sums.ChunkSums`) as the R-backward reaches each parameter's placeholder. Tangents are freed after their last R-forward use unless a rule keeps them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from ..sums import ChunkSums
from .capture import Captured
from .fusion import fuse
from .lm_head import fuse_lm_head
from .rules import GraphUnsupported, OpRule, rule_for
from .rules.base import REMEDY, add, describe

aten = torch.ops.aten

#: ops whose output never carries a tangent even when their input does
_STOPS = {aten.detach.default, aten._assert_tensor_metadata.default}


def _floating(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    if isinstance(value, (tuple, list)):
        return any(_floating(v) for v in value)
    return False


def _arg_nodes(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


@dataclass
class Step:
    index: int
    node: fx.Node
    rule: OpRule | None = None
    inputs: list = field(default_factory=list)  # per rule input: node index or None
    param: list = field(default_factory=list)  # per rule input: parameter slot or None
    frees: list = field(default_factory=list)  # node indices whose last primal use is this step


@dataclass
class GraphState:
    """The primal pass of one batch: the rules' saved values and the gradients they read."""

    saved: dict
    grads: dict
    loss: torch.Tensor
    activation_numel: int = 0
    largest_activation_numel: int = 1
    program: object = None
    values: dict = field(default_factory=dict)  # primal values of the nodes a pass asked to keep


class Program:
    """A captured graph with rules bound to its active nodes; ``index_of`` maps id(parameter) to its slot."""

    def __init__(self, captured: Captured, index_of: dict[int, int], num_params: int,
                 memory_budget: int | None = None):
        self.captured = captured
        self.num_params = num_params
        fuse(captured.graph)  # written-out ops (GPT-2's tanh GELU) become the op its rule fuses
        # before the analysis: the fused node replaces the logits' nodes (and may be the loss itself)
        fused = fuse_lm_head(captured.graph)
        captured.loss_node = fused.get(captured.loss_node, captured.loss_node)
        nodes = [n for n in captured.graph.nodes]
        self.position = {n: i for i, n in enumerate(nodes)}
        placeholders = [n for n in nodes if n.op == "placeholder"]
        self.sources: dict[int, tuple] = {}
        slot_of: dict[int, int] = {}
        for node, (kind, what) in zip(placeholders, captured.placeholders):
            i = self.position[node]
            self.sources[i] = (kind, what)
            if kind == "param" and id(what) in index_of and what.requires_grad:
                slot_of[i] = index_of[id(what)]
        self.slot_of = slot_of
        # nodes that depend on θ
        carries: set[fx.Node] = {nodes[i] for i in slot_of}
        for node in nodes:
            if node.op == "call_function" and node.target not in _STOPS and _floating(node.meta.get("val")):
                if any(a in carries for a in _arg_nodes(node)):
                    carries.add(node)
        # ... and lead to the loss
        loss = captured.loss_node
        if loss not in carries:
            raise GraphUnsupported("the loss does not depend on the parameters")
        active: set[fx.Node] = set()
        stack = [loss]
        while stack:
            node = stack.pop()
            if node in active:
                continue
            active.add(node)
            stack.extend(a for a in _arg_nodes(node) if a in carries)
        self.active = active
        self.loss_index = self.position[loss]
        last_use: dict[int, int] = {}
        for node in nodes:
            for a in _arg_nodes(node):
                last_use[self.position[a]] = self.position[node]
        self.steps: list[Step] = []
        for node in nodes:
            i = self.position[node]
            step = Step(i, node)
            if node.op == "call_function" and node in active:
                rule = rule_for(node, lambda n: n in carries)
                wanted = [a if isinstance(a, fx.Node) and a in active else None for a in rule.inputs()]
                ignored = rule.metadata_inputs()
                missing = [a for a in _arg_nodes(node) if a in active and a not in wanted and a not in ignored]
                if missing:
                    raise GraphUnsupported(
                        f"{describe(node)}: its argument {missing[0].name} depends on the parameters, which its "
                        f"R-operator rule does not handle: {REMEDY}")
                step.rule = rule
                rule.is_output = node is loss
                rule.memory_budget = memory_budget
                step.inputs = [self.position[a] if a is not None else None for a in wanted]
                step.param = [slot_of.get(j) if j is not None else None for j in step.inputs]
            self.steps.append(step)
        for j, i in last_use.items():
            if j != self.loss_index:
                self.steps[i].frees.append(j)
        self.active_steps = [s for s in self.steps if s.rule is not None]
        # nodes whose first-order gradient the primal backward computes (active, not placeholders)
        self.gradient_nodes = {s.index for s in self.active_steps}
        # the last R-forward consumer of each tangent: freed after it
        self.tangent_last_use: dict[int, int] = {}
        for step in self.active_steps:
            for j in step.inputs:
                if j is not None:
                    self.tangent_last_use[j] = step.index

    def set_memory(self, max_memory: int | None, memory_budget: int | None) -> None:
        """A call's budgets (programs are shared by the calls on a model): ``max_memory``, the bytes the rules
        working in chunks (the fused LM head) may take (None: a share of what is free); ``memory_budget``, what a
        rule may hold beyond its inputs and outputs (attention's score tiles; None: the streaming forms)."""
        for step in self.active_steps:
            step.rule.memory_budget = memory_budget
            if hasattr(step.rule, "max_memory"):
                step.rule.max_memory = max_memory

    def chunks(self) -> dict:
        """The chunk sizes the chunked rules chose on their last pass (for the result's info)."""
        found: dict = {}
        for step in self.active_steps:
            found.update(getattr(step.rule, "chunks", {}))
        return found

    # ---- the primal pass ------------------------------------------------------------------------------

    def forward_backward(self, leaves: Sequence, weight: float, keep: frozenset = frozenset()) -> GraphState:
        """The primal pass; ``keep``: node indices whose value and gradient the state keeps as well (the
        Gauss-Newton passes read them at the model's output)."""
        env: dict[int, object] = {}
        kept: dict[int, object] = {}
        saved: dict[int, object] = {}
        numel, largest = 0, 1
        for step in self.steps:
            node = step.node
            if node.op == "placeholder":
                kind, what = self.sources[step.index]
                env[step.index] = leaves[what] if kind == "input" else (what.detach() if isinstance(what, torch.Tensor) else what)
                continue
            if node.op != "call_function":
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[self.position[n]])
            if step.rule is not None:
                value, saved[step.index] = step.rule.forward(args, kwargs)
                if isinstance(value, torch.Tensor):
                    numel += value.numel()
                    largest = max(largest, value.numel())
            else:
                value = node.target(*args, **kwargs)
            env[step.index] = value
            if step.index in keep:
                kept[step.index] = value
            for j in step.frees:
                env.pop(j, None)
        loss = env[self.loss_index]
        grads_kept: dict[int, object] = {}
        grads: dict[int, object] = {self.loss_index: torch.full_like(loss, weight)}
        for step in reversed(self.active_steps):
            g = grads.pop(step.index, None)
            if step.rule.needs_grad or step.index in keep:
                grads_kept[step.index] = g
            need = [j is not None and j in self.gradient_nodes for j in step.inputs]
            if g is None or not any(need):
                continue
            for j, gi in zip(step.inputs, step.rule.vjp(saved[step.index], g, need)):
                if j is not None and gi is not None and j not in self.slot_of:
                    grads[j] = add(grads.get(j), gi)
        return GraphState(saved, grads_kept, loss, numel, largest, values=kept)

    # ---- the R-passes for a chunk of directions --------------------------------------------------------

    @staticmethod
    def _route(step, outs, rgrads: dict, sums: ChunkSums) -> None:
        """A step's R-gradients: a parameter's into the sums, the others to the nodes they flow back to."""
        for j, slot, r in zip(step.inputs, step.param, outs):
            if j is None or r is None:
                continue
            if slot is None:
                rgrads[j] = add(rgrads.get(j), r)
            else:
                sums.add(slot, r)

    def apply(self, state: GraphState, directions: Sequence[torch.Tensor], sums: ChunkSums) -> None:
        """w·H·v for the k directions (per-parameter ``(k, *shape)`` tensors), each parameter's product added into
        ``sums`` (see :class:`~hessgap.curvature.sums.ChunkSums`) as the R-backward reaches it."""
        # the directions come in the sums' dtype (float32 for a half-precision model): the products run in the
        # parameters' own
        tangents: dict[int, torch.Tensor] = {i: directions[slot].to(self.sources[i][1].dtype)
                                             for i, slot in self.slot_of.items()}
        rsaved: dict[int, object] = {}
        reached: set[int] = set()
        for step in self.active_steps:
            ts = [tangents.get(j) if j is not None else None for j in step.inputs]
            if all(t is None for t in ts):
                continue
            r_out, rsaved[step.index] = step.rule.jvp(state.saved[step.index], ts)
            reached.add(step.index)
            if r_out is not None and step.index != self.loss_index:
                tangents[step.index] = r_out
            for j in step.inputs:
                if j is not None and self.tangent_last_use.get(j) == step.index and j not in self.slot_of:
                    tangents.pop(j, None)
        tangents.clear()
        rgrads: dict[int, object] = {}
        for step in reversed(self.active_steps):
            rg = rgrads.pop(step.index, None)
            if step.index not in reached and rg is None:
                continue
            need = [j is not None for j in step.inputs]
            outs = step.rule.rvjp(state.saved[step.index], rsaved.pop(step.index, None),
                                  state.grads.get(step.index), rg, need)
            self._route(step, outs, rgrads, sums)
