"""L-BFGS-B's subspace minimization: the direct primal method with Morales & Nocedal's projection.

From the Cauchy point x^c, the free variables Z move to minimize the model
m(x) = gᵀ(x − x_k) + ½ (x − x_k)ᵀB(x − x_k) with the active ones held (Byrd, Lu, Nocedal & Zhu 1995, Section 5.1). Its
unconstrained minimizer over Z is x^c + d with the reduced gradient r = −Zᵀ(g + B(x^c − x_k)) and

    d = (1/θ) r + (1/θ²) ZᵀW K⁻¹ WᵀZ r,                                (Morales & Nocedal 2011)

K being the 2c × 2c system factored by :meth:`CompactLbfgs.factor_subspace`. Morales & Nocedal's remark
then projects x^c + d onto the box, and keeps the projection when it still descends (gᵀ(P(x^c + d) − x_k)
≤ 0); otherwise it steps from x^c along d only as far as the box allows (the original code's rule).

Everything is an n-vector operation masked to the free set; only WᵀZr and K⁻¹ are 2c-sized.
"""

from __future__ import annotations

import torch

from ._cauchy import CauchyPoint
from ._compact_bfgs import CompactLbfgs


def subspace_minimum(
    x: torch.Tensor,
    g: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    cauchy: CauchyPoint,
    bfgs: CompactLbfgs,
) -> torch.Tensor | None:
    """The point the line search aims at (scipy's ``cmprlb`` and ``subsm``), or None when K cannot be
    factored (the caller then resets the memory, as scipy does)."""
    free, z = cauchy.free, cauchy.x
    if not bfgs.factor_subspace(free):
        return None
    theta = bfgs.theta
    on_free = free.to(x.dtype)  # a 0/1 mask: cheaper than torch.where on the CPU, and exact
    # r = −θ(x^c − x) − g + W M c on the free variables (B = θI − W M Wᵀ, c = Wᵀ(x^c − x))
    reduced = (-theta * (z - x) - g + bfgs.times(bfgs.middle @ cauchy.c)) * on_free
    weights = bfgs.solve_subspace(bfgs.transpose_times(reduced))
    newton = (reduced + bfgs.times(weights / theta)) * (on_free / theta)

    projected = torch.clamp(z + newton, lower, upper)  # z itself off the free set, where the step is 0
    touches = free & ((projected == lower) | (projected == upper))
    if not bool(touches.any()):
        return projected
    if float(torch.dot(projected - x, g)) <= 0:
        return projected  # the projected Newton point still descends

    # otherwise the longest step α ≤ 1 from x^c along d that stays in the box; the variable that
    # limits it lands exactly on its bound
    gap = torch.where(newton < 0, lower - z, upper - z)
    blocked = ((newton < 0) & (gap >= 0)) | ((newton > 0) & (gap <= 0))
    ratio = torch.where(blocked, torch.zeros_like(x), gap / newton)
    ratio = torch.where(free & (newton != 0), ratio, torch.full_like(x, torch.inf))
    limiting = int(torch.argmin(ratio))  # the first of equal ratios, as scipy's loop takes it
    alpha = float(ratio[limiting])
    target = z.clone()
    if alpha < 1.0:
        target[limiting] = upper[limiting] if newton[limiting] > 0 else lower[limiting]
        newton[limiting] = 0.0
    else:
        alpha = 1.0
    return torch.where(free, target + alpha * newton, target)
