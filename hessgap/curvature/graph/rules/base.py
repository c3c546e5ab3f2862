"""The interface every op rule of the graph engine implements, and the small tensor helpers they share.

A rule is bound to one node of the captured graph (an ATen op call). Shapes: a primal tensor has its own
shape ``s``; its R-counterpart (tangent) and the R-counterpart of its gradient have shape ``(k, *s)``,
the k directions stacked along a new leading dimension.

For ``y = op(x_1, ..., x_m)`` (the x_i being the rule's :meth:`OpRule.inputs`) a rule gives

- ``forward(args, kwargs) -> (y, saved)``: the primal value and what the other passes need;
- ``vjp(saved, g, need) -> [∂⟨g, y⟩/∂x_i]``: first-order gradients of the inputs with ``need[i]``;
- ``jvp(saved, tangents) -> (R{y}, rsaved)``: ``tangents[i]`` is R{x_i} or None (x_i does not depend on θ);
  ``rsaved`` is what the rule's R-backward needs of this chunk (often the tangents themselves);
- ``rvjp(saved, rsaved, g, rg, need) -> [R{∂L/∂x_i}]``: ``g`` = ∂L/∂y (None when the rule does not keep it,
  see ``needs_grad``), ``rg`` = R{∂L/∂y} (None when zero).

Linear rules (views, sums, adds, ...) have no second-order term: their R-backward is their vjp applied to
each direction. Values of multi-output ops are tuples; their gradients are lists with None for outputs
that receive none.
"""

from __future__ import annotations

import torch
from torch import fx

from ...fused.base import FusedUnsupported

#: what a message about an op the graph engine cannot differentiate tells the user to do
REMEDY = ("the generic path (double backward) computes the same product with more time and memory; to keep the "
          "fused path, write that module with the ops the README lists as supported")


class GraphUnsupported(FusedUnsupported):
    """The model, its loss or its data is outside what the graph engine handles; the message says what."""


class OpRule:
    """The R-operator rule of one node (see the module docstring)."""

    #: the rule's R-backward reads ∂L/∂y: the engine keeps it from the first-order pass
    needs_grad = False
    #: the node is the loss itself: its own tangent R{L} is never read (set by the engine)
    is_output = False
    #: bytes a rule may hold at once for one chunk of directions beyond its inputs and outputs (the engine's
    #: ``memory_budget``; None: the rule's streaming form). Attention materializes score tiles within it.
    memory_budget: int | None = None

    def __init__(self, node: fx.Node):
        self.node = node

    def inputs(self) -> list:
        """The node's tensor arguments the rule differentiates, in the order of tangents and gradients."""
        return [self.node.args[0]]

    def metadata_inputs(self) -> list:
        """Arguments the op reads for their shape or dtype only (``type_as``'s ``other``): no gradient flows
        into them, so they may depend on θ without being differentiated."""
        return []

    # -- the four passes ---------------------------------------------------------------------------

    def forward(self, args, kwargs):
        return self.node.target(*args, **kwargs), None

    def vjp(self, saved, g, need):
        raise NotImplementedError

    def jvp(self, saved, tangents):
        raise NotImplementedError

    def rvjp(self, saved, rsaved, g, rg, need):
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------------

    @property
    def out_meta(self):
        """The fake tensor (shape, dtype) the capture recorded for the node's output."""
        return self.node.meta["val"]

    def arg_meta(self, i: int):
        a = self.node.args[i]
        return a.meta["val"] if isinstance(a, fx.Node) else a

    def describe(self) -> str:
        return describe(self.node)


class LinearRule(OpRule):
    """A rule for an op linear in each of its inputs: ``jvp`` applies the op to the tangents, the R-backward
    is the transposed op applied to R{g} (``adjoint``), and there is no second-order term."""

    def apply(self, saved, tangents):
        """The op applied to the stacked tangents (None entries are zero)."""
        raise NotImplementedError

    def adjoint(self, saved, g, need, batched: bool):
        """Transposed op: gradients of the inputs from ``g`` (``batched``: g has the leading k dimension)."""
        raise NotImplementedError

    def vjp(self, saved, g, need):
        return self.adjoint(saved, g, need, batched=False)

    def jvp(self, saved, tangents):
        return self.apply(saved, tangents), None

    def rvjp(self, saved, rsaved, g, rg, need):
        if rg is None:
            return [None] * len(need)
        return self.adjoint(saved, rg, need, batched=True)


class Embedded:
    """A gradient nonzero only in a slice of its parameter (``index`` into ``(k, *shape)``): the engine adds it
    there instead of building the mostly-zero full tensor."""

    def __init__(self, index: tuple, values: torch.Tensor):
        self.index, self.values = index, values

    def add_to(self, out: torch.Tensor) -> None:
        out[self.index].add_(self.values)  # a half-precision product adds into float32 sums as it is

    def dense(self, shape) -> torch.Tensor:
        full = self.values.new_zeros(shape)
        full[self.index] = self.values
        return full


class IndexAdded(Embedded):
    """A gradient that is ``values`` index-added along ``dim`` (embedding rows): added in place into the totals."""

    def __init__(self, dim: int, index: torch.Tensor, values: torch.Tensor):
        self.dim, self.index, self.values = dim, index, values

    def add_to(self, out: torch.Tensor) -> None:
        out.index_add_(self.dim, self.index, self.values.to(out.dtype))  # index_add_ takes one dtype

    def dense(self, shape) -> torch.Tensor:
        return self.values.new_zeros(shape).index_add_(self.dim, self.index, self.values)


def describe(node: fx.Node) -> str:
    """``aten.op (in module path)`` for messages: where in the user's model the node came from."""
    target = node.target
    name = getattr(target, "__name__", str(target))
    if hasattr(target, "_schema"):
        name = f"aten.{target._schema.name.split('::')[-1]}" + (
            f".{target._overloadname}" if target._overloadname != "default" else "")
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        kind_name = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1].strip("'>")
        return f"{name} (in {module_path(path) or 'the model'}: {kind_name})"
    return name


def module_path(path: str) -> str:
    """The qualified name in the user's model of a module the capture recorded: the captured function holds the
    model as its ``model`` attribute, so ``model.layers.0`` is the model's ``layers.0`` (and ``model`` itself)."""
    path = path.removeprefix("L['self'].")
    if path == "model":
        return ""
    return path.removeprefix("model.")


def argument(node: fx.Node, index: int, name: str, default=None):
    """The node's argument at position ``index`` or keyword ``name`` (``default`` when it has neither)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def lift(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A stacked tangent (k, *s) reshaped to (k, 1, ..., 1, *s) of ``ndim + 1`` dims, so that it broadcasts
    against primal tensors of ``ndim`` dims the way the primal operand did."""
    missing = ndim - (t.dim() - 1)
    if missing <= 0:
        return t
    return t.reshape((t.shape[0],) + (1,) * missing + tuple(t.shape[1:]))


def sum_to(t: torch.Tensor, shape, batched: bool) -> torch.Tensor:
    """``t`` summed over the dimensions that broadcasting added to ``shape`` (after the leading k when
    ``batched``): the adjoint of broadcasting."""
    shape = tuple(shape)
    lead = 1 if batched else 0
    body = t.shape[lead:]
    if tuple(body) == shape:
        return t
    extra = len(body) - len(shape)
    dims = list(range(lead, lead + extra))
    for i, size in enumerate(shape):
        if size == 1 and body[extra + i] != 1:
            dims.append(lead + extra + i)
    out = t.sum(dims, keepdim=True) if dims else t
    return out.reshape(t.shape[:lead] + shape)


def add(a, b):
    """a + b where None is zero (tensors, or lists of tensors for multi-output values)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, list):
        return [add(x, y) for x, y in zip(a, b)]
    return a + b


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def zeros_tangent(like: torch.Tensor, k: int) -> torch.Tensor:
    return like.new_zeros((k,) + tuple(like.shape))


def k_of(tangents) -> int:
    for t in tangents:
        if t is not None:
            return t.shape[0]
    raise AssertionError("a rule was called without any tangent")
