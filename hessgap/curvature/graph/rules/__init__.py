"""The R-operator rule of each ATen op the graph engine handles (:func:`rule_for`).

One module per family: :mod:`.views` (reshapes, slices, concatenation, casts), :mod:`.arith` (element-wise
arithmetic and functions, sums), :mod:`.piecewise` (hardswish, hardsigmoid, hardtanh, ReLU6), :mod:`.dense`
(linear, matmul, einsum, embedding), :mod:`.conv`, :mod:`.norm` (LayerNorm, RMSNorm, GroupNorm, BatchNorm in
eval mode, weight_norm), :mod:`.pool`, :mod:`.loss` (softmax, cross-entropy, NLL, MSE), :mod:`.attention` (and
:mod:`.attention_bias` for a learned mask), :mod:`.indexing` (indexing, gathers, scatters, repeats,
embedding_bag), :mod:`.routing` (mixture-of-experts selections and grouped products) and :mod:`.recurrent`
(LSTM, GRU); :mod:`.base` holds the interface they implement.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from . import arith, attention, conv, dense, indexing, loss, norm, piecewise, pool, recurrent, routing, views
from .base import REMEDY, GraphUnsupported, OpRule, describe

RULES: dict = {}
for _module in (views, arith, piecewise, dense, conv, norm, pool, loss, attention, indexing, routing, recurrent):
    RULES.update(_module.RULES)


def rule_for(node: fx.Node, carries: Callable[[fx.Node], bool]) -> OpRule:
    """The rule bound to ``node``; ``carries(n)`` says whether node n depends on the parameters.
    Raises :class:`GraphUnsupported` naming the op (and the module it came from) when there is none."""
    make = RULES.get(node.target)
    if make is None and hasattr(node.target, "_schema"):
        make = routing.NAMED_RULES.get(node.target._schema.name)
    if make is None:
        raise GraphUnsupported(f"{describe(node)} has no R-operator rule in hessgap's graph engine: {REMEDY}")
    if isinstance(make, type):
        return make(node)
    return make(node, carries)


__all__ = ["GraphUnsupported", "OpRule", "RULES", "rule_for"]
