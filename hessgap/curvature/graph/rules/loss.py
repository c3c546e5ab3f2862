"""Rules of softmax, log-softmax and the losses: cross-entropy (class indices with ignore_index, or class
probabilities; label smoothing), negative log-likelihood and mean squared error.

The softmax cross-entropy Hessian with respect to the logits is s·(diag p − p pᵀ) per row whatever the
targets (indices, probabilities, smoothing change only the gradient); its product with the k R-logits is
the fused kernel :func:`hessgap.ops.hvp_pointwise.softmax_ce_rgrad`.
"""

from __future__ import annotations

import torch
from torch import fx

from ....ops import hvp_pointwise as pointwise
from .base import GraphUnsupported, LinearRule, OpRule, norm_dim

aten = torch.ops.aten


class Softmax(OpRule):
    """y = softmax(x) or log_softmax(x) along one dimension, also with a ``dtype`` to compute in (Qwen-MoE's
    router: a cast of x, then the softmax)."""

    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        self.dim = norm_dim(node.args[1], len(self.arg_meta(0).shape))
        self.log = node.target in (aten._log_softmax.default, aten.log_softmax.int)
        self.in_dtype, self.out_dtype = self.arg_meta(0).dtype, self.out_meta.dtype
        if self.in_dtype != self.out_dtype and node.target in (aten._softmax.default, aten._log_softmax.default):
            raise GraphUnsupported(f"{self.describe()} changes the dtype")  # half_to_float: not a model's choice

    def forward(self, args, kwargs):
        y = self.node.target(*args, **kwargs)
        return y, (y.exp() if self.log else y)

    def vjp(self, p, g, need):
        if self.log:
            return [(g - p * g.sum(self.dim, keepdim=True)).to(self.in_dtype)]
        return [(p * (g - (p * g).sum(self.dim, keepdim=True))).to(self.in_dtype)]

    def jvp(self, p, tangents):
        t = tangents[0].to(self.out_dtype)
        d = self.dim + 1
        centred = t - (p * t).sum(d, keepdim=True)
        # log-softmax: R{y} = t − ⟨p, t⟩; softmax: R{y} = p ⊙ (t − ⟨p, t⟩)
        ry = centred if self.log else p * centred
        return ry, ry

    def rvjp(self, p, ry, g, rg, need):
        d = self.dim + 1
        if self.log:
            rp = p * ry  # R{p} = p ⊙ R{log p}
            out = -rp * g.sum(self.dim, keepdim=True)
            if rg is not None:
                out = out + rg - p * rg.sum(d, keepdim=True)
            return [out.to(self.in_dtype)]
        dot = (p * g).sum(self.dim, keepdim=True)
        r_dot = (ry * g).sum(d, keepdim=True)
        if rg is not None:
            r_dot = r_dot + (p * rg).sum(d, keepdim=True)
        out = ry * (g - dot) - p * r_dot
        if rg is not None:
            out = out + p * rg
        return [out.to(self.in_dtype)]


def _rows(t, batched):
    """(…, N, C, d1, …) -> (…, N·d1·…, C): one row per prediction, classes last."""
    lead = 1 if batched else 0
    if t.dim() - lead > 2:
        t = t.movedim(lead + 1, -1)
    return t.reshape(t.shape[:lead] + (-1, t.shape[-1]))


def _unrows(t, shape, batched):
    lead = (t.shape[0],) if batched else ()
    shape = tuple(shape)
    if len(shape) > 2:
        moved = (shape[0],) + shape[2:] + (shape[1],)
        return t.reshape(lead + moved).movedim(-1, len(lead) + 1)
    return t.reshape(lead + shape)


def _widened(t):
    """A bfloat16/float16 tensor in float32; anything else as it is."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t


class CrossEntropy(OpRule):
    """aten.cross_entropy_loss(logits, target, weight=None, reduction, ignore_index, label_smoothing)."""

    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        args = list(node.args) + [None] * 6
        weight = args[2] if args[2] is not None else node.kwargs.get("weight")
        self.reduction = args[3] if args[3] is not None else node.kwargs.get("reduction", 1)
        self.ignore_index = args[4] if args[4] is not None else node.kwargs.get("ignore_index", -100)
        self.smoothing = float(args[5] if args[5] is not None else node.kwargs.get("label_smoothing", 0.0))
        if weight is not None:
            raise GraphUnsupported(f"{self.describe()} with class weights")
        if self.reduction not in (1, 2):
            raise GraphUnsupported(f"{self.describe()} with reduction='none'")
        shape = self.arg_meta(0).shape
        if len(shape) < 2:
            raise GraphUnsupported(f"{self.describe()} on unbatched logits of shape {tuple(shape)}")
        if isinstance(node.args[1], fx.Node) and node.args[1].meta["val"].is_floating_point():
            self.probabilities = True
        else:
            self.probabilities = False

    def forward(self, args, kwargs):
        # Half-precision logits: the softmax, the loss and their statistics in float32. Rounded to bfloat16,
        # p and the loss near a minimum lose most of their digits (the curvature came out at 0.5–0.9×).
        logits, target = _widened(args[0]), _widened(args[1])
        loss = self.node.target(logits, target, *args[2:], **kwargs)
        if not self.is_output:
            loss = loss.to(self.out_meta.dtype)
        z = _rows(logits, False)
        p = torch.softmax(z, -1)
        classes = z.shape[1]
        if self.probabilities:
            q = _rows(target, False)
            if self.smoothing:
                q = q * (1 - self.smoothing) + self.smoothing / classes
            factor = q.sum(-1, keepdim=True)
            scale = 1.0 / z.shape[0] if self.reduction == 1 else 1.0
            grad = (p * factor - q) * scale
            return loss, (p * factor, grad, scale)
        t = target.reshape(-1)
        keep = t != self.ignore_index
        count = int(keep.sum())
        scale = (1.0 / count if count else 0.0) if self.reduction == 1 else 1.0
        grad = p.clone()
        if self.smoothing:
            grad -= self.smoothing / classes
        rows = torch.nonzero(keep).squeeze(1)
        grad[rows, t[rows].long()] -= 1 - self.smoothing
        if count < t.shape[0]:
            mask = keep.to(p.dtype).unsqueeze(1)
            p = p * mask
            grad = grad * mask
        return loss, (p, grad * scale, scale)

    def vjp(self, saved, g, need):
        _, grad, _ = saved
        return [_unrows(grad * g, self.arg_meta(0).shape, False).to(self.arg_meta(0).dtype), None]

    def jvp(self, saved, tangents):
        rz = tangents[0]
        if self.is_output:
            return None, rz
        _, grad, _ = saved
        r_loss = (_rows(rz, True) * grad).sum((1, 2))
        return r_loss.to(self.out_meta.dtype), rz

    def rvjp(self, saved, rz, g, rg, need):
        p, grad, scale = saved
        shape = self.arg_meta(0).shape
        out = pointwise.softmax_ce_rgrad(p.contiguous(), _rows(rz, True).contiguous(), float(g) * scale)
        out = _unrows(out, shape, True)
        if rg is not None:
            out = out + rg.reshape((-1,) + (1,) * len(shape)) * _unrows(grad, shape, False)
        return [out.to(self.arg_meta(0).dtype), None]

    def inputs(self):
        return [self.node.args[0], None]


class NegativeLogLikelihood(LinearRule):
    """aten.nll_loss / nll_loss_nd / nll_loss2d (self, target, weight=None, reduction, ignore_index): linear."""

    def __init__(self, node):
        super().__init__(node)
        args = list(node.args) + [None] * 5
        if args[2] is not None:
            raise GraphUnsupported(f"{self.describe()} with class weights")
        self.reduction = args[3] if args[3] is not None else 1
        self.ignore_index = args[4] if args[4] is not None else -100
        if self.reduction not in (1, 2):
            raise GraphUnsupported(f"{self.describe()} with reduction='none'")

    def inputs(self):
        return [self.node.args[0], None]

    def forward(self, args, kwargs):
        t = args[1].reshape(-1)
        keep = t != self.ignore_index
        count = int(keep.sum())
        scale = (1.0 / count if count else 0.0) if self.reduction == 1 else 1.0
        return self.node.target(*args, **kwargs), (t.clamp(min=0).long(), keep, scale)

    def apply(self, saved, tangents):
        t, keep, scale = saved
        rows = _rows(tangents[0], True)
        picked = rows.gather(2, t.reshape(1, -1, 1).expand(rows.shape[0], -1, 1)).squeeze(2)
        return -(picked * keep.to(picked.dtype)).sum(1) * scale

    def adjoint(self, saved, g, need, batched):
        t, keep, scale = saved
        shape = self.arg_meta(0).shape
        classes = int(shape[1])
        weights = (-scale * keep.to(g.dtype))
        if batched:
            out = g.new_zeros((g.shape[0], t.shape[0], classes))
            src = g.reshape(-1, 1, 1) * weights.reshape(1, -1, 1)
            out.scatter_(2, t.reshape(1, -1, 1).expand(g.shape[0], -1, 1), src)
        else:
            out = g.new_zeros((t.shape[0], classes))
            out.scatter_(1, t.reshape(-1, 1), (g * weights).reshape(-1, 1))
        return [_unrows(out, shape, batched), None]


class MeanSquaredError(OpRule):
    """aten.mse_loss(a, b, reduction) with a, b of one shape (broadcasts are separate nodes)."""

    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        self.reduction = node.args[2] if len(node.args) > 2 else node.kwargs.get("reduction", 1)
        if self.reduction not in (1, 2):
            raise GraphUnsupported(f"{self.describe()} with reduction='none'")

    def inputs(self):
        return [a if isinstance(a, fx.Node) else None for a in self.node.args[:2]]

    def forward(self, args, kwargs):
        diff = args[0] - args[1]
        scale = 2.0 / diff.numel() if self.reduction == 1 else 2.0
        return self.node.target(*args, **kwargs), (diff, scale)

    def vjp(self, saved, g, need):
        diff, scale = saved
        grad = diff * (scale * g)
        return [grad if need[0] else None, -grad if need[1] else None]

    def _rdiff(self, tangents):
        ra, rb = tangents
        if rb is None:
            return ra
        return -rb if ra is None else ra - rb

    def jvp(self, saved, tangents):
        diff, scale = saved
        rd = self._rdiff(tangents)
        if self.is_output:
            return None, rd
        return (rd * diff).flatten(1).sum(1) * scale, rd

    def rvjp(self, saved, rd, g, rg, need):
        diff, scale = saved
        out = rd * (scale * g)
        if rg is not None:
            out = out + rg.reshape((-1,) + (1,) * diff.dim()) * (scale * diff)
        return [out if need[0] else None, -out if need[1] else None]


RULES = {
    aten._softmax.default: Softmax, aten.softmax.int: Softmax,
    aten._log_softmax.default: Softmax, aten.log_softmax.int: Softmax,
    aten.cross_entropy_loss.default: CrossEntropy,
    aten.nll_loss.default: NegativeLogLikelihood, aten.nll_loss_nd.default: NegativeLogLikelihood,
    aten.nll_loss2d.default: NegativeLogLikelihood,
    aten.mse_loss.default: MeanSquaredError,
}
