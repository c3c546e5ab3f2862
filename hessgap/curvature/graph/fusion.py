"""Rewrites of a captured graph that keep its function and give the engine fewer, fused ops.

A model may write out an op the engine has a fused rule for: GPT-2's ``gelu_new`` (Hugging Face's
``NewGELUActivation``) is ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), eight element-wise nodes whose R-passes
cost about ten passes over the activation per direction; ``aten.gelu(x, approximate="tanh")`` is the same
function, and its rule two products per direction. :func:`fuse` replaces each such subgraph by the op, in place,
and drops the nodes nothing else uses; it is idempotent, so a capture shared by several programs is rewritten
once.
"""

from __future__ import annotations

import math

import torch
from torch import fx

aten = torch.ops.aten

_MUL = (aten.mul.Tensor, aten.mul.Scalar)
_ADD = (aten.add.Tensor, aten.add.Scalar)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _scaled(node, scale: float | None = None):
    """``node = x·c`` (either order): (x, c), or None; with ``scale``, only when c equals it."""
    if not isinstance(node, fx.Node) or node.target not in _MUL or node.kwargs:
        return None
    a, b = node.args[:2]
    x, c = (a, _number(b)) if isinstance(a, fx.Node) else (b, _number(a))
    if not isinstance(x, fx.Node) or c is None or (scale is not None and not math.isclose(c, scale, rel_tol=1e-6)):
        return None
    return x, c


def _plus_number(node, number: float):
    """``node = x + number`` (either order, alpha 1): x, or None."""
    if not isinstance(node, fx.Node) or node.target not in _ADD or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[:2]
    x, c = (a, _number(b)) if isinstance(a, fx.Node) else (b, _number(a))
    return x if isinstance(x, fx.Node) and c is not None and math.isclose(c, number) else None


def _sum_of(node):
    """``node = a + b`` of two nodes (alpha 1): (a, b), or None."""
    if not isinstance(node, fx.Node) or node.target is not aten.add.Tensor or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[:2]
    return (a, b) if isinstance(a, fx.Node) and isinstance(b, fx.Node) else None


def _cube_of(node, x) -> bool:
    return (isinstance(node, fx.Node) and node.target is aten.pow.Tensor_Scalar and node.args[0] is x
            and _number(node.args[1]) == 3.0)


def _gelu_tanh_input(root: fx.Node):
    """x when ``root`` computes ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (operands in either order), with the
    nodes of that subgraph; else None."""
    if root.op != "call_function" or root.target is not aten.mul.Tensor or root.kwargs:
        return None
    a, b = root.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    for half, one_plus in ((a, b), (b, a)):
        scaled = _scaled(half, 0.5)
        t = _plus_number(one_plus, 1.0)
        if scaled is None or t is None or t.target is not aten.tanh.default:
            continue
        x = scaled[0]
        inner = _scaled(t.args[0], math.sqrt(2 / math.pi))
        pair = _sum_of(inner[0]) if inner is not None else None
        if pair is None:
            continue
        for first, second in (pair, pair[::-1]):
            cubic = _scaled(second, 0.044715)
            if first is x and cubic is not None and _cube_of(cubic[0], x):
                return x, [root, half, one_plus, t, t.args[0], inner[0], second, cubic[0]]
    return None


def fuse(graph: fx.Graph) -> int:
    """Replace written-out ops by the op itself (see the module docstring); returns how many were replaced."""
    replaced = 0
    for node in list(graph.nodes):  # a pattern's members come before its root: none is visited once erased
        found = _gelu_tanh_input(node)
        if found is None:
            continue
        x, members = found
        with graph.inserting_before(node):
            gelu = graph.call_function(aten.gelu.default, (x,), {"approximate": "tanh"})
        gelu.meta = dict(node.meta)
        node.replace_all_uses_with(gelu)
        for member in members:  # producers after consumers: a member is dropped once nothing uses it
            if not member.users:
                graph.erase_node(member)
        replaced += 1
    return replaced
