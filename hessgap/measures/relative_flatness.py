"""Relative flatness (Petzka et al. 2021, "Relative flatness and generalization", Definition 3, the trace
form κ^φ_Tr):

    κ_Tr(W) = Σ_{s,s'=1}^{d} ⟨w_s, w_s'⟩ · Tr(H_{s,s'}(W))

W ∈ R^{d×m} the weights of the last linear layer (mapping the penultimate representation φ(x) ∈ R^m to d
outputs), w_s its rows, H_{s,s'} the m × m block of the training loss's Hessian with respect to w_s and w_s'.
Rescaling φ by λ > 0 and W by 1/λ (a ReLU or BatchNorm layer before it allows exactly that) leaves κ_Tr
unchanged: the Gram matrix scales by λ⁻², the Hessian by λ².

Estimated without forming any block: with G = WWᵀ = Σ_k λ_k q_k q_kᵀ and a Rademacher vector u ∈ R^m,
Σ_k λ_k (q_k ⊗ u)ᵀ H (q_k ⊗ u) = Σ_{s,s'} G_{ss'} uᵀ H_{ss'} u, whose expectation over u is κ_Tr. Every probe
u takes d Hessian-vector products, all probes in one batched pass over the data restricted to W
(``params=``). ``form="simple"`` gives the cruder ‖W‖²_F · Tr(H_W) (a bound-like simplification used in
follow-up work), by Hutchinson on the same operator.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _checks
from ..curvature.operator import HessianOperator
from .average_case import mean_and_stderr
from .context import Context, NotApplicable, Outcome

DEFAULT_PROBES = 16
FORMS = ("petzka", "simple")


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` of the model (in module order): the layer from the penultimate representation
    to the outputs."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise NotApplicable("it is taken over the weights of the last linear layer, and the model has no nn.Linear")
    name, layer = found[-1]
    if not layer.weight.requires_grad:
        raise NotApplicable(f"the last linear layer ({name}) is frozen (requires_grad=False)")
    return name, layer


def _rademacher(count: int, size: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    signs = torch.randint(0, 2, (count, size), generator=generator, device=like.device)
    return signs.to(like.dtype).mul_(2).sub_(1)


def relative_flatness(ctx: Context, probes: int = DEFAULT_PROBES, form: str = "petzka") -> Outcome:
    """κ_Tr of the last linear layer (``form="petzka"``) or ‖W‖²_F·Tr(H_W) (``"simple"``), with the standard
    error over the Hutchinson probes."""
    _checks.positive_int(probes, "probes", "Hutchinson probes")
    if form not in FORMS:
        raise NotApplicable(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
    name, layer = last_linear(ctx.model)
    weight = layer.weight
    # the generic path: the fused engine's plan does not take a params= subset of a model's trainable weights
    operator = HessianOperator(ctx.model, ctx.batches, loss_fn=ctx.loss_fn, params=[weight], cache_batches=True,
                               path="generic")
    W = weight.detach().to(operator.dtype)
    d, m = W.shape
    generator = ctx.generator(salt=7)
    if form == "simple":
        Z = _rademacher(probes, d * m, generator, W)
        HZ = operator.matmat(Z)
        norm = float(W.double().pow(2).sum())
        estimates = [norm * float(torch.dot(z.double(), hz.double())) for z, hz in zip(Z, HZ)]
    else:
        lam, Q = torch.linalg.eigh(W.double() @ W.double().T)  # G = Q diag(λ) Qᵀ, columns q_k
        lam = lam.clamp_min(0)
        U = _rademacher(probes, m, generator, W)
        V = torch.einsum("sk,pj->pksj", Q.to(W.dtype), U).reshape(probes * d, d * m)  # rows q_k ⊗ u_p
        HV = operator.matmat(V)
        quad = (V.double() * HV.double()).sum(1).reshape(probes, d)  # (q_k ⊗ u_p)ᵀ H (q_k ⊗ u_p)
        estimates = (quad @ lam).tolist()
    value, stderr = mean_and_stderr(estimates)
    if not math.isfinite(value):
        raise NotApplicable("the estimate is not finite")
    return Outcome(value, stderr, details={"layer": name, "shape": [d, m], "probes": probes, "form": form,
                                           "hvps": operator.hvps, "path": operator.path})
