"""The rule of ``scaled_dot_product_attention``: causal, masked (boolean or additive mask that does not depend
on θ) or plain (:mod:`hessgap.ops.attention_rop`: on CPU by BLAS on score tiles within the engine's memory
budget, else streaming; never the T×T matrix per direction)."""

from __future__ import annotations

import torch
from torch import fx

from ....ops import attention_rop as ops
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
        if kw.get("enable_gqa", False):
            q, k = (self.arg_meta(i).shape for i in (0, 1))
            if len(q) < 3 or q[-3] != k[-3]:
                raise GraphUnsupported(f"{self.describe()} with grouped-query heads (enable_gqa)")
        shapes = [tuple(self.arg_meta(i).shape) for i in range(3)]
        if any(len(s) not in (3, 4) for s in shapes) or shapes[0][:-2] != shapes[1][:-2] or shapes[1][:-2] != shapes[2][:-2]:
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
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if isinstance(self.mask, fx.Node) and mask is None:
            mask = kwargs.get("attn_mask")
        bias = self._bias(mask, q, k)
        o, lse = ops.attention_forward(q, k, v, bias, self.causal, self.scale)
        return self._back(o), (q, k, v, bias, o, lse)

    def vjp(self, saved, g, need):
        q, k, v, bias, o, lse = saved
        grads = ops.attention_backward(q, k, v, bias, o, lse, self._four(g).contiguous(), self.causal, self.scale)
        return [self._back(t) if wanted else None for t, wanted in zip(grads, need)]

    def _tangents(self, saved, tangents):
        q, k, v = saved[:3]
        kk = next(t.shape[0] for t in tangents if t is not None)
        return [self._four(t, True).contiguous() if t is not None else x.new_zeros((kk,) + tuple(x.shape))
                for t, x in zip(tangents, (q, k, v))]

    def jvp(self, saved, tangents):
        q, k, v, bias, o, lse = saved
        rq, rk, rv = self._tangents(saved, tangents)
        ro, rho = ops.attention_rforward(q, k, v, bias, o, lse, rq, rk, rv, self.causal, self.scale,
                                         memory_budget=self.memory_budget)
        return self._back(ro, True), (rq, rk, rv, ro, rho)

    def rvjp(self, saved, rsaved, g, rg, need):
        q, k, v, bias, o, lse = saved
        rq, rk, rv, ro, rho = rsaved
        rg4 = self._four(rg, True).contiguous() if rg is not None else None
        grads = ops.attention_rbackward(q, k, v, bias, o, lse, self._four(g).contiguous(), rq, rk, rv, ro, rho, rg4,
                                        self.causal, self.scale, memory_budget=self.memory_budget)
        return [self._back(t, True) if wanted else None for t, wanted in zip(grads, need)]


RULES = {aten.scaled_dot_product_attention.default: Attention}
