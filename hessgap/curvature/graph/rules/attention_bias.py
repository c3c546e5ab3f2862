"""The rule of ``scaled_dot_product_attention`` whose additive mask depends on θ: a learned position bias
(T5's relative attention bias goes in as the mask), computed with the T×T scores materialized.

The fused kernels (:mod:`.attention`) take a mask that is a constant of the batch; a learned bias needs
∂L/∂bias = dS, the scores' gradient, which they never write out. Here S = scale·Q Kᵀ + bias (−∞ above the
diagonal when causal), P = softmax(S), O = P V as batched matrix products, with the derivatives of
:mod:`hessgap.ops.attention_rop`'s reference twins plus the bias's own terms:

    R{S} = scale·(R{Q} Kᵀ + Q R{K}ᵀ) + R{bias},   ∂L/∂bias = dS,   R{∂L/∂bias} = R{dS}   (summed to its shape)

Grouped-query heads (``enable_gqa``) are expanded for the products and their gradients summed back per group.
"""

from __future__ import annotations

import torch

from ....ops import attention_rop as ops
from .base import GraphUnsupported, OpRule, argument, sum_to

aten = torch.ops.aten


def head_groups(rule: OpRule) -> int:
    """How many query heads share a key/value head (1 without ``enable_gqa``); raises for shapes it refuses."""
    q, k = (tuple(rule.arg_meta(i).shape) for i in (0, 1))
    if not rule.node.kwargs.get("enable_gqa", False) or q[:-2] == k[:-2]:
        return 1
    if len(q) != 4 or len(k) != 4 or q[1] % k[1] or q[0] != k[0]:
        raise GraphUnsupported(f"{rule.describe()} with grouped-query heads of shapes {q}, {k}")
    return q[1] // k[1]


def expand_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Key/value heads (…, Hkv, T, D) repeated for the query heads that share them: (…, Hkv·G, T, D)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=-3)


def sum_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """The adjoint of :func:`expand_heads`: gradients of the query heads summed per key/value head."""
    return t if groups == 1 else t.unflatten(-3, (-1, groups)).sum(-3)


class BiasedAttention(OpRule):
    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        self.mask = argument(node, 3, "attn_mask")
        if argument(node, 4, "dropout_p", 0.0):
            raise GraphUnsupported(f"{self.describe()} with dropout (random masks are not fused)")
        self.causal = bool(argument(node, 5, "is_causal", False))
        self.groups = head_groups(self)
        scale = argument(node, 6, "scale")
        self.scale = scale if scale is not None else ops.default_scale(int(self.arg_meta(0).shape[-1]))
        self.mask_shape = tuple(int(s) for s in self.mask.meta["val"].shape)

    def inputs(self):
        return [*self.node.args[:3], self.mask]

    def forward(self, args, kwargs):
        q, k, v = args[:3]
        bias = args[3] if len(args) > 3 else kwargs["attn_mask"]
        k, v = expand_heads(k, self.groups), expand_heads(v, self.groups)
        s = self.scale * (q @ k.transpose(-1, -2)) + bias.to(q.dtype)
        if self.causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril().logical_not(),
                              float("-inf"))
        lse = torch.logsumexp(s, -1, keepdim=True)
        finite = torch.isfinite(lse)  # a row with every key masked: P = 0, O = 0 (as the fused kernels give)
        p = torch.where(finite, torch.exp(s - torch.where(finite, lse, 0.0)), 0.0)
        o = p @ v
        return o, (q, k, v, p, o)

    def _back(self, grads):
        dq, dk, dv, ds = grads
        return [dq, sum_heads(dk, self.groups), sum_heads(dv, self.groups), ds]

    def _ds(self, p, g, v, o):
        dp = g @ v.transpose(-1, -2)
        delta = (g * o).sum(-1, keepdim=True)
        return dp, delta, p * (dp - delta)

    def vjp(self, saved, g, need):
        q, k, v, p, o = saved
        _, _, ds = self._ds(p, g, v, o)
        grads = [self.scale * ds @ k, self.scale * ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ g,
                 sum_to(ds, self.mask_shape, False)]
        return [t if wanted else None for t, wanted in zip(self._back(grads), need)]

    def _full(self, tangents, saved):
        """The four tangents, zeros for those that are None, K and V expanded to the query heads."""
        q, k, v, p, _ = saved
        n = next(t.shape[0] for t in tangents if t is not None)
        rq, rk, rv, rb = tangents
        rq = rq if rq is not None else q.new_zeros((n,) + tuple(q.shape))
        rk = expand_heads(rk, self.groups) if rk is not None else k.new_zeros((n,) + tuple(k.shape))
        rv = expand_heads(rv, self.groups) if rv is not None else v.new_zeros((n,) + tuple(v.shape))
        return rq, rk, rv, rb

    def jvp(self, saved, tangents):
        q, k, v, p, o = saved
        rq, rk, rv, rb = self._full(tangents, saved)
        rs = self.scale * (rq @ k.transpose(-1, -2) + q @ rk.transpose(-1, -2))
        if rb is not None:
            rs = rs + rb.reshape((rb.shape[0],) + (1,) * (p.dim() - rb.dim() + 1) + tuple(rb.shape[1:]))
        rs = torch.where(p > 0, rs, 0.0)  # masked entries: P = 0, and R{S} there must not turn into NaN
        rp = p * (rs - (p * rs).sum(-1, keepdim=True))
        ro = rp @ v + p @ rv
        return ro, (rq, rk, rv, rp, ro)

    def rvjp(self, saved, rsaved, g, rg, need):
        q, k, v, p, o = saved
        rq, rk, rv, rp, ro = rsaved
        r_dq, r_dk, r_dv, r_ds = ops.rbackward_from_probabilities(q, k, v, p, o, g, rq, rk, rv, rp, ro, rg, self.scale)
        grads = [r_dq, r_dk, r_dv, sum_to(r_ds, self.mask_shape, True)]
        return [t if wanted else None for t, wanted in zip(self._back(grads), need)]
