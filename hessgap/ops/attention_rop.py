"""Softmax attention and its R-operator for k directions, ``torch.ops.hessgap.attention_*``, and their twins.

O = softmax(S)·V with S = scale·Q Kᵀ + bias (−∞ above the diagonal when ``causal``), per (batch, head).
P = softmax(S) is never stored: each op recomputes its tiles from Q, K and the rows' log-sum-exp ``lse``
(flash-style), so the memory beyond the inputs and outputs is O(T) per direction, never T×T.

    attention_forward(q, k, v, bias, causal, scale)            (O, lse)
    attention_backward(q, k, v, bias, o, lse, g, ...)           (∂/∂Q, ∂/∂K, ∂/∂V) of ⟨g, O⟩
    attention_rforward(q, k, v, bias, o, lse, rq, rk, rv, ...)  (R{O}, ρ), ρ = rowsum(P ⊙ R{S})
    attention_rbackward(..., g, rq, rk, rv, ro, rho, rg, ...)   R{∂/∂Q}, R{∂/∂K}, R{∂/∂V}

q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv); bias None or broadcastable to (B, H, Tq, Tk) (additive,
−∞ masks out); lse (B, H, Tq); tangents rq, rk, rv, rg, ro have a leading k. A row whose every key is masked
gives O = 0 and zero gradients (as PyTorch's math attention does).

The R-ops take ``memory_budget`` (bytes): on CPU, when one head's smallest tile of scores fits it, they run on
materialized score tiles with BLAS (:mod:`hessgap.ops.attention_tiles`: several times faster at T = 128–256);
without a budget, beyond it and on CUDA the streaming kernels run.

With D = ∂L/∂O = g and δ = rowsum(g ⊙ O): dP = g Vᵀ, dS = P ⊙ (dP − δ), and for the directions
R{S} = scale·(R{Q} Kᵀ + Q R{K}ᵀ), R{P} = P ⊙ (R{S} − ρ), R{O} = R{P} V + P R{V},
R{dS} = R{P} ⊙ (dP − δ) + P ⊙ (R{dP} − R{δ}), R{dP} = R{g} Vᵀ + g R{V}ᵀ, R{δ} = rowsum(R{g} ⊙ O + g ⊙ R{O}).
"""

from __future__ import annotations

import math

import torch

from .. import _extension
from . import attention_tiles as tiles
from ._precision import in_float32


def _ops():
    _extension.require()
    return torch.ops.hessgap


def attention_forward(q, k, v, bias, causal: bool, scale: float):
    return in_float32(_ops().attention_forward.default, q, k, v, bias, bool(causal), float(scale), keep=(1,))


def attention_backward(q, k, v, bias, o, lse, g, causal: bool, scale: float):
    return in_float32(_ops().attention_backward.default, q, k, v, bias, o, lse, g, bool(causal), float(scale))


def _tile_plan(q, k, memory_budget):
    """How the BLAS path cuts the heads and queries, or None for the streaming kernel (CUDA, no budget, or
    one head's smallest tile over the budget)."""
    if (memory_budget is None or q.device.type != "cpu" or q.dim() != 4 or k.dim() != 4
            or q.dtype not in (torch.float32, torch.float64)):
        return None
    B, H, Tq, _ = q.shape
    return tiles.plan(B, H, Tq, k.shape[2], q.element_size(), memory_budget)


def attention_rforward(q, k, v, bias, o, lse, rq, rk, rv, causal: bool, scale: float, memory_budget: int | None = None):
    cut = _tile_plan(q, k, memory_budget)
    if cut is not None:
        return tiles.rforward(q, k, v, bias, o, lse, rq, rk, rv, bool(causal), float(scale), cut)
    return in_float32(_ops().attention_rforward.default, q, k, v, bias, o, lse, rq, rk, rv, bool(causal), float(scale),
                      keep=(1,))


def attention_rbackward(q, k, v, bias, o, lse, g, rq, rk, rv, ro, rho, rg, causal: bool, scale: float,
                        memory_budget: int | None = None):
    cut = _tile_plan(q, k, memory_budget)
    if cut is not None:
        return tiles.rbackward(q, k, v, bias, o, lse, g, rq, rk, rv, ro, rho, rg, bool(causal), float(scale), cut)
    return in_float32(_ops().attention_rbackward.default, q, k, v, bias, o, lse, g, rq, rk, rv, ro, rho, rg,
                      bool(causal), float(scale))


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ---- plain-PyTorch twins: the full T×T matrices per direction -----------------------------------------


def _scores(q, k, bias, causal, scale):
    s = scale * (q @ k.transpose(-1, -2))
    if bias is not None:
        s = s + bias
    if causal:
        tq, tk = s.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    return s


def _probabilities(s, lse):
    finite = torch.isfinite(lse).unsqueeze(-1)
    return torch.where(finite, torch.exp(s - torch.where(finite, lse.unsqueeze(-1), 0.0)), 0.0)


def attention_forward_reference(q, k, v, bias, causal, scale):
    s = _scores(q, k, bias, causal, scale)
    lse = torch.logsumexp(s, -1)
    p = _probabilities(s, lse)
    return p @ v, lse


def attention_backward_reference(q, k, v, bias, o, lse, g, causal, scale):
    p = _probabilities(_scores(q, k, bias, causal, scale), lse)
    dv = p.transpose(-1, -2) @ g
    dp = g @ v.transpose(-1, -2)
    delta = (g * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    return scale * ds @ k, scale * ds.transpose(-1, -2) @ q, dv


def _rp(q, k, p, rq, rk, scale):
    rs = scale * (rq @ k.transpose(-1, -2) + q @ rk.transpose(-1, -2))
    rs = torch.where(p > 0, rs, 0.0)  # masked entries: P = 0, and R{S} there must not turn into NaN
    rho = (p * rs).sum(-1)
    return p * (rs - rho.unsqueeze(-1)), rho


def attention_rforward_reference(q, k, v, bias, o, lse, rq, rk, rv, causal, scale):
    p = _probabilities(_scores(q, k, bias, causal, scale), lse)
    rp, rho = _rp(q, k, p, rq, rk, scale)
    return rp @ v + p @ rv, rho


def attention_rbackward_reference(q, k, v, bias, o, lse, g, rq, rk, rv, ro, rho, rg, causal, scale):
    p = _probabilities(_scores(q, k, bias, causal, scale), lse)
    rp, _ = _rp(q, k, p, rq, rk, scale)
    r_dq, r_dk, r_dv, _ = rbackward_from_probabilities(q, k, v, p, o, g, rq, rk, rv, rp, ro, rg, scale)
    return r_dq, r_dk, r_dv


def rbackward_from_probabilities(q, k, v, p, o, g, rq, rk, rv, rp, ro, rg, scale):
    """R{∂L/∂q}, R{∂L/∂k}, R{∂L/∂v} and R{∂L/∂S} (the scores') of attention given its probabilities ``p`` and their
    tangent ``rp``, materialized: the twin above, and the rule of attention with a learned bias."""
    dp = g @ v.transpose(-1, -2)
    delta = (g * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    r_dp = g @ rv.transpose(-1, -2)
    r_delta = (g * ro).sum(-1, keepdim=True)
    r_dv = rp.transpose(-1, -2) @ g
    if rg is not None:
        r_dp = r_dp + rg @ v.transpose(-1, -2)
        r_delta = r_delta + (rg * o).sum(-1, keepdim=True)
        r_dv = r_dv + p.transpose(-1, -2) @ rg
    r_ds = rp * (dp - delta) + p * (r_dp - r_delta)
    r_dq = scale * (r_ds @ k + ds @ rk)
    r_dk = scale * (r_ds.transpose(-1, -2) @ q + ds.transpose(-1, -2) @ rq)
    return r_dq, r_dk, r_dv, r_ds


# ---- fake kernels (shape only), registered when the build is there --------------------------------------

if _extension.available() and hasattr(torch.ops.hessgap, "attention_forward"):

    @torch.library.register_fake("hessgap::attention_forward")
    def _forward_fake(q, k, v, bias, causal, scale):
        torch._check(q.dim() == 4, lambda: "q must be (batch, heads, Tq, D)")
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        return out, q.new_empty(q.shape[:-1])

    @torch.library.register_fake("hessgap::attention_backward")
    def _backward_fake(q, k, v, bias, o, lse, g, causal, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("hessgap::attention_rforward")
    def _rforward_fake(q, k, v, bias, o, lse, rq, rk, rv, causal, scale):
        torch._check(rq.dim() == 5, lambda: "rq must be (k, batch, heads, Tq, D)")
        return rq.new_empty(rq.shape[:-1] + v.shape[-1:]), rq.new_empty(rq.shape[:-1])

    @torch.library.register_fake("hessgap::attention_rbackward")
    def _rbackward_fake(q, k, v, bias, o, lse, g, rq, rk, rv, ro, rho, rg, causal, scale):
        return torch.empty_like(rq), torch.empty_like(rk), torch.empty_like(rv)
