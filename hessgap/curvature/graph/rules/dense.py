"""Rules of the matrix products: linear / addmm / mm (one weight matrix, rows of activations), matmul and bmm
(any two operands, batch dimensions broadcast), einsum, and embedding lookups.

Every product is one BLAS call over all k directions: the activations' R-terms stack the directions into
the rows ((k·rows) × in), the direction-dependent weights go through one batched GEMM whose shared operand
is a stride-0 expand (no copy), and second terms accumulate in place (addmm_, baddbmm_).
"""

from __future__ import annotations

import string

import torch
from torch import fx

from .base import GraphUnsupported, IndexAdded, OpRule, lift, sum_to

aten = torch.ops.aten


def _node(a):
    return a if isinstance(a, fx.Node) else None


class Linear(OpRule):
    """y = x Wᵀ + b (linear), y = b + x W' (addmm: W' = Wᵀ given as (in, out)), y = x W' (mm).

    Any of x, W, b may depend on θ (a weight is usually a parameter, but tied or computed weights work too).
    """

    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        target = node.target
        args = list(node.args) + [None] * 3
        if target is aten.linear.default:
            self.x, self.w, self.b, self.transposed = args[0], args[1], args[2], False
        elif target is aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                raise GraphUnsupported(f"{self.describe()} with alpha or beta other than 1")
            self.x, self.w, self.b, self.transposed = args[1], args[2], args[0], True
        else:  # mm
            self.x, self.w, self.b, self.transposed = args[0], args[1], None, True
        if self.b is not None and len(self.b.meta["val"].shape) != 1:
            raise GraphUnsupported(f"{self.describe()} with a bias of shape {tuple(self.b.meta['val'].shape)}")

    def inputs(self):
        return [_node(self.x), _node(self.w), _node(self.b)]

    def _wt(self, w):
        """The weight as (in, out) (a view)."""
        return w if self.transposed else w.t()

    def forward(self, args, kwargs):
        y = self.node.target(*args, **kwargs)
        if self.node.target is aten.addmm.default:
            return y, (args[1], args[2])
        return y, (args[0], args[1])

    def vjp(self, saved, g, need):
        x, w = saved
        wt = self._wt(w)
        in_f, out_f = wt.shape
        g_rows = g.reshape(-1, out_f)
        x_rows = x.reshape(-1, in_f)
        out = [(g_rows @ wt.t()).reshape(x.shape) if need[0] else None]
        if need[1]:
            gw = x_rows.t() @ g_rows  # (in, out)
            out.append(gw if self.transposed else gw.t())
        else:
            out.append(None)
        out.append(g_rows.sum(0) if need[2] else None)
        return out

    def jvp(self, saved, tangents):
        x, w = saved
        rx, rw, rb = tangents
        wt = self._wt(w)
        in_f, out_f = wt.shape
        k = next(t.shape[0] for t in tangents if t is not None)
        x_rows = x.reshape(-1, in_f)
        rows = x_rows.shape[0]
        ry = None
        if rw is not None:
            rwt = rw if self.transposed else rw.transpose(1, 2)  # (k, in, out)
            x_k = x_rows.expand(k, rows, in_f)
            ry = torch.bmm(x_k, rwt) if rb is None else torch.baddbmm(rb.reshape(k, 1, out_f), x_k, rwt)
        elif rb is not None:
            ry = rb.reshape(k, 1, out_f).expand(k, rows, out_f).clone()
        if rx is not None:
            rx_rows = rx.reshape(k * rows, in_f)
            if ry is None:
                ry = (rx_rows @ wt).reshape(k, rows, out_f)
            else:
                ry.view(k * rows, out_f).addmm_(rx_rows, wt)
        return ry.reshape((k,) + tuple(x.shape[:-1]) + (out_f,)), (rx, rw)

    def rvjp(self, saved, rsaved, g, rg, need):
        x, w = saved
        rx, rw = rsaved
        wt = self._wt(w)
        in_f, out_f = wt.shape
        k = (rg if rg is not None else (rx if rx is not None else rw)).shape[0]
        g_rows = g.reshape(-1, out_f)
        rows = g_rows.shape[0]
        rg_rows = rg.reshape(k, rows, out_f) if rg is not None else None
        out = [None, None, None]
        if need[0]:
            # R{g_x} = R{g_y} W'ᵀ + g_y R{W'}ᵀ
            acc = None
            if rg_rows is not None:
                acc = (rg_rows.reshape(k * rows, out_f) @ wt.t()).reshape(k, rows, in_f)
            if rw is not None:
                rwt = rw if self.transposed else rw.transpose(1, 2)
                g_k = g_rows.expand(k, rows, out_f)
                term_t = rwt.transpose(1, 2)
                acc = torch.bmm(g_k, term_t) if acc is None else acc.baddbmm_(g_k, term_t)
            out[0] = None if acc is None else acc.reshape((k,) + tuple(x.shape))
        if need[1]:
            # R{g_W} = R{g_y}ᵀ x + g_yᵀ R{x}, built in the weight's own layout ((k, out, in) for linear,
            # (k, in, out) for addmm/mm) so that adding it into the totals reads it contiguously
            x_rows = x.reshape(rows, in_f)
            acc = None
            if self.transposed:
                if rg_rows is not None:
                    acc = torch.bmm(x_rows.t().expand(k, in_f, rows), rg_rows)
                if rx is not None:
                    rx_t = rx.reshape(k, rows, in_f).transpose(1, 2)
                    g_k = g_rows.expand(k, rows, out_f)
                    acc = torch.bmm(rx_t, g_k) if acc is None else acc.baddbmm_(rx_t, g_k)
            else:
                if rg_rows is not None:
                    acc = torch.bmm(rg_rows.transpose(1, 2), x_rows.expand(k, rows, in_f))
                if rx is not None:
                    g_t = g_rows.t().expand(k, out_f, rows)
                    rx_k = rx.reshape(k, rows, in_f)
                    acc = torch.bmm(g_t, rx_k) if acc is None else acc.baddbmm_(g_t, rx_k)
            out[1] = acc
        if need[2] and rg_rows is not None:
            out[2] = rg_rows.sum(1)
        return out


def _t(x):
    return x.transpose(-1, -2)


class MatMul(OpRule):
    """a @ b for operands of at least two dimensions (bmm, matmul), batch dimensions broadcast."""

    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        for a in node.args[:2]:
            if isinstance(a, fx.Node) and len(a.meta["val"].shape) < 2:
                raise GraphUnsupported(f"{self.describe()} with a one-dimensional operand")

    def inputs(self):
        return [_node(self.node.args[0]), _node(self.node.args[1])]

    def forward(self, args, kwargs):
        return torch.matmul(args[0], args[1]), (args[0], args[1])

    def vjp(self, saved, g, need):
        a, b = saved
        return [sum_to(g @ _t(b), a.shape, False) if need[0] else None,
                sum_to(_t(a) @ g, b.shape, False) if need[1] else None]

    def jvp(self, saved, tangents):
        a, b = saved
        ra, rb = tangents
        n = len(self.out_meta.shape)
        out = None
        if ra is not None:
            out = lift(ra, n) @ b
        if rb is not None:
            term = a @ lift(rb, n)
            out = term if out is None else out + term
        return out, (ra, rb)

    def rvjp(self, saved, rsaved, g, rg, need):
        a, b = saved
        ra, rb = rsaved
        n = len(self.out_meta.shape)
        out = [None, None]
        if need[0]:
            acc = rg @ _t(b) if rg is not None else None
            if rb is not None:
                term = g @ _t(lift(rb, n))
                acc = term if acc is None else acc + term
            out[0] = None if acc is None else sum_to(acc, a.shape, True)
        if need[1]:
            acc = _t(a) @ rg if rg is not None else None
            if ra is not None:
                term = _t(lift(ra, n)) @ g
                acc = term if acc is None else acc + term
            out[1] = None if acc is None else sum_to(acc, b.shape, True)
        return out


class Einsum(OpRule):
    """einsum of one or two operands without ellipsis or repeated indices within an operand."""

    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        equation = node.args[0].replace(" ", "")
        if "..." in equation or "->" not in equation:
            raise GraphUnsupported(f"{self.describe()} with an equation {equation!r} (needs explicit '->', no '...')")
        lhs, self.out = equation.split("->")
        self.ops = lhs.split(",")
        if len(self.ops) > 2 or any(len(set(o)) != len(o) for o in self.ops + [self.out]):
            raise GraphUnsupported(f"{self.describe()} with equation {equation!r} (at most two operands, no diagonals)")
        used = set(lhs)
        self.k = next(c for c in string.ascii_letters if c not in used)
        for i, op in enumerate(self.ops):
            others = set(self.out) | set("".join(o for j, o in enumerate(self.ops) if j != i))
            if not set(op) <= others:
                raise GraphUnsupported(f"{self.describe()}: an index of operand {i} is summed away alone")

    def inputs(self):
        return [_node(a) for a in self.node.args[1]]

    def forward(self, args, kwargs):
        return self.node.target(*args, **kwargs), list(args[1])

    def _eq(self, sources, target, batched):
        k = self.k
        parts = [(k if b else "") + s for s, b in zip(sources, batched)]
        return ",".join(parts) + "->" + (k if any(batched) else "") + target

    def vjp(self, ops, g, need):
        out = []
        for i, wanted in enumerate(need):
            if not wanted:
                out.append(None)
                continue
            others = [o for j, o in enumerate(ops) if j != i]
            subs = [self.out] + [s for j, s in enumerate(self.ops) if j != i]
            out.append(torch.einsum(self._eq(subs, self.ops[i], [False] * len(subs)), g, *others))
        return out

    def jvp(self, ops, tangents):
        out = None
        for i, t in enumerate(tangents):
            if t is None:
                continue
            operands = [t if j == i else o for j, o in enumerate(ops)]
            term = torch.einsum(self._eq(self.ops, self.out, [j == i for j in range(len(ops))]), *operands)
            out = term if out is None else out + term
        return out, list(tangents)

    def rvjp(self, ops, tangents, g, rg, need):
        out = []
        for i, wanted in enumerate(need):
            if not wanted:
                out.append(None)
                continue
            subs = [self.out] + [s for j, s in enumerate(self.ops) if j != i]
            others = [o for j, o in enumerate(ops) if j != i]
            acc = None
            if rg is not None:
                acc = torch.einsum(self._eq(subs, self.ops[i], [True] + [False] * len(others)), rg, *others)
            for j, t in enumerate(tangents):
                if j == i or t is None:
                    continue
                operands = [g] + [t if jj == j else o for jj, o in enumerate(ops) if jj != i]
                flags = [False] + [jj == j for jj in range(len(ops)) if jj != i]
                term = torch.einsum(self._eq(subs, self.ops[i], flags), *operands)
                acc = term if acc is None else acc + term
            out.append(acc)
        return out


class Embedding(OpRule):
    """Rows of a weight table looked up by indices that do not depend on θ (linear in the table)."""

    def __init__(self, node):
        super().__init__(node)
        args = list(node.args) + [-1, False, False][len(node.args) - 2:]
        self.padding_idx = args[2]
        if args[3]:
            raise GraphUnsupported(f"{self.describe()} with scale_grad_by_freq=True")

    def inputs(self):
        return [self.node.args[0]]

    def forward(self, args, kwargs):
        return self.node.target(*args, **kwargs), args[1]

    def _scatter(self, idx, g, batched):
        num, dim = (int(s) for s in self.arg_meta(0).shape)
        lead = (g.shape[0],) if batched else ()
        flat = g.reshape(lead + (-1, dim))
        out = g.new_zeros(lead + (num, dim)).index_add_(len(lead), idx.reshape(-1), flat)
        if self.padding_idx is not None and self.padding_idx >= 0:
            out.select(len(lead), self.padding_idx).zero_()
        return out

    def vjp(self, idx, g, need):
        return [self._scatter(idx, g, False)]

    def jvp(self, idx, tangents):
        t = tangents[0]
        k, dim = t.shape[0], t.shape[-1]
        out = t.index_select(1, idx.reshape(-1)).reshape((k,) + tuple(idx.shape) + (dim,))
        if self.padding_idx is not None and self.padding_idx >= 0:
            # autograd never trains the padding row: its gradient is 0, so the Hessian's row and column are too
            out = out.masked_fill((idx == self.padding_idx).unsqueeze(-1), 0)
        return out, None

    def rvjp(self, idx, rsaved, g, rg, need):
        if rg is None:
            return [None]
        rows = rg.reshape(rg.shape[0], -1, rg.shape[-1])
        flat = idx.reshape(-1)
        if self.padding_idx is not None and self.padding_idx >= 0:
            rows = rows.masked_fill((flat == self.padding_idx).reshape(1, -1, 1), 0)
        return [IndexAdded(1, flat, rows)]


RULES = {
    aten.linear.default: Linear, aten.addmm.default: Linear, aten.mm.default: Linear,
    aten.bmm.default: MatMul, aten.matmul.default: MatMul,
    aten.einsum.default: Einsum,
    aten.embedding.default: Embedding,
}
