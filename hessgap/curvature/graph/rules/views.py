"""Rules of the ops that move elements without arithmetic: reshapes, permutations, slices, concatenation,
splits, broadcasts, padding, rolls, casts and the identities (clone, dropout in eval mode). Each is linear: the
tangent goes through the same op, shifted one dimension for the leading k, and gradients through its
transpose.
"""

from __future__ import annotations

import operator
import sys

import torch

from .base import GraphUnsupported, LinearRule, lift, norm_dim, sum_to

aten = torch.ops.aten


def _shape(meta) -> tuple[int, ...]:
    return tuple(int(s) for s in meta.shape)


def _lead(t: torch.Tensor, batched: bool) -> tuple[int, ...]:
    return (t.shape[0],) if batched else ()


class Reshape(LinearRule):
    """view, reshape, flatten, (un)squeeze, ...: the same elements in row-major order."""

    def forward(self, args, kwargs):
        if self.node.target in (aten.view.default, aten._unsafe_view.default):
            # a view of a rule's output: a rule may lay its output out otherwise than the op it replaces (the
            # fused attention's O is (B, H, T, D) where PyTorch's is (B, T, H, D) transposed), so a view the
            # capture recorded may need a copy here
            return args[0].reshape(args[1]), None
        return self.node.target(*args, **kwargs), None

    def apply(self, saved, tangents):
        t = tangents[0]
        return t.reshape((t.shape[0],) + _shape(self.out_meta))

    def adjoint(self, saved, g, need, batched):
        return [g.reshape(_lead(g, batched) + _shape(self.arg_meta(0)))]


class Identity(LinearRule):
    """clone, contiguous, alias, dropout in eval mode, floating-point casts (to, type_as)."""

    def __init__(self, node):
        super().__init__(node)
        name = node.target._schema.name
        if name in ("aten::dropout", "aten::feature_dropout", "aten::alpha_dropout") and node.args[2] and node.args[1] > 0:
            raise GraphUnsupported(f"{self.describe()} is dropout in train mode (random masks are not fused)")
        dtype = self.out_meta.dtype
        if not dtype.is_floating_point:
            raise GraphUnsupported(f"{self.describe()} casts to {dtype}")

    def metadata_inputs(self):
        # type_as(x, other) reads other's dtype only (Gemma's RMSNorm casts back to its input's dtype)
        return list(self.node.args[1:2]) if self.node.target is aten.type_as.default else []

    def apply(self, saved, tangents):
        return tangents[0].to(self.out_meta.dtype)

    def adjoint(self, saved, g, need, batched):
        return [g.to(self.arg_meta(0).dtype)]


class Permute(LinearRule):
    def _dims(self):
        ndim = len(self.arg_meta(0).shape)
        target = self.node.target
        if target is aten.permute.default:
            return [norm_dim(d, ndim) for d in self.node.args[1]]
        dims = list(range(ndim))
        if target is aten.t.default:
            if ndim == 2:
                dims = [1, 0]
            return dims
        a, b = (norm_dim(d, ndim) for d in self.node.args[1:3])
        dims[a], dims[b] = dims[b], dims[a]
        return dims

    def apply(self, saved, tangents):
        return tangents[0].permute([0] + [d + 1 for d in self._dims()])

    def adjoint(self, saved, g, need, batched):
        dims = self._dims()
        inverse = [dims.index(i) for i in range(len(dims))]
        if batched:
            inverse = [0] + [d + 1 for d in inverse]
        return [g.permute(inverse)]


class Expand(LinearRule):
    def apply(self, saved, tangents):
        t = tangents[0]
        out = _shape(self.out_meta)
        return lift(t, len(out)).expand((t.shape[0],) + out)

    def adjoint(self, saved, g, need, batched):
        return [sum_to(g, _shape(self.arg_meta(0)), batched)]


class Slice(LinearRule):
    def _args(self):
        args = list(self.node.args[1:]) + [None] * 4
        dim, start, end, step = args[:4]
        ndim = len(self.arg_meta(0).shape)
        return norm_dim(dim or 0, ndim), start or 0, sys.maxsize if end is None else end, step or 1

    def apply(self, saved, tangents):
        dim, start, end, step = self._args()
        return aten.slice.Tensor(tangents[0], dim + 1, start, end, step)

    def adjoint(self, saved, g, need, batched):
        dim, start, end, step = self._args()
        shape = _lead(g, batched) + _shape(self.arg_meta(0))
        return [aten.slice_backward(g, shape, dim + int(batched), start, end, step)]


class Select(LinearRule):
    def _args(self):
        ndim = len(self.arg_meta(0).shape)
        return norm_dim(self.node.args[1], ndim), self.node.args[2]

    def apply(self, saved, tangents):
        dim, index = self._args()
        return tangents[0].select(dim + 1, index)

    def adjoint(self, saved, g, need, batched):
        dim, index = self._args()
        shape = _lead(g, batched) + _shape(self.arg_meta(0))
        return [aten.select_backward(g, shape, dim + int(batched), index)]


class Split(LinearRule):
    """split, split_with_sizes, unbind: one tangent per piece; gradients concatenate back (zeros for pieces
    that receive none)."""

    def _dim(self):
        ndim = len(self.arg_meta(0).shape)
        if self.node.target is aten.unbind.int:
            return norm_dim(self.node.args[1] if len(self.node.args) > 1 else 0, ndim)
        dim = self.node.args[2] if len(self.node.args) > 2 else self.node.kwargs.get("dim", 0)
        return norm_dim(dim, ndim)

    def apply(self, saved, tangents):
        dim = self._dim()
        t = tangents[0]
        if self.node.target is aten.unbind.int:
            return list(t.unbind(dim + 1))
        sizes = [int(m.shape[dim]) for m in self.out_meta]
        return list(t.split(sizes, dim + 1))

    def adjoint(self, saved, g, need, batched):
        dim = self._dim()
        lead = None
        for piece in g:
            if piece is not None:
                lead = piece.shape[:1] if batched else ()
                like = piece
                break
        pieces = [
            piece if piece is not None else like.new_zeros(tuple(lead) + _shape(m))
            for piece, m in zip(g, self.out_meta)
        ]
        if self.node.target is aten.unbind.int:
            return [torch.stack(pieces, dim + int(batched))]
        return [torch.cat(pieces, dim + int(batched))]


class Cat(LinearRule):
    def inputs(self):
        return list(self.node.args[0])

    def _dim(self):
        dim = self.node.args[1] if len(self.node.args) > 1 else self.node.kwargs.get("dim", 0)
        return norm_dim(dim, len(self.out_meta.shape))

    def _stack(self):
        return self.node.target is aten.stack.default

    def apply(self, saved, tangents):
        k = next(t.shape[0] for t in tangents if t is not None)
        like = next(t for t in tangents if t is not None)
        pieces = []
        for t, node in zip(tangents, self.inputs()):
            shape = _shape(node.meta["val"]) if hasattr(node, "meta") else ()
            if t is None:
                t = like.new_zeros((k,) + shape)
            pieces.append(t)
        if self._stack():
            return torch.stack(pieces, self._dim() + 1)
        # cat skips empty 1-D inputs (legacy behaviour): keep them out of the tangent too
        pieces = [p for p in pieces if not (p.dim() == 2 and p.shape[1] == 0)]
        return torch.cat(pieces, self._dim() + 1)

    def adjoint(self, saved, g, need, batched):
        dim = self._dim() + int(batched)
        if self._stack():
            return list(g.unbind(dim))
        out = []
        offset = 0
        for node, wanted in zip(self.inputs(), need):
            shape = _shape(node.meta["val"])
            if len(shape) == 1 and shape[0] == 0 and len(self.out_meta.shape) > 1:
                out.append(None)
                continue
            size = shape[dim - int(batched)]
            out.append(g.narrow(dim, offset, size) if wanted else None)
            offset += size
        return out


class GetItem(LinearRule):
    """operator.getitem on a multi-output op's tuple."""

    def _index(self):
        return self.node.args[1]

    def apply(self, saved, tangents):
        t = tangents[0]
        return None if t is None else t[self._index()]

    def adjoint(self, saved, g, need, batched):
        source = self.node.args[0].meta["val"]
        out = [None] * len(source)
        out[self._index()] = g
        return [out]


class BroadcastTensors(LinearRule):
    def inputs(self):
        return list(self.node.args[0])

    def apply(self, saved, tangents):
        out = []
        for t, m in zip(tangents, self.out_meta):
            shape = _shape(m)
            out.append(None if t is None else lift(t, len(shape)).expand((t.shape[0],) + shape))
        return out

    def adjoint(self, saved, g, need, batched):
        return [
            sum_to(piece, _shape(node.meta["val"]), batched) if (wanted and piece is not None) else None
            for piece, node, wanted in zip(g, self.inputs(), need)
        ]


class Roll(LinearRule):
    """torch.roll (Swin's shifted windows): the adjoint rolls back."""

    def _args(self):
        shifts = [int(s) for s in self.node.args[1]]
        dims = self.node.args[2] if len(self.node.args) > 2 else self.node.kwargs.get("dims", [])
        return shifts, [norm_dim(d, len(self.arg_meta(0).shape)) for d in dims]

    def _roll(self, t, batched, sign):
        shifts, dims = self._args()
        lead = 1 if batched else 0
        shifts = [sign * s for s in shifts]
        if not dims:  # rolled as a flat tensor
            return t.flatten(lead).roll(shifts, lead).reshape(t.shape)
        return t.roll(shifts, [d + lead for d in dims])

    def apply(self, saved, tangents):
        return self._roll(tangents[0], True, 1)

    def adjoint(self, saved, g, need, batched):
        return [self._roll(g, batched, -1)]


class ConstantPad(LinearRule):
    def __init__(self, node):
        super().__init__(node)
        target = node.target
        if target is aten.pad.default:
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            if mode != "constant":
                raise GraphUnsupported(f"{self.describe()} pads in mode {mode!r} (only 'constant' is fused)")

    def apply(self, saved, tangents):
        return aten.constant_pad_nd(tangents[0], list(self.node.args[1]), 0.0)

    def adjoint(self, saved, g, need, batched):
        return [aten.constant_pad_nd(g, [-p for p in self.node.args[1]], 0.0)]


RULES = {
    aten.view.default: Reshape, aten._unsafe_view.default: Reshape, aten.reshape.default: Reshape,
    aten.unsqueeze.default: Reshape, aten.squeeze.dim: Reshape, aten.squeeze.dims: Reshape,
    aten.squeeze.default: Reshape, aten.flatten.using_ints: Reshape, aten.unflatten.int: Reshape,
    aten.view_as.default: Reshape, aten.reshape_as.default: Reshape,
    aten.clone.default: Identity, aten.contiguous.default: Identity, aten.alias.default: Identity,
    aten.lift_fresh_copy.default: Identity, aten.dropout.default: Identity, aten.feature_dropout.default: Identity,
    aten.alpha_dropout.default: Identity, aten._to_copy.default: Identity, aten.to.dtype: Identity,
    aten.to.dtype_layout: Identity, aten.to.device: Identity, aten.type_as.default: Identity,
    aten.permute.default: Permute, aten.transpose.int: Permute, aten.t.default: Permute,
    aten.expand.default: Expand,
    aten.slice.Tensor: Slice, aten.select.int: Select,
    aten.split.Tensor: Split, aten.split_with_sizes.default: Split, aten.unbind.int: Split,
    aten.cat.default: Cat, aten.stack.default: Cat,
    operator.getitem: GetItem,
    aten.broadcast_tensors.default: BroadcastTensors,
    aten.constant_pad_nd.default: ConstantPad, aten.pad.default: ConstantPad,
    aten.roll.default: Roll,
}
