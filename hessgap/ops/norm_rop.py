"""The row-wise second-order pieces of LayerNorm, RMSNorm and GroupNorm for k directions,
``torch.ops.hessgap.norm_*``, and their plain-PyTorch twins.

A row is what one set of statistics normalizes: x̂ = (x − μ)·r, r = 1/√(var + ε) (``center=False``, RMSNorm:
μ = 0 and var = mean(x²)). With ``a`` = ∂L/∂x̂ for one batch and R{·} the directional derivative along k
directions (tensors with a leading k), per row:

    norm_backward(x̂, r, a)                  g_x = r·(a − [mean a] − x̂·mean(a x̂))
    norm_rforward(x̂, r, rx)                 m1 = mean(x̂ R{x}),  R{x̂} = r·(R{x} − [mean R{x}] − x̂·m1)
    norm_rbackward(x̂, r, a, ra, R{x̂}, m1)   R{g_x} = r·R{c} − r²·m1·c, with c = a − [mean a] − x̂·mean(a x̂) and
                                            R{c} = ra − [mean ra] − R{x̂}·mean(a x̂) − x̂·(mean(ra x̂) + mean(a R{x̂}))

(brackets: only when ``center``). Shapes: x̂, a (rows, D); r (rows,); rx, ra, R{x̂} (k, rows, D); m1 (k, rows).
The compiled kernels keep one row in cache while the k directions stream through it: a few passes over
each direction's row instead of the dozen a composition of tensor ops makes.
"""

from __future__ import annotations

import torch

from .. import _extension
from ._precision import in_float32


def _ops():
    _extension.require()
    return torch.ops.hessgap


def norm_backward(xhat: torch.Tensor, rstd: torch.Tensor, a: torch.Tensor, center: bool) -> torch.Tensor:
    """First-order gradient of the rows' input (once per batch: plain tensor ops)."""
    c = a - xhat * (a * xhat).mean(-1, keepdim=True)
    if center:
        c = c - a.mean(-1, keepdim=True)
    return c * rstd.unsqueeze(-1)


def norm_rforward(xhat, rstd, rx, center: bool):
    """(R{x̂}, m1) for the k directions ``rx``, by the compiled kernel."""
    return in_float32(_ops().norm_rforward.default, xhat, rstd, rx, bool(center), keep=(1,))


def norm_rbackward(xhat, rstd, a, ra, rxhat, m1, center: bool):
    """R{g_x} for the k directions, by the compiled kernel."""
    return in_float32(_ops().norm_rbackward.default, xhat, rstd, a, ra, rxhat, m1, bool(center))


# ---- plain-PyTorch twins -------------------------------------------------------------------------------


def norm_rforward_reference(xhat, rstd, rx, center: bool):
    m1 = (xhat.unsqueeze(0) * rx).mean(-1)
    centred = rx - rx.mean(-1, keepdim=True) if center else rx
    rxhat = rstd.unsqueeze(-1) * (centred - xhat.unsqueeze(0) * m1.unsqueeze(-1))
    return rxhat, m1


def norm_rbackward_reference(xhat, rstd, a, ra, rxhat, m1, center: bool):
    r = rstd.unsqueeze(-1)
    ax = (a * xhat).mean(-1, keepdim=True)
    c = a - xhat * ax
    rc = ra - rxhat * ax - xhat * ((ra * xhat).mean(-1, keepdim=True) + (a * rxhat).mean(-1, keepdim=True))
    if center:
        c = c - a.mean(-1, keepdim=True)
        rc = rc - ra.mean(-1, keepdim=True)
    return r * rc - (r * r) * m1.unsqueeze(-1) * c


# ---- fake kernels (shape only), registered when the build is there --------------------------------------

if _extension.available() and hasattr(torch.ops.hessgap, "norm_rforward"):

    @torch.library.register_fake("hessgap::norm_rforward")
    def _norm_rforward_fake(xhat, rstd, rx, center):
        torch._check(rx.dim() == 3 and xhat.dim() == 2, lambda: "rx must be (k, rows, D), xhat (rows, D)")
        return torch.empty_like(rx, memory_format=torch.contiguous_format), rx.new_empty(rx.shape[:2])

    @torch.library.register_fake("hessgap::norm_rbackward")
    def _norm_rbackward_fake(xhat, rstd, a, ra, rxhat, m1, center):
        torch._check(ra.dim() == 3 and xhat.dim() == 2, lambda: "ra must be (k, rows, D), xhat (rows, D)")
        return torch.empty_like(ra, memory_format=torch.contiguous_format)
