"""The Gauss-Newton passes of the graph engine: G·v = Jᵀ·H_L·J·v and the Fisher's Jᵀ·M·J·v over a captured graph.

The graph is captured with the model's output tensor z as a second result (the logits the loss compares,
Hugging Face's ``.logits`` feeding the model's own loss), which splits its active nodes in two:

- the *body*, the model θ → z: the nodes up to z;
- the *head*, the loss z → L: every active node downstream of z (casts, views, the label shift, the
  cross-entropy or MSE). The loss must depend on θ through z only; a parameter inside the loss, or a second
  path around z (an auxiliary loss), is refused: the Gauss-Newton split is not defined there.

:meth:`GaussNewtonProgram.apply_ggn` runs the HVP's R-forward over every active node (J·v reaches z and the
head), the head's full R-backward (the loss's own Hessian at z: the fused softmax cross-entropy kernel, MSE's
constant), and through the body only the first-order part of each rule's R-backward, its vjp applied to the
k stacked cotangents: the second-order terms of the network (R{x}·g, R{W}·g, σ″·g, ...) are what the GGN
leaves out, and with them about a third of an HVP's products. :meth:`apply_outer` multiplies the tangent at
z by a given matrix instead of the head (the Fishers' Σ g gᵀ) and runs the same first-order backward.

The first-order backward of a rule (:data:`FIRST_ORDER`) calls the rule's own R-backward without the
tangents its second-order terms read, where the rule's R-backward skips absent tangents; any other rule
(one added later included) runs its R-backward with a zero gradient g, which is exact since the
second-order terms are linear in g, at the cost of an HVP's R-backward for that node.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch

from ..sums import ChunkSums
from .capture import Captured
from .plan import GraphPlan
from .program import GraphState, Program, _arg_nodes
from .rules import GraphUnsupported, arith, attention, conv, dense, norm
from .rules.base import LinearRule, describe


def _without_tangents(count: int):
    """Rules whose R-backward skips the second-order terms of tangents that are None."""
    def first_order(rule, saved, rsaved, g, rg, need):
        return rule.rvjp(saved, (None,) * count, g, rg, need)
    return first_order


def _einsum(rule, saved, rsaved, g, rg, need):
    return rule.rvjp(saved, [None] * len(rule.ops), g, rg, need)


def _activation(rule, saved, rsaved, g, rg, need):
    return [rg * saved[0]]  # the rule saves (σ′, σ″); σ′ is diagonal: the vjp is the jvp


def _elementwise(rule, saved, rsaved, g, rg, need):
    return [rule.jvp(saved, [rg])[0]]  # f′(x) is diagonal: the vjp is the jvp


def _attention(rule, saved, rsaved, g, rg, need):
    """The flash-style first-order backward per direction (the R-backward kernel would also compute the
    second-order terms, times a zero gradient)."""
    grads = [rule.vjp(saved, rg[j], need) for j in range(rg.shape[0])]
    return [torch.stack([gr[i] for gr in grads]) if need[i] else None for i in range(len(need))]


def _linear_rule(rule, saved, rsaved, g, rg, need):
    return rule.rvjp(saved, rsaved, g, rg, need)  # no second-order term at all


#: rule class -> its first-order R-backward ``(rule, saved, rsaved, g, rg, need) -> [vjp of rg per input]``
FIRST_ORDER: dict[type, Callable] = {
    LinearRule: _linear_rule,
    dense.Linear: _without_tangents(2),
    dense.MatMul: _without_tangents(2),
    dense.Einsum: _einsum,
    dense.Embedding: _linear_rule,  # linear in the table: its R-backward reads R{g} only
    conv.Convolution: _without_tangents(2),
    norm.BatchNormEval: _without_tangents(2),
    norm.Normalization: _without_tangents(3),
    arith.Product: _without_tangents(2),
    arith.Activation: _activation,
    arith.Elementwise: _elementwise,
    attention.Attention: _attention,
}


def first_order_of(rule) -> Callable | None:
    """The rule's first-order R-backward from :data:`FIRST_ORDER` (by class, nearest first), or None."""
    for cls in type(rule).__mro__:
        found = FIRST_ORDER.get(cls)
        if found is not None:
            return found
    return None


def _zero_like(g):
    """A zero gradient of ``g``'s structure (None stays None)."""
    if g is None:
        return None
    if isinstance(g, (list, tuple)):
        return [None if t is None else torch.zeros_like(t) for t in g]
    return torch.zeros_like(g)


def _unaliased(node):
    """The node an exported output stands for: torch.export returns ``getitem(broadcast_tensors([z, y]), 0)``
    for a z that F.mse_loss broadcast against its targets (a view of z itself, of z's shape); the split must be
    at z, or the broadcast's other result (the targets) would seem to reach the loss around it."""
    while (isinstance(node, torch.fx.Node) and node.target is operator.getitem
           and isinstance(node.args[0], torch.fx.Node)
           and node.args[0].target is torch.ops.aten.broadcast_tensors.default):
        source = node.args[0].args[0][node.args[1]]
        shape = getattr(node.meta.get("val"), "shape", None)
        if not isinstance(source, torch.fx.Node) or getattr(source.meta.get("val"), "shape", None) != shape:
            break
        node = source
    return node


class GaussNewtonProgram(Program):
    """A :class:`Program` over a graph captured with the model's output, split at that output (see the module
    docstring); its primal pass also keeps z and ∂(w·L)/∂z."""

    def __init__(self, captured: Captured, index_of: dict[int, int], num_params: int):
        super().__init__(captured, index_of, num_params)
        output = _unaliased(captured.output_node)
        if output is None or output not in self.active or output.op != "call_function":
            raise GraphUnsupported("the model's output does not depend on the parameters, or the loss does not "
                                   "depend on it")
        self.output_index = self.position[output]
        head: set = set()
        for node in captured.graph.nodes:
            if node in self.active and node is not output and any(
                    a is output or a in head for a in _arg_nodes(node)):
                head.add(node)
        for node in head:
            around = [a for a in _arg_nodes(node) if a in self.active and a is not output and a not in head]
            if around:
                raise GraphUnsupported(
                    f"the loss depends on the parameters other than through the model's output: {describe(node)} "
                    f"also reads {around[0].name}, which depends on them (a parameter inside the loss, or an "
                    "auxiliary loss); the Gauss-Newton matrix needs loss(model(θ))")
        if captured.loss_node not in head:
            raise GraphUnsupported("the loss is the model's output itself; the Gauss-Newton matrix needs a loss "
                                   "function of the output")
        self.head_indices = {self.position[n] for n in head}
        self.body_steps = [s for s in self.active_steps if s.index not in self.head_indices]
        self.first_order = {s.index: first_order_of(s.rule) for s in self.body_steps}
        self.keep = frozenset({self.output_index})

    def forward_backward(self, leaves, weight: float, keep: frozenset = frozenset()) -> GraphState:
        return super().forward_backward(leaves, weight, keep | self.keep)

    def output_value(self, state: GraphState) -> tuple[torch.Tensor, torch.Tensor]:
        """z and ∂(w·L)/∂z of the batch (w: the weight its primal pass was seeded with)."""
        return state.values[self.output_index], state.grads[self.output_index]

    # ---- the passes ------------------------------------------------------------------------------------

    def _r_forward(self, state: GraphState, directions, steps, keep_rsaved) -> tuple[dict, dict]:
        """Tangents in graph order over ``steps``; the R-saved values of the steps ``keep_rsaved(index)`` names."""
        tangents: dict[int, torch.Tensor] = {i: directions[slot] for i, slot in self.slot_of.items()}
        rsaved: dict[int, object] = {}
        for step in steps:
            ts = [tangents.get(j) if j is not None else None for j in step.inputs]
            if all(t is None for t in ts):
                continue
            r_out, saved = step.rule.jvp(state.saved[step.index], ts)
            if keep_rsaved(step.index):
                rsaved[step.index] = saved
            if r_out is not None and step.index != self.loss_index:
                tangents[step.index] = r_out
            for j in step.inputs:
                if (j is not None and self.tangent_last_use.get(j) == step.index and j not in self.slot_of
                        and j != self.output_index):
                    tangents.pop(j, None)
        return tangents, rsaved

    def _backward(self, state: GraphState, steps, rgrads: dict, rsaved: dict, totals: ChunkSums) -> None:
        """R-backward over ``steps`` (reverse order): the full rule in the head, the first-order part in the body."""
        for step in reversed(steps):
            rg = rgrads.pop(step.index, None)
            need = [j is not None for j in step.inputs]
            g = state.grads.get(step.index)
            if step.index in self.head_indices:
                if step.index not in rsaved and rg is None:
                    continue
                outs = step.rule.rvjp(state.saved[step.index], rsaved.pop(step.index, None), g, rg, need)
            else:
                if rg is None:
                    continue  # the body is linear in the cotangent: nothing reaches this node
                first_order = self.first_order[step.index]
                if first_order is None:
                    outs = step.rule.rvjp(state.saved[step.index], rsaved.pop(step.index, None), _zero_like(g), rg,
                                          need)
                else:
                    outs = first_order(step.rule, state.saved[step.index], rsaved.pop(step.index, None), g, rg, need)
            self._route(step, outs, rgrads, totals)

    def apply_ggn(self, state: GraphState, directions: Sequence[torch.Tensor], sums: ChunkSums) -> None:
        """w·Jᵀ·H_L·J·v for the k directions, into ``sums`` as :meth:`Program.apply` (w: the batch's weight)."""
        def keep(index):  # the head's R-backward reads its tangents; a body rule without a first-order form too
            return index in self.head_indices or self.first_order.get(index, 0) is None

        tangents, rsaved = self._r_forward(state, directions, self.active_steps, keep)
        tangents.clear()
        self._backward(state, self.active_steps, {}, rsaved, sums)

    def apply_outer(self, state: GraphState, directions: Sequence[torch.Tensor], middle: Callable,
                    sums: ChunkSums) -> None:
        """Jᵀ·M·J·v for the k directions, ``middle(J·v) -> M·J·v`` on (k, *z.shape) tensors."""
        def keep(index):
            return self.first_order.get(index) is None

        tangents, rsaved = self._r_forward(state, directions, self.body_steps, keep)
        jv = tangents.get(self.output_index)
        tangents.clear()
        if jv is not None:
            self._backward(state, self.body_steps, {self.output_index: middle(jv)}, rsaved, sums)


class GaussNewtonPlan(GraphPlan):
    """The graph engine's plan for the Gauss-Newton products: captures with the model's output, compiles a
    :class:`GaussNewtonProgram`; ``outer(batch, z, grad_z) -> middle`` gives the Fisher's matrix at the output
    for a batch (None: the GGN, the loss's own Hessian)."""

    with_output = True

    def __init__(self, model, params, loss_fn, outer: Callable | None = None):
        super().__init__(model, params, loss_fn)
        self.outer = outer

    def compile(self, captured: Captured) -> GaussNewtonProgram:
        return GaussNewtonProgram(captured, self.index_of, self.num_params)

    def forward_backward(self, batch, weight: float) -> GraphState:
        state = super().forward_backward(batch, weight)
        if self.outer is not None:
            z, grad_z = state.program.output_value(state)
            state.middle = self.outer(batch, z, grad_z)  # fixed with the state: the same draws on every product
        return state

    def apply(self, state: GraphState, directions, sums: ChunkSums) -> None:
        if self.outer is None:
            state.program.apply_ggn(state, directions, sums)
        else:
            state.program.apply_outer(state, directions, state.middle, sums)
