"""Rules of mixture-of-experts routing: the router's selections (``topk``, ``sort``, ``max``/``min`` along a
dimension) and the grouped matrix product that runs each expert on the tokens sent to it.

A selection's indices are piecewise constant in θ: almost everywhere a small move of θ keeps the same
experts, so the indices carry no tangent and the selected values are a gather of the input by them (linear,
no second-order term). The routing weights made from those values (a softmax of the selected logits, or
the selected probabilities renormalized) are differentiated by the rules of the ops that make them.

The grouped product ``y[rows of group e] = x[rows of group e] @ W[e]`` (``offs`` holding the cumulative row
counts, the tokens sorted by expert) is bilinear in x and W: one product per expert and pass, with the
cross terms of a product in the R-backward.
"""

from __future__ import annotations

import torch
from torch import fx

from .base import GraphUnsupported, LinearRule, OpRule, argument, norm_dim

aten = torch.ops.aten


def _shape(meta) -> tuple[int, ...]:
    return tuple(int(s) for s in meta.shape)


class Selection(LinearRule):
    """(values, indices) = topk / sort / max.dim / min.dim of x: values = x gathered at the indices."""

    def __init__(self, node):
        super().__init__(node)
        ndim = len(self.arg_meta(0).shape)
        target = node.target
        if target is aten.topk.default:
            dim = argument(node, 2, "dim", -1)
        elif target is aten.sort.stable:
            dim = node.kwargs.get("dim", -1)
        else:  # sort.default, max.dim, min.dim: dim second
            dim = argument(node, 1, "dim", -1)
        self.dim = norm_dim(dim, ndim) if ndim else 0
        reduces = target in (aten.max.dim, aten.min.dim)
        self.squeezed = reduces and not argument(node, 2, "keepdim", False)

    def forward(self, args, kwargs):
        values, indices = self.node.target(*args, **kwargs)
        index = indices.unsqueeze(self.dim) if self.squeezed else indices
        return (values, indices), index

    def apply(self, index, tangents):
        t = tangents[0]
        picked = t.gather(self.dim + 1, index.unsqueeze(0).expand((t.shape[0],) + tuple(index.shape)))
        return [picked.squeeze(self.dim + 1) if self.squeezed else picked, None]

    def adjoint(self, index, g, need, batched):
        gv = g[0]
        if gv is None:
            return [None]
        lead = 1 if batched else 0
        if self.squeezed:
            gv = gv.unsqueeze(self.dim + lead)
        idx = index.unsqueeze(0).expand((gv.shape[0],) + tuple(index.shape)) if batched else index
        shape = tuple(gv.shape[:lead]) + _shape(self.arg_meta(0))
        return [gv.new_zeros(shape).scatter_add_(self.dim + lead, idx, gv)]


class GroupedMatMul(OpRule):
    """y = grouped_mm(x, W, offs): x (S, K) with its rows sorted by group, W (E, K, N), offs (E,) the groups'
    cumulative row counts; rows past offs[-1] give zeros. transformers' ``grouped_mm_fallback`` (its experts on
    CPU, and whenever torch's kernel cannot run) and ``torch._grouped_mm`` in that form."""

    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        x, w = (self.arg_meta(i) for i in (0, 1))
        if len(x.shape) != 2 or len(w.shape) != 3:
            raise GraphUnsupported(f"{self.describe()} with operands of shapes {tuple(x.shape)}, {tuple(w.shape)} "
                                   "(the rules take tokens (S, K) and expert weights (E, K, N))")
        offs = argument(node, 2, "offs")
        if not isinstance(offs, fx.Node) or argument(node, 3, "bias") is not None:
            raise GraphUnsupported(f"{self.describe()} without group offsets or with a bias")

    def inputs(self):
        return [self.node.args[0], self.node.args[1]]

    def _groups(self, offs):
        """(expert, start, end) for every group that has rows (one host sync per batch)."""
        out, start = [], 0
        for e, end in enumerate(offs.tolist()):
            if end > start:
                out.append((e, start, end))
            start = end
        return out

    def forward(self, args, kwargs):
        x, w = args[0], args[1]
        offs = args[2] if len(args) > 2 else kwargs["offs"]
        groups = self._groups(offs)
        y = x.new_zeros((x.shape[0], w.shape[2]))
        for e, s, t in groups:
            torch.mm(x[s:t], w[e], out=y[s:t])
        return y, (x, w, groups)

    def vjp(self, saved, g, need):
        x, w, groups = saved
        gx = torch.zeros_like(x) if need[0] else None
        gw = torch.zeros_like(w) if need[1] else None
        for e, s, t in groups:
            if gx is not None:
                torch.mm(g[s:t], w[e].t(), out=gx[s:t])
            if gw is not None:
                torch.mm(x[s:t].t(), g[s:t], out=gw[e])
        return [gx, gw]

    def jvp(self, saved, tangents):
        x, w, groups = saved
        rx, rw = tangents
        k = (rx if rx is not None else rw).shape[0]
        ry = x.new_zeros((k, x.shape[0], w.shape[2]))
        for e, s, t in groups:
            if rx is not None:
                torch.matmul(rx[:, s:t], w[e], out=ry[:, s:t])
            if rw is not None:
                ry[:, s:t].add_(torch.matmul(x[s:t], rw[:, e]))
        return ry, (rx, rw)

    def rvjp(self, saved, rsaved, g, rg, need):
        x, w, groups = saved
        rx, rw = rsaved
        k = next(t.shape[0] for t in (rg, rx, rw) if t is not None)
        rgx = x.new_zeros((k,) + tuple(x.shape)) if need[0] else None
        rgw = w.new_zeros((k,) + tuple(w.shape)) if need[1] else None
        for e, s, t in groups:
            if rgx is not None:  # R{g_x} = R{g} Wᵀ + g R{W}ᵀ
                if rg is not None:
                    rgx[:, s:t] = torch.matmul(rg[:, s:t], w[e].t())
                if rw is not None:
                    rgx[:, s:t] += torch.matmul(g[s:t], rw[:, e].transpose(1, 2))
            if rgw is not None:  # R{g_W} = xᵀ R{g} + R{x}ᵀ g
                if rg is not None:
                    rgw[:, e] = torch.matmul(x[s:t].t(), rg[:, s:t])
                if rx is not None:
                    rgw[:, e] += torch.matmul(rx[:, s:t].transpose(1, 2), g[s:t])
        return [rgx, rgw]


RULES = {
    aten.topk.default: Selection, aten.sort.default: Selection, aten.sort.stable: Selection,
    aten.max.dim: Selection, aten.min.dim: Selection,
}
if hasattr(aten, "_grouped_mm"):  # torch >= 2.8
    RULES[aten._grouped_mm.default] = GroupedMatMul

#: ops of other libraries, by schema name: they exist once that library registers them, maybe after hessgap loads
NAMED_RULES = {"transformers::grouped_mm_fallback": GroupedMatMul}
