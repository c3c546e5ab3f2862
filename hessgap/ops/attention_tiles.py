"""Softmax attention's R-forward and R-backward for k directions by BLAS on materialized score tiles (CPU).

The same results as ``torch.ops.hessgap.attention_rforward`` / ``attention_rbackward`` (math and shapes:
:mod:`hessgap.ops.attention_rop`), computed with ``torch.bmm`` (MKL/OpenBLAS) instead of the streaming kernel's
scalar loops: for a group of heads and a block of queries the tile of P = exp(S − lse) against the keys the block
can see is built once and shared by the k directions, and every product is one batched GEMM over the group's
heads. At T = 128–256 the GEMMs run several times faster than the kernel's hand-vectorized loops.

Memory. A tile of n heads × bq queries × tk keys holds ``TILE_SLOTS`` such matrices at once (P, dP − δ, dS
shared by the directions; R{S}/R{P}, R{dP}/R{dS} and a product's result for the direction at hand: the
directions go one after another), so its working set is ``TILE_SLOTS · n · bq · tk · itemsize`` bytes,
independent of k. :func:`plan` cuts the heads and queries so that a tile stays within ``TILE_BYTES`` (a size that
stays in the caches) and gives up, returning None, when even one head's smallest block of queries against all
keys exceeds the caller's memory budget: the streaming kernel then runs, whose working set is linear in T.

Keys that no query of a block may see (causal attention, a causal or padding mask given as a bias) are left out
of the block's tile: their P is exactly 0, so the results are unchanged and masked work is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: matrices of one tile's size alive at once during the R-backward (the R-forward needs fewer)
TILE_SLOTS = 6
#: preferred bytes of one tile's working set: a group of heads and a block of queries are cut to fit it
TILE_BYTES = 4 * 1024**2
#: queries per block (fewer when the tile would exceed TILE_BYTES; never fewer than MIN_BLOCK)
QUERY_BLOCK = 128
MIN_BLOCK = 16


@dataclass(frozen=True)
class Plan:
    heads: int  # heads per group, a divisor of H, or batches of H heads (then ``heads`` is a multiple of H)
    block: int  # queries per block


def plan(B: int, H: int, Tq: int, Tk: int, itemsize: int, budget: int | None) -> Plan | None:
    """How to cut the (B·H heads, Tq queries) into tiles, or None when the smallest tile exceeds ``budget``."""
    per_row = TILE_SLOTS * Tk * itemsize  # bytes of one query row of one head
    smallest = min(Tq, MIN_BLOCK) * per_row
    if budget is None or smallest > budget:
        return None
    target = max(TILE_BYTES, smallest)
    block = max(min(Tq, MIN_BLOCK), min(Tq, QUERY_BLOCK, target // per_row))
    heads = max(1, target // (block * per_row))
    if heads >= H:
        heads = H * min(B, heads // H)
    else:
        while H % heads:
            heads -= 1
    return Plan(heads, block)


def _flat(t: torch.Tensor, lead: int = 0) -> torch.Tensor:
    """(..., B, H, T, D) -> (..., B·H, T, D)."""
    return t.reshape(t.shape[:lead] + (-1,) + t.shape[lead + 2:])


def _compact(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias with its broadcast (stride-0) batch and head dimensions cut to size 1: a view."""
    if bias is None:
        return None
    for dim in (0, 1):
        if bias.shape[dim] > 1 and bias.stride(dim) == 0:
            bias = bias.narrow(dim, 0, 1)
    return bias


class _Tiles:
    """The shared pieces of one call: flattened heads, pre-scaled operands, the bias and the tile plan."""

    def __init__(self, q, k, v, bias, lse, causal: bool, scale: float, cut: Plan):
        self.B, self.H, self.Tq, self.D = q.shape
        self.Tk = k.shape[2]
        self.causal, self.cut = causal, cut
        self.q, self.k, self.v = _flat(q), _flat(k), _flat(v)
        self.q_s, self.k_s = self.q * scale, self.k * scale  # scale folded into one operand of each product
        self.bias = _compact(bias)
        # exp(S − lse) must be 0 on a row whose every key is masked (lse = −∞): +∞ there does it
        self.lse = _flat(lse.unsqueeze(-1)).squeeze(-1).masked_fill(torch.isneginf(lse).reshape(-1, self.Tq),
                                                                     float("inf"))

    def tiles(self):
        """(n0, n1, i0, i1, j0, j1): heads [n0, n1), queries [i0, i1), and the keys [j0, j1) they may see."""
        heads, block, H = self.cut.heads, self.cut.block, self.H
        for n0 in range(0, self.B * H, heads):
            n1 = min(n0 + heads, self.B * H)
            for i0 in range(0, self.Tq, block):
                i1 = min(i0 + block, self.Tq)
                j0, j1 = self._keys(n0, n1, i0, i1)
                if j1 > j0:
                    yield n0, n1, i0, i1, j0, j1

    def _bias_block(self, n0, n1, i0, i1, j0, j1):
        """The bias of heads [n0, n1) (a run of whole batches, or heads of one batch), shaped (b, h, bq, tk)."""
        bias, H = self.bias, self.H
        b0, h0 = divmod(n0, H)
        if n1 - n0 >= H:
            rows = bias if bias.shape[0] == 1 else bias[b0 : b0 + (n1 - n0) // H]
            heads = rows
        else:
            rows = bias if bias.shape[0] == 1 else bias[b0 : b0 + 1]
            heads = rows if rows.shape[1] == 1 else rows[:, h0 : h0 + n1 - n0]
        return heads[:, :, i0:i1, j0:j1]

    def _keys(self, n0, n1, i0, i1):
        j0, j1 = 0, self.Tk
        if self.causal:
            j1 = min(j1, i1)  # key j is seen by query i when j ≤ i (PyTorch's top-left causal mask)
        if self.bias is not None and j1 > 0:
            seen = torch.isfinite(self._bias_block(n0, n1, i0, i1, 0, j1)).flatten(0, 2).any(0)
            if self.causal:
                seen = seen & (torch.arange(j1, device=seen.device) < i1)
            where = torch.nonzero(seen)
            if where.numel() == 0:
                return 0, 0
            j0, j1 = int(where[0]), int(where[-1]) + 1
        return j0, j1

    def probabilities(self, n0, n1, i0, i1, j0, j1) -> torch.Tensor:
        """P = exp(S − lse) of the tile, (n, bq, tk)."""
        p = torch.bmm(self.q_s[n0:n1, i0:i1], self.k[n0:n1, j0:j1].transpose(1, 2))
        if self.bias is not None:
            n, bq, tk = p.shape
            block = self._bias_block(n0, n1, i0, i1, j0, j1)
            heads = self.H if n >= self.H else n
            p.view(n // heads, heads, bq, tk).add_(block)
        if self.causal and j1 > i0 + 1:
            above = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=p.device).triu_(i0 + 1 - j0)
            p.masked_fill_(above, float("-inf"))
        return p.sub_(self.lse[n0:n1, i0:i1, None]).exp_()


def rforward(q, k, v, bias, o, lse, rq, rk, rv, causal: bool, scale: float, cut: Plan):
    """(R{O}, ρ) as ``attention_rforward`` gives them, by tiles (see the module docstring)."""
    t = _Tiles(q, k, v, bias, lse, causal, scale, cut)
    K = rq.shape[0]
    o3 = _flat(o)
    rq3, rk3, rv3 = (_flat(x, 1) for x in (rq, rk, rv))
    rq_s = rq3 * scale
    ro = torch.zeros((K,) + tuple(o3.shape), dtype=o.dtype, device=o.device)
    rho = torch.zeros((K,) + tuple(t.lse.shape), dtype=o.dtype, device=o.device)
    # Products land in fresh tensors and are then stored: an in-place batched GEMM into a strided slice of the
    # outputs copies that slice twice. A block of queries sees all of its keys in one tile: stored once.
    for n0, n1, i0, i1, j0, j1 in t.tiles():
        p = t.probabilities(n0, n1, i0, i1, j0, j1)
        kb, q_s, vb, ob = t.k[n0:n1, j0:j1], t.q_s[n0:n1, i0:i1], t.v[n0:n1, j0:j1], o3[n0:n1, i0:i1]
        for d in range(K):
            # P ⊙ R{S}, R{S} = scale·(R{Q} Kᵀ + Q R{K}ᵀ)
            rs = torch.bmm(rq_s[d, n0:n1, i0:i1], kb.transpose(1, 2))
            rs.baddbmm_(q_s, rk3[d, n0:n1, j0:j1].transpose(1, 2)).mul_(p)
            rho_b = rs.sum(-1, keepdim=True)
            # R{O} = P (R{S} − ρ) V + P R{V} = (P ⊙ R{S}) V + P R{V} − ρ·O
            out = torch.bmm(rs, vb).baddbmm_(p, rv3[d, n0:n1, j0:j1]).addcmul_(rho_b, ob, value=-1)
            ro[d, n0:n1, i0:i1] = out
            rho[d, n0:n1, i0:i1] = rho_b.squeeze(-1)
    return ro.reshape(rq.shape[:-1] + v.shape[-1:]), rho.reshape(rq.shape[:-1])


def rbackward(q, k, v, bias, o, lse, g, rq, rk, rv, ro, rho, rg, causal: bool, scale: float, cut: Plan):
    """R{∂/∂Q}, R{∂/∂K}, R{∂/∂V} as ``attention_rbackward`` gives them, by tiles."""
    t = _Tiles(q, k, v, bias, lse, causal, scale, cut)
    K = rq.shape[0]
    o3, g3 = _flat(o), _flat(g)
    rq3, rk3, rv3, ro3, rho3 = (_flat(x, 1) for x in (rq, rk, rv, ro, rho.unsqueeze(-1)))
    rg3 = _flat(rg, 1) if rg is not None else None
    delta = (g3 * o3).sum(-1, keepdim=True)  # δ = rowsum(g ⊙ O)
    r_delta = (ro3 * g3).sum(-1, keepdim=True)  # R{δ} = rowsum(R{g} ⊙ O + g ⊙ R{O})
    if rg3 is not None:
        r_delta += (rg3 * o3).sum(-1, keepdim=True)
    rq_s = rq3 * scale
    rdq, rdk, rdv = torch.zeros_like(rq3), torch.zeros_like(rk3), torch.zeros_like(rv3)
    for n0, n1, i0, i1, j0, j1 in t.tiles():
        p = t.probabilities(n0, n1, i0, i1, j0, j1)
        q_s, kb, k_s, vb = t.q_s[n0:n1, i0:i1], t.k[n0:n1, j0:j1], t.k_s[n0:n1, j0:j1], t.v[n0:n1, j0:j1]
        gb = g3[n0:n1, i0:i1]
        dp = torch.bmm(gb, vb.transpose(1, 2)).sub_(delta[n0:n1, i0:i1])  # dP − δ
        ds_s = (p * dp).mul_(scale)  # scale·dS, dS = P ⊙ (dP − δ)
        for d in range(K):
            rk_d, rv_d = rk3[d, n0:n1, j0:j1], rv3[d, n0:n1, j0:j1]
            # R{P} = P ⊙ (R{S} − ρ)
            rp = torch.bmm(rq_s[d, n0:n1, i0:i1], kb.transpose(1, 2)).baddbmm_(q_s, rk_d.transpose(1, 2))
            rp.sub_(rho3[d, n0:n1, i0:i1]).mul_(p)
            # R{dS} = R{P} ⊙ (dP − δ) + P ⊙ (R{dP} − R{δ}),  R{dP} = R{g} Vᵀ + g R{V}ᵀ
            rds = torch.bmm(gb, rv_d.transpose(1, 2))
            if rg3 is not None:
                rds.baddbmm_(rg3[d, n0:n1, i0:i1], vb.transpose(1, 2))
            rds.sub_(r_delta[d, n0:n1, i0:i1]).mul_(p).addcmul_(rp, dp)
            # R{dV} = R{P}ᵀ g + Pᵀ R{g}   (keys see several query blocks: added)
            out_v = torch.bmm(rp.transpose(1, 2), gb)
            if rg3 is not None:
                out_v.baddbmm_(p.transpose(1, 2), rg3[d, n0:n1, i0:i1])
            rdv[d, n0:n1, j0:j1] += out_v
            # R{dQ} = scale·(R{dS} K + dS R{K}) (complete: the tile holds all of the block's keys),
            # R{dK} = scale·(R{dS}ᵀ Q + dSᵀ R{Q})
            rdq[d, n0:n1, i0:i1] = torch.bmm(rds, k_s).baddbmm_(ds_s, rk_d)
            rdk[d, n0:n1, j0:j1] += torch.bmm(rds.transpose(1, 2), q_s).baddbmm_(ds_s.transpose(1, 2),
                                                                               rq3[d, n0:n1, i0:i1])
    return rdq.reshape(rq.shape), rdk.reshape(rk.shape), rdv.reshape(rv.shape)
