"""The rule of ``scaled_dot_product_attention``: causal, masked (boolean or additive mask that does not depend
on θ) or plain, grouped-query heads included, never materializing the T×T matrix per direction
(:mod:`hessgap.ops.attention_rop`); a mask that depends on θ takes :mod:`.attention_bias`."""

from __future__ import annotations

import torch
from torch import fx

from ....ops import attention_rop as ops
from .attention_bias import BiasedAttention, expand_heads, head_groups, sum_heads
from .base import GraphUnsupported, OpRule

aten = torch.ops.aten


class Attention(OpRule):
    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        args = list(node.args) + [None] * 6
        kw = node.kwargs
        self.mask = args[3] if args[3] is not None else kw.get("attn_mask")
        dropout = args[4] if args[4] is not None else kw.get("dropout_p", 0.0)
        self.causal = bool(args[5] if args[5] is not None else kw.get("is_causal", False))
        self.scale = args[6] if args[6] is not None else kw.get("scale")
        if dropout:
            raise GraphUnsupported(f"{self.describe()} with dropout_p={dropout} (random masks are not fused)")
        self.groups = head_groups(self)  # query heads per key/value head: K and V expanded for the kernels
        shapes = [tuple(self.arg_meta(i).shape) for i in range(3)]
        kv_lead = [s[:-2] if self.groups == 1 else s[:-3] + (s[-3] * self.groups,) for s in shapes[1:]]
        if any(len(s) not in (3, 4) for s in shapes) or any(lead != shapes[0][:-2] for lead in kv_lead):
            raise GraphUnsupported(f"{self.describe()} with query/key/value shapes {shapes}")
        self.unbatched_heads = len(shapes[0]) == 3
        if self.scale is None:
            self.scale = ops.default_scale(shapes[0][-1])

    def inputs(self):
        return list(self.node.args[:3])

    def _four(self, t, batched=False):
        if self.unbatched_heads:
            return t.unsqueeze(2 if batched else 1)
        return t

    def _back(self, t, batched=False):
        return t.squeeze(2 if batched else 1) if self.unbatched_heads else t

    def _bias(self, mask, q, k):
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, float("-inf")).to(q.dtype)
        else:
            mask = mask.to(q.dtype)
        if self.unbatched_heads and mask.dim() == 3:
            mask = mask.unsqueeze(1)
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        # every broadcast dimension expanded (stride 0, no copy): a padding mask comes as (B, 1, 1, Tk)
        return mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])

    def forward(self, args, kwargs):
        q, k, v = (self._four(t) for t in args[:3])
        k, v = expand_heads(k, self.groups), expand_heads(v, self.groups)
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if isinstance(self.mask, fx.Node) and mask is None:
            mask = kwargs.get("attn_mask")
        bias = self._bias(mask, q, k)
        o, lse = ops.attention_forward(q, k, v, bias, self.causal, self.scale)
        return self._back(o), (q, k, v, bias, o, lse)

    def vjp(self, saved, g, need):
        q, k, v, bias, o, lse = saved
        grads = ops.attention_backward(q, k, v, bias, o, lse, self._four(g).contiguous(), self.causal, self.scale)
        return [self._back(t) if wanted else None for t, wanted in zip(self._grouped(grads), need)]

    def _grouped(self, grads):
        """Gradients of the expanded K and V summed back to their own heads."""
        dq, dk, dv = grads
        return dq, sum_heads(dk, self.groups), sum_heads(dv, self.groups)

    def _tangents(self, saved, tangents):
        q, k, v = saved[:3]
        kk = next(t.shape[0] for t in tangents if t is not None)
        out = []
        for i, (t, x) in enumerate(zip(tangents, (q, k, v))):
            if t is None:
                out.append(x.new_zeros((kk,) + tuple(x.shape)))
            else:
                t = self._four(t, True)
                out.append((expand_heads(t, self.groups) if i else t).contiguous())
        return out

    def jvp(self, saved, tangents):
        q, k, v, bias, o, lse = saved
        rq, rk, rv = self._tangents(saved, tangents)
        ro, rho = ops.attention_rforward(q, k, v, bias, o, lse, rq, rk, rv, self.causal, self.scale)
        return self._back(ro, True), (rq, rk, rv, ro, rho)

    def rvjp(self, saved, rsaved, g, rg, need):
        q, k, v, bias, o, lse = saved
        rq, rk, rv, ro, rho = rsaved
        rg4 = self._four(rg, True).contiguous() if rg is not None else None
        grads = ops.attention_rbackward(q, k, v, bias, o, lse, self._four(g).contiguous(), rq, rk, rv, ro, rho, rg4,
                                        self.causal, self.scale)
        return [self._back(t, True) if wanted else None for t, wanted in zip(self._grouped(grads), need)]


def attention_rule(node, carries):
    """The fused kernels' rule, or the materialized one when the additive mask depends on θ (a learned bias)."""
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) and carries(mask):
        return BiasedAttention(node)
    return Attention(node)


RULES = {aten.scaled_dot_product_attention.default: attention_rule}
