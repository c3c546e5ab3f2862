"""Rules of the normalizations: LayerNorm, RMSNorm and GroupNorm (statistics of the input itself, so their
R-passes have second-order terms, computed by the fused kernels of :mod:`hessgap.ops.norm_rop`),
BatchNorm with running statistics (eval mode: per-channel affine in the input) and weight normalization
(``weight_norm`` parametrizations: w = g·v/‖v‖).

For LayerNorm/RMSNorm/GroupNorm the rows are what one set of statistics normalizes (the last dimensions,
or one group of channels) and x̂ = (x − μ)·r with r = 1/√(var + ε) (RMSNorm: μ = 0, var = mean(x²)).
"""

from __future__ import annotations

import torch
from torch import fx

from ....ops import norm_rop
from .base import GraphUnsupported, OpRule

aten = torch.ops.aten


def _node(a):
    return a if isinstance(a, fx.Node) else None


class Normalization(OpRule):
    """Shared by LayerNorm, RMSNorm and GroupNorm: x̂ over rows, then y = x̂·w + b per feature."""

    needs_grad = True
    center = True

    def inputs(self):
        return [self.node.args[0], _node(self.w), _node(self.b)]

    # -- per op: rows view and the shape the affine parameters broadcast to ---------------------------

    def rows(self, t: torch.Tensor, batched: bool) -> torch.Tensor:
        raise NotImplementedError

    def affine(self, p: torch.Tensor, batched: bool) -> torch.Tensor:
        """A weight or bias (or its k directions) shaped to broadcast against the output."""
        raise NotImplementedError

    def param_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over everything but the parameters' own dimensions of a (k, *x.shape) tensor -> (k, *w.shape)."""
        raise NotImplementedError

    def stats(self, x):
        raise NotImplementedError

    # -- passes --------------------------------------------------------------------------------------

    def forward(self, args, kwargs):
        x = args[0]
        xhat, rstd = self.stats(x, args)
        w = args[self._w_pos] if self.w is not None else None
        b = args[self._b_pos] if self.b is not None else None
        y = xhat
        if w is not None:
            y = y * self.affine(w, False)
        if b is not None:
            y = y + self.affine(b, False)
        return y, (xhat, rstd, w)

    def _a(self, g, w):
        return g if w is None else g * self.affine(w, False)

    def vjp(self, saved, g, need):
        xhat, rstd, w = saved
        out = [None, None, None]
        if need[0]:
            a = self._a(g, w)
            out[0] = norm_rop.norm_backward(self.rows(xhat, False), rstd, self.rows(a, False), self.center).reshape(g.shape)
        if need[1]:
            out[1] = self.param_sum((g * xhat).unsqueeze(0))[0]
        if need[2]:
            out[2] = self.param_sum(g.unsqueeze(0))[0]
        return out

    def jvp(self, saved, tangents):
        xhat, rstd, w = saved
        rx, rw, rb = tangents
        k = next(t.shape[0] for t in tangents if t is not None)
        rxhat = m1 = None
        ry = None
        if rx is not None:
            rxhat, m1 = norm_rop.norm_rforward(self.rows(xhat, False), rstd, self.rows(rx, True), self.center)
            rxhat = rxhat.reshape(rx.shape)
            ry = rxhat * self.affine(w, False) if w is not None else rxhat
        if rw is not None:
            term = xhat * self.affine(rw, True)
            ry = term if ry is None else ry.add_(term)
        if rb is not None:
            term = self.affine(rb, True)
            ry = term.expand((k,) + tuple(xhat.shape)).clone() if ry is None else ry.add_(term)
        return ry, (rxhat, m1, rw)

    def rvjp(self, saved, rsaved, g, rg, need):
        xhat, rstd, w = saved
        rxhat, m1, rw = rsaved
        out = [None, None, None]
        if need[0]:
            ra = None
            if rg is not None:
                ra = rg * self.affine(w, False) if w is not None else rg
            if rw is not None:
                term = g * self.affine(rw, True)
                ra = term if ra is None else ra + term
            a = self._a(g, w)
            k = (rxhat if rxhat is not None else ra).shape[0]
            if ra is None:
                ra = torch.zeros((k,) + tuple(g.shape), dtype=g.dtype, device=g.device)
            if rxhat is None:
                rx_rows = torch.zeros_like(self.rows(ra, True))
                m1 = rx_rows.new_zeros(rx_rows.shape[:2])
            else:
                rx_rows = self.rows(rxhat, True)
            out[0] = norm_rop.norm_rbackward(self.rows(xhat, False), rstd, self.rows(a, False), self.rows(ra, True),
                                             rx_rows, m1, self.center).reshape(ra.shape)
        if need[1]:
            acc = rg * xhat if rg is not None else None
            if rxhat is not None:
                acc = g * rxhat if acc is None else acc.addcmul_(g.unsqueeze(0), rxhat)
            out[1] = None if acc is None else self.param_sum(acc)
        if need[2] and rg is not None:
            out[2] = self.param_sum(rg)
        return out


class LayerNorm(Normalization):
    def __init__(self, node):
        super().__init__(node)
        args = list(node.args) + [None] * 4
        self.shape = tuple(args[1])
        if node.target is aten.rms_norm.default:
            self.center = False
            self.w, self.b, self._w_pos, self._b_pos = args[2], None, 2, None
            self.eps = args[3] if args[3] is not None else node.kwargs.get("eps")
        else:
            self.w, self.b, self._w_pos, self._b_pos = args[2], args[3], 2, 3
            self.eps = args[4] if args[4] is not None else node.kwargs.get("eps", 1e-5)
        self.d = 1
        for s in self.shape:
            self.d *= int(s)

    def stats(self, x, args):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        rows = x.reshape(-1, self.d)
        if self.center:
            var, mean = torch.var_mean(rows, dim=1, unbiased=False, keepdim=True)
            rstd = torch.rsqrt(var + eps)
            xhat = (rows - mean) * rstd
        else:
            rstd = torch.rsqrt(rows.pow(2).mean(1, keepdim=True) + eps)
            xhat = rows * rstd
        return xhat.reshape(x.shape), rstd.reshape(-1)

    def rows(self, t, batched):
        return t.reshape(((t.shape[0],) if batched else ()) + (-1, self.d))

    def affine(self, p, batched):
        if not batched:
            return p  # shaped as the normalized (last) dimensions: broadcasts from the right
        missing = len(self.arg_meta(0).shape) - len(self.shape)
        return p.reshape((p.shape[0],) + (1,) * missing + self.shape)

    def param_sum(self, t):
        k = t.shape[0]
        return t.reshape(k, -1, self.d).sum(1).reshape((k,) + self.shape)


class GroupNorm(Normalization):
    def __init__(self, node):
        super().__init__(node)
        args = list(node.args) + [None] * 5
        self.groups = int(args[1])
        self.w, self.b, self._w_pos, self._b_pos = args[2], args[3], 2, 3
        self.eps = args[4] if args[4] is not None else 1e-5
        shape = self.arg_meta(0).shape
        self.channels = int(shape[1])
        self.ndim = len(shape)

    def stats(self, x, args):
        n = x.shape[0]
        rows = x.reshape(n * self.groups, -1)
        var, mean = torch.var_mean(rows, dim=1, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + self.eps)
        return ((rows - mean) * rstd).reshape(x.shape), rstd.reshape(-1)

    def rows(self, t, batched):
        lead = (t.shape[0],) if batched else ()
        n = t.shape[len(lead)]
        return t.reshape(lead + (n * self.groups, -1))

    def affine(self, p, batched):
        lead = (p.shape[0], 1) if batched else (1,)
        return p.reshape(lead + (self.channels,) + (1,) * (self.ndim - 2))

    def param_sum(self, t):
        return t.sum([1] + list(range(3, t.dim())))


class BatchNormEval(OpRule):
    """BatchNorm with running statistics: y = (x − μ)·r·w + b per channel (dimension 1)."""

    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        target = node.target
        args = list(node.args)
        if target is aten.batch_norm.default:
            x, w, b, mean, var, training, _, eps = args[:8]
            if training:
                raise GraphUnsupported(f"{self.describe()} normalizes with batch statistics (train mode)")
        else:  # _native_batch_norm_legit_no_training(x, w, b, running_mean, running_var, momentum, eps)
            x, w, b, mean, var, _, eps = args[:7]
        if mean is None or var is None:
            raise GraphUnsupported(f"{self.describe()} without running statistics")
        self.w, self.b, self.eps = w, b, eps
        self.tuple_output = target is not aten.batch_norm.default
        self.ndim = len(self.arg_meta(0).shape)

    def inputs(self):
        return [self.node.args[0], _node(self.w), _node(self.b)]

    def _view(self, t, batched=False):
        lead = (t.shape[0], 1) if batched else (1,)
        return t.reshape(lead + (-1,) + (1,) * (self.ndim - 2))

    def forward(self, args, kwargs):
        y = self.node.target(*args, **kwargs)
        x, w = args[0], args[1]
        mean, var = args[3], args[4]
        rstd = torch.rsqrt(var.to(x.dtype) + self.eps)
        xhat = (x - self._view(mean.to(x.dtype))) * self._view(rstd)
        scale = rstd * w if w is not None else rstd
        return y, (xhat, rstd, scale)

    def _sum(self, t, batched):
        lead = 1 if batched else 0
        return t.sum([lead] + list(range(lead + 2, t.dim())))

    def _unpack(self, g):
        return g[0] if self.tuple_output else g

    def _pack(self, t):
        return [t, None, None] if self.tuple_output else t

    def vjp(self, saved, g, need):
        xhat, rstd, scale = saved
        g = self._unpack(g)
        return [g * self._view(scale) if need[0] else None,
                self._sum(g * xhat, False) if need[1] else None,
                self._sum(g, False) if need[2] else None]

    def jvp(self, saved, tangents):
        xhat, rstd, scale = saved
        rx, rw, rb = tangents
        k = next(t.shape[0] for t in tangents if t is not None)
        ry = rx * self._view(scale) if rx is not None else None
        if rw is not None:
            term = xhat * self._view(rw, True)
            ry = term if ry is None else ry.add_(term)
        if rb is not None:
            term = self._view(rb, True)
            ry = term.expand((k,) + tuple(xhat.shape)).clone() if ry is None else ry.add_(term)
        return self._pack(ry), (rx, rw)

    def rvjp(self, saved, rsaved, g, rg, need):
        xhat, rstd, scale = saved
        rx, rw = rsaved
        g = self._unpack(g)
        rg = self._unpack(rg) if rg is not None else None
        out = [None, None, None]
        if need[0]:
            acc = rg * self._view(scale) if rg is not None else None
            if rw is not None:
                term = g * self._view(rw * rstd, True)
                acc = term if acc is None else acc.add_(term)
            out[0] = acc
        if need[1]:
            acc = rg * xhat if rg is not None else None
            if rx is not None:
                term = (g * self._view(rstd)) * rx
                acc = term if acc is None else acc.add_(term)
            out[1] = None if acc is None else self._sum(acc, True)
        if need[2] and rg is not None:
            out[2] = self._sum(rg, True)
        return out


class WeightNorm(OpRule):
    """w = g·v/‖v‖ (``weight_norm`` parametrizations, aten._weight_norm): the norm of every slice of v along ``dim``
    (of all of v for dim = −1), g shaped like those norms. Per row r of v: u = v/n, n = ‖v‖,

        ∂/∂g = ⟨G, u⟩,  ∂/∂v = (g/n)(G − u⟨u, G⟩),  R{u} = (R{v} − u⟨u, R{v}⟩)/n,  R{w} = R{g} u + g R{u}.
    """

    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        shape = tuple(int(s) for s in self.arg_meta(0).shape)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        self.shape, self.dim = shape, (None if dim == -1 else dim % len(shape))

    def inputs(self):
        return [_node(self.node.args[0]), _node(self.node.args[1])]

    def rows(self, t, batched):
        """(…, rows, row length): one row per norm."""
        lead = 1 if batched else 0
        if self.dim is None:
            return t.reshape(t.shape[:lead] + (1, -1))
        return t.movedim(self.dim + lead, lead).reshape(t.shape[:lead] + (self.shape[self.dim], -1))

    def unrows(self, t, batched):
        lead = tuple(t.shape[:1]) if batched else ()
        if self.dim is None:
            return t.reshape(lead + self.shape)
        moved = (self.shape[self.dim],) + tuple(s for i, s in enumerate(self.shape) if i != self.dim)
        return t.reshape(lead + moved).movedim(len(lead), self.dim + len(lead))

    def forward(self, args, kwargs):
        v, g = args[0], args[1]
        u = self.rows(v, False)
        n = u.norm(dim=-1, keepdim=True)
        u = u / n
        gr = g.reshape(-1, 1)
        return self.node.target(*args, **kwargs), (u, n, gr, tuple(g.shape))

    def vjp(self, saved, G, need):
        u, n, g, g_shape = saved
        Gr = self.rows(G, False)
        a = (u * Gr).sum(-1, keepdim=True)
        gv = self.unrows(g / n * (Gr - u * a), False) if need[0] else None
        return [gv, a.reshape(g_shape) if need[1] else None]

    def _ru(self, u, n, rv):
        return (rv - u * (u * rv).sum(-1, keepdim=True)) / n

    def jvp(self, saved, tangents):
        u, n, g, g_shape = saved
        rv, rg = tangents
        k = (rv if rv is not None else rg).shape[0]
        # weights are small next to activations: missing tangents as zeros keep the algebra in one piece
        rv = self.rows(rv, True) if rv is not None else u.new_zeros((k,) + tuple(u.shape))
        rg = rg.reshape(k, -1, 1) if rg is not None else g.new_zeros((k,) + tuple(g.shape))
        ru = self._ru(u, n, rv)
        return self.unrows(rg * u + g * ru, True), (rv, rg, ru)

    def rvjp(self, saved, rsaved, G, rG, need):
        u, n, g, g_shape = saved
        rv, rg, ru = rsaved
        Gr = self.rows(G, False)
        rGr = self.rows(rG, True) if rG is not None else torch.zeros_like(ru)
        a = (u * Gr).sum(-1, keepdim=True)
        ra = (ru * Gr).sum(-1, keepdim=True) + (u * rGr).sum(-1, keepdim=True)
        # g_v = s·(G − u a) with s = g/n: R{s} = R{g}/n − g·R{n}/n², R{n} = ⟨u, R{v}⟩
        rs = rg / n - g * (u * rv).sum(-1, keepdim=True) / (n * n)
        r_gv = rs * (Gr - u * a) + (g / n) * (rGr - ru * a - u * ra)
        return [self.unrows(r_gv, True) if need[0] else None,
                ra.reshape((ra.shape[0],) + g_shape) if need[1] else None]


RULES = {
    aten._weight_norm.default: WeightNorm,
    aten.layer_norm.default: LayerNorm, aten.rms_norm.default: LayerNorm, aten.group_norm.default: GroupNorm,
    aten.batch_norm.default: BatchNormEval, aten._native_batch_norm_legit_no_training.default: BatchNormEval,
}
