"""Rules of the ops that pick or place elements by index tensors that do not depend on θ: advanced indexing
(``x[idx]``: Swin's relative position bias table, tokens sent to experts), ``index_select``, ``gather``,
``scatter``/``scatter_add``, ``index_add``, ``index_put``, ``repeat``, ``repeat_interleave`` and
``embedding_bag``.

Each is linear in its floating inputs (the indices are integers, so nothing flows into them): the tangent
goes through the same op with the k directions as an extra dimension, gradients through the transposed
op (a gather's transpose is a scatter-add and back), and there is no second-order term.
"""

from __future__ import annotations

import torch
from torch import fx

from .base import GraphUnsupported, IndexAdded, LinearRule, argument, norm_dim, sum_to

aten = torch.ops.aten


def _shape(meta) -> tuple[int, ...]:
    return tuple(int(s) for s in meta.shape)


def _node(a):
    return a if isinstance(a, fx.Node) else None


def _adjacent(indices) -> bool:
    """Whether the index tensors sit next to each other: then advanced indexing puts the indexed dimensions
    where they were, else first (NumPy's rule), which decides where a leading k dimension ends up."""
    positions = [i for i, ix in enumerate(indices) if ix is not None]
    return positions == list(range(positions[0], positions[-1] + 1))


def index_batched(t: torch.Tensor, indices: list) -> torch.Tensor:
    """``t[k, *indices]`` for every k: x[indices] applied to each of the stacked (k, *s) directions."""
    if _adjacent(indices):
        return aten.index.Tensor(t, [None, *indices])
    return aten.index.Tensor(t.movedim(0, -1), indices).movedim(-1, 0)  # k last stays last


def index_put_batched(out: torch.Tensor, indices: list, values: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """``out[k, *indices] (+)= values[k]`` for every k, in place; returns ``out``."""
    if _adjacent(indices):
        aten.index_put_(out, [None, *indices], values, accumulate)
    else:
        aten.index_put_(out.movedim(0, -1), indices, values.movedim(0, -1) if values.dim() else values, accumulate)
    return out


class Index(LinearRule):
    """y = x[indices] (aten.index.Tensor; ``None`` entries are full slices)."""

    def forward(self, args, kwargs):
        return aten.index.Tensor(*args), list(args[1])

    def apply(self, indices, tangents):
        return index_batched(tangents[0], indices)

    def adjoint(self, indices, g, need, batched):
        shape = _shape(self.arg_meta(0))
        if batched:
            return [index_put_batched(g.new_zeros((g.shape[0],) + shape), indices, g, True)]
        return [aten.index_put_(g.new_zeros(shape), indices, g, True)]


class IndexSelect(LinearRule):
    def _dim(self):
        return norm_dim(self.node.args[1], len(self.arg_meta(0).shape))

    def forward(self, args, kwargs):
        return aten.index_select(*args), args[2]

    def apply(self, index, tangents):
        return tangents[0].index_select(self._dim() + 1, index)

    def adjoint(self, index, g, need, batched):
        lead = (g.shape[0],) if batched else ()
        return [g.new_zeros(lead + _shape(self.arg_meta(0))).index_add_(self._dim() + len(lead), index, g)]


def _expand_index(index: torch.Tensor, k: int) -> torch.Tensor:
    return index.unsqueeze(0).expand((k,) + tuple(index.shape))


class Gather(LinearRule):
    """y = x.gather(dim, index)."""

    def _dim(self):
        return norm_dim(self.node.args[1], len(self.arg_meta(0).shape))

    def forward(self, args, kwargs):
        return self.node.target(*args, **kwargs), args[2]

    def apply(self, index, tangents):
        t = tangents[0]
        return t.gather(self._dim() + 1, _expand_index(index, t.shape[0]))

    def adjoint(self, index, g, need, batched):
        shape = _shape(self.arg_meta(0))
        if batched:
            out = g.new_zeros((g.shape[0],) + shape)
            return [out.scatter_add_(self._dim() + 1, _expand_index(index, g.shape[0]), g)]
        return [g.new_zeros(shape).scatter_add_(self._dim(), index, g)]


class Scatter(LinearRule):
    """y = x.scatter(dim, index, src) (src written over x), x.scatter(dim, index, value) and
    x.scatter_add(dim, index, src): linear in x and src."""

    def __init__(self, node):
        super().__init__(node)
        self.add = node.target is aten.scatter_add.default
        if node.target is aten.scatter.reduce or node.kwargs.get("reduce") is not None:
            raise GraphUnsupported(f"{self.describe()} with a reduction")

    def inputs(self):
        src = self.node.args[3] if self.node.target is not aten.scatter.value else None
        return [self.node.args[0], _node(src)]

    def _dim(self):
        return norm_dim(self.node.args[1], len(self.arg_meta(0).shape))

    def forward(self, args, kwargs):
        return self.node.target(*args, **kwargs), args[2]

    def apply(self, index, tangents):
        rx, rsrc = tangents
        like = rx if rx is not None else rsrc
        k = like.shape[0]
        base = rx if rx is not None else like.new_zeros((k,) + _shape(self.out_meta))
        idx = _expand_index(index, k)
        if rsrc is None:
            return base if self.add else base.scatter(self._dim() + 1, idx, 0.0)
        if self.add:
            return base.scatter_add(self._dim() + 1, idx, rsrc)
        return base.scatter(self._dim() + 1, idx, rsrc)

    def adjoint(self, index, g, need, batched):
        dim = self._dim() + int(batched)
        idx = _expand_index(index, g.shape[0]) if batched else index
        gx = g if self.add else g.scatter(dim, idx, 0.0)  # overwritten entries do not depend on x
        return [gx if need[0] else None, g.gather(dim, idx) if need[1] else None]


class IndexAdd(LinearRule):
    """y = x.index_add(dim, index, source, alpha=α): linear in x and source."""

    def inputs(self):
        return [self.node.args[0], self.node.args[3]]

    def _dim(self):
        return norm_dim(self.node.args[1], len(self.arg_meta(0).shape))

    def forward(self, args, kwargs):
        return self.node.target(*args, **kwargs), args[2]

    def apply(self, index, tangents):
        rx, rsource = tangents
        alpha = self.node.kwargs.get("alpha", 1)
        like = rx if rx is not None else rsource
        out = rx if rx is not None else like.new_zeros((like.shape[0],) + _shape(self.out_meta))
        return out if rsource is None else out.index_add(self._dim() + 1, index, rsource, alpha=alpha)

    def adjoint(self, index, g, need, batched):
        alpha = self.node.kwargs.get("alpha", 1)
        gs = g.index_select(self._dim() + int(batched), index) if need[1] else None
        return [g if need[0] else None, gs * alpha if gs is not None and alpha != 1 else gs]


class IndexPut(LinearRule):
    """y = x.index_put(indices, values, accumulate): values added (accumulate) or written at the indices."""

    def inputs(self):
        return [self.node.args[0], _node(self.node.args[2])]

    def _accumulate(self):
        return bool(argument(self.node, 3, "accumulate", False))

    def forward(self, args, kwargs):
        indices = list(args[1])
        region = tuple(aten.index.Tensor(args[0], indices).shape)  # the indexed elements' shape
        return self.node.target(*args, **kwargs), (indices, region)

    def apply(self, saved, tangents):
        indices, region = saved
        rx, rv = tangents
        like = rx if rx is not None else rv
        k = like.shape[0]
        out = rx.clone() if rx is not None else like.new_zeros((k,) + _shape(self.out_meta))
        if rv is None:  # written entries no longer depend on x; added ones keep x's tangent
            return out if self._accumulate() else index_put_batched(out, indices, like.new_zeros(()), False)
        # values broadcast against the indexed region from the right: k goes in front of that
        rv = rv.reshape((k,) + (1,) * (len(region) + 1 - rv.dim()) + tuple(rv.shape[1:])).expand((k,) + region)
        return index_put_batched(out, indices, rv, self._accumulate())

    def adjoint(self, saved, g, need, batched):
        indices, _ = saved
        gx = gv = None
        if need[0]:
            if self._accumulate():
                gx = g
            elif batched:
                gx = index_put_batched(g.clone(), indices, g.new_zeros(()), False)
            else:
                gx = aten.index_put(g, indices, g.new_zeros(()), False)
        if need[1]:
            picked = index_batched(g, indices) if batched else aten.index.Tensor(g, indices)
            gv = sum_to(picked, _shape(self.node.args[2].meta["val"]), batched)
        return [gx, gv]


class RepeatInterleave(LinearRule):
    """y = x.repeat_interleave(r, dim) with a number of repeats r (every element r times)."""

    def __init__(self, node):
        super().__init__(node)
        self.repeats = int(node.args[1])
        dim = argument(node, 2, "dim")
        self.dim = None if dim is None else norm_dim(dim, len(self.arg_meta(0).shape))

    def apply(self, saved, tangents):
        t = tangents[0]
        if self.dim is None:
            return t.flatten(1).repeat_interleave(self.repeats, dim=1)
        return t.repeat_interleave(self.repeats, dim=self.dim + 1)

    def adjoint(self, saved, g, need, batched):
        lead = 1 if batched else 0
        shape = _shape(self.arg_meta(0))
        if self.dim is None:
            return [g.unflatten(lead, (-1, self.repeats)).sum(lead + 1).reshape(g.shape[:lead] + shape)]
        d = self.dim + lead
        return [g.unflatten(d, (shape[self.dim], self.repeats)).sum(d + 1)]


class Repeat(LinearRule):
    """y = x.repeat(r_0, …, r_m): the tiles are copies of x, so the adjoint sums them."""

    def __init__(self, node):
        super().__init__(node)
        self.repeats = [int(r) for r in node.args[1]]
        shape = _shape(self.arg_meta(0))
        self.padded = (1,) * (len(self.repeats) - len(shape)) + shape  # repeat counts may add dimensions in front

    def apply(self, saved, tangents):
        t = tangents[0]
        return t.reshape((t.shape[0],) + self.padded).repeat([1, *self.repeats])

    def adjoint(self, saved, g, need, batched):
        lead = tuple(g.shape[:1]) if batched else ()
        tiles = [d for r, s in zip(self.repeats, self.padded) for d in (r, s)]
        summed = g.reshape(lead + tuple(tiles)).sum([len(lead) + 2 * i for i in range(len(self.repeats))])
        return [summed.reshape(lead + _shape(self.arg_meta(0)))]


class EmbeddingBag(LinearRule):
    """Bags of weight rows (``nn.EmbeddingBag``), summed, averaged or maxed, with per-sample weights that do not
    depend on θ: linear in the weight (max: in the rows the maximum picked, which do not move a.e.)."""

    def __init__(self, node):
        super().__init__(node)
        args = list(node.args) + [None] * 9
        if args[3]:
            raise GraphUnsupported(f"{self.describe()} with scale_grad_by_freq=True")
        self.mode = int(args[4] or 0)
        self.weights = _node(args[6])
        self.last_offset = bool(args[7])
        padding = args[8]
        self.padding_idx = padding if padding is not None and padding >= 0 else None

    def inputs(self):
        return [self.node.args[0], None]

    def forward(self, args, kwargs):
        out = self.node.target(*args, **kwargs)
        weight, indices, offsets = args[0], args[1], args[2]
        if self.mode == 2:  # the rows the maxima came from; an empty bag (size 0) gives zeros
            return out, ("max", out[3].masked_fill((out[2] == 0).unsqueeze(1), -1))
        n, bags = indices.shape[0], offsets.shape[0] - int(self.last_offset)
        bag = torch.searchsorted(offsets[:bags], torch.arange(n, device=indices.device), right=True) - 1
        scale = torch.ones(n, dtype=weight.dtype, device=weight.device)
        per_sample = args[6] if len(args) > 6 else None
        if per_sample is not None:
            scale = scale * per_sample.to(weight.dtype)
        if self.padding_idx is not None:
            scale = scale.masked_fill(indices == self.padding_idx, 0)
        if self.mode == 1:
            counts = torch.zeros(bags, dtype=weight.dtype, device=weight.device).index_add_(0, bag, (scale != 0).to(weight.dtype))
            scale = scale / counts.clamp_min(1)[bag]
        return out, ("sum", (indices, bag, scale, bags))

    def apply(self, saved, tangents):
        # the op's outputs: (bags, offset2bag, bag_size, max_indices); only the bags carry a tangent
        t = tangents[0]
        kind, info = saved
        k, dim = t.shape[0], t.shape[-1]
        if kind == "max":
            picked = info.clamp_min(0)  # -1 marks an empty bag: zero output
            out = t.gather(1, _expand_index(picked, k)).masked_fill(info.unsqueeze(0) < 0, 0)
        else:
            indices, bag, scale, bags = info
            rows = t.index_select(1, indices) * scale.view(1, -1, 1)
            out = t.new_zeros((k, bags, dim)).index_add_(1, bag, rows)
        return [out, None, None, None]

    def adjoint(self, saved, g, need, batched):
        g = g[0]
        if g is None:
            return [None, None]
        kind, info = saved
        lead = (g.shape[0],) if batched else ()
        shape = lead + _shape(self.arg_meta(0))
        if kind == "max":
            idx = info.clamp_min(0)
            g = g.masked_fill(info < 0, 0) if not batched else g.masked_fill(info.unsqueeze(0) < 0, 0)
            idx = _expand_index(idx, g.shape[0]) if batched else idx
            return [g.new_zeros(shape).scatter_add_(len(lead), idx, g), None]
        indices, bag, scale, bags = info
        rows = g.index_select(len(lead), bag) * scale.view((1,) * len(lead) + (-1, 1))
        if batched and self.node.args[0].op == "placeholder":
            return [IndexAdded(1, indices, rows), None]  # added into the parameter's totals in place
        return [g.new_zeros(shape).index_add_(len(lead), indices, rows), None]


def embedding_bag_rule(node, carries):
    weights = node.args[6] if len(node.args) > 6 else None
    if isinstance(weights, fx.Node) and carries(weights):
        raise GraphUnsupported(f"{EmbeddingBag(node).describe()} with per_sample_weights that depend on the parameters")
    return EmbeddingBag(node)


RULES = {
    aten.index.Tensor: Index, aten.index_select.default: IndexSelect, aten.gather.default: Gather,
    aten.scatter.src: Scatter, aten.scatter.value: Scatter, aten.scatter_add.default: Scatter,
    aten.index_add.default: IndexAdd, aten.index_put.default: IndexPut,
    aten.repeat_interleave.self_int: RepeatInterleave, aten.repeat.default: Repeat,
    aten.embedding_bag.padding_idx: embedding_bag_rule, aten.embedding_bag.default: embedding_bag_rule,
    aten._embedding_bag.default: embedding_bag_rule,
}
