"""Rules of pooling: max pooling (1-d, 2-d, adaptive; linear given the argmax positions of the primal pass)
and average pooling (1-d, 2-d, adaptive: linear). The k directions fold into the batch dimension.
"""

from __future__ import annotations

import torch

from .base import GraphUnsupported, LinearRule

aten = torch.ops.aten

_WITH_INDICES = {
    aten.max_pool2d.default: aten.max_pool2d_with_indices.default,
    aten.max_pool1d.default: aten.max_pool1d_with_indices.default if hasattr(aten, "max_pool1d_with_indices") else None,
}
_TUPLE_OUTPUT = (aten.max_pool2d_with_indices.default, aten.adaptive_max_pool2d.default,
                 aten.adaptive_max_pool1d.default)


class MaxPool(LinearRule):
    def __init__(self, node):
        super().__init__(node)
        self.tuple_output = node.target in _TUPLE_OUTPUT
        if not self.tuple_output and _WITH_INDICES.get(node.target) is None:
            raise GraphUnsupported(f"{self.describe()} (no indices variant on this torch)")

    def forward(self, args, kwargs):
        if self.tuple_output:
            y, idx = self.node.target(*args, **kwargs)
            return (y, idx), idx
        y, idx = _WITH_INDICES[self.node.target](*args, **kwargs)
        return y, idx

    def _flat(self, t, lead):
        return t.reshape(tuple(t.shape[: lead + 2]) + (-1,))

    def apply(self, idx, tangents):
        t = tangents[0]
        k = t.shape[0]
        flat_idx = self._flat(idx, 0).unsqueeze(0).expand((k,) + tuple(self._flat(idx, 0).shape))
        out = self._flat(t, 1).gather(3, flat_idx).reshape((k,) + tuple(idx.shape))
        return [out, None] if self.tuple_output else out

    def adjoint(self, idx, g, need, batched):
        if self.tuple_output:
            g = g[0]
            if g is None:
                return [None]
        x_shape = tuple(int(s) for s in self.arg_meta(0).shape)
        flat_idx = self._flat(idx, 0)
        if batched:
            k = g.shape[0]
            out = g.new_zeros((k,) + x_shape[:2] + (_numel(x_shape[2:]),))
            out.scatter_add_(3, flat_idx.unsqueeze(0).expand((k,) + tuple(flat_idx.shape)), self._flat(g, 1))
            return [out.reshape((k,) + x_shape)]
        out = g.new_zeros(x_shape[:2] + (_numel(x_shape[2:]),))
        out.scatter_add_(2, flat_idx, self._flat(g, 0))
        return [out.reshape(x_shape)]


def _numel(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


class LinearPool(LinearRule):
    """avg_pool1d/2d and adaptive_avg_pool1d/2d: linear maps applied per sample."""

    def _op(self, x):
        return self.node.target(x, *self.node.args[1:], **self.node.kwargs)

    def apply(self, saved, tangents):
        t = tangents[0]
        y = self._op(t.flatten(0, 1))
        return y.reshape((t.shape[0], t.shape[1]) + tuple(y.shape[1:]))

    def adjoint(self, saved, g, need, batched):
        shape = tuple(int(s) for s in self.arg_meta(0).shape)
        if batched:
            k = g.shape[0]
            flat_shape = (k * shape[0],) + shape[1:]
            g = g.flatten(0, 1)
        else:
            flat_shape = shape
        zeros = g.new_zeros(flat_shape)  # the op is linear: its transpose does not depend on the point
        _, transpose = torch.func.vjp(self._op, zeros)
        out = transpose(g)[0]
        return [out.reshape(((k,) if batched else ()) + shape)]


RULES = {
    aten.max_pool2d.default: MaxPool, aten.max_pool2d_with_indices.default: MaxPool,
    aten.adaptive_max_pool2d.default: MaxPool, aten.adaptive_max_pool1d.default: MaxPool,
    aten.avg_pool2d.default: LinearPool, aten.avg_pool1d.default: LinearPool,
    aten.adaptive_avg_pool2d.default: LinearPool, aten.adaptive_avg_pool1d.default: LinearPool,
    aten._adaptive_avg_pool2d.default: LinearPool,
}
if _WITH_INDICES[aten.max_pool1d.default] is not None:
    RULES[aten.max_pool1d.default] = MaxPool
