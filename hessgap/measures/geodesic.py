"""Geodesic sharpness: the largest loss rise over a geodesic ball of the quotient of parameter space by the
network's symmetries (da Silva, Dangel & Oore, ICML 2025, "Hide & Seek: Transformer Symmetries Obscure
Sharpness & Riemannian Geometry Finds It"): transformers' attention heads have a GL(h) symmetry per head
(:mod:`.attention`), along which plain and even adaptive sharpness change while the function does not.

    S_geo(ρ) = max { f(γ_ξ(1)) − f(θ) : ξ horizontal, ‖ξ‖_θ ≤ ρ }

with γ_ξ the geodesic from θ with velocity ξ, approximated to second order, γ_ξ(1) ≈ θ + ξ − ½Γ_θ(ξ, ξ)
(first order gives the adaptive sharpness; da Silva et al. show the second-order term matters). The metric:

- on each head's pair (G, H) (query/key or value/output blocks, :mod:`.attention`): the GL(h)-invariant
  metric of fixed-rank factorizations (Mishra, Meyer, Bonnabel & Sepulchre 2014)
  g(ξ, η) = tr(HᵀH·ξ_Gᵀη_G) + tr(GᵀG·ξ_Hᵀη_H), divided by the invariant c = ‖GHᵀ‖²_F / (h·√(k_G·k_H)) (k the
  blocks' rows) so that the ball is in about the units of the adaptive part: entries' moves relative to
  their size. Its horizontal space (orthogonal to the orbit
  directions (GΩ, −HΩᵀ)) has a closed-form projection, Ω = ½(ξ_GᵀG(GᵀG)⁻¹ − (HᵀH)⁻¹Hᵀξ_H)ᵀ; its geodesic
  equation (Euler–Lagrange) G̈ = [G·ḢᵀḢ − Ġ(ḢᵀH + HᵀḢ)](HᵀH)⁻¹ and the same with G and H exchanged gives
  the second-order term;
- on every other parameter: the scale-invariant metric Σ ξ_i²/θ_i² of adaptive sharpness (the GL(1)
  symmetry of ReLU and normalization rescalings), whose geodesic θ·exp(ξ/θ) is θ + ξ + ξ²/(2θ) to second
  order; parameters at 0 stay at 0.

The maximum is found by normalized gradient ascent in coordinates where the metric is Euclidean, projected
on the horizontal space and the ball, from a random horizontal start drawn equivariantly (ξ_G = Z·G, ξ_i =
θ_i·z_i): each step commutes with the symmetries, so the value is invariant under them up to rounding,
which the invariance check verifies on the rescaled copies. Where this implementation's choices may differ
from da Silva et al.'s: the metric's normalization c, the solver (steps, start) and ρ.
"""

from __future__ import annotations

import torch

from .. import _checks
from .._state import preserved
from .attention import block, covered, find_heads, write_block
from .context import Context, Outcome

DEFAULT_RHO = 0.1
DEFAULT_STEPS = 10
_RIDGE = 1e-10  # keeps a rank-deficient head's Gram matrices invertible


class _Pair:
    """One head's (G, H) at θ with what the metric needs: Gram matrices, their inverses and square roots."""

    def __init__(self, pair, params: dict):
        self.pair = pair
        self.g, self.h = block(params, pair.g).detach().double(), block(params, pair.h).detach().double()
        width = self.g.shape[1]
        eye = torch.eye(width, dtype=torch.float64, device=self.g.device)
        sg, sh = self.g.T @ self.g, self.h.T @ self.h
        sg = sg + _RIDGE * float(sg.trace()) / width * eye
        sh = sh + _RIDGE * float(sh.trace()) / width * eye
        self.sg_inv, self.sh_inv = torch.linalg.inv(sg), torch.linalg.inv(sh)
        # ‖GHᵀ‖²_F ≈ ‖G‖²‖H‖²/h for generic blocks: this c makes ‖u‖ about the root-sum-square of the
        # entries' relative moves, the units of the element-wise (adaptive) part
        self.c = float((self.g @ self.h.T).square().sum()) / (width * (self.g.shape[0] * self.h.shape[0]) ** 0.5)
        self.sg_half, self.sg_half_inv = _sqrt_pair(sg)
        self.sh_half, self.sh_half_inv = _sqrt_pair(sh)

    def xi(self, ug, uh):
        """u (Euclidean coordinates) → the tangent vector ξ = (ξ_G, ξ_H)."""
        s = self.c ** 0.5
        return ug @ self.sh_half_inv * s, uh @ self.sg_half_inv * s

    def u(self, xg, xh):
        s = self.c ** 0.5
        return xg @ self.sh_half / s, xh @ self.sg_half / s

    def horizontal(self, ug, uh):
        """The metric's orthogonal projection of u on the horizontal space (closed form, see the docstring)."""
        xg, xh = self.xi(ug, uh)
        omega = 0.5 * (xg.T @ self.g @ self.sg_inv - self.sh_inv @ self.h.T @ xh).T
        return self.u(xg - self.g @ omega, xh + self.h @ omega.T)

    def geodesic(self, ug, uh):
        """G and H moved along the second-order geodesic with velocity ξ(u)."""
        xg, xh = self.xi(ug, uh)
        g, h = self.g.to(ug.dtype), self.h.to(ug.dtype)
        gg = (g @ (xh.T @ xh) - xg @ (xh.T @ h + h.T @ xh)) @ self.sh_inv.to(ug.dtype)
        hh = (h @ (xg.T @ xg) - xh @ (xg.T @ g + g.T @ xg)) @ self.sg_inv.to(ug.dtype)
        return g + xg + 0.5 * gg, h + xh + 0.5 * hh


def _sqrt_pair(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(s)
    values = values.clamp_min(1e-300)
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


class _Geometry:
    """The quotient geometry at the model's weights θ: which entries each head pair holds, the rest taken
    element-wise."""

    def __init__(self, ctx: Context):
        self.names = [n for n, p in ctx.model.named_parameters() if p.requires_grad]
        params = dict(ctx.model.named_parameters())
        self.theta = {n: params[n].detach().double() for n in self.names}
        heads, self.notes = find_heads(ctx.model)
        self.pairs = [_Pair(pair, self.theta) for pair in heads]
        masks = covered(ctx.model, heads)
        self.elementwise = {n: ~masks[n] for n in self.names}

    def project(self, u: dict) -> dict:
        """Horizontal projection of u (the element-wise part has no vertical directions)."""
        out = {n: t.clone() for n, t in u.items()}
        for p in self.pairs:
            ug, uh = p.horizontal(block(u, p.pair.g), block(u, p.pair.h))
            write_block(out, p.pair.g, ug)
            write_block(out, p.pair.h, uh)
        return out

    def moved(self, u: dict) -> dict:
        """θ moved along the second-order geodesic with velocity ξ(u): a differentiable function of u."""
        out = {}
        for n in self.names:
            theta = self.theta[n]
            moved = theta * (1 + torch.sign(theta) * u[n] + 0.5 * u[n] ** 2)
            out[n] = torch.where(self.elementwise[n], moved, theta)
        for p in self.pairs:
            g, h = p.geodesic(block(u, p.pair.g), block(u, p.pair.h))
            write_block(out, p.pair.g, g)
            write_block(out, p.pair.h, h)
        return out

    def start(self, generator: torch.Generator) -> dict:
        """A random direction drawn equivariantly: ξ_i = θ_i z_i element-wise (u_i = sign(θ_i) z_i), and
        ξ_G = Z·G, ξ_H = Z′·H on each head (Z, Z′ square Gaussian)."""
        device = generator.device
        u = {n: torch.sign(t) * torch.randn(t.shape, generator=generator, dtype=t.dtype, device=device).to(t.device)
             * self.elementwise[n] for n, t in self.theta.items()}
        for p in self.pairs:
            rows_g, rows_h = p.g.shape[0], p.h.shape[0]
            zg = torch.randn(rows_g, rows_g, generator=generator, dtype=torch.float64, device=device).to(p.g.device)
            zh = torch.randn(rows_h, rows_h, generator=generator, dtype=torch.float64, device=device).to(p.h.device)
            ug, uh = p.u(zg @ p.g, zh @ p.h)
            write_block(u, p.pair.g, ug)
            write_block(u, p.pair.h, uh)
        return self.project(u)


def _norm(u: dict) -> float:
    return float(sum(t.square().sum() for t in u.values())) ** 0.5


def _scaled(u: dict, factor: float) -> dict:
    return {n: t * factor for n, t in u.items()}


def geodesic_sharpness(ctx: Context, rho: float = DEFAULT_RHO, steps: int = DEFAULT_STEPS) -> Outcome:
    """S_geo(ρ) of the module docstring, by ``steps`` projected gradient-ascent steps from a random start."""
    rho = _checks.positive_number(rho, "rho", "the radius of the geodesic ball")
    steps = _checks.nonnegative_int(steps, "steps", "the gradient-ascent steps")
    notes = []
    if ctx.half_precision:
        notes.append(f"measured on a float32 copy of the {str(ctx.dtype).replace('torch.', '')} model")
        ctx = ctx.in_float32()
    geometry = _Geometry(ctx)
    objective = ctx.objective()
    dtype = next(iter(geometry.theta.values())).dtype

    def value_and_grad(u: dict) -> tuple[float, dict]:
        leaves = {n: t.detach().requires_grad_(True) for n, t in u.items()}
        total, weight = 0.0, 0.0
        grads = {n: torch.zeros_like(t) for n, t in leaves.items()}
        for batch in objective.batches():
            moved = geometry.moved(leaves)
            params = {n: moved[n].to(p.dtype) for n, p in zip(objective.names, objective.params)}
            loss = objective.batch_loss(batch, params)
            for n, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)):
                if g is not None:
                    grads[n].add_(g.to(dtype), alpha=batch.weight)
            total += float(loss.detach()) * batch.weight
            weight += batch.weight
        summed = list(grads.values()) + [torch.tensor([total, weight], dtype=dtype, device=next(iter(grads.values())).device)]
        ctx.ranks.sum_bucket_(summed)
        total, weight = summed[-1].tolist()
        return total / weight, {n: g / weight for n, g in grads.items()}

    with preserved(ctx.model, train_mode=False, parameters=False):
        loss0 = objective.value()
        u = geometry.start(ctx.generator(salt=31))
        u = _scaled(u, rho / max(_norm(u), 1e-300))
        best, history = -float("inf"), []
        for _ in range(steps + 1):
            value, grad = value_and_grad(u)
            history.append(value - loss0)
            best = max(best, value)
            grad = geometry.project(grad)
            length = _norm(grad)
            if length == 0:
                break
            u = geometry.project({n: u[n] + (rho / 2) * grad[n] / length for n in u})
            size = _norm(u)
            if size > rho:
                u = _scaled(u, rho / size)
    heads = len(geometry.pairs)
    notes += geometry.notes
    return Outcome(best - loss0, None, details={
        "loss": loss0, "rises": history, "head_pairs": heads,
        "qk_pairs": sum(p.pair.kind == "qk" for p in geometry.pairs)}, notes=notes)
