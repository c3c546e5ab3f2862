"""The sizes a capture serves, and its graph made concrete for one batch's sizes.

A capture with dynamic batch and sequence dimensions (:mod:`.capture`) records sizes as symbols: the input
placeholders' shapes (``(s0, s1)`` for ``input_ids``), the range each symbol may take, and the guards
torch.export derived while tracing (``s1 <= 512`` for a model with 512 positions, ``s0*s1 == s2*s3`` for
targets that must hold one label per token). :class:`Sizes` binds a batch's sizes to those symbols and
checks every range and guard: a batch that fails one needs a capture of its own.

:func:`specialize` then gives the graph with every symbol replaced by the batch's value: sizes computed
in the graph (``sym_size``, their products) become numbers in the ops' arguments, and each node's recorded
value (``meta["val"]``) becomes a meta tensor of the batch's sizes. The rules read sizes from there, so
they work on the same static graph a capture of this very batch would have given, and no rule needs to
know that shapes were ever symbolic. Only the export is done once; making a graph concrete is a walk over
its nodes (milliseconds), done once per distinct batch shape.
"""

from __future__ import annotations

import dataclasses

import sympy
import torch
from torch import fx

aten = torch.ops.aten

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)
#: nodes that check sizes at run time: evaluated here, left out of the concrete graph
_RUNTIME_CHECKS = {aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
                   aten.sym_constrain_range.default}


class Sizes:
    """The symbolic sizes of a capture: ``shapes`` (per user input, ints and sympy expressions), the
    ``ranges`` of its symbols and the export's ``guards`` (sympy relations in those symbols)."""

    def __init__(self, shapes: list[tuple | None], ranges: dict, guards: list):
        self.shapes, self.ranges, self.guards = shapes, ranges, guards

    @classmethod
    def of(cls, exported, input_nodes: list[fx.Node]) -> Sizes | None:
        """The sizes of an ExportedProgram (``input_nodes``: its user-input placeholders), or None when every
        size is a number (nothing to bind)."""
        shapes, env = [], None
        for node in input_nodes:
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                shapes.append(None)
                continue
            dims = []
            for size in value.shape:
                if isinstance(size, torch.SymInt):
                    env = size.node.shape_env
                    dims.append(size.node.expr)
                else:
                    dims.append(int(size))
            shapes.append(tuple(dims))
        if env is None:
            return None
        ranges = {sym: (r.lower, r.upper) for sym, r in exported.range_constraints.items()}
        # guards in the symbols the graph kept (export merges equal sizes into one symbol)
        guards = [env.replace(guard.expr) for guard in env.guards]
        return cls(shapes, ranges, [g for g in guards if g not in (sympy.true, True)])

    def bind(self, leaves) -> dict | None:
        """The value of every symbol for the batch's tensors ``leaves`` (the graph's user inputs in order),
        or None when the capture does not serve these sizes."""
        binding: dict = {}
        derived = []
        for shape, leaf in zip(self.shapes, leaves):
            if shape is None:
                continue
            if not isinstance(leaf, torch.Tensor) or leaf.dim() != len(shape):
                return None
            for expected, size in zip(shape, leaf.shape):
                if isinstance(expected, int):
                    if expected != size:
                        return None
                elif isinstance(expected, sympy.Symbol):
                    if binding.setdefault(expected, sympy.Integer(size)) != size:
                        return None
                else:
                    derived.append((expected, size))
        for expr, size in derived:
            if _number(expr, binding) != size:
                return None
        for sym, (lower, upper) in self.ranges.items():
            value = binding.get(sym)
            if value is not None and not (lower <= value and value <= upper):
                return None
        return binding if all(_number(g, binding) is True for g in self.guards) else None


def _number(expr, binding):
    """``expr`` with the symbols' values: an int, float or bool; None when a symbol has no value (a size
    that depends on the data, such as the count of a mask's nonzeros)."""
    value = expr.xreplace(binding) if isinstance(expr, sympy.Basic) else expr
    if isinstance(value, sympy.Basic):
        if value.free_symbols:
            return None
        if value in (sympy.true, sympy.false):
            return bool(value)
        return int(value) if value.is_integer else float(value)
    return value


@dataclasses.dataclass
class _Concrete:
    """Values of the graph's symbolic quantities under one binding, each computed once."""

    binding: dict
    cache: dict = dataclasses.field(default_factory=dict)

    def number(self, sym):
        expr = sym.node.expr
        if expr not in self.cache:
            self.cache[expr] = _number(expr, self.binding)
        return self.cache[expr]

    def size(self, size):
        if not isinstance(size, torch.SymInt):
            return int(size)
        value = self.number(size)
        return size if value is None else value

    def meta(self, value):
        """A recorded value with the batch's sizes: tensors become meta tensors of those sizes."""
        if isinstance(value, (tuple, list)):
            return type(value)(self.meta(v) for v in value)
        if isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in (*value.shape, *value.stride())):
            shape = [self.size(s) for s in value.shape]
            stride = [self.size(s) for s in value.stride()]
            if any(isinstance(s, torch.SymInt) for s in (*shape, *stride)):
                return value  # a size that depends on the data stays symbolic, as in a static capture
            return torch.empty_strided(shape, stride, dtype=value.dtype, device="meta")
        return value


def specialize(graph: fx.Graph, loss_node: fx.Node, binding: dict, output_node: fx.Node | None = None):
    """``(graph, loss node, output node)``: ``graph`` with the sizes of ``binding`` (symbolic quantities become
    numbers and recorded values meta tensors of the batch's sizes); None when one of the graph's run-time size
    checks fails for them."""
    concrete = _Concrete(binding)
    out = fx.Graph()
    env: dict = {}
    for node in graph.nodes:
        value = node.meta.get("val")
        if node.op == "call_function" and isinstance(value, _SYMBOLIC):
            number = concrete.number(value)
            if number is not None:  # a size computed in the graph: a number in its users' arguments
                env[node] = number
                continue
        if node.op == "call_function" and node.target in _RUNTIME_CHECKS:
            if node.target is aten._assert_scalar.default:
                condition = fx.node.map_arg(node.args[0], lambda n: env[n])
                if condition is False:
                    return None
            continue
        copy = out.node_copy(node, lambda n: env[n])
        copy.meta = dict(node.meta)
        if "val" in node.meta:
            copy.meta["val"] = concrete.meta(value)
        env[node] = copy
    return out, env[loss_node], (env[output_node] if output_node is not None else None)

