"""Rules of element-wise arithmetic, element-wise functions and sums: residual adds, scalings, products of
two activations (gates, attention by hand), quotients, powers, σ(x) for the activations, ``where`` and
``masked_fill`` with masks that do not depend on θ, ``sum`` and ``mean``.

Activations with a fused kernel (ReLU, GELU in both forms, SiLU, tanh, sigmoid, LeakyReLU) compute σ′ and
σ″ once per element for all k directions (:mod:`hessgap.ops.hvp_pointwise`); the other functions use
closed-form derivatives with plain tensor ops.
"""

from __future__ import annotations

import torch
from torch import fx

from ....ops import hvp_pointwise as pointwise
from .base import GraphUnsupported, LinearRule, OpRule, lift, norm_dim, sum_to

aten = torch.ops.aten


def _is_node(a) -> bool:
    return isinstance(a, fx.Node)


def _shape(node_or_value):
    if _is_node(node_or_value):
        return tuple(int(s) for s in node_or_value.meta["val"].shape)
    return ()


# ---- sums with coefficients: add, sub, rsub, neg, scalings -----------------------------------------------


class Affine(LinearRule):
    """y = Σ c_i x_i (+ constant): add, sub (with alpha), rsub, neg, mul/div by a number or by a tensor that
    does not depend on θ."""

    def __init__(self, node, swap: bool = False):
        super().__init__(node)
        target = node.target
        args = list(node.args)
        alpha = node.kwargs.get("alpha", 1)
        self.scale_node = None  # a tensor factor that does not depend on θ (set by the engine's check below)
        if target in (aten.add.Tensor, aten.sub.Tensor):
            sign = -1 if target is aten.sub.Tensor else 1
            self.terms = [(args[0], 1), (args[1], sign * alpha)]
        elif target in (aten.add.Scalar, aten.sub.Scalar):
            self.terms = [(args[0], 1)]
        elif target is aten.rsub.Scalar or target is aten.rsub.Tensor:
            self.terms = [(args[0], -alpha), (args[1], 1)]
        elif target is aten.neg.default:
            self.terms = [(args[0], -1)]
        elif target in (aten.mul.Scalar, aten.mul.Tensor, aten.div.Scalar, aten.div.Tensor):
            if target in (aten.div.Tensor, aten.div.Scalar) and node.kwargs.get("rounding_mode") is not None:
                raise GraphUnsupported(f"{self.describe()} divides with rounding (piecewise constant)")
            self.divide = target in (aten.div.Scalar, aten.div.Tensor)
            self.factor_pos = 0 if (swap or not _is_node(args[0])) else 1
            x, factor = args[1 - self.factor_pos], args[self.factor_pos]
            if _is_node(factor):
                self.scale_node = factor
                self.terms = [(x, 1)]
            else:
                self.terms = [(x, (1 / factor) if self.divide else factor)]
        else:  # pragma: no cover - the table below lists the targets
            raise AssertionError(target)

    def inputs(self):
        return [a if _is_node(a) else None for a, _ in self.terms]

    def forward(self, args, kwargs):
        y = self.node.target(*args, **kwargs)
        scale = None
        if self.scale_node is not None:
            factor = args[self.factor_pos]
            scale = (1 / factor) if self.divide else factor
        return y, scale

    def _coef(self, t, c, scale):
        if c != 1:
            t = t * c
        if scale is not None:
            t = t * scale
        return t

    def apply(self, saved, tangents):
        out_ndim = len(self.out_meta.shape)
        out_shape = tuple(int(s) for s in self.out_meta.shape)
        total = None
        for t, (_, c) in zip(tangents, self.terms):
            if t is None:
                continue
            t = self._coef(lift(t, out_ndim), c, saved)
            total = t if total is None else total + t
        if tuple(total.shape[1:]) != out_shape:
            total = total.expand((total.shape[0],) + out_shape)
        return total

    def adjoint(self, saved, g, need, batched):
        out = []
        for (a, c), wanted in zip(self.terms, need):
            out.append(sum_to(self._coef(g, c, saved), _shape(a), batched) if wanted else None)
        return out


# ---- products and quotients of two activations -----------------------------------------------------------


class Product(OpRule):
    """y = a·b with both factors depending on θ (gates, hand-written attention): R-backward has the cross term."""

    needs_grad = True

    def inputs(self):
        return [self.node.args[0], self.node.args[1]]

    def forward(self, args, kwargs):
        return args[0] * args[1], (args[0], args[1])

    def vjp(self, saved, g, need):
        a, b = saved
        return [sum_to(g * b, a.shape, False) if need[0] else None,
                sum_to(g * a, b.shape, False) if need[1] else None]

    def jvp(self, saved, tangents):
        a, b = saved
        n = len(self.out_meta.shape)
        ra, rb = tangents
        out = None
        if ra is not None:
            out = lift(ra, n) * b
        if rb is not None:
            term = a * lift(rb, n)
            out = term if out is None else out + term
        return out, (ra, rb)

    def rvjp(self, saved, rsaved, g, rg, need):
        a, b = saved
        ra, rb = rsaved
        n = len(self.out_meta.shape)
        out = []
        for wanted, other, r_other, own in ((need[0], b, rb, a), (need[1], a, ra, b)):
            if not wanted:
                out.append(None)
                continue
            total = rg * other if rg is not None else None
            if r_other is not None:
                term = g * lift(r_other, n)
                total = term if total is None else total + term
            out.append(None if total is None else sum_to(total, own.shape, True))
        return out


class Quotient(OpRule):
    """y = a / b with b depending on θ."""

    needs_grad = True

    def inputs(self):
        return [self.node.args[0] if _is_node(self.node.args[0]) else None, self.node.args[1]]

    def forward(self, args, kwargs):
        a, b = args
        return a / b, (a, b)

    def vjp(self, saved, g, need):
        a, b = saved
        out = [sum_to(g / b, _shape(self.node.args[0]), False) if need[0] else None]
        out.append(sum_to(-g * a / (b * b), b.shape, False) if need[1] else None)
        return out

    def jvp(self, saved, tangents):
        a, b = saved
        n = len(self.out_meta.shape)
        ra, rb = tangents
        out = -(a / (b * b)) * lift(rb, n)
        if ra is not None:
            out = out + lift(ra, n) / b
        return out, (ra, rb)

    def rvjp(self, saved, rsaved, g, rg, need):
        a, b = saved
        ra, rb = rsaved
        n = len(self.out_meta.shape)
        rb_l = lift(rb, n)
        out = []
        if need[0]:
            total = -g / (b * b) * rb_l
            if rg is not None:
                total = total + rg / b
            out.append(sum_to(total, _shape(self.node.args[0]), True))
        else:
            out.append(None)
        if need[1]:
            total = 2 * g * a / (b * b * b) * rb_l
            if rg is not None:
                total = total - rg * a / (b * b)
            if ra is not None:
                total = total - g / (b * b) * lift(ra, n)
            out.append(sum_to(total, b.shape, True))
        else:
            out.append(None)
        return out


# ---- element-wise functions ------------------------------------------------------------------------------

_KERNEL_KINDS = {
    aten.relu.default: "relu", aten.tanh.default: "tanh", aten.sigmoid.default: "sigmoid",
    aten.silu.default: "silu",
}


class Activation(OpRule):
    """σ(x) with σ′, σ″ from the fused kernels (one read of x per element for all k directions)."""

    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        target = node.target
        self.slope = 0.01
        if target is aten.gelu.default:
            approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            self.kind = "gelu" if approximate == "none" else "gelu_tanh"
        elif target is aten.leaky_relu.default:
            self.kind = "leaky_relu"
            self.slope = float(node.args[1]) if len(node.args) > 1 else 0.01
        else:
            self.kind = _KERNEL_KINDS[target]
        if self.kind in ("relu", "leaky_relu"):
            self.needs_grad = False

    def forward(self, args, kwargs):
        return self.node.target(*args, **kwargs), args[0]

    def vjp(self, x, g, need):
        return [pointwise.act_jvp(x, g.unsqueeze(0), self.kind, self.slope)[0]]

    def jvp(self, x, tangents):
        rx = tangents[0]
        return pointwise.act_jvp(x, rx, self.kind, self.slope), (None if not self.needs_grad else rx)

    def rvjp(self, x, rx, g, rg, need):
        if rg is None and rx is None:
            return [None]
        if rx is None:
            return [pointwise.act_jvp(x, rg, self.kind, self.slope)]
        if rg is None:
            rg = torch.zeros_like(rx)
        return [pointwise.act_rbackward(x, g, rx, rg, self.kind, self.slope)]


class Elementwise(OpRule):
    """y = f(x) with closed-form f′, f″ (exp, log, sqrt, rsqrt, reciprocal, powers, sin, cos)."""

    needs_grad = True

    def derivatives(self, x, y):
        target = self.node.target
        if target is aten.exp.default:
            return y, y
        if target is aten.log.default:
            inv = 1 / x
            return inv, -inv * inv
        if target is aten.sqrt.default:
            return 0.5 / y, -0.25 / (y * y * y)
        if target is aten.rsqrt.default:
            return -0.5 * y * y * y, 0.75 * y * y * y * y * y
        if target is aten.reciprocal.default:
            return -y * y, 2 * y * y * y
        if target is aten.sin.default:
            return torch.cos(x), -y
        if target is aten.cos.default:
            return -torch.sin(x), -y
        if target is aten.pow.Tensor_Scalar:
            p = self.node.args[1]
            if p == 2:
                return 2 * x, torch.full_like(x, 2.0)
            return p * x.pow(p - 1), p * (p - 1) * x.pow(p - 2)
        raise AssertionError(target)

    def forward(self, args, kwargs):
        y = self.node.target(*args, **kwargs)
        return y, (args[0], y)

    def vjp(self, saved, g, need):
        d1, _ = self.derivatives(*saved)
        return [g * d1]

    def jvp(self, saved, tangents):
        d1, _ = self.derivatives(*saved)
        return tangents[0] * d1, tangents[0]

    def rvjp(self, saved, rx, g, rg, need):
        d1, d2 = self.derivatives(*saved)
        out = rx * (d2 * g)
        if rg is not None:
            out = out + rg * d1
        return [out]


# ---- selections with fixed masks ---------------------------------------------------------------------------


_WHERE = (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)


class Where(LinearRule):
    """where(cond, a, b) (either side may be a number: T5's masks) and masked_fill(x, mask, value) with a mask
    that does not depend on θ."""

    def inputs(self):
        if self.node.target in _WHERE:
            return [a if _is_node(a) else None for a in self.node.args[1:3]]
        return [self.node.args[0]]

    def forward(self, args, kwargs):
        y = self.node.target(*args, **kwargs)
        mask = args[0] if self.node.target in _WHERE else args[1]
        return y, mask

    def apply(self, mask, tangents):
        n = len(self.out_meta.shape)
        out_shape = tuple(int(s) for s in self.out_meta.shape)
        if self.node.target in _WHERE:
            a, b = (None if t is None else lift(t, n) for t in tangents)
            like = a if a is not None else b
            zero = like.new_zeros(())
            out = torch.where(mask, a if a is not None else zero, b if b is not None else zero)
        else:
            out = lift(tangents[0], n).masked_fill(mask, 0)
        return out.expand((out.shape[0],) + out_shape) if tuple(out.shape[1:]) != out_shape else out

    def adjoint(self, mask, g, need, batched):
        zero = g.new_zeros(())
        if self.node.target in _WHERE:
            args = self.node.args[1:3]
            picks = (torch.where(mask, g, zero), torch.where(mask, zero, g))
            return [sum_to(p, _shape(a), batched) if w else None for p, a, w in zip(picks, args, need)]
        return [sum_to(g.masked_fill(mask, 0), _shape(self.node.args[0]), batched)]


# ---- sums and means --------------------------------------------------------------------------------------


class Reduce(LinearRule):
    def __init__(self, node):
        super().__init__(node)
        args = list(node.args) + [None, None]
        ndim = len(self.arg_meta(0).shape)
        if node.target in (aten.sum.default, aten.mean.default):
            dims, keepdim = None, False
        else:
            dims, keepdim = args[1], bool(args[2] if args[2] is not None else node.kwargs.get("keepdim", False))
        if not dims:
            dims = list(range(ndim))
        self.dims = sorted(norm_dim(d, ndim) for d in dims)
        self.keepdim = keepdim
        self.mean = node.target in (aten.mean.default, aten.mean.dim)
        shape = tuple(int(s) for s in self.arg_meta(0).shape)
        count = 1
        for d in self.dims:
            count *= shape[d]
        self.scale = 1.0 / count if self.mean and count else 1.0

    def apply(self, saved, tangents):
        t = tangents[0]
        out = t.sum([d + 1 for d in self.dims], keepdim=self.keepdim) if self.dims else t
        out = out.to(self.out_meta.dtype)
        return out * self.scale if self.mean else out

    def adjoint(self, saved, g, need, batched):
        shape = tuple(int(s) for s in self.arg_meta(0).shape)
        lead = 1 if batched else 0
        if not self.keepdim:
            for d in self.dims:
                g = g.unsqueeze(d + lead)
        g = g.expand(g.shape[:lead] + shape).to(self.arg_meta(0).dtype)
        return [g * self.scale if self.mean else g]


def product_rule(node, carries):
    """mul/div of two tensors: a scaling when one side does not depend on θ, else a product or quotient."""
    a, b = node.args[0], node.args[1]
    a_on, b_on = _is_node(a) and carries(a), _is_node(b) and carries(b)
    if node.target is aten.div.Tensor:
        return Quotient(node) if b_on else Affine(node)
    if a_on and b_on:
        return Product(node)
    return Affine(node, swap=b_on)


RULES = {
    aten.add.Tensor: Affine, aten.sub.Tensor: Affine, aten.add.Scalar: Affine, aten.sub.Scalar: Affine,
    aten.rsub.Scalar: Affine, aten.rsub.Tensor: Affine, aten.neg.default: Affine,
    aten.mul.Scalar: Affine, aten.div.Scalar: Affine,
    aten.mul.Tensor: product_rule, aten.div.Tensor: product_rule,
    aten.relu.default: Activation, aten.tanh.default: Activation, aten.sigmoid.default: Activation,
    aten.silu.default: Activation, aten.gelu.default: Activation, aten.leaky_relu.default: Activation,
    aten.exp.default: Elementwise, aten.log.default: Elementwise, aten.sqrt.default: Elementwise,
    aten.rsqrt.default: Elementwise, aten.reciprocal.default: Elementwise, aten.pow.Tensor_Scalar: Elementwise,
    aten.sin.default: Elementwise, aten.cos.default: Elementwise,
    aten.where.self: Where, aten.where.ScalarOther: Where, aten.where.ScalarSelf: Where,
    aten.masked_fill.Scalar: Where, aten.masked_fill.Tensor: Where,
    aten.sum.default: Reduce, aten.sum.dim_IntList: Reduce, aten.mean.default: Reduce, aten.mean.dim: Reduce,
}
